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


def _conclusion(report_md: str) -> str:
    """The report's sentence on what the comparison concludes (report.md, Results section)."""
    for line in open(report_md, encoding="utf-8"):
        if line.startswith(("At n = ", "The table cannot conclude")):
            return line.strip()
    return ""


onsuccess:
    results = config["results_dir"]
    pages = ([f"{results}/{task}/report.md" for task in TASKS] + multitask_report_files(results, TASKS)[:1]
             if TASKS else [f"{results}/{config['task']}/report.md"])
    for page in pages:
        if os.path.isfile(page):
            print(f"\nscd-pipeline: report {page} (HTML beside it)")
            sentence = _conclusion(page)
            if sentence:
                print(f"  {sentence}")


def _last_line(path: str) -> str:
    lines = [line.strip() for line in open(path, encoding="utf-8", errors="replace") if line.strip()]
    return lines[-1] if lines else ""


onerror:
    import glob

    results = config["results_dir"]
    job_logs = sorted(glob.glob(f"{results}/**/logs/*.log", recursive=True), key=os.path.getmtime)
    # A stage that fails ends its log with one `error: ...` line; another failure leaves a traceback.
    failed = [path for path in job_logs if _last_line(path).startswith("error:")] or job_logs[-1:]
    print("\nscd-pipeline: the run stopped because a job failed (its rule and error are listed above).")
    for path in failed[-3:]:
        print(f"  {path}: {_last_line(path)}")
    print("  Fix the cause and run the same command again: finished jobs are kept.")
