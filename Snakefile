# hybrid: AnomalyHybrid from normal images to generated anomalies and hybrids, and their worth.
# Run from the repository root:  snakemake --cores all
# Each stage lives in rules/<stage>.smk; rule all names each stage's final output, one line each.

configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/preprocess.smk"
include: "rules/train.smk"
include: "rules/generate.smk"
include: "rules/evaluate.smk"
include: "rules/classify.smk"
include: "rules/report.smk"
include: "rules/models.smk"


rule all:
    input:
        "results/manifest.parquet",
        "results/shards/index.parquet",
        "results/train/checkpoint",
        "results/train_depth/checkpoint" if config["train_depth"]["enabled"] else [],
        "results/generated/manifest.parquet",
        "results/metrics/evaluate.json",
        list(CLASSIFY_OUTPUTS.values()),  # butterfly layouts only (empty elsewhere)
        "results/report/index.html",
    default_target: True
