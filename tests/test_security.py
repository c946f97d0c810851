"""Ray's control plane: token authentication is on for the clusters the runtime starts, and a
cluster without it is reported (or refused with require_ray_auth)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import Runtime
from dist_runtime.config import CacheConfig
from dist_runtime.executor import ray_executor
from dist_runtime.executor.base import WorkerError
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
