# Stage: one distilled student per configured method (teacher signal from the caches only).

METHODS = config["distill"]["methods"]


def distill_init(wildcards):
    if config["distill"]["init"] == "sft":
        return TASK_DIR + "/student_sft"
    return MODELS + "/student_base"


rule distill:
    input:
        CACHES,
        DATA_FILES,
        TASK_DIR + "/subdomains.parquet",
        TASK_DIR + "/teacher/checkpoints.json",
        distill_init,
    output:
        directory(TASK_DIR + "/students/{method}"),
    wildcard_constraints:
        method="|".join(re.escape(m) for m in METHODS),
    params:
        settings=settings("seed", "distill", "subdomains", "cache.temperature"),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/distill_{method}.log",
    benchmark:
        TASK_DIR + "/benchmarks/distill_{method}.tsv"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=480,
        gpu=GPUS,
    shell:
        "OMP_NUM_THREADS={threads} {SCD} distill --method '{wildcards.method}' --name '{wildcards.method}' "
        "--config {CONFIG_FILE} > {log} 2>&1"
