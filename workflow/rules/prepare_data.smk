# Stage: task data, tokenised with the teacher's tokenizer.

DATA_FILES = expand(TASK_DIR + "/data/{split}.parquet", split=["train", "val", "test"]) + [
    TASK_DIR + "/data/manifest.json"
]


rule prepare_data:
    input:
        MODELS + "/teacher_base",
    output:
        DATA_FILES,
    params:
        task=TASK,
        settings=settings("task", "seed", "data"),
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/prepare_data.log",
    benchmark:
        TASK_DIR + "/benchmarks/prepare_data.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    shell:
        "{SCD} prepare-data --task {params.task} --config {CONFIG_FILE} --tokenizer {input} > {log} 2>&1"
