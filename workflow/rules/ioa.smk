# Stage: IOA's curriculum inputs, run only when a method of distill.methods is a curriculum (ioa,
# X+ioa): the plan (Identifier + Organizer), the teacher-written items (Adapter), their caches
# for every checkpoint and, for +aw curricula, their adaptive weights.

SYNTHETIC = TASK_DIR + "/data/synthetic.parquet"
SYNTHETIC_CACHES = expand(TASK_DIR + "/logits/synthetic/ckpt-{k}.parquet", k=CHECKPOINTS)
IOA_PLAN = [TASK_DIR + "/ioa/plan.json", TASK_DIR + "/ioa/val_scores.parquet"]
SYNTHESIS_SUMMARY = TASK_DIR + "/ioa/synthesis.json"


rule ioa_plan:
    input:
        DATA_FILES,
        CACHES,
        TASK_DIR + "/student_sft",
        TASK_DIR + "/teacher/checkpoints.json",
    output:
        IOA_PLAN,
    params:
        task=TASK,
        settings=settings("ioa", "evaluate", exclude=["ioa.synthesis"]),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/ioa_plan.log",
    benchmark:
        TASK_DIR + "/benchmarks/ioa_plan.tsv"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=GPUS_ONE,
    shell:
        "OMP_NUM_THREADS={threads} {SCD} ioa-plan --task {params.task} --config {CONFIG_FILE} > {log} 2>&1"


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
        "OMP_NUM_THREADS={threads} {SCD} synthesize --task {params.task} --config {CONFIG_FILE} > {log} 2>&1"


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
        mem_mb=8000,
        runtime=60,
        gpu=GPUS_ONE,
    shell:
        "OMP_NUM_THREADS={threads} {SCD} cache-logits --synthetic --checkpoint {wildcards.k} "
        "--task {params.task} --config {CONFIG_FILE} > {log} 2>&1"


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
        mem_mb=8000,
        runtime=60,
        gpu=GPUS_ONE,
    shell:
        "OMP_NUM_THREADS={threads} {SCD} estimate-subdomains --synthetic --task {params.task} "
        "--config {CONFIG_FILE} > {log} 2>&1"
