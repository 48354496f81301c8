# Stage: one teacher-logit cache per checkpoint (fans out over jobs / nodes); with a curriculum
# method, the same for IOA's teacher-written items.


rule cache_logits:
    input:
        DATA_FILES,
        index=TASK_DIR + "/teacher/checkpoints.json",
        checkpoint=TASK_DIR + "/teacher/ckpt-{k}",
    output:
        cache=TASK_DIR + "/logits/ckpt-{k}.parquet",
        meta=TASK_DIR + "/logits/ckpt-{k}.meta.json",
    params:
        task=TASK,
        settings=settings("cache"),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/cache_logits_{k}.log",
    benchmark:
        TASK_DIR + "/benchmarks/cache_logits_{k}.tsv"
    threads: JOB_THREADS
    resources:
        **planned_resources("cache_logits"),
        gpu=GPUS_ONE,
    shell:
        "OMP_NUM_THREADS={threads} {ON_GPU}{SCD} cache-logits --checkpoint {wildcards.k} "
        "--task {params.task} --config {CONFIG_FILE} > {log} 2>&1"


rule cache_logits_synthetic:
    input:
        SYNTHETIC,
        DATA_FILES,
        index=TASK_DIR + "/teacher/checkpoints.json",
        checkpoint=TASK_DIR + "/teacher/ckpt-{k}",
    output:
        cache=TASK_DIR + "/logits/synthetic/ckpt-{k}.parquet",
        meta=TASK_DIR + "/logits/synthetic/ckpt-{k}.meta.json",
    wildcard_constraints:
        k=r"\d+",
    params:
        task=TASK,
        settings=settings("cache"),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/cache_logits_synthetic_{k}.log",
    benchmark:
        TASK_DIR + "/benchmarks/cache_logits_synthetic_{k}.tsv"
    threads: JOB_THREADS
    resources:
        **planned_resources("cache_logits_synthetic"),
        gpu=GPUS_ONE,
    shell:
        "OMP_NUM_THREADS={threads} {ON_GPU}{SCD} cache-logits --synthetic --checkpoint {wildcards.k} "
        "--task {params.task} --config {CONFIG_FILE} > {log} 2>&1"
