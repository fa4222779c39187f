"""harmony-pipe's data pipeline: url list -> WebDataset shards -> training batches."""
