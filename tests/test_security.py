"""Ray's control plane: token authentication is on for the clusters the runtime starts, and a
cluster without it is reported (or refused with require_ray_auth)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import Runtime
from dist_runtime.config import CacheConfig
from dist_runtime.engine.executor import ray_executor
from dist_runtime.engine.executor.base import WorkerError
from tests.conftest import REPO_ROOT
from tests.helpers.ray_state import ray_leftovers


def _ray_version() -> tuple[int, int]:
    ray = pytest.importorskip("ray")
    major, minor = ray.__version__.split(".")[:2]
    return int(major), int(minor)


def test_local_cluster_authenticates(ray_cluster: Any) -> None:
    if _ray_version() < (2, 59):
        pytest.skip("Ray < 2.59 starts local clusters without token authentication")
    assert ray_executor.ray_auth_mode() == "token"
    assert ray_executor.check_ray_auth(require=True) == "token"


def test_cluster_without_auth_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ray_executor, "ray_auth_mode", lambda: "disabled")
    with caplog.at_level(logging.WARNING, logger=ray_executor.__name__):
        assert ray_executor.check_ray_auth(require=False) == "disabled"
    assert "RAY_AUTH_MODE=token" in caplog.text
    with pytest.raises(WorkerError, match=r"token authentication is disabled.*require_ray_auth"):
        ray_executor.check_ray_auth(require=True)


def test_require_ray_auth_refuses_before_any_worker_starts(
    ray_cluster: Any, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ray_executor, "ray_auth_mode", lambda: "disabled")
    before = ray_leftovers(ray_cluster)
    with pytest.raises(WorkerError, match=r"RAY_AUTH_MODE=token"):
        Runtime(
            model=str(tiny_llama_dir),
            tp=2,
            device="cpu",
            require_ray_auth=True,
            cache=CacheConfig(block_size=16, num_blocks=16),
        )
    assert ray_leftovers(ray_cluster) == before


SELF_STARTED = """
import sys
from dist_runtime import Runtime, SamplingParams
from dist_runtime.config import CacheConfig
with Runtime(model=sys.argv[1], tp=2, device="cpu", cache=CacheConfig(num_blocks=16)) as rt:
    (out,) = rt.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=3, temperature=0.0))
    print("auth", rt.engine.executor.auth_mode, "tokens", len(out.token_ids))
"""


def test_runtime_starts_its_own_authenticated_ray(tiny_llama_dir: Path) -> None:
    """The README's main command path: no Ray running in the process, so the runtime starts a
    local cluster itself; it must come up authenticated, and its own calls must pass."""
    if _ray_version() < (2, 59):
        pytest.skip("Ray < 2.59 starts local clusters without token authentication")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", SELF_STARTED, str(tiny_llama_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "auth token tokens 3" in proc.stdout
