# Stage: evaluate the base teacher, T* (the best teacher checkpoint), the SFT student and every
# distilled student (every replicate).

from scd_pipeline.engine.naming import (
    default_eval_name,
    multitask_report_files,
    replicate_eval_name,
    sft_student_dir,
    sft_student_eval_name,
)

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
# The SFT student's seeds (replicates > 1): eval name -> its folder under the task.
SFT_OF_EVAL = {sft_student_eval_name(s): sft_student_dir(s) for s in range(REPLICATES)}
REPORTED_EVAL_NAMES = ["teacher_base", *SFT_OF_EVAL] + list(STUDENT_OF_EVAL)
EVAL_NAMES = REPORTED_EVAL_NAMES + [f"teacher-ckpt-{k}" for k in CHECKPOINTS]


def teacher_best_eval(wildcards):
    """T*'s test evaluation: known once the teacher SFT (a Snakemake checkpoint) has written
    checkpoints.json."""
    from scd_pipeline.engine.checkpoints import read_checkpoints

    index = checkpoints.sft_teacher.get().output.index
    best = read_checkpoints(Path(index).parent)["best_index"]
    name = TASK_DIR + "/eval/" + default_eval_name(f"teacher/ckpt-{best}")
    return [name + ".json", name + ".predictions.parquet"]


def model_to_evaluate(wildcards):
    name = wildcards.name
    if name == "teacher_base":
        return MODELS + "/teacher_base"
    if name in SFT_OF_EVAL:
        return TASK_DIR + "/" + SFT_OF_EVAL[name]
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
        **planned_resources("evaluate"),
        gpu=GPUS_ONE,
    shell:
        "OMP_NUM_THREADS={threads} {ON_GPU}{SCD} evaluate --model {input.model} --name '{wildcards.name}' "
        "--task {params.task} --config {CONFIG_FILE} > {log} 2>&1"
