"""Tokenization, webdataset shards, streaming packed batches, resumable loader state."""
