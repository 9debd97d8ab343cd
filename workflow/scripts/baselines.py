"""Snakemake adapter: Perlin and CutPaste anomalies, in the generate stage's format, into results/baselines/."""

from pathlib import Path

from hybrid.data.manifest import read_manifest
from hybrid.log import setup_logging
from hybrid.stages.baselines import BaselinesConfig, run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
params = snakemake.params  # noqa: F821
run(
    snakemake.input.index,  # noqa: F821
    read_manifest(snakemake.input.manifest),  # noqa: F821
    Path(snakemake.output.manifest).parent,  # noqa: F821
    BaselinesConfig.from_dict(params.baselines, default_count=params.default_count),
    select=params.select,
)
