# Stage: IOA's plan (Identifier + Organizer), run only when a method of distill.methods is a
# curriculum (ioa, X+ioa).


rule ioa_plan:
    input:
        DATA_FILES,
        CACHES,
        # the student the curriculum starts from is the one diagnosed
        TASK_DIR + "/student_sft" if config["distill"]["init"] == "sft" else MODELS + "/student_base",
        TASK_DIR + "/teacher/checkpoints.json",
    output:
        IOA_PLAN,
    params:
        task=TASK,
        settings=settings("ioa", "evaluate", "distill.init", exclude=["ioa.synthesis"]),
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
        "OMP_NUM_THREADS={threads} {ON_GPU}{SCD} ioa-plan --task {params.task} --config {CONFIG_FILE} > {log} 2>&1"
