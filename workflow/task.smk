# The workflow of one task (config `task`): every stage's rules. The Snakefile includes it once,
# or, with `tasks: [a, b, ...]`, loads it as a module once per task.


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/data.smk"
include: "rules/sft.smk"
include: "rules/cache.smk"
include: "rules/ioa.smk"
include: "rules/distill.smk"
include: "rules/evaluate.smk"
