"""Distributed tensor-parallel long-context LLM runtime: the driver side.

from dist_runtime import Runtime, SamplingParams

The public names load on first use, so `import dist_runtime.config` (which worker processes
do) pulls in nothing of the driver: no engine, job store, Jinja or tqdm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "Beam": "dist_runtime.beam_search",
    "BeamSearchParams": "dist_runtime.beam_search",
    "CacheConfig": "dist_runtime.config",
    "ConfigError": "dist_runtime.config",
    "ModelConfig": "dist_runtime.config",
    "ParallelConfig": "dist_runtime.config",
    "RuntimeConfig": "dist_runtime.config",
    "SchedulerConfig": "dist_runtime.config",
    "SamplingParams": "dist_runtime.sampling_params",
    "RequestOutput": "dist_runtime.engine.outputs",
    "TokenLogprobs": "dist_runtime.engine.outputs",
    "IdempotencyKeyConflictError": "dist_runtime.jobs.store",
    "JobFailedError": "dist_runtime.jobs.store",
    "JobState": "dist_runtime.jobs.store",
    "JobStatus": "dist_runtime.jobs.store",
    "UnknownJobError": "dist_runtime.jobs.store",
    "Runtime": "dist_runtime.runtime",
}

__all__ = [
    "Beam",
    "BeamSearchParams",
    "CacheConfig",
    "ConfigError",
    "IdempotencyKeyConflictError",
    "JobFailedError",
    "JobState",
    "JobStatus",
    "ModelConfig",
    "ParallelConfig",
    "RequestOutput",
    "Runtime",
    "RuntimeConfig",
    "SamplingParams",
    "SchedulerConfig",
    "TokenLogprobs",
    "UnknownJobError",
]

if TYPE_CHECKING:
    from dist_runtime.beam_search import Beam, BeamSearchParams
    from dist_runtime.config import (
        CacheConfig,
        ConfigError,
        ModelConfig,
        ParallelConfig,
        RuntimeConfig,
        SchedulerConfig,
    )
    from dist_runtime.engine.outputs import RequestOutput, TokenLogprobs
    from dist_runtime.jobs.store import (
        IdempotencyKeyConflictError,
        JobFailedError,
        JobState,
        JobStatus,
        UnknownJobError,
    )
    from dist_runtime.runtime import Runtime
    from dist_runtime.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'dist_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
