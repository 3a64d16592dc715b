"""Registers the brat encoder loaders with the harness."""
