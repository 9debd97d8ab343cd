# hybrid: AnomalyHybrid from normal images to generated anomalies and hybrids, and their worth.
# Run from the repository root:  snakemake --cores all
# Each stage lives in rules/<stage>.smk; rule all names each stage's final output, one line each.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# `snakemake --report report.zip` (make report): this description, then the outputs marked report().
report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/preprocess.smk"
include: "rules/train.smk"
include: "rules/generate.smk"
include: "rules/evaluate.smk"
include: "rules/classify.smk"
include: "rules/baselines.smk"
include: "rules/fewshot.smk"
include: "rules/classify_defects.smk"
include: "rules/segment.smk"
include: "rules/anomalyfactory.smk"
include: "rules/report.smk"
include: "rules/models.smk"


rule all:
    default_target: True
    input:
        "results/manifest.parquet",
        "results/shards/index.parquet",
        "results/train/checkpoint",
        "results/train_depth/checkpoint" if config["train_depth"]["enabled"] else [],
        "results/generated/manifest.parquet",
        "results/metrics/evaluate.json",
        list(CLASSIFY_OUTPUTS.values()),  # butterfly layouts only (empty elsewhere)
        list(BASELINES_OUTPUTS.values()),  # industrial layouts by default (baselines.enabled)
        list(FEWSHOT_OUTPUTS.values()),  # industrial layouts by default (fewshot.enabled)
        list(CLASSIFY_DEFECTS_OUTPUTS.values()),  # industrial layouts by default
        list(SEGMENT_OUTPUTS.values()),  # industrial layouts by default (segment.enabled)
        EXPORT_OUTPUTS,  # the MVTec AD tree of generated anomalies when export.enabled
        list(AF_OUTPUTS.values()),  # AnomalyFactory: boot, flare, blaze, localize (anomalyfactory.enabled)
        "results/report/index.html",
