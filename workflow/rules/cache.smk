# Stage: one teacher-logit cache per checkpoint (fans out over jobs / nodes), then SFS/TFS.

CACHES = expand(TASK_DIR + "/logits/ckpt-{k}.parquet", k=CHECKPOINTS)


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
        mem_mb=8000,
        runtime=120,
        gpu=GPUS_ONE,
    shell:
        "OMP_NUM_THREADS={threads} {SCD} cache-logits --checkpoint {wildcards.k} "
        "--task {params.task} --config {CONFIG_FILE} > {log} 2>&1"


rule estimate_subdomains:
    input:
        CACHES,
        TASK_DIR + "/student_sft",
        TASK_DIR + "/teacher/checkpoints.json",
    output:
        table=TASK_DIR + "/subdomains.parquet",
        summary=TASK_DIR + "/subdomains.json",
    params:
        task=TASK,
        settings=settings("subdomains", "cache"),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/estimate_subdomains.log",
    benchmark:
        TASK_DIR + "/benchmarks/estimate_subdomains.tsv"
    threads: JOB_THREADS
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=GPUS_ONE,
    shell:
        "OMP_NUM_THREADS={threads} {SCD} estimate-subdomains --task {params.task} --config {CONFIG_FILE} > {log} 2>&1"
