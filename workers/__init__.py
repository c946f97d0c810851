"""Per-device code: the worker shell, the model runner, models, parallel layers, KV cache."""
