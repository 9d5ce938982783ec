"""Prepared data sets: the dataset card and the Parquet shard reader."""
