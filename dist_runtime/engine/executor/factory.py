"""Which executor a config gets: in-process for one device, Ray for more."""

from __future__ import annotations

from dist_runtime.config import RuntimeConfig
from dist_runtime.engine.executor.base import Executor


def create_executor(config: RuntimeConfig, replacing: bool = False) -> Executor:
    """The executor for `config`, its workers started. `replacing`: it replaces a group that
    failed, so a cluster short of devices (a node lost) is waited for, up to init_timeout_s,
    rather than refused."""
    if config.resolved_executor() == "inprocess":
        from dist_runtime.engine.executor.inprocess import InProcessExecutor

        return InProcessExecutor(config)
    from dist_runtime.engine.executor.ray_executor import RayExecutor

    return RayExecutor(config, replacing=replacing)
