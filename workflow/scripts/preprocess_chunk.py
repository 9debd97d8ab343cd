"""Snakemake adapter: one part of the preprocess scatter (preprocess.chunks > 1): its range of
shards in results/shards/, and its skipped records as the job's output."""

from pathlib import Path

from hybrid.data.manifest import read_manifest
from hybrid.io import write_parquet_atomic
from hybrid.log import setup_logging
from hybrid.stages.preprocess import PreprocessConfig, run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
p = snakemake.params  # noqa: F821
cfg = PreprocessConfig.from_dict({**p.preprocess, "paths": p.paths})
shard_dir = Path(snakemake.output.records).parent.parent  # noqa: F821 (results/shards/chunks/<part>.parquet)
skipped = run(read_manifest(snakemake.input.manifest), shard_dir, cfg, auto=p.auto,  # noqa: F821
                     part=(int(snakemake.wildcards.chunk), cfg.chunks))  # noqa: F821
write_parquet_atomic(skipped, snakemake.output.records)  # noqa: F821
