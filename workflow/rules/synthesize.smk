# Stage: IOA's teacher-written items for the deficient modules (Adapter), run only when a method
# of distill.methods is a curriculum; their caches and weights are in cache_logits.smk and
# estimate_subdomains.smk.


rule synthesize:
    input:
        IOA_PLAN,
        DATA_FILES,
        CACHES,
        TASK_DIR + "/teacher/checkpoints.json",
    output:
        synthetic=SYNTHETIC,
        summary=SYNTHESIS_SUMMARY,
    params:
        task=TASK,
        settings=settings("seed", "ioa.synthesis", "data.system_prompt", "data.max_length", "cache.batch_size"),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/synthesize.log",
    benchmark:
        TASK_DIR + "/benchmarks/synthesize.tsv"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPUS_ONE,
    shell:
        "OMP_NUM_THREADS={threads} {ON_GPU}{SCD} synthesize --task {params.task} --config {CONFIG_FILE} > {log} 2>&1"
