# Stage: one distilled student per configured method (teacher signal from the caches only); with
# `replicates: N` > 1, N per method (students/{method}/seed-{s}, seed = config seed + s), one job each.

from scd_pipeline.engine.methods import parse_method
from scd_pipeline.engine.naming import replicate_student_name

METHODS = config["distill"]["methods"]
REPLICATES = config["replicates"]
# students/{name} -> (method, distillation seed). Teacher SFT, student SFT and caches are shared.
STUDENTS = (
    {method: (method, config["seed"]) for method in METHODS}
    if REPLICATES == 1
    else {
        replicate_student_name(method, s): (method, config["seed"] + s)
        for method in METHODS
        for s in range(REPLICATES)
    }
)


def distill_init(wildcards):
    if config["distill"]["init"] == "sft":
        return TASK_DIR + "/student_sft"
    return MODELS + "/student_base"


def curriculum_inputs(wildcards):
    """A curriculum method (ioa, X+ioa) also reads IOA's plan; it and a +synthetic control read the
    synthetic items and their caches (and their adaptive weights when it weights samples)."""
    method = parse_method(STUDENTS[wildcards.student][0])
    if not method.uses_synthetic:
        return []
    files = (IOA_PLAN if method.curriculum else []) + [SYNTHETIC] + SYNTHETIC_CACHES
    if method.needs_subdomains:
        files += [TASK_DIR + "/subdomains-synthetic.parquet", TASK_DIR + "/subdomains-synthetic.json"]
    return files


def distill_settings(wildcards):
    """The settings a student's result depends on (its params rerun trigger): the method list
    itself is left out, so adding a method trains only that one."""
    keys = ["seed", "distill", "subdomains", "cache.temperature"]
    method = parse_method(STUDENTS[wildcards.student][0])
    if method.curriculum:
        keys += ["ioa", "evaluate"]  # the mastery gates score the student on the validation split
    elif method.synthetic:
        keys += ["ioa"]  # the synthetic items it trains on
    return settings(*keys, exclude=["distill.methods"])


rule distill:
    input:
        CACHES,
        DATA_FILES,
        TASK_DIR + "/subdomains.parquet",
        TASK_DIR + "/teacher/checkpoints.json",
        distill_init,
        curriculum_inputs,
    output:
        directory(TASK_DIR + "/students/{student}"),
    wildcard_constraints:
        student="|".join(re.escape(name) for name in STUDENTS),
    params:
        task=TASK,
        settings=distill_settings,
        method=lambda wildcards: STUDENTS[wildcards.student][0],
        seed=lambda wildcards: STUDENTS[wildcards.student][1],
    conda:
        CONDA_ENV
    log:
        TASK_DIR + "/logs/distill_{student}.log",
    benchmark:
        TASK_DIR + "/benchmarks/distill_{student}.tsv"
    threads: train_threads(JOB_THREADS)
    resources:
        **planned_resources("distill"),
        gpu=GPUS,
    shell:
        "OMP_NUM_THREADS=" + TRAIN_OMP + " {ON_GPUS}{TRAIN} distill --method '{params.method}' --name '{wildcards.student}' "
        "--task {params.task} --config {CONFIG_FILE} --set seed={params.seed} > {log} 2>&1"
