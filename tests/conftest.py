"""Shared fixtures: tiny random checkpoints in both layouts, written once per session."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dist_runtime.random_checkpoint import write_random_checkpoint  # noqa: E402

TINY_SHAPES: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=8, num_kv_heads=4
)
"""Shapes of the session checkpoints: GQA with 2 query heads per KV head."""
TINY_SEED = 0
TINY_SHARD_BYTES = 200_000
"""About 600 KB of fp32 weights split into >= 3 shards, so loaders must follow the index."""


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sharded Llama-layout checkpoint with tokenizer."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-llama"),
        architecture="llama",
        seed=TINY_SEED,
        max_shard_bytes=TINY_SHARD_BYTES,
        **TINY_SHAPES,
    )


@pytest.fixture(scope="session")
def tiny_internlm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sharded InternLM2-layout checkpoint, same function as `tiny_llama_dir`."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-internlm2"),
        architecture="internlm2",
        seed=TINY_SEED,
        max_shard_bytes=TINY_SHARD_BYTES,
        **TINY_SHAPES,
    )
