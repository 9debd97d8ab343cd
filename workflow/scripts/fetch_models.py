"""Snakemake adapter: download the weights the configured stages need (run on a login node)."""

import logging

from hybrid.log import setup_logging
from hybrid.models.store import fetch_to_manifest

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
found = fetch_to_manifest(snakemake.params.names, snakemake.params.paths, snakemake.output[0])  # noqa: F821
logging.getLogger("fetch_models").info("weights present: %s", found)
