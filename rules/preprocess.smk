# Preprocess: decode, resize, edges and depth into HDF5 shards.
# preprocess.chunks = K > 1 scatters it: K preprocess_chunk jobs each write a contiguous range of
# the shards (a failed one reruns alone), then the preprocess rule gathers them into the index,
# exactly as the single job (K = 1) writes it.

PREPROCESS_CHUNKS = int(config["preprocess"]["chunks"])

if PREPROCESS_CHUNKS == 1:

    rule preprocess:
        input:
            manifest="results/manifest.parquet",
        output:
            # Shards are written beside the index, each whole under a temporary name, and are kept
            # when a run fails so that the rerun resumes at the first missing shard.
            index="results/shards/index.parquet",
        log:
            "results/logs/preprocess.log",
        benchmark:
            "results/benchmarks/preprocess.tsv"
        conda:
            "../envs/hybrid.yaml"
        threads: max(1, config["preprocess"]["workers"])
        resources:
            mem_mb=8000,
            runtime=240,
        params:
            preprocess=config["preprocess"],
            paths=model_paths(),
            auto=[n for n in AUTO_NOTES if n.startswith("preprocess.")],
            code=code_hash("hybrid.stages.preprocess"),
        script:
            "../workflow/scripts/preprocess.py"

else:

    rule preprocess_chunk:
        input:
            manifest="results/manifest.parquet",
        output:
            # The part's skipped records; its shards go to results/shards/ (kept across failures).
            records=f"results/shards/chunks/{{chunk}}-of-{PREPROCESS_CHUNKS}.parquet",
        log:
            "results/logs/preprocess-{chunk}.log",
        benchmark:
            "results/benchmarks/preprocess-{chunk}.tsv"
        wildcard_constraints:
            chunk=r"\d+",
        conda:
            "../envs/hybrid.yaml"
        threads: max(1, config["preprocess"]["workers"])
        resources:
            mem_mb=8000,
            runtime=240,
        params:
            preprocess=config["preprocess"],
            paths=model_paths(),
            auto=[n for n in AUTO_NOTES if n.startswith("preprocess.")],
            code=code_hash("hybrid.stages.preprocess"),
        script:
            "../workflow/scripts/preprocess_chunk.py"

    rule preprocess:
        input:
            manifest="results/manifest.parquet",
            records=expand(
                "results/shards/chunks/{chunk}-of-{n}.parquet",
                chunk=range(PREPROCESS_CHUNKS),
                n=PREPROCESS_CHUNKS,
            ),
        output:
            index="results/shards/index.parquet",
        log:
            "results/logs/preprocess.log",
        conda:
            "../envs/hybrid.yaml"
        resources:
            mem_mb=2000,
            runtime=30,
        params:
            preprocess=config["preprocess"],
            paths=model_paths(),
            code=code_hash("hybrid.stages.preprocess"),
        script:
            "../workflow/scripts/preprocess_gather.py"
