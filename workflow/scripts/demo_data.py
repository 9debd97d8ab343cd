"""Snakemake adapter: write the embedded demo dataset."""

import logging

from hybrid.data.demo import DemoConfig, make_demo
from hybrid.log import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
summary = make_demo(snakemake.params.out_dir, DemoConfig.from_dict(snakemake.params.demo))  # noqa: F821
logging.getLogger("demo_data").info("demo dataset: %s", summary)
