"""The worker actor: a thin shell around a ModelRunner, speaking msgpack bytes.

The Ray executor wraps this class with `ray.remote`; nothing here imports Ray, so the same shell
is testable in-process. Rank 0 first opens the rendezvous store (on a port the OS picks), then
every rank joins the process group and builds its model shard.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import msgpack
import torch

from dist_runtime import heap
from dist_runtime.config import WORKER_ENV, RuntimeConfig
from dist_runtime.protocol import StepPlan, StepResult, decode, encode
from workers.distributed import MeshCoords, create_store, destroy_distributed, init_distributed
from workers.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        config_bytes: bytes,
        rank: int,
        num_threads: int | None = None,
        env: dict[str, str] | None = None,
    ):
        # The driver's kernel and path switches (`WORKER_ENV`), before anything reads them.
        if env is not None:
            for key in WORKER_ENV:
                if key in env:
                    os.environ[key] = env[key]
                else:
                    os.environ.pop(key, None)
        self.config = RuntimeConfig.from_dict(
            msgpack.unpackb(config_bytes, raw=False), source="worker config"
        )
        par = self.config.parallel
        self.coords = MeshCoords.from_rank(rank, par.tp, par.cp)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self._store: Any = None
        self.runner: ModelRunner | None = None

    def create_store(self, host: str) -> int:
        """Rank 0 only: start the rendezvous store and return its port."""
        self._store, port = create_store(host, self.config.init_timeout_s)
        return port

    def init_model(self, host: str, port: int) -> int:
        """Join the process group, build and load this rank's shard; returns bytes read."""
        backend = "nccl" if self.config.resolved_device() == "cuda" else "gloo"
        if backend == "nccl":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            logger.debug("rank %d on CUDA_VISIBLE_DEVICES=%s", self.coords.rank, visible)
        comm = init_distributed(
            self.coords,
            host,
            port,
            backend,
            self.config.init_timeout_s,
            store=self._store,
            collective_timeout_s=self.config.collective_timeout_s,
        )
        self.runner = ModelRunner(self.config, comm)
        return self.runner.weight_bytes_read

    def num_available_blocks(self, sharing: int = 1) -> int:
        assert self.runner is not None
        return self.runner.num_available_blocks(sharing)

    def num_host_blocks(self) -> int:
        assert self.runner is not None
        return self.runner.num_host_blocks()

    def allocate_kv_cache(
        self, num_blocks: int, num_host_blocks: int = 0, disk_dir: str | None = None
    ) -> None:
        assert self.runner is not None
        self.runner.allocate_kv_cache(num_blocks, num_host_blocks, disk_dir)
        heap.freeze()  # the worker is set up: what it holds stays out of full collections

    def execute(self, plan_bytes: bytes) -> bytes | None:
        result = self.execute_plan(decode(plan_bytes, StepPlan))
        return None if result is None else encode(result)

    def launch(self, plan_bytes: bytes) -> None:
        """Start a step (see `ModelRunner.launch`); the driver rank's `collect` returns it."""
        self.launch_plan(decode(plan_bytes, StepPlan))

    def collect(self) -> bytes:
        """Driver rank: the oldest launched step's result."""
        result = self.collect_plan()
        assert result is not None
        return encode(result)

    def launch_plan(self, plan: StepPlan) -> None:
        """Start a step without waiting for it (see `ModelRunner.launch`)."""
        assert self.runner is not None
        self.runner.launch(plan)

    def collect_plan(self) -> StepResult | None:
        assert self.runner is not None
        return self.runner.collect()

    def drop_launched(self) -> None:
        """Forget the steps launched and not collected: one of them raised, and the driver
        plans their requests again (`RayExecutor._step_raised`)."""
        assert self.runner is not None
        self.runner.drop_launched()

    def runs_ahead(self) -> bool:
        assert self.runner is not None
        return self.runner.runs_ahead()

    def execute_plan(self, plan: StepPlan) -> StepResult | None:
        """`execute` without the codec, for a worker in the driver's own process: the plan and
        the result are shared objects (frozen messages whose lists neither side changes)."""
        assert self.runner is not None
        return self.runner.execute(plan)

    def memory_stats(self) -> dict[str, int]:
        """This worker's memory: peak resident bytes of its process, its KV cache allocation,
        and on CUDA the peak bytes the allocator handed out."""
        import resource

        assert self.runner is not None
        stats = {
            "rank": self.coords.rank,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "kv_cache_bytes": 0 if self.runner.kv_cache is None else self.runner.kv_cache.nbytes,
            "host_kv_bytes": self.runner.host_kv_bytes(),
        }
        if self.runner.device.type == "cuda":
            stats["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.runner.device)
        return stats

    def comm_stats(self, reset: bool = False) -> dict[str, dict[str, float]]:
        """This rank's collective counters (see `Collectives.comm_stats`); with reset, zeroes
        them after reading."""
        assert self.runner is not None
        comm = self.runner.comm
        stats = comm.comm_stats()
        if reset:
            comm.reset_comm_stats()
        return stats

    def step_stats(self) -> dict[str, int]:
        """This worker's step counters: steps run, and decode steps replayed from its decode
        graphs (all of them, and those with per-request RoPE tables)."""
        assert self.runner is not None
        graphs = self.runner.graphs
        return {
            "rank": self.coords.rank,
            "steps": self.runner.num_steps,
            "graph_replays": 0 if graphs is None else graphs.num_replays,
            "graph_rope_replays": 0 if graphs is None else graphs.num_rope_replays,
            "graph_staged_replays": 0 if graphs is None else graphs.num_staged,
        }

    def ping(self) -> int:
        return self.coords.rank

    def disk_kv_blocks(self) -> tuple[int, int, list[str]]:
        assert self.runner is not None
        return self.runner.disk_kv_blocks()

    def load_lora(self, slot: int, name: str, path: str, digest: bytes = b"") -> None:
        assert self.runner is not None
        self.runner.load_lora(slot, name, path, digest)

    def unload_lora(self, slot: int) -> None:
        assert self.runner is not None
        self.runner.unload_lora(slot)

    def flush_disk_kv(self) -> None:
        if self.runner is not None:
            self.runner.flush_disk_kv()

    def shutdown(self) -> None:
        self.flush_disk_kv()
        self.runner = None
        destroy_distributed()
        self._store = None
