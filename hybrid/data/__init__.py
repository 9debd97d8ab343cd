"""Datasets: readers that return one manifest DataFrame, the demo generator, and HDF5 shards."""
