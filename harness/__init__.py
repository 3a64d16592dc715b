"""Core of brat-harness: data layer, preprocessing, encoders, caching, suites and statistics."""

__version__ = "0.1.0"
