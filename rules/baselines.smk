# Baselines: model-free anomalies (DRAEM's Perlin noise, CutPaste) drawn from the same normal
# training images as generate, written in the generate stage's shard format (kind local, decoder =
# the method) so that evaluate, the defect classifier and segment can take them like generated
# shards. By default a stage of industrial layouts only (baselines.enabled: auto); BASELINES_OUTPUTS
# is empty where it is off, as CLASSIFY_OUTPUTS is for non-butterfly layouts.

BASELINES_OUTPUTS = {"manifest": "results/baselines/manifest.parquet"} if stage_enabled("baselines") else {}


if BASELINES_OUTPUTS:

    rule baselines:
        input:
            index="results/shards/index.parquet",
            manifest="results/manifest.parquet",
            # A texture folder (DTD) is an input, so that new or changed textures rerun the rule; one
            # that does not exist is left to the stage, whose error names baselines.perlin.textures.
            textures=texture_input(),
        output:
            # Shards (shard-NNNNN.h5) beside the manifest, kept across runs when their fingerprint
            # matches; contact sheets in results/baselines/sheets/<category>.png.
            manifest=BASELINES_OUTPUTS["manifest"],
        log:
            "results/logs/baselines.log",
        benchmark:
            "results/benchmarks/baselines.tsv"
        conda:
            "../envs/hybrid.yaml"
        resources:
            mem_mb=8000,
            runtime=60,
        params:
            baselines=config["baselines"],
            # The sources are the rows generate draws from; a null baselines.count is its local count.
            select=config["generate"]["select"],
            default_count=config["generate"]["local"]["count"],
            code=code_hash("hybrid.stages.baselines"),
        script:
            "../workflow/scripts/baselines.py"
