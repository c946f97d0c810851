"""Checkpoint formats: GGUF conversion, random checkpoints, the demo model."""
