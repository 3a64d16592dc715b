"""Downstream task families that consume manifest rows and encoders and emit result records."""
