"""Snakemake adapter: train AnomalyHybrid on results/shards, resuming from the work folder."""

from hybrid.log import setup_logging
from hybrid.stages.train import run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
p = snakemake.params  # noqa: F821
run(
    index=snakemake.input.index,  # noqa: F821
    manifest=snakemake.input.manifest,  # noqa: F821
    checkpoint=snakemake.output.checkpoint,  # noqa: F821
    losses=snakemake.output.losses,  # noqa: F821
    samples=snakemake.output.samples,  # noqa: F821
    work_root=p.work_root,
    model_cfg=p.model,
    train_cfg=p.train,
    augment_cfg=p.augment,
    select=p.select,
    paths=p.paths,
    threads=snakemake.threads,  # noqa: F821
    init_from=snakemake.input.get("init"),  # noqa: F821 (train_depth: start from the RGB-level weights)
)
