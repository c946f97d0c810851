"""A tp=2 x cp=2 Runtime on a Ray cluster of two nodes on this machine (Ray's test cluster: two
raylets, one address), run as a script by `tests/dist_runtime/test_placement.py` (in a process
of its own, so the suite's Ray stays as it is). Prints one JSON line: each rank's node, the
driver's node and the greedy tokens next to a single-device run's.

With `--lose-node`, the node without the driver is then removed while the runtime is idle; once
Ray counts it gone, a request starts and a new node joins 3 s later: the line also has the
request's tokens and the worker-group restarts."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from dist_runtime import CacheConfig, Runtime, SamplingParams  # noqa: E402
from dist_runtime.formats.random_checkpoint import write_random_checkpoint  # noqa: E402
from tests.conftest import TINY_SHAPES  # noqa: E402


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    lose_node = "--lose-node" in sys.argv
    root = Path(__file__).resolve().parents[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    nodes = [cluster.head_node, cluster.add_node(num_cpus=2)]
    try:
        ray.init(
            address=cluster.address,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(root)}},
        )
        cluster.wait_for_nodes()
        model = write_random_checkpoint(
            Path(tempfile.mkdtemp()), architecture="llama", seed=0, **TINY_SHAPES
        )
        kw: dict[str, Any] = dict(
            device="cpu",
            dtype="float32",
            session_len=256,
            cache=CacheConfig(num_blocks=64),
            monitor_interval_s=0.5,
            init_timeout_s=120,
        )
        prompt = [[5, 6, 7, 8, 9] * 12]
        params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
        with Runtime(model=str(model), executor="inprocess", **kw) as one:
            (want,) = one.generate(prompt, params)
        report: dict[str, Any] = {"want": want.token_ids}
        with Runtime(model=str(model), tp=2, cp=2, **kw) as rt:
            actors = rt.engine.executor.actors  # type: ignore[union-attr]
            report["nodes"] = ray.get(
                [
                    a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
                    for a in actors
                ]  # fmt: skip
            )
            report["driver"] = ray.get_runtime_context().get_node_id()
            report["num_nodes"] = len([n for n in ray.nodes() if n["Alive"]])
            (got,) = rt.generate(prompt, params)
            report["got"] = got.token_ids
            if lose_node:
                driver_node: Any = ray._private.worker.global_worker.node  # (the one it joined)
                lost = next(
                    n for n in nodes if n._raylet_socket_name != driver_node._raylet_socket_name
                )
                cluster.remove_node(lost, allow_graceful=False)
                _wait(lambda: ray.cluster_resources().get("CPU", 0) < 4, 120, "Ray to drop it")
                executor: Any = rt.engine.executor
                _wait(lambda: executor.dead is not None, 60, "the monitor to see it")
                (handle,) = rt.add_requests(prompt, params)
                time.sleep(3.0)
                cluster.add_node(num_cpus=2)  # (from the main thread: it sets signals)
                report["after_loss"] = handle.result(timeout=180).token_ids
                report["restarts"] = rt.num_worker_restarts
        print(json.dumps(report))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
