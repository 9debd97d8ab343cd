"""Snakemake adapter: the preprocess gather (preprocess.chunks > 1): index.parquet and
skipped.parquet from the parts, exactly as one preprocess job writes them."""

from pathlib import Path

from hybrid.data.manifest import read_manifest
from hybrid.log import setup_logging
from hybrid.stages.preprocess import PreprocessConfig, gather

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
cfg = PreprocessConfig.from_dict({**snakemake.params.preprocess, "paths": snakemake.params.paths})  # noqa: F821
gather(read_manifest(snakemake.input.manifest), Path(snakemake.output.index).parent, cfg,  # noqa: F821
       list(snakemake.input.records))  # noqa: F821
