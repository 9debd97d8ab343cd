# Data: the embedded demo dataset and the ingest stage (one manifest for every layout).


rule demo_data:
    output:
        train_csv=f"{DEMO_DIR}/butterfly_anomaly_train.csv",
        test_csv=f"{DEMO_DIR}/ref_test.csv",
    params:
        demo=config["demo"],
        out_dir=lambda wildcards, output: str(Path(output.train_csv).parent),
        code=code_hash("hybrid.data.demo"),
    log:
        "results/logs/demo_data.log",
    conda:
        "../envs/hybrid.yaml"
    script:
        "../workflow/scripts/demo_data.py"


rule ingest:
    input:
        ingest_inputs,
    output:
        manifest="results/manifest.parquet",
        skipped="results/ingest_skipped.csv",
    params:
        layout=config["dataset"]["layout"],
        options=reader_options(),
        missing=config["ingest"].get("missing", "error"),
        code=code_hash("hybrid.ingest"),
    log:
        "results/logs/ingest.log",
    conda:
        "../envs/hybrid.yaml"
    script:
        "../workflow/scripts/ingest.py"
