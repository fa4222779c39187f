"""`make compare`: methods side by side on the same shards and budget, with seeds and intervals."""
