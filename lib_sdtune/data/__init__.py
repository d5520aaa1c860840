"""Datasets: scan (kohya folders, dataset_config TOML), captions and images per step, buckets, caches, loading."""
