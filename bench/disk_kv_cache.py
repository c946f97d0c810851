"""CPU benchmark of the prefix cache's disk tier: a document asked about in a new runtime (a
restart) that finds its KV blocks on disk, against one that prefills it.

    python bench/disk_kv_cache.py [--tries 3] [--report PATH]

Each try, on the demo model (SmolLM2-135M-Instruct, fp32, in-process executor), four fresh
Runtimes, each asking the same three questions about a ~2,100-token report (`rt.ask`;
`--sections`, 24 by default, sets its length):

1. **no disk tier**: the document is prefilled;
2. **cold directory** (`kv_cache_dir`, empty): prefilled too, and every block written to disk
   as it is computed (the writes' cost on the ask, then the wait at shutdown for the last);
3. **running replica** (the same directory): a Runtime started before the cold one, so the
   blocks were written after it listed the directory, asks once the cold one has stopped: it
   finds them by their files (another replica's blocks, as on a shared directory);
4. **warm directory** (the same directory, a new Runtime): the document's blocks are read back.

Timed from the call to the last answer; start-up is timed apart (the weights' fingerprint is
hashed once, then remembered). Reported: medians, prompt tokens computed and read from disk,
and whether every answer is the same. One summary line; `--report` writes a markdown report.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.machine import cpu_report_header  # noqa: E402
from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.config import CacheConfig  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402

QUESTIONS = [
    "Who is the mayor of Kelmsby?",
    "Who keeps the lighthouse?",
    "What is the name of the largest boat of the fleet?",
]
MODES = ("no disk tier", "cold directory", "running replica", "warm directory")


def new_runtime(kv_dir: str | None) -> tuple[Runtime, float]:
    start = time.perf_counter()
    rt = Runtime(
        model=str(demo_model_path()),
        device="cpu",
        dtype="float32",
        session_len=4096,
        cache=CacheConfig(kv_cache_dir=kv_dir),
    )
    return rt, time.perf_counter() - start


def ask(rt: Runtime, doc: str, params: SamplingParams) -> dict[str, Any]:
    start = time.perf_counter()
    answers = rt.ask(doc, QUESTIONS, params)
    seconds = time.perf_counter() - start
    stats = rt.engine.stats()
    return {
        "seconds": seconds,
        "answers": answers,
        "computed": stats["num_prompt_tokens_computed"],
        "from_disk": stats["prefix_cache_disk_hit_tokens"],
        "written": stats["disk_kv_saved_blocks"],
    }


def one_run(kv_dir: str | None, doc: str, params: SamplingParams) -> dict[str, Any]:
    rt, started = new_runtime(kv_dir)
    try:
        result = ask(rt, doc, params)
    finally:
        start = time.perf_counter()
        rt.shutdown()
        stopped = time.perf_counter() - start
    return {"start": started, "stop": stopped, **result}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--sections", type=int, default=24, help="report sections (~150 tokens each)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    doc = harbor_report(seed=7, num_sections=args.sections).text
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    top = Path(tempfile.mkdtemp(prefix="disk-kv-bench-"))
    try:
        for i in range(args.tries):
            kv_dir = str(top / f"try{i}")
            results["no disk tier"].append(one_run(None, doc, params))
            running, started = new_runtime(kv_dir)  # before the blocks are written
            try:
                results["cold directory"].append(one_run(kv_dir, doc, params))
                results["running replica"].append({"start": started, "stop": 0.0,
                                                   **ask(running, doc, params)})  # fmt: skip
            finally:
                running.shutdown()
            results["warm directory"].append(one_run(kv_dir, doc, params))
        size = sum(f.stat().st_size for f in (top / "try0").rglob("*.kv"))
    finally:
        shutil.rmtree(top, ignore_errors=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    plain, cold, replica, warm = MODES
    same = all(
        r["answers"] == results[plain][i]["answers"]
        for mode in (cold, replica, warm)
        for i, r in enumerate(results[mode])
    )
    summary = (
        f"disk-kv-cache: a {med(plain, 'computed'):.0f}-token document in a new runtime: "
        f"{med(warm, 'seconds'):.2f} s from the disk tier vs {med(plain, 'seconds'):.2f} s "
        f"prefilled ({med(plain, 'seconds') / med(warm, 'seconds'):.1f}x; "
        f"{med(warm, 'from_disk'):.0f} tokens read, {med(warm, 'computed'):.0f} computed); "
        f"a runtime already running when they were written: {med(replica, 'seconds'):.2f} s "
        f"({med(replica, 'from_disk'):.0f} tokens read); "
        f"writing it: {med(cold, 'seconds'):.2f} s (+{med(cold, 'stop'):.2f} s at shutdown), "
        f"{size / 2**20:.0f} MiB; answers identical: {same}"
    )
    print(summary)
    if args.report:
        lines = [
            *cpu_report_header("Disk tier of the prefix cache on CPU", summary, args.threads),
            f"- demo model (SmolLM2-135M-Instruct, fp32); blocks of 16 tokens; {args.tries} "
            f"tries; greedy, up to {args.max_new_tokens} new tokens; the directory on this "
            "machine's disk (read back through the page cache: the files were just written)",
            "",
            "| runtime | start (s) | three questions (s) | shutdown (s) | prompt tokens "
            "computed | read from disk | blocks written |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for mode in MODES:
            lines.append(
                f"| {mode} | {med(mode, 'start'):.2f} | {med(mode, 'seconds'):.2f} | "
                f"{med(mode, 'stop'):.2f} | {med(mode, 'computed'):.0f} | "
                f"{med(mode, 'from_disk'):.0f} | {med(mode, 'written'):.0f} |"
            )
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
