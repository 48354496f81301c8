# The workflow of one task (config `task`): every stage's rules, one file per stage named as its
# `scd-pipeline` command. The Snakefile includes it once, or, with `tasks: [a, b, ...]`, loads it
# as a module once per task.


include: "rules/common.smk"
include: "rules/prepare_model.smk"
include: "rules/prepare_data.smk"
include: "rules/sft.smk"
include: "rules/cache_logits.smk"
include: "rules/estimate_subdomains.smk"
include: "rules/ioa_plan.smk"
include: "rules/synthesize.smk"
include: "rules/distill.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
