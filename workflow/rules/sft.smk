# Stage: teacher SFT with N dense checkpoints, and the SFT student (baseline + AW anchor).
# The teacher SFT is a Snakemake checkpoint: which of its checkpoints is T* (best validation
# metric, teacher/checkpoints.json) decides which one the report evaluates on the test split.

TEACHER_CKPTS = expand(TASK_DIR + "/teacher/ckpt-{k}", k=CHECKPOINTS)


checkpoint sft_teacher:
    input:
        DATA_FILES,
        MODELS + "/teacher_base",
    output:
        ckpts=[directory(path) for path in TEACHER_CKPTS],
        index=TASK_DIR + "/teacher/checkpoints.json",
    params:
        task=TASK,
        settings=settings("seed", "sft"),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/sft_teacher.log",
    benchmark:
        TASK_DIR + "/benchmarks/sft_teacher.tsv"
    threads: train_threads(4)
    priority: 1  # the critical path: it starts before the student SFT or the base evaluation may take a core
    resources:
        **planned_resources("sft_teacher"),
        gpu=GPUS,
    shell:
        "OMP_NUM_THREADS=" + TRAIN_OMP + " {ON_GPUS}{TRAIN} sft --role teacher --task {params.task} --config {CONFIG_FILE} > {log} 2>&1"


rule sft_student:
    input:
        DATA_FILES,
        MODELS + "/student_base",
    output:
        directory(TASK_DIR + "/student_sft"),
    params:
        task=TASK,
        settings=settings("seed", "sft"),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/sft_student.log",
    benchmark:
        TASK_DIR + "/benchmarks/sft_student.tsv"
    threads: train_threads(JOB_THREADS)
    resources:
        **planned_resources("sft_student"),
        gpu=GPUS,
    shell:
        "OMP_NUM_THREADS=" + TRAIN_OMP + " {ON_GPUS}{TRAIN} sft --role student --task {params.task} --config {CONFIG_FILE} > {log} 2>&1"


# With `replicates: N` > 1 the SFT student has N seeds too: seed 0 is student_sft (the AW anchor and
# the distillation start), seeds 1..N-1 (config seed + s) are references only, so that every
# difference to the SFT student carries its training variance like the methods' own.
rule sft_student_replicate:
    input:
        DATA_FILES,
        MODELS + "/student_base",
    output:
        directory(TASK_DIR + "/student_sft_seeds/seed-{k}"),
    wildcard_constraints:
        k="[1-9][0-9]*",
    params:
        task=TASK,
        settings=settings("seed", "sft"),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/sft_student_seed-{k}.log",
    benchmark:
        TASK_DIR + "/benchmarks/sft_student_seed-{k}.tsv"
    threads: train_threads(JOB_THREADS)
    resources:
        **planned_resources("sft_student_replicate"),
        gpu=GPUS,
    shell:
        "OMP_NUM_THREADS=" + TRAIN_OMP + " {ON_GPUS}{TRAIN} sft --role student --replicate {wildcards.k} "
        "--task {params.task} --config {CONFIG_FILE} > {log} 2>&1"
