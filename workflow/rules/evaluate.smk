# Stage: evaluate the base teacher, every teacher checkpoint, the SFT student and every
# distilled student; then the report.

from scd_pipeline.naming import default_eval_name

# Evaluation name -> distilled student (names as `scd-pipeline evaluate` and the report derive them).
STUDENT_OF_EVAL = {default_eval_name(f"students/{method}"): method for method in METHODS}
EVAL_NAMES = (
    ["teacher_base", "student_sft"]
    + [f"teacher-ckpt-{k}" for k in CHECKPOINTS]
    + list(STUDENT_OF_EVAL)
)


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
        settings=settings("evaluate"),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/evaluate_{name}.log",
    benchmark:
        TASK_DIR + "/benchmarks/evaluate_{name}.tsv"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=GPUS,
    shell:
        "OMP_NUM_THREADS={threads} {SCD} evaluate --model {input.model} --name '{wildcards.name}' "
        "--config {CONFIG_FILE} > {log} 2>&1"


REPORT_FILES = [TASK_DIR + "/report.md", TASK_DIR + "/report.html", TASK_DIR + "/summary.csv"]


rule report:
    input:
        expand(TASK_DIR + "/eval/{name}.json", name=EVAL_NAMES),
        TASK_DIR + "/subdomains.json",
        TASK_DIR + "/teacher/checkpoints.json",
        expand(TASK_DIR + "/students/{method}", method=METHODS),
    output:
        REPORT_FILES,
    params:
        settings=settings("distill.methods"),
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
        "{SCD} report --config {CONFIG_FILE} > {log} 2>&1"
