"""Snakemake adapter: AnomalyFactory's BootGenerator (the train stage with the AF model forced)."""

from hybrid.log import setup_logging
from hybrid.stages.boot import run

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
    boot_cfg=p.boot,
    augment_cfg=p.augment,
    select=p.select,
    per_dataset=p.per_dataset,
    seed=p.seed,
    paths=p.paths,
    threads=snakemake.threads,  # noqa: F821
)
