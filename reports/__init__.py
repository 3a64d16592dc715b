"""Paper-ready tables and figures built from result records."""
