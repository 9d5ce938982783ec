"""Prepared data sets: the dataset card (`card`), the Parquet shard reader (`prepared`), and for the prepare stage
the image sources (`sources`) and the shard / card writer (`writer`)."""
