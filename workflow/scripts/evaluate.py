"""Snakemake adapter: Inception Score and cluster LPIPS of results/generated into results/metrics/."""

from pathlib import Path

from hybrid.log import setup_logging
from hybrid.stages.evaluate import EvaluateConfig, run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
cfg = EvaluateConfig.from_dict({**snakemake.params.evaluate, "paths": snakemake.params.paths})  # noqa: F821
run(
    snakemake.input.generated,  # noqa: F821
    Path(snakemake.input.generated).parent,  # noqa: F821
    snakemake.input.manifest,  # noqa: F821
    snakemake.input.index,  # noqa: F821
    Path(snakemake.output.json).parent,  # noqa: F821
    cfg,
)
