"""The executor interface the driver talks to."""

from __future__ import annotations

import abc
import re

from dist_runtime.protocol import StepPlan, StepResult


class WorkerError(RuntimeError):
    """A worker failed, died or timed out: its group is replaced."""


BROKEN_DEVICE = re.compile(
    r"CUDA error|cudaError|CUBLAS_STATUS|illegal memory access|device-side assert|NCCL|"
    r"ProcessGroup|Connection (reset|closed)|Broken pipe|a peer is hung or dead",
    re.IGNORECASE,
)
"""Errors that leave a worker's device or communicators unusable (a sticky CUDA error fails
every later step): its group is replaced rather than the step retried in place."""


def breaks_device(error: BaseException) -> bool:
    """Whether `error` names a broken device or communicator (`BROKEN_DEVICE`)."""
    return BROKEN_DEVICE.search(str(error)) is not None


class StepFailedError(RuntimeError):
    """A step raised on its workers, and every worker finished it: the group is in step and
    runs on (the engine computes the step's requests again, as after any step that raised)."""


class Executor(abc.ABC):
    weight_bytes_read: list[int]
    """Bytes of checkpoint each worker read while loading, by rank."""

    @abc.abstractmethod
    def num_available_blocks(self) -> int:
        """KV blocks every worker can hold (the minimum over workers)."""

    @abc.abstractmethod
    def num_host_blocks(self) -> int:
        """KV blocks each worker's host tier holds (`cache.host_kv_cache_gb`; 0: none)."""

    @abc.abstractmethod
    def allocate_kv_cache(
        self, num_blocks: int, num_host_blocks: int = 0, disk_dir: str | None = None
    ) -> None:
        """Each worker's KV cache, host tier and disk tier (`disk_dir`: see
        `ModelRunner.allocate_kv_cache`)."""

    @abc.abstractmethod
    def disk_kv_blocks(self) -> list[tuple[int, int, list[str]]]:
        """Each worker's (cp rank, disk-tier blocks per pool, digests on disk), by rank."""

    @abc.abstractmethod
    def load_lora(self, slot: int, name: str, path: str, digest: bytes = b"") -> None:
        """Every worker puts the adapter into its reserved `slot`: from its host cache when that
        holds `digest`, else read from the folder `path`."""

    @abc.abstractmethod
    def unload_lora(self, slot: int) -> None:
        """Every worker zeroes its reserved adapter `slot`."""

    @abc.abstractmethod
    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step on every worker; the driver rank's result."""

    def launch(self, plan: StepPlan) -> None:
        """Start a step; its result comes from the matching `collect` (steps are collected in
        launch order). The engine calls it only where `runs_ahead()`."""
        raise NotImplementedError(f"{type(self).__name__} does not launch steps ahead")

    def collect(self) -> StepResult:
        """The result of the oldest launched step not collected yet."""
        raise NotImplementedError(f"{type(self).__name__} does not launch steps ahead")

    @abc.abstractmethod
    def flush_disk_kv(self) -> None:
        """Wait until every worker's disk tier has done its queued writes and deletions."""

    def runs_ahead(self) -> bool:
        """Whether `launch` returns before the step ends, so the driver can plan and launch the
        next decode step meanwhile (whose `LAST_SAMPLED` token ids the workers fill in)."""
        return False

    @abc.abstractmethod
    def memory_stats(self) -> list[dict[str, int]]:
        """Each worker's memory (see `Worker.memory_stats`), by rank."""

    @abc.abstractmethod
    def comm_stats(self, reset: bool = False) -> list[dict[str, dict[str, float]]]:
        """Each worker's collective counters (see `Worker.comm_stats`), by rank; with reset,
        each worker zeroes its counters after reading them."""

    @abc.abstractmethod
    def step_stats(self) -> list[dict[str, int]]:
        """Each worker's step counters (see `Worker.step_stats`), by rank."""

    @abc.abstractmethod
    def shutdown(self, keep_ray: bool = False) -> None:
        """Release every worker (kill the processes); keep_ray leaves a Ray this executor
        started running, for a replacement executor."""
