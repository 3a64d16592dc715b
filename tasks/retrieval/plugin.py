"""Registers the retrieval task with the harness."""
