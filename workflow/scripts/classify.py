"""Snakemake adapter: DINOv2 hybrid classification with and without generated hybrids."""

from pathlib import Path

from hybrid.log import setup_logging
from hybrid.stages.classify import ClassifyStageConfig, run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
cfg = ClassifyStageConfig.from_dict({**snakemake.params.classify, "paths": snakemake.params.paths})  # noqa: F821
run(
    snakemake.input.manifest,  # noqa: F821
    snakemake.input.index,  # noqa: F821
    snakemake.input.generated,  # noqa: F821
    Path(snakemake.input.generated).parent,  # noqa: F821
    snakemake.input.reference,  # noqa: F821
    Path(snakemake.output.json).parent,  # noqa: F821
    cfg,
)
