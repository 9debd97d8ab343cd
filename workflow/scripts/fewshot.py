"""Snakemake adapter: few-shot PatchCore with and without generated normals into results/metrics/fewshot.*."""

from hybrid.data.manifest import read_manifest
from hybrid.log import setup_logging
from hybrid.stages.fewshot import FewShotConfig, run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
run(
    snakemake.input.index,  # noqa: F821
    read_manifest(snakemake.input.manifest),  # noqa: F821
    snakemake.input.get("checkpoint") or None,  # noqa: F821 (none when no generated normals are asked for)
    snakemake.output.json,  # noqa: F821
    snakemake.output.table,  # noqa: F821
    FewShotConfig.from_dict(snakemake.params.fewshot),  # noqa: F821
    paths=snakemake.params.paths,  # noqa: F821
    threads=snakemake.threads,  # noqa: F821
)
