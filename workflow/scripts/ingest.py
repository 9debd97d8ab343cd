"""Snakemake adapter: read the configured dataset layout(s) into results/manifest.parquet."""

from hybrid.log import setup_logging
from hybrid.stages.ingest import run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
run(
    snakemake.params.datasets,  # noqa: F821
    missing=snakemake.params.missing,  # noqa: F821
    manifest_path=snakemake.output.manifest,  # noqa: F821
    skipped_path=snakemake.output.skipped,  # noqa: F821
    protocol=snakemake.params.protocol,  # noqa: F821
)
