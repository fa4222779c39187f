"""Training shards -> batches: view recipes, the DALI and torch backends, sample order, mixing, the shard cache."""
