"""Parallel building blocks: each creates only its local shard and knows how to load it."""
