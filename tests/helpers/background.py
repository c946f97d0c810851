"""Jobs run ahead on a few threads: for tests whose time is mostly subprocesses' start-up
(a fresh interpreter importing torch runs on one core), so that two of them share the
machine's cores while the tests take the results in their own order."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import pytest

T = TypeVar("T")


class Ahead(Generic[T]):
    """`jobs` start in the order given, `workers` at a time; get(key) waits for that one."""

    def __init__(self, jobs: dict[str, Callable[[], T]], workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ahead")
        self._futures: dict[str, Future[T]] = {k: self._pool.submit(job) for k, job in jobs.items()}

    def get(self, key: str) -> T:
        return self._futures[key].result()

    def close(self) -> None:
        """Drop the jobs not started; wait for those running."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def selected_tests(request: pytest.FixtureRequest) -> set[str]:
    """Names (with parameter ids) of the tests of the requesting module that this session runs:
    a module-scoped fixture runs ahead only what will be asked for."""
    return {item.name for item in request.session.items if item.path == request.path}
