"""Command-line and typed client for the asyncdiff Triton model."""
