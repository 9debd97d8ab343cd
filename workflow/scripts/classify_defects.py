"""Snakemake adapter: ResNet-34 defect classification of results/generated into results/metrics/."""

from pathlib import Path

from hybrid.log import setup_logging
from hybrid.stages.classify_defects import ClassifyDefectsConfig, run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
run(
    snakemake.input.generated,  # noqa: F821
    Path(snakemake.input.generated).parent,  # noqa: F821
    snakemake.input.manifest,  # noqa: F821
    snakemake.input.index,  # noqa: F821
    Path(snakemake.output.json).parent,  # noqa: F821
    ClassifyDefectsConfig.from_dict({**snakemake.params.classify_defects, "paths": snakemake.params.paths}),  # noqa: F821
)
