"""Progress of one phase of long work (a download, a conversion, a prefill, a decode).

On a terminal a phase is a tqdm bar that is closed (with its final count and rate) before the
next phase starts. Anywhere else (a log file, a pipe, CI) carriage-return bars would be noise:
a phase prints one line when it ends, and one every `interval` seconds while it runs long.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

PLURALS = {"entry": "entries", "reply": "replies", "tok": "tok"}


def plural(n: int, word: str) -> str:
    """`1 answer`, `3 answers`, `2,092 tokens`."""
    if n == 1:
        return f"1 {word}"
    return f"{n:,} {PLURALS.get(word, word + 's')}"


def is_terminal(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class Phase:
    """`with Phase("prefill", "token", total=n) as p: p.update_to(k)`; `unit` is singular.

    `initial`: units already done before the phase started (a resumed run); they count
    towards the total but not the rate, and the summary says how many there were.
    `since`: when the phase's work began (a `time.monotonic()` reading) if before now; its
    seconds and rate count from then.
    """

    def __init__(
        self,
        desc: str,
        unit: str,
        total: int | None = None,
        file: TextIO | None = None,
        interval: float = 30.0,
        enabled: bool = True,
        initial: int = 0,
        since: float | None = None,
    ) -> None:
        self.desc, self.unit, self.total = desc, unit, total
        self.file = file if file is not None else sys.stderr
        self.interval = interval
        self.enabled = enabled
        self.initial = initial
        self.n = initial
        self.start = self._last_line = time.perf_counter()
        if since is not None:
            self.start -= max(time.monotonic() - since, 0.0)
        self._bar: Any = None
        self._closed = False
        if enabled and is_terminal(self.file):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,  # tqdm leaves it out of the rate
                desc=desc,
                unit=" " + unit,
                file=self.file,
                dynamic_ncols=True,
            )

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(finished=exc[0] is None)

    def update_to(self, n: int, total: int | None = None) -> None:
        """Set the count (and the total when it became better known)."""
        if total is not None:
            self.total = max(total, n)
        if self._bar is not None:
            if self.total is not None and self._bar.total != self.total:
                self._bar.total = self.total
            self._bar.update(n - self._bar.n)
        self.n = n
        now = time.perf_counter()
        if self._bar is None and self.enabled and now - self._last_line >= self.interval:
            self._last_line = now
            of = f" of {self.total:,}" if self.total else ""
            self._print(f"{self.desc}: {self.n:,}{of} {self._units(self.total or n)} so far")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def close(self, finished: bool = True) -> None:
        """End the phase: the bar shows its final count; off a terminal, one summary line."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            if finished:
                self._bar.total = self._bar.n  # the estimate is now the count
                self._bar.refresh()
            self._bar.close()
        elif self.enabled and finished:
            self._print(self.summary())

    def summary(self) -> str:
        """`prefill: 2,048 tokens in 3.1 s, 660.6 token/s`; with units done before the phase,
        `needle cells: 6 cells (2 already done), 4 in 9.0 s, 0.4 cell/s` (the rate counts only
        this run's), or `needle cells: 2 cells, all already done`."""
        seconds = self.seconds
        done_now = self.n - self.initial
        rate = f", {done_now / seconds:,.1f} {self.unit}/s" if seconds > 0 and done_now > 0 else ""
        if self.initial <= 0:
            return f"{self.desc}: {plural(self.n, self.unit)} in {seconds:.1f} s{rate}"
        if done_now <= 0:
            return f"{self.desc}: {plural(self.n, self.unit)}, all already done"
        return (
            f"{self.desc}: {plural(self.n, self.unit)} ({self.initial:,} already done), "
            f"{done_now:,} in {seconds:.1f} s{rate}"
        )

    def _units(self, n: int) -> str:
        return self.unit if n == 1 else PLURALS.get(self.unit, self.unit + "s")

    def _print(self, line: str) -> None:
        print(line, file=self.file, flush=True)
