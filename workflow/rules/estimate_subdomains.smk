# Stage: student- / teacher-favoured subdomains (SFS/TFS) and adaptive weights per sample, from the
# caches and the SFT student; with a +aw curriculum, the same for IOA's teacher-written items.


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
        **planned_resources("estimate_subdomains"),
        gpu=GPUS_ONE,
    shell:
        "OMP_NUM_THREADS={threads} {ON_GPU}{SCD} estimate-subdomains --task {params.task} --config {CONFIG_FILE} > {log} 2>&1"


rule estimate_subdomains_synthetic:
    input:
        SYNTHETIC_CACHES,
        TASK_DIR + "/student_sft",
        TASK_DIR + "/teacher/checkpoints.json",
    output:
        table=TASK_DIR + "/subdomains-synthetic.parquet",
        summary=TASK_DIR + "/subdomains-synthetic.json",
    params:
        task=TASK,
        settings=settings("cache"),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/estimate_subdomains_synthetic.log",
    benchmark:
        TASK_DIR + "/benchmarks/estimate_subdomains_synthetic.tsv"
    threads: JOB_THREADS
    resources:
        **planned_resources("estimate_subdomains_synthetic"),
        gpu=GPUS_ONE,
    shell:
        "OMP_NUM_THREADS={threads} {ON_GPU}{SCD} estimate-subdomains --synthetic --task {params.task} "
        "--config {CONFIG_FILE} > {log} 2>&1"
