"""Snakemake adapter: write the industrial demo dataset (an MVTec AD tree)."""

import logging

from hybrid.data.demo_industrial import IndustrialDemoConfig, make_demo_industrial
from hybrid.log import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
cfg = IndustrialDemoConfig.from_dict(snakemake.params.demo)  # noqa: F821
summary = make_demo_industrial(snakemake.params.out_dir, cfg)  # noqa: F821
logging.getLogger("demo_industrial").info("industrial demo dataset: %s", summary)
