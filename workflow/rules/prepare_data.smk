# Stage: task data, tokenised with the teacher's tokenizer.

from scd_pipeline.stages.prepare_data import heldout_size

# The extra held-out split (data.heldout_size; auto: the JMED-LLM tasks), evaluated beside the test.
HELDOUT = heldout_size(config) > 0
DATA_FILES = expand(
    TASK_DIR + "/data/{split}.parquet", split=["train", "val", "test", *(["heldout"] if HELDOUT else [])]
) + [TASK_DIR + "/data/manifest.json"]


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
