"""Shared fixtures: tiny random checkpoints in both layouts, written once per session."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Triton kernels run in its interpreter where there is no GPU. Triton reads this when it is first
# imported, so it is set here, before any test module imports a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dist_runtime import heap  # noqa: E402
from dist_runtime.formats.random_checkpoint import write_random_checkpoint  # noqa: E402

_FREEZE = heap.freeze


def pytest_configure(config: pytest.Config) -> None:
    """Hugging Face's `kernels` distribution (a dependency of transformers >= 5.25) has the
    import name of this project's `kernels/` package; transformers, the tests' oracle, then
    fails to import. Say so once instead of in every test that imports it."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    raise pytest.UsageError(
        f"the `kernels` distribution {version} (Hugging Face hub kernels) is installed; its "
        "import name is this project's kernels/ package, so transformers cannot import. "
        "Run `pip uninstall -y kernels` and `pip install 'transformers<5.25'` (pyproject's pin)."
    )


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


@pytest.fixture(scope="session", autouse=True)
def _no_heap_freeze() -> Iterator[None]:
    """The tests start hundreds of runtimes in this one process, and each start's collection
    before it froze the heap (`dist_runtime.heap.freeze`) walked the whole session's heap:
    about 0.3 s a start, a quarter of tests/dist_runtime's time. In this process it is off;
    runtimes in child processes and Ray workers keep it, and so do tests that ask for
    `heap_freeze`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(heap, "freeze", lambda: None)
        yield


@pytest.fixture
def heap_freeze(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runtimes freeze the heap, as outside the tests."""
    monkeypatch.setattr(heap, "freeze", _FREEZE)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """One local Ray instance for the whole session (executors reuse an initialized Ray).

    4 logical CPUs so tp=4 fits (one CPU bundle per worker) even on a 2-core machine; the worker
    actors get the repository on PYTHONPATH so they can import `workers` and `dist_runtime`.
    """
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
        )
    yield ray
    if started:
        ray.shutdown()
