"""Image-report retrieval."""
