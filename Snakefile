# scd-pipeline workflow: every rule runs one `scd-pipeline <stage>`; all logic lives in the package.
#   snakemake --cores all                                  # demo task, embedded SmolLM2
#   snakemake --cores all --config task=smdis              # any task / model / k / method list
#   snakemake --profile workflow/profiles/slurm            # same DAG on SLURM
import os

from snakemake.utils import min_version

min_version("9.0")


# Defaults beside this Snakefile, so `snakemake -d OTHER_DIR` works; --configfile/--config override.
configfile: os.path.join(workflow.basedir, "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/sft.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        REPORT_FILES,
