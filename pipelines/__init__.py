"""Ray Data pipelines: raw image/text corpora -> validated Parquet shards + manifest -> training batches."""
