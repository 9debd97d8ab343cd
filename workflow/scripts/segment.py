"""Snakemake adapter: train and test the segmentation models, resuming from the work folder."""

from hybrid.log import setup_logging
from hybrid.stages.segment import Inputs, Outputs, SegmentConfig, run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
i, o = snakemake.input, snakemake.output  # noqa: F821
run(
    Inputs(i.manifest, i.index, i.generated),
    Outputs(o.json, o.table, o.models, o.strips),
    SegmentConfig.from_dict(snakemake.params.segment),  # noqa: F821
    work_root=snakemake.params.work_root,  # noqa: F821
    threads=snakemake.threads,  # noqa: F821
)
