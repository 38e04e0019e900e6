"""Serving: the KV-cache decode step derived from a traced graph, and generation on it."""
