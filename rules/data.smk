# Data: the embedded demo datasets and the ingest stage (one manifest for every layout).

# The industrial demo's MVTec AD tree (rule demo_industrial; read through ingest_inputs and
# reader_options in common.smk, which run after this file is read).
DEMO_INDUSTRIAL_DIR = "results/data/demo_industrial"


rule demo_data:
    output:
        train_csv=f"{DEMO_DIR}/butterfly_anomaly_train.csv",
        test_csv=f"{DEMO_DIR}/ref_test.csv",
    log:
        "results/logs/demo_data.log",
    conda:
        "../envs/hybrid.yaml"
    params:
        demo={k: v for k, v in config["demo"].items() if k != "industrial"},
        out_dir=lambda wildcards, output: str(Path(output.train_csv).parent),
        code=code_hash("hybrid.data.demo"),
    script:
        "../workflow/scripts/demo_data.py"


# The industrial demo (dataset.layout: demo_industrial): an MVTec AD tree of procedural bottles,
# pills and carpets with defect masks and xyz height maps, settings in demo.industrial.
rule demo_industrial:
    output:
        meta=f"{DEMO_INDUSTRIAL_DIR}/demo.json",
    log:
        "results/logs/demo_industrial.log",
    conda:
        "../envs/hybrid.yaml"
    params:
        demo=config["demo"]["industrial"],
        out_dir=lambda wildcards, output: str(Path(output.meta).parent),
        code=code_hash("hybrid.data.demo_industrial"),
    script:
        "../workflow/scripts/demo_industrial.py"


rule ingest:
    input:
        ingest_inputs,
    output:
        manifest="results/manifest.parquet",
        skipped="results/ingest_skipped.csv",
    log:
        "results/logs/ingest.log",
    conda:
        "../envs/hybrid.yaml"
    params:
        datasets=ingest_datasets(),
        missing=config["ingest"]["missing"],
        protocol=config["ingest"]["protocol"],
        code=code_hash("hybrid.stages.ingest"),
    script:
        "../workflow/scripts/ingest.py"
