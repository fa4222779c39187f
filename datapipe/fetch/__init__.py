"""`make download`: a url list (CC3M, CC12M or your own) -> raw WebDataset shards, with img2dataset."""
