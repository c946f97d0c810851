"""One worker in the driver's own process: tp * cp == 1, no Ray needed."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import msgpack

from dist_runtime.config import RuntimeConfig
from dist_runtime.engine.executor.base import Executor, WorkerError, breaks_device
from dist_runtime.protocol import StepPlan, StepResult
from workers.worker import Worker

logger = logging.getLogger(__name__)


class InProcessExecutor(Executor):
    def __init__(self, config: RuntimeConfig):
        started = time.perf_counter()
        self.worker = Worker(msgpack.packb(config.to_dict()), rank=0)
        self.weight_bytes_read = [self.worker.init_model("127.0.0.1", 0)]
        logger.info(
            "loaded weights: %.0f MiB in %.1f s (in this process)",
            self.weight_bytes_read[0] / 2**20,
            time.perf_counter() - started,
        )

    def num_available_blocks(self) -> int:
        return self.worker.num_available_blocks()

    def num_host_blocks(self) -> int:
        return self.worker.num_host_blocks()

    def allocate_kv_cache(
        self, num_blocks: int, num_host_blocks: int = 0, disk_dir: str | None = None
    ) -> None:
        self.worker.allocate_kv_cache(num_blocks, num_host_blocks, disk_dir)

    def disk_kv_blocks(self) -> list[tuple[int, int, list[str]]]:
        return [self.worker.disk_kv_blocks()]

    def load_lora(self, slot: int, name: str, path: str, digest: bytes = b"") -> None:
        self.worker.load_lora(slot, name, path, digest)

    def unload_lora(self, slot: int) -> None:
        self.worker.unload_lora(slot)

    def execute(self, plan: StepPlan) -> StepResult:
        # No codec in one process: the messages it would check are built by this code on both
        # sides (the Ray executor, and the protocol tests, take the encoded path).
        with _device_check(f"running step {plan.step_id}"):
            out = self.worker.execute_plan(plan)
        assert out is not None
        return out

    def launch(self, plan: StepPlan) -> None:
        with _device_check(f"launching step {plan.step_id}"):
            self.worker.launch_plan(plan)

    def collect(self) -> StepResult:
        with _device_check("collecting a step"):
            out = self.worker.collect_plan()
        assert out is not None
        return out

    def runs_ahead(self) -> bool:
        return self.worker.runs_ahead()

    def flush_disk_kv(self) -> None:
        self.worker.flush_disk_kv()

    def memory_stats(self) -> list[dict[str, int]]:
        return [self.worker.memory_stats()]

    def comm_stats(self, reset: bool = False) -> list[dict[str, dict[str, float]]]:
        return [self.worker.comm_stats(reset)]

    def step_stats(self) -> list[dict[str, int]]:
        return [self.worker.step_stats()]

    def shutdown(self, keep_ray: bool = False) -> None:
        self.worker.shutdown()


@contextlib.contextmanager
def _device_check(what: str) -> Iterator[None]:
    """A step error that names a broken device (a sticky CUDA error fails every later step)
    becomes a WorkerError, so the engine replaces the worker (or, when the device cannot start
    one again, stops with the cause) instead of failing request after request on it. Any
    other error is a step that raised: the engine computes its requests again."""
    try:
        yield
    except WorkerError:
        raise
    except Exception as e:
        if breaks_device(e):
            raise WorkerError(f"the device broke while {what}: {e}") from e
        raise
