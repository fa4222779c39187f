"""Networks and losses of Harmony. Knows nothing of files or shards."""
