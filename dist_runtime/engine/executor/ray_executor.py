"""Ray executor: one worker actor per device, placed with a placement group.

Rank 0 opens the rendezvous store on a port the OS picks and reports it; the other ranks then
join. Every `ray.get` carries a timeout, so a hung or dead worker surfaces as `WorkerError`.
Only msgpack bytes cross to the actors.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

from dist_runtime.config import WORKER_ENV, RuntimeConfig, async_decode_enabled
from dist_runtime.engine.executor.base import (
    Executor,
    StepFailedError,
    WorkerError,
    breaks_device,
)
from dist_runtime.progress import plural
from dist_runtime.protocol import StepPlan, StepResult, decode, encode
from workers.distributed import is_loopback

logger = logging.getLogger(__name__)

REPO_ROOT = str(Path(__file__).resolve().parents[3])
ABANDON_CHECK_S = 0.25
"""How often a wait on the workers looks whether the engine abandoned it."""
STEP_ERROR_GRACE_S = 10.0
"""After a step raises on one worker, how long the others get to finish it. All done: the
group is in step (no rank waits in a collective another left) and runs on, the step retried
in place (`StepFailedError`). One still running: it waits on a rank that left, so the group is
replaced (`WorkerError`), as for a death."""
MAX_IN_PLACE_FAILURES = 3
"""Steps failing in a row that are retried in place before the group is replaced anyway: a
device or communicator left broken would fail every step."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise RuntimeError(
            "tp * cp > 1 needs Ray: pip install 'ray>=2.30' (or run with tp=1, cp=1, which uses "
            "the in-process executor)"
        ) from e
    return ray


def place_ranks(nodes: list[str], tp: int, first: str | None) -> tuple[list[int], list[int]]:
    """The placement-group bundle of each rank (rank = cp_rank * tp + tp_rank), given the node
    of each bundle: tp groups (ranks [c * tp, (c + 1) * tp)) whole on one node first, nodes
    taken `first` first, then those with the most bundles; the bundles left make the last
    groups, across nodes. Returns (bundle of each rank, cp ranks whose tp group spans nodes)."""
    if len(nodes) % tp:
        raise ValueError(f"{len(nodes)} bundles do not make tp groups of {tp}")
    free: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        free.setdefault(node, []).append(i)
    order = sorted(free, key=lambda n: (n != first, -len(free[n]), nodes.index(n)))
    groups: list[list[int]] = []
    for node in order:
        while len(free[node]) >= tp:
            groups.append(free[node][:tp])
            del free[node][:tp]
    rest = [b for node in order for b in free[node]]
    spanning = list(range(len(groups), len(nodes) // tp))
    groups.extend(rest[i : i + tp] for i in range(0, len(rest), tp))
    return [b for group in groups for b in group], spanning


def init_ray(ray: Any, **kwargs: Any) -> None:
    """ray.init(**kwargs), leaving this process's SIGTERM and SIGINT handling as it was.

    A driver's ray.init installs a Python SIGTERM handler (`sys.exit(15)`, over any handler the
    application set) and then, in its core worker, a C++ failure-signal handler (absl's) that
    prints "*** SIGTERM received ..." and a stack dump to stderr before passing the signal on.
    Afterwards the application's own Python handler is back; where it had none, Ray's Python
    handler stays but the C++ one is dropped (for SIGTERM only: crashes still dump). Handlers
    can only be set on the main thread; elsewhere this is a plain ray.init."""
    main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT)
    before = {s: signal.getsignal(s) for s in signals} if main else {}
    try:
        ray.init(**kwargs)
    finally:
        for sig, old in before.items():
            own = callable(old) or old == signal.SIG_IGN
            handler = old if own else signal.getsignal(sig)
            if handler is not None:  # None: set outside Python; leave it
                signal.signal(sig, handler)  # also replaces a C-level handler Python never saw


def kill_local_ray() -> None:
    """Stop the local Ray instance this process started (its raylet stops the workers and
    agents), now, without ray.shutdown's calls to the GCS: for a forced exit, which otherwise
    leaves Ray's agents running. A process that joined a running cluster stops nothing. Best
    effort, through Ray's internals."""
    ray = sys.modules.get("ray")
    try:
        node = ray._private.worker._global_node if ray is not None else None
        if node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=True, wait=False)
    except Exception as e:
        logger.debug("stopping the local Ray instance failed: %s", e)


def ray_auth_mode() -> str:
    """'token' when this Ray session authenticates its control plane, 'disabled' when not,
    'unknown' on a Ray without token authentication (before 2.52).

    Call it only after ray.init: Ray caches the mode at the first read, and a local ray.init
    switches token authentication on (Ray 2.59+) after the process started."""
    try:
        from ray._raylet import (  # type: ignore[attr-defined]
            AuthenticationMode,
            get_authentication_mode,
        )
    except ImportError:
        return "unknown"
    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"


def check_ray_auth(require: bool) -> str:
    """Warn (or, with `require`, refuse) when the Ray cluster runs without token
    authentication: then anyone who reaches its ports can run code on every node."""
    mode = ray_auth_mode()
    if mode == "token":
        return mode
    message = (
        f"the Ray cluster's token authentication is {mode} (RAY_AUTH_MODE="
        f"{os.environ.get('RAY_AUTH_MODE', 'unset')}): anyone who reaches its ports can run code "
        "on it. Start Ray with RAY_AUTH_MODE=token on every node (Ray >= 2.52; see "
        "docs/reliability.md)"
    )
    if require:
        raise WorkerError(message + ", or set require_ray_auth=false to accept this")
    logger.warning("%s", message)
    return mode


class RayExecutor(Executor):
    def __init__(self, config: RuntimeConfig, replacing: bool = False):
        self.ray = ray = _import_ray()
        self.config = config
        self._replacing = replacing
        self.world_size = config.parallel.world_size
        self.is_cuda = config.resolved_device() == "cuda"
        self._owns_ray = False
        self.pg: Any = None
        self.actors: list[Any] = []
        self.sharing = [1] * self.world_size
        """Per rank, the workers on its node, itself included (they share its memory)."""
        self.dead: str | None = None
        """Why the group is unusable (a worker died), as the monitor found it; None: healthy."""
        self._stop_monitor = threading.Event()
        self._monitor: threading.Thread | None = None
        self._abandoned = threading.Event()
        """Set by `abandon`: waits on the workers end at once (the engine is stopping)."""
        self._ahead = async_decode_enabled()
        self._queued: collections.deque[tuple[int, list[Any]]] = collections.deque()
        """Launched steps not collected yet: (step id, every rank's launch call)."""
        self._failures_in_place = 0
        """Steps that raised in a row and were retried in place (`_step_raised`)."""
        try:
            self._start(ray)
        except BaseException:
            self.shutdown()
            raise
        self._monitor = threading.Thread(
            target=self._watch, name="dist-runtime-worker-monitor", daemon=True
        )
        self._monitor.start()

    def _start(self, ray: Any) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        started = time.perf_counter()
        if not ray.is_initialized():
            self._init_ray(ray)
        self.auth_mode = check_ray_auth(self.config.require_ray_auth)
        bundle = {"GPU": 1, "CPU": 1} if self.is_cuda else {"CPU": 1}
        self._check_capacity(ray, bundle)
        self.pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        self._get(
            self.pg.ready(),
            self.config.init_timeout_s,
            f"placing {self.world_size} workers ({bundle} each)",
        )
        bundles, host = self._layout(ray)
        from workers.worker import Worker

        actor_cls = ray.remote(Worker)
        config_bytes = msgpack.packb(self.config.to_dict())
        threads = None if self.is_cuda else 1
        env = {key: os.environ[key] for key in WORKER_ENV if key in os.environ}
        self.actors = [
            actor_cls.options(
                num_cpus=1,
                num_gpus=1 if self.is_cuda else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=bundles[rank]
                ),
            ).remote(config_bytes, rank, threads, env)
            for rank in range(self.world_size)
        ]
        port = self._get(
            self.actors[0].create_store.remote(host),
            self.config.init_timeout_s,
            "starting the rendezvous store",
        )
        logger.info(
            "started %s on Ray in %.1f s",
            plural(self.world_size, "worker"),
            time.perf_counter() - started,
        )
        loading = time.perf_counter()
        self.weight_bytes_read = self._get(
            [a.init_model.remote(host, port) for a in self.actors],
            self.config.init_timeout_s,
            "loading the model on the workers",
        )
        logger.info(
            "loaded weights: %.0f MiB over %s in %.1f s",
            sum(self.weight_bytes_read) / 2**20,
            plural(self.world_size, "worker"),
            time.perf_counter() - loading,
        )

    def _layout(self, ray: Any) -> tuple[list[int], str]:
        """Where each rank runs (its bundle in the placement group) and the rendezvous store's
        address. Each tp group gets one node where the bundles allow (its all-reduces run every
        layer; cp's exchanges are fewer and overlap compute), rank 0 the node of `master_addr`
        or else the driver's. On several nodes a loopback `master_addr` becomes rank 0's node's
        address, since the other nodes could not reach it."""
        from ray.util.placement_group import placement_group_table

        table = placement_group_table(self.pg)["bundles_to_node_id"]
        nodes = [str(table[i]) for i in range(self.world_size)]
        addresses = {str(n["NodeID"]): str(n["NodeManagerAddress"]) for n in ray.nodes()}
        host = self.config.master_addr
        first = next((n for n in nodes if addresses.get(n) == host), None) or str(
            ray.get_runtime_context().get_node_id()
        )
        tp = self.config.parallel.tp
        bundles, spanning = place_ranks(nodes, tp, first)
        self.sharing = [nodes.count(nodes[bundles[r]]) for r in range(self.world_size)]
        used = list(dict.fromkeys(nodes))
        if len(used) > 1:
            where = ", ".join(
                f"{addresses.get(n, '?')} (node {n[:8]}): ranks "
                f"{[r for r in range(self.world_size) if nodes[bundles[r]] == n]}"
                for n in used
            )
            logger.info("workers on %d nodes (%s)", len(used), where)
            zero = addresses.get(nodes[bundles[0]], host)
            if is_loopback(host) or (host != zero and host in addresses.values()):
                # (a loopback address, or another node's, where rank 0 cannot listen)
                logger.info(
                    "the workers span nodes and rank 0 runs on %s: the rendezvous store "
                    "listens there, not on master_addr %s",
                    zero,
                    host,
                )
                host = zero
        for cp_rank in spanning:
            logger.warning(
                "the tp group of cp rank %d (ranks %d-%d) spans nodes: its all-reduces, one "
                "per layer, cross the network; give each node a multiple of tp=%d free devices",
                cp_rank,
                cp_rank * tp,
                cp_rank * tp + tp - 1,
                tp,
            )
        return bundles, host

    def _check_capacity(self, ray: Any, bundle: dict[str, int]) -> None:
        """Refuse a cluster without the devices at all (a group replacing a failed one waits
        for them instead: a lost node may come back, or an autoscaler add one); log a wait
        for devices other jobs hold."""
        total = ray.cluster_resources()
        free = ray.available_resources()
        for key, per_worker in bundle.items():
            need, have = per_worker * self.world_size, int(total.get(key, 0))
            if have < need and not self._replacing:
                raise WorkerError(
                    f"tp*cp = {self.world_size} workers need {need} {key} but the Ray cluster "
                    f"has {have}; lower tp/cp or add {key}s to the cluster"
                )
            if have < need:
                logger.warning(
                    "the Ray cluster has %d %s now, %d needed: waiting up to %.0f s for it to "
                    "have them again (a node lost: restart it or add one)",
                    have,
                    key,
                    need,
                    self.config.init_timeout_s,
                )
            elif int(free.get(key, 0)) < need:
                logger.warning(
                    "%d %s of the cluster's %d are free now, %d needed: waiting up to %.0f s for "
                    "other jobs (another Runtime?) to release them",
                    int(free.get(key, 0)),
                    key,
                    have,
                    need,
                    self.config.init_timeout_s,
                )

    def _init_ray(self, ray: Any) -> None:
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": True,
            # Ray's own start-up messages (its auth-token notice, "Started a local Ray
            # instance") only at DEBUG: the runtime logs its phases itself.
            "logging_level": logging.INFO if logger.isEnabledFor(logging.DEBUG) else logging.ERROR,
        }
        if self.config.ray_address is not None:
            kwargs["address"] = self.config.ray_address
        else:
            kwargs["num_cpus"] = max(os.cpu_count() or 1, self.world_size)
            pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath}}
        init_ray(ray, **kwargs)
        self._owns_ray = True

    def abandon(self) -> None:
        """Stop waiting for the workers: the step in flight (and any later call) fails at once
        with WorkerError. The engine calls this as it shuts down, so a stop does not wait out a
        long step, nor hang on workers whose Ray died first (Ray's processes stopped by the
        same SIGTERM: without its GCS a driver never learns that an actor died)."""
        self._abandoned.set()

    def _get(self, refs: Any, timeout: float, what: str, step: bool = False) -> Any:
        """ray.get with a timeout that fails as soon as any one ref fails: when a worker dies
        mid-step its peers block in a collective, so waiting for all of them would hang. A
        `step` that raises on a live worker is retried in place when the group is still in
        step (`_step_raised`)."""
        ray = self.ray
        every = list(refs) if isinstance(refs, list) else [refs]
        try:
            deadline = time.monotonic() + timeout
            pending = every
            while pending:
                if self._abandoned.is_set():
                    raise WorkerError(f"stopped waiting for the workers while {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ray.exceptions.GetTimeoutError(what)
                ready, pending = ray.wait(
                    pending, num_returns=1, timeout=min(left, ABANDON_CHECK_S)
                )
                for ref in ready:
                    ray.get(ref, timeout=0)  # raises this ref's error, if any
            out = ray.get(refs, timeout=1.0)
        except ray.exceptions.GetTimeoutError as e:
            raise WorkerError(f"{what} timed out after {timeout:.0f} s") from e
        except ray.exceptions.RayActorError as e:
            raise WorkerError(f"a worker died while {what}: {e}") from e
        except ray.exceptions.RayTaskError as e:
            if step:
                self._step_raised(every, e, what)
            raise WorkerError(f"a worker failed while {what}: {e}") from e
        if step:
            self._failures_in_place = 0
        return out

    def _step_raised(self, refs: list[Any], error: Exception, what: str) -> None:
        """A step raised on a worker (`error`). Raise StepFailedError when the group may run
        on: every worker finished this step and those launched after it within
        STEP_ERROR_GRACE_S, none died, the error does not name a broken device or
        communicator, and fewer than MAX_IN_PLACE_FAILURES steps failed in a row. The
        workers' launched steps are dropped then (the engine computes their requests again).
        Return otherwise, for the caller's WorkerError."""
        ray = self.ray
        cause = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
        if breaks_device(error):
            logger.error("a worker's device or communicator broke while %s: %s", what, cause)
            return
        if self._failures_in_place + 1 >= MAX_IN_PLACE_FAILURES:
            in_a_row = self._failures_in_place + 1
            logger.error("%d steps in a row failed on the workers: replacing them", in_a_row)
            return
        later = [r for _, launches in self._queued for r in launches]
        everything = refs + later
        done, running = ray.wait(
            everything, num_returns=len(everything), timeout=STEP_ERROR_GRACE_S
        )
        if running:
            logger.error(
                "a worker failed while %s and its peers did not finish the step within "
                "%.0f s: the group is out of step",
                what,
                STEP_ERROR_GRACE_S,
            )
            return
        for ref in done:
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError:
                return
            except Exception:
                pass  # the failure itself, or a step launched after it failing in turn
        try:  # the workers forget the steps they launched; the engine plans them again
            ray.get([a.drop_launched.remote() for a in self.actors], timeout=STEP_ERROR_GRACE_S)
        except Exception as e:
            logger.error("dropping the workers' launched steps failed: %s", e)
            return
        self._queued.clear()
        self._failures_in_place += 1
        logger.warning(
            "a step raised on a worker while %s; every worker finished it, so they run on: %s",
            what,
            cause,
        )
        raise StepFailedError(f"a worker raised while {what}: {cause}") from error

    def num_available_blocks(self) -> int:
        counts = self._get(
            [a.num_available_blocks.remote(n) for a, n in zip(self.actors, self.sharing)],
            self.config.init_timeout_s,
            "sizing the KV cache",
        )
        return min(counts)

    def num_host_blocks(self) -> int:
        counts = self._get(
            [a.num_host_blocks.remote() for a in self.actors],
            self.config.init_timeout_s,
            "sizing the host KV tier",
        )
        return min(counts)

    def allocate_kv_cache(
        self, num_blocks: int, num_host_blocks: int = 0, disk_dir: str | None = None
    ) -> None:
        self._get(
            [
                a.allocate_kv_cache.remote(num_blocks, num_host_blocks, disk_dir)
                for a in self.actors
            ],
            self.config.init_timeout_s,
            "allocating the KV cache",
        )

    def disk_kv_blocks(self) -> list[tuple[int, int, list[str]]]:
        return self._get(
            [a.disk_kv_blocks.remote() for a in self.actors],
            self.config.init_timeout_s,
            "listing the disk KV tier",
        )

    def load_lora(self, slot: int, name: str, path: str, digest: bytes = b"") -> None:
        self._get(
            [a.load_lora.remote(slot, name, path, digest) for a in self.actors],
            self.config.init_timeout_s,
            f"loading LoRA adapter {name!r}",
        )

    def unload_lora(self, slot: int) -> None:
        self._get(
            [a.unload_lora.remote(slot) for a in self.actors],
            self.config.init_timeout_s,
            f"unloading LoRA adapter slot {slot}",
        )

    def _watch(self) -> None:
        """Sentinel pings, so a worker that dies between requests is noticed within seconds.

        A ping waits behind a running step on its actor; only an actor error counts (a slow
        step is the step timeout's business)."""
        ray = self.ray
        interval = self.config.monitor_interval_s
        while not self._stop_monitor.wait(interval):
            actors = list(self.actors)
            if not actors or self.dead is not None:
                continue
            refs = [a.ping.remote() for a in actors]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=interval)
            for rank, ref in enumerate(refs):
                if ref not in ready:
                    continue
                try:
                    ray.get(ref, timeout=0)
                except ray.exceptions.RayActorError as e:
                    self.dead = f"worker rank {rank} died: {str(e).splitlines()[0]}"
                    level = logging.DEBUG if self._abandoned.is_set() else logging.ERROR
                    logger.log(level, "monitor: %s", self.dead)
                    break
                except Exception as e:  # anything else is not a death
                    logger.debug("monitor ping of rank %d: %s", rank, e)

    def execute(self, plan: StepPlan) -> StepResult:
        if self.dead is not None:
            raise WorkerError(self.dead)
        payload = encode(plan)
        outs = self._get(
            [a.execute.remote(payload) for a in self.actors],
            self.config.step_timeout_s,
            f"running step {plan.step_id}",
            step=True,
        )
        return decode(outs[0], StepResult)

    def launch(self, plan: StepPlan) -> None:
        """Queue the step on every worker and return: each actor runs its calls in order, so a
        step launched while the one before runs starts as soon as that one ends, without a
        round trip to the driver between them."""
        if self.dead is not None:
            raise WorkerError(self.dead)
        payload = encode(plan)
        self._queued.append((plan.step_id, [a.launch.remote(payload) for a in self.actors]))

    def collect(self) -> StepResult:
        if not self._queued:
            raise RuntimeError("collect() without a launched step")
        step_id, launches = self._queued.popleft()
        if self.dead is not None:
            raise WorkerError(self.dead)
        # Waiting on every rank's launch as well: a rank whose step failed fails the wait.
        outs = self._get(
            [*launches, self.actors[0].collect.remote()],
            self.config.step_timeout_s,
            f"running step {step_id}",
            step=True,
        )
        return decode(outs[-1], StepResult)

    def flush_disk_kv(self) -> None:
        if self.dead is not None:
            raise WorkerError(self.dead)
        self._get(
            [a.flush_disk_kv.remote() for a in self.actors],
            self.config.step_timeout_s,
            "flushing the disk KV tier",
        )

    def runs_ahead(self) -> bool:
        """With `DIST_RUNTIME_ASYNC_DECODE=1`. Every worker takes its `LAST_SAMPLED` ids from
        the step before: from the device where a decode graph picked them, otherwise from the
        driver rank's picks, broadcast."""
        return self._ahead

    def memory_stats(self) -> list[dict[str, int]]:
        return list(
            self._get(
                [a.memory_stats.remote() for a in self.actors],
                self.config.step_timeout_s,
                "reading memory stats",
            )
        )

    def comm_stats(self, reset: bool = False) -> list[dict[str, dict[str, float]]]:
        return list(
            self._get(
                [a.comm_stats.remote(reset) for a in self.actors],
                self.config.step_timeout_s,
                "reading collective counters",
            )
        )

    def step_stats(self) -> list[dict[str, int]]:
        return list(
            self._get(
                [a.step_stats.remote() for a in self.actors],
                self.config.step_timeout_s,
                "reading step counters",
            )
        )

    def shutdown(self, keep_ray: bool = False) -> None:
        """Kill every worker and remove the placement group; stop Ray too if this executor
        started it, unless keep_ray (a replacement group is about to start)."""
        ray = self.ray
        self._stop_monitor.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=self.config.monitor_interval_s * 3 + 1)
        self._monitor = None
        if self.actors and self.config.cache.kv_cache_dir and self.dead is None:
            try:  # the disk tier's queued writes, before the workers go
                ray.get([a.flush_disk_kv.remote() for a in self.actors], timeout=30)
            except Exception as e:
                logger.warning("disk KV tier: writes still queued may be lost: %s", e)
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as e:  # already dead
                logger.debug("kill failed: %s", e)
        self.actors = []
        disconnect = self._owns_ray and ray.is_initialized() and not keep_ray
        if self.pg is not None and disconnect:
            # ray.shutdown below ends this driver's job, and Ray removes a job's placement
            # groups with it. Removing it here would block on the GCS, which may already be
            # gone: systemd stops a unit by sending SIGTERM to all its processes, Ray's too.
            self.pg = None
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception as e:
                logger.debug("removing the placement group failed: %s", e)
            self.pg = None
        if disconnect:
            ray.shutdown()
            self._owns_ray = False
