# Stage: evaluate the base teacher, T* (the best teacher checkpoint), the SFT student and every
# distilled student (every replicate).

from scd_pipeline.engine.naming import (
    HELDOUT_SPLIT,
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
# Evaluations go to eval/ (evaluate.split) and, when the task has one, the held-out split's to
# eval/heldout/ (logs and benchmarks likewise): the path's part after "eval".
HELDOUT_EXTRA = "/" + HELDOUT_SPLIT
EVAL_EXTRA = ["", *([HELDOUT_EXTRA] if HELDOUT else [])]


def teacher_best_eval(wildcards):
    """T*'s evaluations (the test split, and the held-out split when there is one): known once the
    teacher SFT (a Snakemake checkpoint) has written checkpoints.json."""
    from scd_pipeline.engine.checkpoints import read_checkpoints

    index = checkpoints.sft_teacher.get().output.index
    best = read_checkpoints(Path(index).parent)["best_index"]
    return [
        f"{TASK_DIR}/eval{extra}/{default_eval_name(f'teacher/ckpt-{best}')}{suffix}"
        for extra in EVAL_EXTRA
        for suffix in (".json", ".predictions.parquet")
    ]


def model_to_evaluate(wildcards):
    name = wildcards.name
    if name == "teacher_base":
        return MODELS + "/teacher_base"
    if name in SFT_OF_EVAL:
        return TASK_DIR + "/" + SFT_OF_EVAL[name]
    if name.startswith("teacher-ckpt-"):
        return TASK_DIR + "/teacher/ckpt-" + name.removeprefix("teacher-ckpt-")
    return TASK_DIR + "/students/" + STUDENT_OF_EVAL[name]


# One rule per split it scores: `evaluate` (evaluate.split, into eval/) and, when the task has a
# held-out split, `evaluate_heldout` (into eval/heldout/, logs/heldout/, benchmarks/heldout/).
for _extra, _split in [("", config["evaluate"]["split"]), *([(HELDOUT_EXTRA, HELDOUT_SPLIT)] if HELDOUT else [])]:

    rule:
        name:
            "evaluate" + _extra.replace("/", "_")
        input:
            DATA_FILES,
            model=model_to_evaluate,
        output:
            metrics=TASK_DIR + f"/eval{_extra}/{{name}}.json",
            predictions=TASK_DIR + f"/eval{_extra}/{{name}}.predictions.parquet",
        wildcard_constraints:
            name="|".join(re.escape(n) for n in EVAL_NAMES),
        params:
            task=TASK,
            settings=settings("evaluate"),
            split=_split,
        conda:
            CONDA_ENV
        log:
            TASK_DIR + f"/logs{_extra}/evaluate_{{name}}.log",
        benchmark:
            TASK_DIR + f"/benchmarks{_extra}/evaluate_{{name}}.tsv"
        threads: JOB_THREADS
        resources:
            **planned_resources("evaluate"),
            gpu=GPUS_ONE,
        shell:
            "OMP_NUM_THREADS={threads} {ON_GPU}{SCD} evaluate --model {input.model} --name '{wildcards.name}' "
            "--split {params.split} --task {params.task} --config {CONFIG_FILE} > {log} 2>&1"
