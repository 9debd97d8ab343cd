"""Snakemake adapter: the generated anomalies and masks as an MVTec AD folder tree."""

from hybrid.log import setup_logging
from hybrid.stages.export import ExportConfig, Inputs, run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
i = snakemake.input  # noqa: F821
run(Inputs(i.manifest, i.index, i.generated), snakemake.output.tree, ExportConfig.from_dict(snakemake.params.export))  # noqa: F821
