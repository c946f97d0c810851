"""Show and bound a disk tier's directory (`--kv-cache-dir DIR`) as a whole.

    python launch/kv_cache_dir.py DIR                       # what each model / layout holds
    python launch/kv_cache_dir.py DIR --max-gb 200          # delete the least recently used
    python launch/kv_cache_dir.py DIR --unused-days 7       # delete those unused for a week
    python launch/kv_cache_dir.py DIR --delete 3f9a 0c1e    # delete these (id prefixes)

`--disk-kv-cache-gb` bounds each model's and layout's blocks (one subdirectory each, named by
their fingerprint); a directory that served several models, dtypes, KV quantizations or tp x cp
layouts holds a bound's worth for each. This lists them, least recently used first, and deletes
whole ones. A directory a running runtime holds is never deleted (each runtime holds a lock on
its own while it runs). `--dry-run` says what would go.

Exit status: 0 done; 2 bad input (DIR not a directory, an id naming no directory or several).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_runtime.engine.kv_disk import TierDir, choose, prune, survey  # noqa: E402

EXIT_BAD = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("dir", type=Path, help="the disk tier's directory (--kv-cache-dir)")
    p.add_argument("--delete", nargs="+", default=[], metavar="ID", help="delete these")
    p.add_argument("--unused-days", type=float, help="delete those unused for this many days")
    p.add_argument(
        "--max-gb", type=float, help="delete the least recently used until the rest fit (GiB)"
    )
    p.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete none")
    args = p.parse_args(argv)
    if args.unused_days is not None and not args.unused_days >= 0:
        p.error(f"--unused-days {args.unused_days:g}: give a number of days >= 0")
    if args.max_gb is not None and not args.max_gb >= 0:
        p.error(f"--max-gb {args.max_gb:g}: give a number of GiB >= 0")
    return args


def _row(t: TierDir, now: float) -> str:
    card = t.card
    layout = "?"
    if card:
        bits = card.get("quant_policy") or 0
        kv = f"int{bits}" if bits else card.get("dtype", "?")
        layout = f"tp{card.get('tp', '?')}xcp{card.get('cp', '?')} {kv} bs{card.get('block_size')}"
    used = "in use" if t.in_use else _ago(now - t.last_used) + ("?" if t.in_use is None else "")
    return (
        f"{t.id[:12]}  {t.nbytes / 2**30:8.2f} GiB  {t.files:8d} blocks  {used:>13}  "
        f"{layout:<24} {card.get('checkpoint', '?')}"
    )


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit} ago"
    return f"{max(seconds, 0):.0f} s ago"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tiers = survey(args.dir)
        doomed = choose(
            tiers,
            args.delete,
            None if args.unused_days is None else args.unused_days * 86400,
            None if args.max_gb is None else int(args.max_gb * 2**30),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD
    now = time.time()
    total = sum(t.nbytes for t in tiers)
    print(f"{args.dir}: {len(tiers)} model / layout directories, {total / 2**30:.2f} GiB")
    for t in tiers:
        print("  " + _row(t, now))
    if any(t.in_use is None for t in tiers):
        print("?: this file system has no file locks, so a runtime using such a directory cannot "
              "be told apart: stop the runtimes on DIR before deleting")  # fmt: skip
    wanted = bool(args.delete or args.unused_days is not None or args.max_gb is not None)
    if not wanted:
        return 0
    held = [t.id[:12] for t in tiers if t.in_use and any(t.id.startswith(i) for i in args.delete)]
    if held:
        print(f"in use by a running runtime, kept: {' '.join(held)}")
    if not doomed:
        print("nothing to delete")
        return 0
    gone = 0
    for t in doomed:
        if args.dry_run:
            print(f"would delete {t.id[:12]} ({t.nbytes / 2**30:.2f} GiB)")
        elif prune(t):
            print(f"deleted {t.id[:12]} ({t.nbytes / 2**30:.2f} GiB)")
            gone += t.nbytes
        else:
            print(f"kept {t.id[:12]}: a runtime started on it just now")
    if not args.dry_run:
        print(f"{args.dir}: {(total - gone) / 2**30:.2f} GiB left")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
