# Generate: global hybrids, local anomalies (manipulated edge and depth maps) and normal images,
# from both decoders (AHD, AHE), each with its fusion mask M.
# generate.chunks = K > 1 scatters it: K generate_chunk jobs (e.g. one per GPU) each write a
# contiguous range of the shards (a failed one reruns alone), then the generate rule gathers them
# into the manifest and the contact sheets, exactly as the single job (K = 1) writes them.

GENERATE_CHUNKS = int(config["generate"]["chunks"])
GENERATE_INPUTS = {
    "index": "results/shards/index.parquet",
    "manifest": "results/manifest.parquet",
    "checkpoint": "results/train/checkpoint",
    # AnomalyHybrid* turns every generated image into aligned depth and edge anomalies.
    "depth_checkpoint": ("results/train_depth/checkpoint" if config["train_depth"]["enabled"] else []),
}

if GENERATE_CHUNKS == 1:

    rule generate:
        input:
            **GENERATE_INPUTS,
        output:
            # Shards (shard-NNNNN.h5) are written beside the manifest, each whole under a temporary
            # name, and kept when a run fails so that the rerun resumes at the first missing shard;
            # contact sheets go to results/generated/sheets/<category>.png.
            manifest="results/generated/manifest.parquet",
        log:
            "results/logs/generate.log",
        benchmark:
            "results/benchmarks/generate.tsv"
        conda:
            "../envs/hybrid.yaml"
        threads: max(1, config["generate"]["workers"])
        resources:
            mem_mb=16000,
            runtime=240,
        params:
            generate=config["generate"],
            code=code_hash("hybrid.stages.generate"),
        script:
            "../workflow/scripts/generate.py"

else:

    rule generate_chunk:
        input:
            **GENERATE_INPUTS,
        output:
            # The part's manifest rows; its shards go to results/generated/ (kept across failures).
            rows=f"results/generated/chunks/{{chunk}}-of-{GENERATE_CHUNKS}.parquet",
        log:
            "results/logs/generate-{chunk}.log",
        benchmark:
            "results/benchmarks/generate-{chunk}.tsv"
        wildcard_constraints:
            chunk=r"\d+",
        conda:
            "../envs/hybrid.yaml"
        threads: max(1, config["generate"]["workers"])
        resources:
            mem_mb=16000,
            runtime=240,
        params:
            generate=config["generate"],
            code=code_hash("hybrid.stages.generate"),
        script:
            "../workflow/scripts/generate_chunk.py"

    rule generate:
        input:
            **GENERATE_INPUTS,
            rows=expand(
                "results/generated/chunks/{chunk}-of-{n}.parquet",
                chunk=range(GENERATE_CHUNKS),
                n=GENERATE_CHUNKS,
            ),
        output:
            manifest="results/generated/manifest.parquet",
        log:
            "results/logs/generate.log",
        conda:
            "../envs/hybrid.yaml"
        resources:
            mem_mb=4000,
            runtime=60,
        params:
            generate=config["generate"],
            code=code_hash("hybrid.stages.generate"),
        script:
            "../workflow/scripts/generate_gather.py"
