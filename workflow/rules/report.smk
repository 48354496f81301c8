# Stage: the report of one task (and, with `tasks`, the table across tasks).

from scd_pipeline.engine.methods import parse_method

REPORT_FILES = [
    TASK_DIR + "/report.md",
    TASK_DIR + "/report.html",
    TASK_DIR + "/summary.csv",
    TASK_DIR + "/sfs_tfs.csv",
    TASK_DIR + "/plots",
]
REPORT_CATEGORY = f"task {TASK}"


rule report:
    input:
        expand(TASK_DIR + "/eval{extra}/{name}.json", extra=EVAL_EXTRA, name=REPORTED_EVAL_NAMES),
        expand(TASK_DIR + "/eval{extra}/{name}.predictions.parquet", extra=EVAL_EXTRA, name=REPORTED_EVAL_NAMES),
        teacher_best_eval,
        TASK_DIR + "/subdomains.json",
        TASK_DIR + "/teacher/checkpoints.json",
        expand(TASK_DIR + "/students/{student}", student=STUDENTS),
        # IOA's plan and synthesis yield, when a curriculum method ran
        [*IOA_PLAN, SYNTHESIS_SUMMARY] if any(parse_method(m).uses_synthetic for m in METHODS) else [],
    output:
        markdown=TASK_DIR + "/report.md",
        html=report(TASK_DIR + "/report.html", category=REPORT_CATEGORY, labels={"file": "report"}),
        summary=report(TASK_DIR + "/summary.csv", category=REPORT_CATEGORY, labels={"file": "summary.csv"}),
        outcome=report(TASK_DIR + "/sfs_tfs.csv", category=REPORT_CATEGORY, labels={"file": "sfs_tfs.csv"}),
        plots=report(
            directory(TASK_DIR + "/plots"),
            patterns=["{plot}.png"],
            category=REPORT_CATEGORY,
            labels={"plot": "{plot}"},
        ),
    params:
        task=TASK,
        settings=settings("distill.methods", "replicates", "report"),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/report.log",
    benchmark:
        TASK_DIR + "/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{SCD} report --task {params.task} --config {CONFIG_FILE} > {log} 2>&1"


# With `tasks: [a, b, ...]` every task is a module of this file; the first one also writes the
# table across tasks (the paper's Table 1 shape) from every task's evaluations.
if config["tasks"] and TASK == config["tasks"][0]:
    MULTITASK_OUTPUTS = multitask_report_files(RESULTS, config["tasks"])

    rule multitask_report:
        input:
            expand(RESULTS + "/{task}/summary.csv", task=config["tasks"]),
        output:
            markdown=MULTITASK_OUTPUTS[0],
            html=report(MULTITASK_OUTPUTS[1], category="all tasks", labels={"file": "multi-task report"}),
            summary=report(MULTITASK_OUTPUTS[2], category="all tasks", labels={"file": "multi-task table"}),
        params:
            tasks=",".join(config["tasks"]),
            settings=settings("tasks", "distill.methods", "replicates", "report"),
        conda:
            CONDA_ENV
        log:
            RESULTS + "/logs/multitask_report.log",
        benchmark:
            RESULTS + "/benchmarks/multitask_report.tsv"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        shell:
            "{SCD} report --tasks {params.tasks} --config {CONFIG_FILE} > {log} 2>&1"
