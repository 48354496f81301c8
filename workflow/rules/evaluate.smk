# Stage: evaluate the base teacher, T* (the best teacher checkpoint), the SFT student and every
# distilled student (every replicate); then the report (and, with `tasks`, the multi-task table).

from scd_pipeline.naming import default_eval_name, multitask_report_files, replicate_eval_name

# Evaluation name -> distilled student folder under students/ (names as `scd-pipeline evaluate`
# and the report derive them; replicates get `{method}@seed-{s}`, passed with --name).
STUDENT_OF_EVAL = (
    {default_eval_name(f"students/{method}"): method for method in METHODS}
    if REPLICATES == 1
    else {
        replicate_eval_name(method, s): replicate_student_name(method, s)
        for method in METHODS
        for s in range(REPLICATES)
    }
)
# Every model the evaluate rule can score; the report asks for all but the teacher checkpoints,
# of which it needs T* alone (the validation curve of all of them is in teacher/checkpoints.json;
# any other, e.g. `snakemake results/demo/eval/teacher-ckpt-3.json`, on request).
REPORTED_EVAL_NAMES = ["teacher_base", "student_sft"] + list(STUDENT_OF_EVAL)
EVAL_NAMES = REPORTED_EVAL_NAMES + [f"teacher-ckpt-{k}" for k in CHECKPOINTS]


def teacher_best_eval(wildcards):
    """T*'s test evaluation: known once the teacher SFT (a Snakemake checkpoint) has written
    checkpoints.json."""
    from scd_pipeline.checkpoints import read_checkpoints

    index = checkpoints.sft_teacher.get().output.index
    best = read_checkpoints(Path(index).parent)["best_index"]
    name = TASK_DIR + "/eval/" + default_eval_name(f"teacher/ckpt-{best}")
    return [name + ".json", name + ".predictions.parquet"]


def model_to_evaluate(wildcards):
    name = wildcards.name
    if name == "teacher_base":
        return MODELS + "/teacher_base"
    if name == "student_sft":
        return TASK_DIR + "/student_sft"
    if name.startswith("teacher-ckpt-"):
        return TASK_DIR + "/teacher/ckpt-" + name.removeprefix("teacher-ckpt-")
    return TASK_DIR + "/students/" + STUDENT_OF_EVAL[name]


rule evaluate:
    input:
        DATA_FILES,
        model=model_to_evaluate,
    output:
        metrics=TASK_DIR + "/eval/{name}.json",
        predictions=TASK_DIR + "/eval/{name}.predictions.parquet",
    wildcard_constraints:
        name="|".join(re.escape(n) for n in EVAL_NAMES),
    params:
        task=TASK,
        settings=settings("evaluate"),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/evaluate_{name}.log",
    benchmark:
        TASK_DIR + "/benchmarks/evaluate_{name}.tsv"
    threads: JOB_THREADS
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=GPUS_ONE,
    shell:
        "OMP_NUM_THREADS={threads} {SCD} evaluate --model {input.model} --name '{wildcards.name}' "
        "--task {params.task} --config {CONFIG_FILE} > {log} 2>&1"


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
        expand(TASK_DIR + "/eval/{name}.json", name=REPORTED_EVAL_NAMES),
        expand(TASK_DIR + "/eval/{name}.predictions.parquet", name=REPORTED_EVAL_NAMES),
        teacher_best_eval,
        TASK_DIR + "/subdomains.json",
        TASK_DIR + "/teacher/checkpoints.json",
        expand(TASK_DIR + "/students/{student}", student=STUDENTS),
        # IOA's plan and synthesis yield, when a curriculum method ran
        [*IOA_PLAN, SYNTHESIS_SUMMARY] if any(parse_method(m).curriculum for m in METHODS) else [],
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
