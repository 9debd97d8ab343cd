"""Snakemake adapter: AnomalyFactory's BlazeDetector, learning from Flare's anomalies, resumable."""

from hybrid.log import setup_logging
from hybrid.stages.blaze import run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
p = snakemake.params  # noqa: F821
run(
    index=snakemake.input.index,  # noqa: F821
    manifest=snakemake.input.manifest,  # noqa: F821
    flare=snakemake.input.flare,  # noqa: F821
    checkpoint=snakemake.output.checkpoint,  # noqa: F821
    losses=snakemake.output.losses,  # noqa: F821
    samples=snakemake.output.samples,  # noqa: F821
    work_root=p.work_root,
    train_cfg=p.train,
    blaze_cfg=p.blaze,
    flare_cfg=p.flare,
    augment_cfg=p.augment,
    manipulate_cfg=p.manipulate,
    sam_cfg=p.sam,
    regions=snakemake.input.get("regions"),  # noqa: F821
    select=p.select,
    per_dataset=p.per_dataset,
    seed=p.seed,
    paths=p.paths,
    threads=snakemake.threads,  # noqa: F821
)
