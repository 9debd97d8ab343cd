"""One module per Snakemake rule, each a run(...)."""
