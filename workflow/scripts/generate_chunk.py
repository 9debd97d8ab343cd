"""Snakemake adapter: one part of the generate scatter (generate.chunks > 1): its range of shards
in results/generated/, and their rows as the job's output."""

from pathlib import Path

from hybrid.data.manifest import read_manifest
from hybrid.io import write_parquet_atomic
from hybrid.log import setup_logging
from hybrid.stages.generate import GenerateConfig, run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
cfg = GenerateConfig.from_dict(snakemake.params.generate)  # noqa: F821
rows = run(
    snakemake.input.checkpoint,  # noqa: F821
    snakemake.input.index,  # noqa: F821
    read_manifest(snakemake.input.manifest),  # noqa: F821
    Path(snakemake.output.rows).parent.parent,  # noqa: F821 (results/generated/chunks/<part>.parquet)
    cfg,
    depth_checkpoint=snakemake.input.get("depth_checkpoint") or None,  # noqa: F821 (train_depth.enabled)
    part=(int(snakemake.wildcards.chunk), cfg.chunks),  # noqa: F821
)
write_parquet_atomic(rows, snakemake.output.rows)  # noqa: F821
