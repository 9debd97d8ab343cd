"""hybrid: AnomalyHybrid and AnomalyFactory, from normal images to generated anomalies and hybrids.

The library never imports snakemake; the workflow's scripts are thin adapters around it.
"""

__version__ = "0.1.0"
