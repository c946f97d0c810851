"""What the benchmark reports say about the machine and the code: cores, CPU model, machine-wide
CPU counters, and the checked-out commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_counters() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return (total - idle - iowait) / tick, total / tick


def code_version() -> str:
    """The checked-out commit, and uncommitted changes to the library (read-only git calls)."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        # rstrip, not strip: porcelain lines start with a status column that may be a space
        return out.stdout.rstrip() if out.returncode == 0 else ""

    commit = git("log", "-1", "--format=%h %s")
    if not commit:
        return "unknown (not a git checkout)"
    status = git("status", "--porcelain", "--", "dist_runtime", "workers", "kernels")
    changed = [line[3:] for line in status.splitlines()]
    return f"`{commit}`" + (f" plus uncommitted changes to {', '.join(changed)}" if changed else "")


def cpu_report_header(title: str, summary: str, threads: int) -> list[str]:
    """The first lines of a CPU bench's markdown report: its title (dated), the command that
    produced it, its summary line, the machine and the code."""
    import datetime
    import sys

    import torch

    script = Path(sys.argv[0]).as_posix()
    script = script[script.index("bench/") :] if "bench/" in script else script
    return [
        f"# {title} ({datetime.date.today()})",
        "",
        f"Produced by `python {script}"
        + "".join(f" {a}" for a in sys.argv[1:])
        + "`; see its docstring for how each number is measured.",  # fmt: skip
        "",
        f"**Summary:** `{summary}`",
        "",
        f"- CPU: {cpu_model()}, {usable_cores()} usable cores, {threads} torch threads",
        f"- Python {platform.python_version()}, torch {torch.__version__}",
        f"- code: {code_version()}",
    ]
