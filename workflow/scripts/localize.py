"""Snakemake adapter: Blaze localisation on the real test images, the strips, and Boot vs Flare quality."""

from hybrid.log import setup_logging
from hybrid.stages.localize import Inputs, LocalizeConfig, Outputs, run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
run(
    Inputs(manifest=i.manifest, index=i.index, boot=i.boot, flare=i.flare, blaze=i.blaze, regions=i.get("regions")),
    Outputs(json=o.json, table=o.table, strips=o.strips, quality_json=o.quality_json, quality_table=o.quality_table),
    LocalizeConfig.from_dict(p.localize, p.quality),
    flare_cfg=p.flare,
    manipulate_cfg=p.manipulate,
    sam_cfg=p.sam,
    evaluate_cfg=p.evaluate,
    threads=snakemake.threads,  # noqa: F821
)
