# Generate: global hybrids, local anomalies (manipulated edge and depth maps) and normal images,
# from both decoders (AHD, AHE), each with its fusion mask M.


rule generate:
    input:
        index="results/shards/index.parquet",
        manifest="results/manifest.parquet",
        checkpoint="results/train/checkpoint",
        # AnomalyHybrid* turns every generated image into aligned depth and edge anomalies.
        depth_checkpoint=(
            "results/train_depth/checkpoint" if config["train_depth"]["enabled"] else []
        ),
    output:
        # Shards (shard-NNNNN.h5) are written beside the manifest, each whole under a temporary
        # name, and kept when a run fails so that the rerun resumes at the first missing shard;
        # contact sheets go to results/generated/sheets/<category>.png.
        manifest="results/generated/manifest.parquet",
    params:
        generate=config["generate"],
        code=code_hash("hybrid.generate"),
    threads: max(1, config["generate"].get("workers", 0))
    resources:
        mem_mb=16000,
        runtime=240,
    benchmark:
        "results/benchmarks/generate.tsv"
    log:
        "results/logs/generate.log",
    conda:
        "../envs/hybrid.yaml"
    script:
        "../workflow/scripts/generate.py"
