# Evaluate: Inception Score and cluster LPIPS of the generated images, per category and decoder.


rule evaluate:
    input:
        generated="results/generated/manifest.parquet",
        index="results/shards/index.parquet",
        manifest="results/manifest.parquet",
    output:
        json=report(
            "results/metrics/evaluate.json",
            caption="../workflow/report/evaluate.rst",
            category="Evaluation",
            subcategory="Generation quality",
        ),
        table="results/metrics/evaluate.parquet",
    log:
        "results/logs/evaluate.log",
    benchmark:
        "results/benchmarks/evaluate.tsv"
    conda:
        "../envs/hybrid.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
    params:
        evaluate=config["evaluate"],
        paths=model_paths(),
        code=code_hash("hybrid.stages.evaluate"),
    script:
        "../workflow/scripts/evaluate.py"
