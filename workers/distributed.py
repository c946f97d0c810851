"""The one module that calls torch.distributed.

Every collective returns at once when its group has one rank, so a tp=1 model runs without a
process group. Every rank must issue the same collectives in the same order.

`Collectives` counts what each operation sent (see `Collectives.comm_stats`).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_runtime.config import cpu_collectives_choice
from kernels import cpu_shm
from kernels.cpu_shm import ShmGroup

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MeshCoords:
    """This process's place in the tp x cp mesh: rank = cp_rank * tp_size + tp_rank."""

    tp_rank: int = 0
    tp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1

    @property
    def rank(self) -> int:
        return self.cp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.cp_size

    def rank_at(self, *, cp_rank: int | None = None, tp_rank: int | None = None) -> int:
        """Global rank of the mesh point that differs from this one in the given coordinates."""
        cp = self.cp_rank if cp_rank is None else cp_rank
        tp = self.tp_rank if tp_rank is None else tp_rank
        return cp * self.tp_size + tp

    @classmethod
    def from_rank(cls, rank: int, tp_size: int, cp_size: int) -> MeshCoords:
        return cls(
            tp_rank=rank % tp_size, tp_size=tp_size, cp_rank=rank // tp_size, cp_size=cp_size
        )


def create_store(host: str, timeout_s: float) -> tuple[dist.TCPStore, int]:
    """Start the rendezvous store on `host` and a port the OS picks, so no port race exists.

    The listening socket is bound here and handed to the store, which would otherwise listen on
    every interface: with the default host the store is reachable from this machine only.
    """
    sock = socket.create_server((host, 0), family=_family(host), backlog=128)
    store = dist.TCPStore(
        host,
        sock.getsockname()[1],
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        master_listen_fd=sock.detach(),
    )
    return store, store.port


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) resolves to a loopback address (False when it
    does not resolve)."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def pin_interfaces_to_loopback(host: str) -> None:
    """Keep gloo's and NCCL's own sockets on loopback when the group lives on one machine."""
    if is_loopback(host):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


COLLECTIVE_OPS = (
    "tp_all_reduce",
    "tp_all_gather",
    "cp_all_gather",
    "cp_all_to_all",
    "cp_ring_shift",
    "broadcast",
    "world_all_reduce",
)
"""The operations `Collectives.comm_stats` reports, by method name."""


class CollectiveError(RuntimeError):
    """A collective timed out or lost a peer: this worker's group must be rebuilt."""


class Collectives:
    """Collectives over this rank's tp group (same cp rank) and cp group (same tp rank).

    Each operation counts its calls, the bytes this rank sent (numel x element size of its input
    tensor) and the wall seconds spent in the call. Only real communication counts: a call on a
    one-rank group returns its input untouched and adds nothing, so a tp=1 model reports zero
    tp traffic. The seconds are host time around the torch.distributed call with no device
    sync: on gloo (CPU) that covers the whole exchange, including the wait for slower peers; on
    NCCL only the enqueue onto the stream. A ring shift counts its bytes when issued and adds
    the time of both the issue and `RingTransfer.wait`. Decode steps replayed from a CUDA graph
    run no Python, so the counters cover eagerly run steps only.
    """

    def __init__(
        self,
        coords: MeshCoords,
        tp_group: dist.ProcessGroup | None = None,
        cp_group: dist.ProcessGroup | None = None,
        timeout_s: float | None = None,
        tp_shm: ShmGroup | None = None,
    ):
        self.coords = coords
        self.tp_group = tp_group
        self.cp_group = cp_group
        self.timeout_s = timeout_s
        self.tp_shm = tp_shm
        """The tp group's shared-memory segment, when its ranks share a machine on gloo."""
        self._stats: dict[str, list[float]] = {op: [0, 0, 0.0] for op in COLLECTIVE_OPS}

    def _record(self, op: str, nbytes: int, seconds: float, calls: int = 1) -> None:
        stat = self._stats[op]
        stat[0] += calls
        stat[1] += nbytes
        stat[2] += seconds

    def comm_stats(self) -> dict[str, dict[str, float]]:
        """{op: {"calls", "bytes", "seconds"}} since creation or the last `reset_comm_stats`."""
        return {
            op: {"calls": int(calls), "bytes": int(nbytes), "seconds": seconds}
            for op, (calls, nbytes, seconds) in self._stats.items()
        }

    def reset_comm_stats(self) -> None:
        for stat in self._stats.values():
            stat[:] = [0, 0, 0.0]

    @contextlib.contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        """Turn a backend failure (gloo's timeout, a closed peer socket) into CollectiveError
        naming this rank and the operation."""
        try:
            yield
        except RuntimeError as e:
            limit = "" if self.timeout_s is None else f" (collective_timeout_s={self.timeout_s:g})"
            raise CollectiveError(
                f"rank {self.coords.rank}: {op} failed; a peer is hung or dead{limit}: {e}"
            ) from e

    @property
    def tp_size(self) -> int:
        return self.coords.tp_size

    @property
    def tp_rank(self) -> int:
        return self.coords.tp_rank

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        start = time.perf_counter()
        with self._guard("tp all-reduce"):
            if self.tp_shm is not None and x.is_cpu and x.dtype == torch.float32:
                flat = x.contiguous()  # x itself when it already is
                self.tp_shm.all_reduce(flat, self.timeout_s)
                if flat is not x:
                    x.copy_(flat)
            else:
                dist.all_reduce(x, group=self.tp_group)
        self._record("tp_all_reduce", x.numel() * x.element_size(), time.perf_counter() - start)
        return x

    def tp_all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every tp rank's x along dim (rank order)."""
        if self.tp_size == 1:
            return x
        start = time.perf_counter()
        with self._guard("tp all-gather"):
            if self.tp_shm is not None and x.is_cpu:
                parts = list(self.tp_shm.all_gather(x, self.timeout_s).unbind(0))
            else:
                parts = [torch.empty_like(x) for _ in range(self.tp_size)]
                dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        self._record("tp_all_gather", x.numel() * x.element_size(), time.perf_counter() - start)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """World rank 0's x on every rank of the world, in place (x: same shape and dtype on
        every rank)."""
        if self.coords.world_size == 1:
            return x
        start = time.perf_counter()
        with self._guard("broadcast"):
            dist.broadcast(x, src=0)
        self._record("broadcast", x.numel() * x.element_size(), time.perf_counter() - start)
        return x

    def world_max(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise max of x over every rank of the world, in place (x: same shape and
        dtype on every rank)."""
        if self.coords.world_size == 1:
            return x
        start = time.perf_counter()
        with self._guard("world all-reduce"):
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
        self._record("world_all_reduce", x.numel() * x.element_size(), time.perf_counter() - start)
        return x

    # -- context parallel: every call is collective over the cp group --------------------------
    @property
    def cp_size(self) -> int:
        return self.coords.cp_size

    @property
    def cp_rank(self) -> int:
        return self.coords.cp_rank

    def cp_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """(cp, *x.shape): every cp rank's x (same shape on every rank), in cp-rank order."""
        if self.cp_size == 1:
            return x[None]
        # Concatenated along dim 0 (the layout gloo accepts), then split into a cp dim.
        out = torch.empty((self.cp_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        start = time.perf_counter()
        with self._guard("cp all-gather"):
            _all_gather_single(out, x.contiguous(), group=self.cp_group)
        self._record("cp_all_gather", x.numel() * x.element_size(), time.perf_counter() - start)
        return out.view(self.cp_size, *x.shape)

    def cp_all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """x: (cp, ...); row j goes to cp rank j. Returns (cp, ...) with row j from cp rank j."""
        if self.cp_size == 1:
            return x
        out = torch.empty_like(x)
        start = time.perf_counter()
        with self._guard("cp all-to-all"):
            dist.all_to_all_single(out, x.contiguous(), group=self.cp_group)
        self._record("cp_all_to_all", x.numel() * x.element_size(), time.perf_counter() - start)
        return out

    def cp_ring_shift(self, tensors: list[torch.Tensor]) -> RingTransfer:
        """Start sending `tensors` to the next cp rank and receiving the previous rank's.

        Returns at once; `wait()` yields the received tensors (same shapes and dtypes), so the
        caller computes on what it holds while the next block is on the wire.
        """
        nxt = self.coords.rank_at(cp_rank=(self.cp_rank + 1) % self.cp_size)
        prv = self.coords.rank_at(cp_rank=(self.cp_rank - 1) % self.cp_size)
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group=self.cp_group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, prv, group=self.cp_group) for r in recv]
        start = time.perf_counter()
        with self._guard("cp ring send/recv"):
            works = dist.batch_isend_irecv(ops)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self._record("cp_ring_shift", nbytes, time.perf_counter() - start)
        return RingTransfer(works, recv, self._guard, self._record_ring_wait)

    def _record_ring_wait(self, seconds: float) -> None:
        self._record("cp_ring_shift", 0, seconds, calls=0)


# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name); older torch lacks it.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class RingTransfer:
    """A ring exchange in flight (see `Collectives.cp_ring_shift`)."""

    def __init__(
        self,
        works: list,
        recv: list[torch.Tensor],
        guard: Any = None,
        on_wait: Callable[[float], None] | None = None,
    ):
        self._works = works
        self._recv = recv
        self._guard = guard or (lambda op: contextlib.nullcontext())
        self._on_wait = on_wait

    def wait(self) -> list[torch.Tensor]:
        start = time.perf_counter()
        with self._guard("cp ring send/recv"):
            for w in self._works:
                w.wait()
        if self._on_wait is not None:
            self._on_wait(time.perf_counter() - start)
        return self._recv


def init_distributed(
    coords: MeshCoords,
    host: str,
    port: int,
    backend: str,
    timeout_s: float,
    store: dist.TCPStore | None = None,
    collective_timeout_s: float | None = None,
) -> Collectives:
    """Join the world's process group (rank 0 passes the store it created); build tp and cp
    groups. Joining waits up to `timeout_s`; afterwards each collective waits at most
    `collective_timeout_s` for its peers and then raises (gloo) or aborts the process (NCCL's
    watchdog), so a hung peer fails the step instead of blocking it."""
    if coords.world_size == 1:
        return Collectives(coords)
    timeout = datetime.timedelta(seconds=timeout_s)
    pin_interfaces_to_loopback(host)
    if store is None:
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    dist.init_process_group(
        backend, store=store, rank=coords.rank, world_size=coords.world_size, timeout=timeout
    )
    tp_group = None
    for cp_rank in range(coords.cp_size):  # every rank creates every group, in the same order
        ranks = [cp_rank * coords.tp_size + t for t in range(coords.tp_size)]
        group = dist.new_group(ranks, timeout=timeout)
        if cp_rank == coords.cp_rank:
            tp_group = group
    cp_group = None
    for tp_rank in range(coords.tp_size):
        ranks = [c * coords.tp_size + tp_rank for c in range(coords.cp_size)]
        group = dist.new_group(ranks, timeout=timeout)
        if tp_rank == coords.tp_rank:
            cp_group = group
    if collective_timeout_s is not None:
        set_collective_timeout(collective_timeout_s, [None, tp_group, cp_group])
    logger.debug("rank %d joined %s group of %d", coords.rank, backend, coords.world_size)
    tp_shm = None
    if backend == "gloo" and coords.tp_size > 1 and cpu_collectives_choice() == "shm":
        tp_shm = _tp_shared_memory(store, coords)
    return Collectives(coords, tp_group, cp_group, timeout_s=collective_timeout_s, tp_shm=tp_shm)


def _machine_id() -> str:
    """This machine (host name and boot): ranks that report the same one share memory."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _tp_shared_memory(store: Any, coords: MeshCoords) -> ShmGroup | None:
    """The tp group's shared-memory segment when all its ranks run on this machine and can map
    one (every rank of the group agrees through the store), else None: gloo carries on."""
    prefix, tp, rank = f"tp_shm/{coords.cp_rank}", coords.tp_size, coords.tp_rank

    def everyone(key: str, value: str) -> list[str]:
        store.set(f"{prefix}/{key}/{rank}", value)
        return [store.get(f"{prefix}/{key}/{r}").decode() for r in range(tp)]

    usable = len(set(everyone("machine", _machine_id()))) == 1 and cpu_shm.available()
    group: ShmGroup | None = None
    try:
        if rank == 0:
            path = ""
            if usable:
                try:
                    segment = cpu_shm.new_segment_path(f"tp{coords.cp_rank}")
                    group = ShmGroup(segment, 0, tp, create=True)
                    path = str(segment)
                except (OSError, RuntimeError) as e:
                    logger.info("no shared-memory tp collectives (%s); gloo carries them", e)
            store.set(f"{prefix}/path", path)
        else:
            path = store.get(f"{prefix}/path").decode()
            if usable and path:
                try:
                    group = ShmGroup(path, rank, tp, create=False)
                except (OSError, RuntimeError) as e:
                    logger.info("could not map %s (%s); gloo carries the tp collectives", path, e)
        ready = everyone("ready", "1" if group is not None else "0")
    finally:
        if rank == 0 and group is not None:
            group.unlink()  # every rank has mapped it (or given up): the name can go
    if all(r == "1" for r in ready):
        logger.debug("rank %d: tp collectives through shared memory", coords.rank)
        return group
    if group is not None:
        group.close()
    return None


def set_collective_timeout(seconds: float, groups: list[Any]) -> None:
    """Shorten (or lengthen) the per-operation timeout of already-joined groups; None is the
    world group. Group creation keeps the longer join timeout: its barriers wait for slow
    starters, which is not a hang."""
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is None:  # older torch: groups keep the join timeout
        logger.warning("this torch cannot change a process group's timeout; collectives keep it")
        return
    timeout = datetime.timedelta(seconds=seconds)
    for group in groups:  # every group listed holds this rank
        set_timeout(timeout, group)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
