"""A request's way back to its caller: a per-request queue of deltas, filled by the engine thread.

Rules for callers: iterate it (`for delta in handle`, or `async for` on an event loop), wait for
the whole output (`handle.result()`), or abort it (`handle.abort()`). Leaving an iteration early
(break, an exception, the iterator garbage-collected) aborts the request, so its KV blocks go
back to the pool at the engine's next step. A slow reader only grows its own queue; the engine
never waits for a reader.

Rules for the engine: `put` each step's delta, then exactly one of `finish` or `fail`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

from dist_runtime.engine.outputs import RequestDelta, RequestOutput


class RequestHandle:
    def __init__(self, request_id: str, num_prompt_tokens: int, abort: Callable[[str], None]):
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self._abort = abort
        self._cond = threading.Condition()
        self._deltas: deque[RequestDelta] = deque()
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[RequestHandle], None]] = []
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._readers = 0
        """Threads iterating the deltas and waiting for one: only they are woken per token
        (a thread waiting in `result()` sleeps until the end)."""
        # Progress, written by the engine thread only (plain ints: readers see whole values).
        self.num_computed_prompt_tokens = 0
        """Prompt tokens whose K/V are in the cache (prefix-cache hits included)."""
        self.num_output_tokens = 0
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        """time.monotonic() when the first output token was sampled."""
        self.finish_time: float | None = None
        self.first_step_id: int | None = None
        """The engine step that first computed tokens of this request."""
        self.owner: str | None = None
        """Who asked (the name of the server's API key it came with), for accounting."""
        self.part_of: str | None = None
        """What larger request this is a step of ("beam_search"), which is accounted for as a
        whole instead (the server's request metrics skip the step)."""
        self.first_scheduled_time: float | None = None
        """time.monotonic() when that step began (the end of its wait in the queue)."""
        self.first_token_step_id: int | None = None
        self.last_step_id: int | None = None

    # -- caller side ----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._output is not None or self._error is not None

    def abort(self) -> None:
        """Stop the request; its blocks are freed at the engine's next step. A no-op once done."""
        if not self.done:
            self._abort(self.request_id)

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Wait for the whole output; raises the engine's error if the request failed, and
        TimeoutError after `timeout` seconds (the request keeps running)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.request_id} not done after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._output is not None
        return self._output

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done or `timeout` seconds pass; True when done."""
        with self._cond:
            return self._cond.wait_for(lambda: self.done, timeout)

    def exception(self) -> BaseException | None:
        """The error the request failed with; None while it runs or when it succeeded."""
        return self._error

    def add_done_callback(self, fn: Callable[[RequestHandle], None]) -> None:
        """Call fn(handle) once it is done (at once if it already is); fn runs on the engine
        thread, so it must be quick and must not wait on the engine."""
        with self._cond:
            if not self.done:
                self._callbacks.append(fn)
                return
        fn(self)

    def __iter__(self) -> Iterator[RequestDelta]:
        try:
            while True:
                with self._cond:
                    self._readers += 1
                    try:
                        self._cond.wait_for(lambda: self._deltas or self.done)
                    finally:
                        self._readers -= 1
                    deltas = list(self._deltas)
                    self._deltas.clear()
                    finished = not deltas and self.done
                yield from deltas
                if finished:
                    break
            if self._error is not None:
                raise self._error
        finally:
            self.abort()

    async def __aiter__(self) -> AsyncIterator[RequestDelta]:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._async_waiters.append((loop, event))
        try:
            while True:
                with self._cond:
                    deltas = list(self._deltas)
                    self._deltas.clear()
                    finished = not deltas and self.done
                    if not deltas and not finished:
                        event.clear()
                if finished:
                    break
                if not deltas:
                    await event.wait()
                    continue
                for delta in deltas:
                    yield delta
            if self._error is not None:
                raise self._error
        finally:
            with self._cond:
                self._async_waiters.remove((loop, event))
            self.abort()

    # -- engine side -----------------------------------------------------------------------
    def put(self, delta: RequestDelta) -> None:
        with self._cond:
            self._deltas.append(delta)
            if self._readers:
                self._cond.notify_all()
        if self._async_waiters:  # one that registers later reads the deltas first anyway
            self._wake_async()

    def finish(self, output: RequestOutput) -> None:
        self._end(output, None)

    def fail(self, error: BaseException) -> None:
        self._end(None, error)

    def _end(self, output: RequestOutput | None, error: BaseException | None) -> None:
        with self._cond:
            if self.done:
                return
            self._output, self._error = output, error
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        self._wake_async()
        for fn in callbacks:
            fn(self)

    def _wake_async(self) -> None:
        with self._cond:
            waiters = list(self._async_waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # a closed loop: its reader is gone
                loop.call_soon_threadsafe(event.set)
