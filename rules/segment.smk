# Segment: downstream detection and localisation (paper 003 Tables 2 and 4): per category, a
# segmentation network (DRAEM's DiscriminativeSubNetwork by default, as AnomalyDiffusion's
# localisation benchmark) trained on generated local anomalies (their regions as masks) and real
# normal images, optionally plus generated normals (AnoHybrid+), tested on the real test set;
# with depth-level anomalies (train_depth) also a depth model and rgb+depth.
# Industrial layouts by default (segment.enabled: auto = every layout but the butterfly ones, demo
# and heliconius); SEGMENT_OUTPUTS is empty, and the rule absent, where it is off.
# Export: the generated anomalies and masks as an MVTec AD folder tree (export.enabled puts it in
# `all`; `snakemake export` makes it on demand).

SEGMENT_OUTPUTS = (
    {"json": "results/metrics/segment.json", "table": "results/metrics/segment.parquet"}
    if stage_enabled("segment")
    else {}
)
EXPORT_OUTPUTS = ["results/export"] if config["export"]["enabled"] else []


if SEGMENT_OUTPUTS:

    rule segment:
        input:
            manifest="results/manifest.parquet",
            index="results/shards/index.parquet",
            generated="results/generated/manifest.parquet",
        output:
            json=report(
                SEGMENT_OUTPUTS["json"],
                caption="../workflow/report/segment.rst",
                category="Evaluation",
                subcategory="Segmentation",
            ),
            table=SEGMENT_OUTPUTS["table"],
            # save_pretrained folders <category>/<variant>/<modality>/, and one strip per category
            models=directory("results/segment/models"),
            strips=report(
                directory("results/segment/strips"),
                patterns=["{category}.png"],
                caption="../workflow/report/segment_strips.rst",
                category="Evaluation",
                subcategory="Segmentation",
            ),
        log:
            "results/logs/segment.log",
        benchmark:
            "results/benchmarks/segment.tsv"
        conda:
            "../envs/hybrid.yaml"
        threads: 2
        resources:
            mem_mb=16000,
            runtime=12 * 60,
            gpu=0 if config["segment"]["device"] == "cpu" else 1,
        params:
            segment={k: v for k, v in config["segment"].items() if k != "enabled"},
            # Periodic checkpoints and finished models live here, outside the outputs Snakemake
            # deletes before a job, in a folder named by the training settings: a killed job
            # resumes, finished models are reused when only scoring settings change.
            work_root="results/segment/work",
            code=code_hash("hybrid.stages.segment"),
        script:
            "../workflow/scripts/segment.py"


rule export:
    input:
        manifest="results/manifest.parquet",
        index="results/shards/index.parquet",
        generated="results/generated/manifest.parquet",
    output:
        tree=directory("results/export"),
    log:
        "results/logs/export.log",
    conda:
        "../envs/hybrid.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        export={k: v for k, v in config["export"].items() if k != "enabled"},
        code=code_hash("hybrid.stages.export"),
    script:
        "../workflow/scripts/export.py"
