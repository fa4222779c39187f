"""Helpers every stage of the data path shares (object storage, tar shards, manifests, captions, image rules,
perceptual hashes, locks, process pools). They import nothing from the stages."""
