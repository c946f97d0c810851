"""Distributed tensor-parallel long-context LLM runtime: the driver side.

from dist_runtime import Runtime, SamplingParams
"""

from dist_runtime.config import (
    CacheConfig,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    RuntimeConfig,
    SchedulerConfig,
)
from dist_runtime.job_store import JobFailedError, JobState, JobStatus, UnknownJobError
from dist_runtime.outputs import RequestOutput, TokenLogprobs
from dist_runtime.runtime import Runtime
from dist_runtime.sampling_params import SamplingParams

__all__ = [
    "CacheConfig",
    "ConfigError",
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
