"""Snakemake adapter: SAM candidate regions of every preprocessed image (AnomalyFactory's semantic regions)."""

from hybrid.log import setup_logging
from hybrid.stages.sam_regions import run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
p = snakemake.params  # noqa: F821
run(
    index=snakemake.input.index,  # noqa: F821
    out=snakemake.output.regions,  # noqa: F821
    cfg=p.sam,
    fallback=p.fallback,
    paths=p.paths,
    threads=snakemake.threads,  # noqa: F821
)
