# Classify: DINOv2 features, linear and SGD heads trained with and without generated hybrids,
# scored with the HDR butterfly challenge rule (paper 003, Table 6). Butterfly layouts only: the
# rule exists only where a reference CSV is known, and CLASSIFY_OUTPUTS is empty elsewhere.


if CLASSIFY_OUTPUTS:

    rule classify:
        input:
            manifest="results/manifest.parquet",
            index="results/shards/index.parquet",
            generated="results/generated/manifest.parquet",
            reference=classify_reference(),
        output:
            json=report(
                CLASSIFY_OUTPUTS["json"],
                caption="../workflow/report/classify.rst",
                category="Evaluation",
                subcategory="Hybrid detection",
            ),
            table=CLASSIFY_OUTPUTS["table"],
            predictions=directory("results/metrics/predictions"),
        log:
            "results/logs/classify.log",
        benchmark:
            "results/benchmarks/classify.tsv"
        conda:
            "../envs/hybrid.yaml"
        threads: 2
        resources:
            mem_mb=16000,
            runtime=120,
        params:
            # reference_csv reaches the rule as an input; the rest is the stage's own section.
            classify={k: v for k, v in config["classify"].items() if k != "reference_csv"},
            paths=model_paths(),
            code=code_hash("hybrid.stages.classify"),
        script:
            "../workflow/scripts/classify.py"
