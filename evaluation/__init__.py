"""`make eval`: zero-shot classification, retrieval, linear probe and k-NN with a run's EMA teachers."""
