# Preprocess: decode, resize, edges and depth into HDF5 shards.


rule preprocess:
    input:
        manifest="results/manifest.parquet",
    output:
        # Shards are written beside the index, each whole under a temporary name, and are kept
        # when a run fails so that the rerun resumes at the first missing shard.
        index="results/shards/index.parquet",
    params:
        preprocess=config["preprocess"],
        weights=model_paths(),
        auto=[n for n in AUTO_NOTES if n.startswith("preprocess.")],
        code=code_hash("hybrid.preprocess"),
    threads: max(1, config["preprocess"].get("workers", 2))
    resources:
        mem_mb=8000,
        runtime=240,
    benchmark:
        "results/benchmarks/preprocess.tsv"
    log:
        "results/logs/preprocess.log",
    conda:
        "../envs/hybrid.yaml"
    script:
        "../workflow/scripts/preprocess.py"
