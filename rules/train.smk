# Train: AnomalyHybrid (RGB level) on the normal training images of the shards.


rule train:
    input:
        index="results/shards/index.parquet",
        manifest="results/manifest.parquet",
    output:
        checkpoint=directory("results/train/checkpoint"),
        losses=report(
            "results/train/losses.csv",
            caption="../workflow/report/train_losses.rst",
            category="Training",
            subcategory="AnomalyHybrid",
        ),
        samples=report(
            directory("results/train/samples"),
            patterns=["step-{step}.png"],
            caption="../workflow/report/train_samples.rst",
            category="Training",
            subcategory="AnomalyHybrid",
        ),
    log:
        "results/logs/train.log",
    benchmark:
        "results/benchmarks/train.tsv"
    conda:
        "../envs/hybrid.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=24 * 60,
    params:
        model=config["model"],
        train={k: v for k, v in config["train"].items() if k != "select"},
        select=config["train"]["select"],
        augment=config["augment"],
        paths=model_paths(),
        # Periodic checkpoints live here, outside the outputs Snakemake deletes when a job fails,
        # in a folder named by the run's settings: a killed job resumes, a changed one starts over.
        work_root="results/train/work",
        code=code_hash("hybrid.stages.train"),
    script:
        "../workflow/scripts/train.py"


# AnomalyHybrid* (paper 003, Sec. 3.1): the depth-level generator, started from the RGB-level
# weights, learns the depth and edge maps of a target image. Optional: train_depth.enabled.


rule train_depth:
    input:
        index="results/shards/index.parquet",
        manifest="results/manifest.parquet",
        init="results/train/checkpoint",
    output:
        checkpoint=directory("results/train_depth/checkpoint"),
        losses=report(
            "results/train_depth/losses.csv",
            caption="../workflow/report/train_losses.rst",
            category="Training",
            subcategory="AnomalyHybrid* (depth level)",
        ),
        samples=report(
            directory("results/train_depth/samples"),
            patterns=["step-{step}.png"],
            caption="../workflow/report/train_samples.rst",
            category="Training",
            subcategory="AnomalyHybrid* (depth level)",
        ),
    log:
        "results/logs/train_depth.log",
    benchmark:
        "results/benchmarks/train_depth.tsv"
    conda:
        "../envs/hybrid.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=12 * 60,
    params:
        model={**config["model"], "level": "depth", "conditions": None},
        train={
            **{k: v for k, v in config["train"].items() if k != "select"},
            **{k: v for k, v in config["train_depth"].items() if k != "enabled"},
        },
        select=config["train"]["select"],
        augment=config["augment"],
        paths=model_paths(),
        work_root="results/train_depth/work",
        code=code_hash("hybrid.stages.train"),
    script:
        "../workflow/scripts/train.py"
