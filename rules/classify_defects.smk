# Classify defects: a ResNet-34 trained on the generated local anomalies of each decoder (labelled
# with the defect type they were generated from) classifies the real eval anomalies (paper 003,
# Tables 5 and 7). Needs the industrial protocol (generate.local.source: base); on by default for
# industrial layouts (classify_defects.enabled: auto, see stage_enabled in rules/common.smk).


CLASSIFY_DEFECTS_OUTPUTS = (
    {
        "json": "results/metrics/classify_defects.json",
        "table": "results/metrics/classify_defects.parquet",
    }
    if stage_enabled("classify_defects")
    else {}
)


if CLASSIFY_DEFECTS_OUTPUTS:

    rule classify_defects:
        input:
            generated="results/generated/manifest.parquet",
            index="results/shards/index.parquet",
            manifest="results/manifest.parquet",
        output:
            json=report(
                CLASSIFY_DEFECTS_OUTPUTS["json"],
                caption="../workflow/report/classify_defects.rst",
                category="Evaluation",
                subcategory="Defect classification",
            ),
            table=CLASSIFY_DEFECTS_OUTPUTS["table"],
        log:
            "results/logs/classify_defects.log",
        benchmark:
            "results/benchmarks/classify_defects.tsv"
        conda:
            "../envs/hybrid.yaml"
        threads: 2
        resources:
            mem_mb=16000,
            runtime=240,
            gpu=0 if config["classify_defects"]["device"] == "cpu" else 1,
        params:
            classify_defects=config["classify_defects"],
            paths=model_paths(),
            code=code_hash("hybrid.stages.classify_defects"),
        script:
            "../workflow/scripts/classify_defects.py"
