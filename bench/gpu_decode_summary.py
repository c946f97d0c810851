"""One table of decode against its bandwidth floor from a `bench/gpu_decode.sh` output folder.

    python bench/gpu_decode_summary.py OUT            # prints the table, writes OUT/summary.md

Reads every `generate_*.md` that `bench/generate_gpu.py` wrote there (the default runs, the
runs with decode steps launched ahead, the segmented-graph runs, the int8 / int4 KV cache runs)
and lines up, per workload, each run's ms per step and its fraction of its own floor (weights +
KV bytes at the measured copy bandwidth; the floor column is the first run's, and a quantized
cache's run reads fewer KV bytes), against the issue's targets: 85% at 8K-128K, 70% at
1,048,576 tokens. The last line is a one-line summary: the best fraction per workload and which
run reached it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

LINE = re.compile(
    r"decode (?:batch (?P<batch>\d+) )?at\s+(?P<ctx>\d+) context: +(?P<ms>[\d.]+) "
    r"ms/(?:token|step), floor +(?P<floor>[\d.]+) ms"
)
TARGET_LONG = 1_048_576
"""From this context on the target is 70%, below it 85%."""


def short(ctx: int) -> str:
    """8192 -> '8K', 1048576 -> '1M', 96 -> '96'."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if ctx % size == 0:
            return f"{ctx // size}{unit}"
    return str(ctx)


def parse(text: str) -> dict[tuple[int, int], tuple[float, float]]:
    """{(batch, context): (ms per step, floor ms)} of every decode line in a report."""
    out = {}
    for m in LINE.finditer(text):
        out[(int(m["batch"] or 1), int(m["ctx"]))] = (float(m["ms"]), float(m["floor"]))
    return out


def run_name(path: Path) -> str:
    """`generate_7b_async.md` -> `async`; `generate_7b.md` -> `default`."""
    parts = path.stem.split("_")[2:]  # after 'generate' and the model tag
    return "_".join(parts) or "default"


def summarize(folder: Path) -> tuple[str, str]:
    """(markdown table, one-line summary) of every generate_*.md in folder."""
    runs: dict[str, dict[tuple[int, int], tuple[float, float]]] = {}
    for path in sorted(folder.glob("generate_*.md")):
        rows = parse(path.read_text())
        if rows:
            name = run_name(path)
            runs.setdefault(name, {}).update(rows)
    if not runs:
        raise SystemExit(f"no decode lines in {folder}/generate_*.md")
    names = sorted(runs, key=lambda n: (n != "default", n))
    keys = sorted({k for rows in runs.values() for k in rows}, key=lambda k: (k[1], k[0]))
    head = ["| batch | context | floor ms | target |", "|---|---|---|---|"]
    head[0] += "".join(f" {n} ms | {n} % |" for n in names)
    head[1] += "---|---|" * len(names)
    lines, best = head, []
    for batch, ctx in keys:
        floor = next(rows[(batch, ctx)][1] for rows in runs.values() if (batch, ctx) in rows)
        target = 0.70 if ctx >= TARGET_LONG else 0.85
        cells, fractions = [], {}
        for n in names:
            if (batch, ctx) in runs[n]:
                ms, own_floor = runs[n][(batch, ctx)]
                fractions[n] = own_floor / ms  # a run with a quantized cache has a lower floor
                cells.append(f" {ms:.2f} | {own_floor / ms:.0%} |")
            else:
                cells.append(" - | - |")
        lines.append(f"| {batch} | {ctx:,} | {floor:.2f} | {target:.0%} |" + "".join(cells))
        top = max(fractions, key=lambda n: fractions[n])
        mark = "" if fractions[top] >= target else " (below target)"
        best.append(f"b{batch} {short(ctx)} {fractions[top]:.0%} ({top}){mark}")
    return "\n".join(lines), "decode vs floor, best run: " + ", ".join(best)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folder", type=Path)
    args = p.parse_args()
    table, summary = summarize(args.folder)
    (args.folder / "summary.md").write_text(table + "\n\n" + summary + "\n")
    print(table)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
