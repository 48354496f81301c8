# Stage: base teacher and (pruned) base student, shared by every task.


rule prepare_model_teacher:
    output:
        directory(MODELS + "/teacher_base"),
    params:
        settings=settings("models.teacher", "models.tiny"),
    conda:
        CONDA_ENV
    log:
        RESULTS + "/logs/prepare_model_teacher.log",
    benchmark:
        RESULTS + "/benchmarks/prepare_model_teacher.tsv"
    threads: 1  # GGUF de-quantisation (once per machine) and safetensors I/O: single-threaded work
    resources:
        mem_mb=4000,
        runtime=20,
    shell:
        "{SCD} prepare-model --role teacher --config {CONFIG_FILE} > {log} 2>&1"


rule prepare_model_student:
    input:
        MODELS + "/teacher_base",
    output:
        directory(MODELS + "/student_base"),
    params:
        settings=settings("models.student", "models.tiny"),
    conda:
        CONDA_ENV
    log:
        RESULTS + "/logs/prepare_model_student.log",
    benchmark:
        RESULTS + "/benchmarks/prepare_model_student.tsv"
    threads: 1  # layer pruning and safetensors I/O: single-threaded work
    resources:
        mem_mb=4000,
        runtime=20,
    shell:
        "{SCD} prepare-model --role student --config {CONFIG_FILE} > {log} 2>&1"
