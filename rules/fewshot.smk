# Few-shot: PatchCore fitted on k real normal images per category, alone and together with normal
# images generated from those same k images by the trained generator, scored on the real test set
# (image AUROC, pixel AUROC, AU-PRO). Industrial layouts by default (fewshot.enabled: auto, see
# stage_enabled in rules/common.smk); FEWSHOT_OUTPUTS is empty where it is off.


FEWSHOT_OUTPUTS = (
    {"json": "results/metrics/fewshot.json", "table": "results/metrics/fewshot.parquet"}
    if stage_enabled("fewshot")
    else {}
)


if FEWSHOT_OUTPUTS:

    rule fewshot:
        input:
            index="results/shards/index.parquet",
            manifest="results/manifest.parquet",
            # fewshot.train_generator is false (the only setting for now): the generated normals
            # come from the run's trained generator, which saw every normal training image. None
            # asked for (generated_per_shot or max_generated 0): PatchCore rows only, no generator.
            checkpoint=(
                "results/train/checkpoint"
                if config["fewshot"]["generated_per_shot"] and config["fewshot"]["max_generated"]
                else []
            ),
        output:
            json=report(
                FEWSHOT_OUTPUTS["json"],
                caption="../workflow/report/fewshot.rst",
                category="Evaluation",
                subcategory="Few-shot PatchCore",
            ),
            table=FEWSHOT_OUTPUTS["table"],
        log:
            "results/logs/fewshot.log",
        benchmark:
            "results/benchmarks/fewshot.tsv"
        conda:
            "../envs/hybrid.yaml"
        threads: 2
        resources:
            mem_mb=16000,
            runtime=240,
            gpu=0 if config["fewshot"]["device"] == "cpu" else 1,
        params:
            fewshot=config["fewshot"],
            paths=model_paths(),
            code=code_hash("hybrid.stages.fewshot"),
        script:
            "../workflow/scripts/fewshot.py"
