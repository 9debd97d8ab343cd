"""Snakemake adapter: global hybrids, local anomalies and normal images into results/generated/."""

from pathlib import Path

from hybrid.data.manifest import read_manifest
from hybrid.log import setup_logging
from hybrid.stages.generate import GenerateConfig, run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
run(
    snakemake.input.checkpoint,  # noqa: F821
    snakemake.input.index,  # noqa: F821
    read_manifest(snakemake.input.manifest),  # noqa: F821
    Path(snakemake.output.manifest).parent,  # noqa: F821
    GenerateConfig.from_dict(snakemake.params.generate),  # noqa: F821
    depth_checkpoint=snakemake.input.get("depth_checkpoint") or None,  # noqa: F821 (train_depth.enabled)
)
