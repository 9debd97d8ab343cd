"""Snakemake adapter: decode, resize, edges and depth into results/shards/."""

from pathlib import Path

from hybrid.data.manifest import read_manifest
from hybrid.log import setup_logging
from hybrid.stages.preprocess import PreprocessConfig, run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
cfg = PreprocessConfig.from_dict({**snakemake.params.preprocess, "paths": snakemake.params.paths})  # noqa: F821
run(read_manifest(snakemake.input.manifest), Path(snakemake.output.index).parent, cfg,  # noqa: F821
           auto=snakemake.params.auto)  # noqa: F821 (what preprocess.* auto resolved to)
