# scd-pipeline workflow: every rule runs one `scd-pipeline <stage>`; all logic lives in the package.
#   snakemake --cores all                                  # demo task, embedded SmolLM2
#   snakemake --cores all --config task=smdis              # any task / model / k / method list
#   snakemake --cores all --config tasks=[demo,smdis]      # several tasks + their Table-1 comparison
#   snakemake --profile workflow/profiles/slurm            # same DAG on SLURM
#   snakemake --report report.html                         # after a run: Snakemake's HTML report
import os

from snakemake.utils import min_version

from scd_pipeline.engine.naming import multitask_report_files

min_version("9.0")


# Defaults beside this Snakefile, so `snakemake -d OTHER_DIR` works; --configfile/--config override.
configfile: os.path.join(workflow.basedir, "config.yaml")


report: "workflow/report/workflow.rst"


TASKS = list(config.get("tasks") or [])

if TASKS:
    # One module per task (its rules prefixed `{task}_`), each with `task` set in its config. The
    # base models are shared: only the first task's module keeps the prepare_model rules, and
    # only it adds the multi-task table (rule `{first task}_multitask_report`).
    for position, task_name in enumerate(TASKS):

        module:
            name:
                task_name
            snakefile:
                "workflow/task.smk"
            config:
                {**config, "task": task_name}

        rule_prefix = f"{task_name}_"
        if position == 0:

            use rule * from task_name as rule_prefix*

        else:

            use rule * from task_name exclude prepare_model_teacher, prepare_model_student as rule_prefix*

    # Snakemake formats every shell command (module rules too) with the names of this file, so
    # SCD and CONFIG_FILE come from here: every rule passes its own task as --task {params.task}.
    include: "workflow/rules/common.smk"

    rule all:
        default_target: True
        input:
            multitask_report_files(config["results_dir"], TASKS),

else:

    include: "workflow/task.smk"

    rule all:
        default_target: True
        input:
            REPORT_FILES,
