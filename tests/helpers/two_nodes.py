"""Run a tp=2 x cp=2 Runtime on a Ray cluster of two nodes on this machine (Ray's test cluster:
two raylets, one address) and print, as one JSON line, each rank's node, the driver's node and
the greedy tokens next to a single-device run's. Run as a script by
`tests/dist_runtime/test_placement.py` (a process of its own: the suite's Ray stays as it is)."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from dist_runtime import CacheConfig, Runtime, SamplingParams  # noqa: E402
from dist_runtime.formats.random_checkpoint import write_random_checkpoint  # noqa: E402
from tests.conftest import TINY_SHAPES  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    root = Path(__file__).resolve().parents[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
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
        kw = dict(device="cpu", dtype="float32", session_len=256, cache=CacheConfig(num_blocks=64))
        prompt = [[5, 6, 7, 8, 9] * 12]
        params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
        with Runtime(model=str(model), executor="inprocess", **kw) as one:  # type: ignore[arg-type]
            (want,) = one.generate(prompt, params)
        with Runtime(model=str(model), tp=2, cp=2, **kw) as rt:  # type: ignore[arg-type]
            actors = rt.engine.executor.actors  # type: ignore[union-attr]
            where = ray.get(
                [
                    a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
                    for a in actors
                ]  # fmt: skip
            )
            (got,) = rt.generate(prompt, params)
        print(
            json.dumps(
                {
                    "nodes": where,
                    "driver": ray.get_runtime_context().get_node_id(),
                    "num_nodes": len([n for n in ray.nodes() if n["Alive"]]),
                    "want": want.token_ids,
                    "got": got.token_ids,
                }
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
