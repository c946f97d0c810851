"""Start/shutdown cycles leave nothing behind: actors, placement groups, threads, sockets."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import Runtime, SamplingParams
from tests.helpers.ray_state import ray_leftovers

PROMPT = [[5, 6, 7, 8, 9, 10, 11]]
PARAMS = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)


def _sockets() -> int:
    """Open socket descriptors of this process."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed while listing
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return n


def _cycles(n: int, make: Any) -> None:
    for _ in range(n):
        with make() as rt:
            assert len(rt.generate(PROMPT, PARAMS)[0].token_ids) == 3


def test_in_process_cycles_leak_nothing(tiny_llama_dir: Path) -> None:
    def make() -> Runtime:
        return Runtime(model=str(tiny_llama_dir), device="cpu", dtype="float32", session_len=64)

    _cycles(1, make)  # first-use imports and caches
    threads, sockets = threading.active_count(), _sockets()
    _cycles(20, make)
    assert threading.active_count() == threads
    assert _sockets() == sockets


def _ray_cycles(ray: Any, tiny_llama_dir: Path, n: int) -> None:
    def make() -> Runtime:
        return Runtime(
            model=str(tiny_llama_dir), tp=2, device="cpu", dtype="float32", session_len=64
        )

    _cycles(1, make)
    before = ray_leftovers(ray)
    threads, sockets = threading.active_count(), _sockets()
    _cycles(n, make)
    assert ray_leftovers(ray) == before
    assert threading.active_count() == threads
    assert _sockets() <= sockets + 2  # Ray's own client connections may come and go


def test_ray_cycles_leak_nothing(ray_cluster: Any, tiny_llama_dir: Path) -> None:
    _ray_cycles(ray_cluster, tiny_llama_dir, 2)


@pytest.mark.slow
def test_twenty_ray_cycles_leak_nothing(ray_cluster: Any, tiny_llama_dir: Path) -> None:
    _ray_cycles(ray_cluster, tiny_llama_dir, 20)


def test_ctrl_c_during_a_run_exits_cleanly(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """SIGINT mid-prefill: launch/run.py releases its workers and exits 130 with one line, no
    traceback."""
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"Line {i}: the tide was {i % 7} metres." for i in range(120)))
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "run.py"), "--model", str(tiny_llama_dir)]
    cmd += ["--doc", str(doc), "-q", "What was the tide at line 3?", "--device", "cpu"]
    # 4-token chunks: some 640 prefill steps, seconds of work, so the signal lands in them.
    cmd += ["--dtype", "float32", "--session-len", "4096", "--max-num-batched-tokens", "4"]
    cmd += ["--max-num-seqs", "4"]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # A Ctrl-C the test process ignores (a shell's background job, say) is ignored by the
        # child too, and Python installs no KeyboardInterrupt handler then: restore it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    seen = b""
    while b"document:" not in seen:  # the document is read: the prefill starts next
        chunk = proc.stderr.read1(4096)  # type: ignore[attr-defined]
        assert chunk, seen.decode(errors="replace")[-2000:]
        seen += chunk
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    text = (seen + err).decode(errors="replace")
    assert proc.returncode == 130, f"{signal.getsignal(signal.SIGINT)!r}\n{text[-2000:]}"
    assert "interrupted: workers released" in text
    assert "Traceback" not in text
