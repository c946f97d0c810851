"""CPU decode attention over the paged KV cache: the native kernel against the torch reference.

    python bench/cpu_attention.py                          # demo and 7B head shapes, 1K-32K keys
    python bench/cpu_attention.py --json a.json --report docs/benchmarks/cpu_attention_<date>.md
    python bench/cpu_attention.py --before /tmp/older.json # adds that run's native column
    python bench/cpu_attention.py --before-ref HEAD~1      # and that commit's kernel, interleaved

Each case is one decode step's attention for one layer: `batch` queries, each over `context`
keys in 16-slot blocks scattered over the cache in random order (as a long-running server's
cache is). Enough distinct layers' caches (`--cache-mb` in all) are cycled through that every
call reads its K and V from memory, as a decode step does. Timed, best of `--repeats` passes
after a warm-up, the paths taking turns pass by pass (so that a slow stretch of the machine
falls on all of them):

* native: `paged_decode` (`kernels/cpu_attention.py`, what CPU decode steps run by default);
* torch: `flash_decode_ref` (`kernels/flash_decode.py`), a gather of the blocks plus SDPA, what
  `DIST_RUNTIME_CPU_ATTENTION=torch` runs;
* with `--before-ref REF`: `paged_decode` on the native library built from that git commit's
  `kernels/csrc` (the same flags, the same inputs), for a before / after in one run.

Both are checked against each other first. KV GB/s counts the cache bytes a call must read (K,
V and, for int8 / int4 caches, their per-row scale and zero); the read rate it is compared with
is `torch.sum` over a 256 MB buffer, measured in the same run. The summary line gives native /
torch per cache kind (geometric mean over the cases) and the native kernel's KV rate as a share
of that read rate.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.machine import code_version  # noqa: E402
from kernels import cpu_attention, native  # noqa: E402
from kernels.cpu_attention import paged_decode  # noqa: E402
from kernels.flash_decode import flash_decode_ref  # noqa: E402
from kernels.kv_quant import quantize_kv_ref  # noqa: E402

HEADS = {"demo": (9, 3, 64), "7b": (32, 8, 128)}
"""(q heads, kv heads, head_dim): SmolLM2-135M (the demo), InternLM2.5-7B at tp 1."""
BLOCK = 16
CASES = [(1, 1024), (8, 1024), (1, 8192), (8, 8192), (1, 32768)]
"""(batch, context) pairs."""


def read_rate(repeats: int) -> float:
    """Bytes per second `torch.sum` reads from a buffer larger than the caches."""
    x = torch.ones(64 * 2**20)
    x.sum()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def ref_library(ref: str) -> tuple[ctypes.CDLL, str]:
    """The native kernels as built from git commit `ref`'s kernels/csrc, typed like today's, and
    the commit's `<short hash> <subject>`."""
    root = Path(__file__).resolve().parents[1]
    cc = native.compiler()
    if cc is None:
        raise SystemExit("--before-ref needs a C compiler (set CC or install gcc)")

    def git(*cmd: str) -> bytes:
        done = subprocess.run(["git", *cmd], cwd=root, capture_output=True)
        if done.returncode:
            raise SystemExit(f"--before-ref {ref!r}: git {' '.join(cmd)}: {done.stderr.decode()}")
        return done.stdout

    tmp = Path(tempfile.mkdtemp(prefix="csrc-"))
    for name in git("ls-tree", "--name-only", ref, "kernels/csrc/").decode().split():
        (tmp / Path(name).name).write_bytes(git("show", f"{ref}:{name}"))
    sources = tuple(tmp / s.name for s in native.SOURCES if (tmp / s.name).exists())
    native.build(cc, tmp / "kernels.so", sources)
    subject = git("log", "-1", "--format=%h %s", ref).decode().strip()
    return cpu_attention.bind(ctypes.CDLL(str(tmp / "kernels.so"))), subject


@contextlib.contextmanager
def kernels_from(lib: ctypes.CDLL):
    """paged_decode runs on `lib` inside the block."""
    saved = cpu_attention._library
    cpu_attention._library = lambda: lib  # type: ignore[assignment]
    try:
        yield
    finally:
        cpu_attention._library = saved  # type: ignore[assignment]


def make_layer(heads: tuple[int, int, int], batch: int, context: int, bits: int, gen):
    """One layer's caches (in the kind asked) and a step's inputs over them."""
    _, kv_heads, d = heads
    per_seq = -(-context // BLOCK)
    blocks = batch * per_seq + 1
    k = torch.randn(blocks, BLOCK, kv_heads, d, generator=gen)
    v = torch.randn(blocks, BLOCK, kv_heads, d, generator=gen)
    tables = torch.randperm(blocks, generator=gen)[: batch * per_seq].view(batch, per_seq)
    layer = {"tables": tables.to(torch.int32), "bits": bits}
    if bits:
        (layer["k"], layer["k_params"]), (layer["v"], layer["v_params"]) = (
            quantize_kv_ref(k, bits),
            quantize_kv_ref(v, bits),
        )
    else:
        layer["k"], layer["v"], layer["k_params"], layer["v_params"] = k, v, None, None
    return layer


def quant(layer: dict) -> dict:
    """A layer's quantization arguments, as both attention paths take them."""
    return {"k_params": layer["k_params"], "v_params": layer["v_params"], "bits": layer["bits"]}


def layer_bytes(heads: tuple[int, int, int], batch: int, context: int, bits: int) -> int:
    """Cache bytes one call reads: K and V rows (+ their scale and zero when quantized)."""
    _, kv_heads, d = heads
    row = {0: 4 * d, 8: d + 8, 4: d // 2 + 8}[bits]
    return 2 * batch * context * kv_heads * row


def measure(heads_name: str, batch: int, context: int, bits: int, args, gen) -> dict:
    heads = HEADS[heads_name]
    nbytes = layer_bytes(heads, batch, context, bits)
    count = max(2, min(64, int(args.cache_mb * 1e6 / nbytes)))
    layers = [make_layer(heads, batch, context, bits, gen) for _ in range(count)]
    q = torch.randn(batch, heads[0], heads[2], generator=gen)
    lens = torch.full((batch,), context, dtype=torch.int64)
    scale = heads[2] ** -0.5

    def native(layer):
        return paged_decode(
            q, layer["k"], layer["v"], layer["tables"], lens, scale, context, **quant(layer)
        )[0]

    def reference(layer):
        return flash_decode_ref(
            q, layer["k"], layer["v"], layer["tables"], lens, scale, **quant(layer)
        )[0]

    paths = {"native": native, "torch": reference}
    if args.before_lib is not None:

        def before(layer):
            with kernels_from(args.before_lib):
                return native(layer)

        paths["before"] = before
    want = reference(layers[0])
    for fn in paths.values():
        torch.testing.assert_close(fn(layers[0]), want, rtol=2e-4, atol=2e-4)
    seconds = dict.fromkeys(paths, math.inf)
    for fn in paths.values():
        for layer in layers:
            fn(layer)
    for _ in range(args.repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            for layer in layers:
                fn(layer)
            seconds[name] = min(seconds[name], (time.perf_counter() - start) / count)
    row = {
        "heads": heads_name,
        "batch": batch,
        "context": context,
        "kv": {0: "float32", 8: "int8", 4: "int4"}[bits],
        "bytes": nbytes,
        "seconds": seconds,
    }
    print(
        f"{heads_name} b{batch} {context} {row['kv']}: "
        + ", ".join(
            f"{n} {t * 1e3:.3f} ms ({nbytes / t / 1e9:.1f} GB/s)" for n, t in seconds.items()
        ),
        flush=True,
    )
    return row


def key(row: dict) -> tuple:
    return row["heads"], row["batch"], row["context"], row["kv"]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--heads", default="demo,7b", help=f"comma list of {sorted(HEADS)}")
    p.add_argument("--kv", default="0,8,4", help="cache kinds: 0 float32, 8 int8, 4 int4")
    p.add_argument("--max-context", type=int, default=32768)
    p.add_argument("--cache-mb", type=float, default=200.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--before", help="a --json file of an earlier run: its native column")
    p.add_argument(
        "--before-ref",
        help="a git commit: its native kernel is built and timed in this run (interleaved)",
    )
    p.add_argument("--report", help="markdown report path")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    unknown = set(args.heads.split(",")) - set(HEADS)
    if unknown:
        p.error(f"--heads {args.heads!r}: unknown {sorted(unknown)}; choose from {sorted(HEADS)}")
    args.before_lib, before_subject = None, ""
    if args.before_ref:
        args.before_lib, before_subject = ref_library(args.before_ref)
    gen = torch.Generator().manual_seed(0)
    rate = read_rate(args.repeats)
    print(f"read rate (torch.sum over 256 MB): {rate / 1e9:.1f} GB/s", flush=True)
    rows = [
        measure(h, b, c, int(bits), args, gen)
        for h in args.heads.split(",")
        for bits in args.kv.split(",")
        for b, c in CASES
        if c <= args.max_context
    ]
    before = {}
    if args.before_ref:
        before = {key(r): {"seconds": {"native": r["seconds"]["before"]}} for r in rows}
    elif args.before:
        old = json.loads(Path(args.before).read_text())
        before = {key(r): r for r in old["rows"]}
    if args.json:
        Path(args.json).write_text(
            json.dumps({"code": code_version(), "read_rate": rate, "rows": rows}, indent=1)
        )
    parts = []
    for kind in dict.fromkeys(r["kv"] for r in rows):
        mine = [r for r in rows if r["kv"] == kind]
        ratio = math.exp(
            sum(math.log(r["seconds"]["torch"] / r["seconds"]["native"]) for r in mine) / len(mine)
        )
        share = sum(r["bytes"] / r["seconds"]["native"] / rate for r in mine) / len(mine)
        part = f"{kind} native/torch {ratio:.2f}x, {share:.0%} of the read rate"
        olds = [before[key(r)] for r in mine if key(r) in before]
        if len(olds) == len(mine):
            gain = math.exp(
                sum(
                    math.log(o["seconds"]["native"] / r["seconds"]["native"])
                    for o, r in zip(olds, mine, strict=True)
                )
                / len(mine)
            )
            part += f", {gain:.2f}x the earlier native"
        parts.append(part)
    summary = "cpu-attention: " + "; ".join(parts)
    print(summary)
    if not args.report:
        return
    has_before = bool(before)
    head = "| heads | batch | keys | KV | native (ms) | native GB/s | share of read rate |"
    head += " torch (ms) | torch GB/s | native / torch |"
    sep = "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"
    if has_before:
        head += " earlier native (ms) | gain |"
        sep += "---:|---:|"
    lines = [head, sep]
    for r in rows:
        s, b = r["seconds"], r["bytes"]
        line = (
            f"| {r['heads']} | {r['batch']} | {r['context']:,} | {r['kv']} | "
            f"{s['native'] * 1e3:.3f} | {b / s['native'] / 1e9:.1f} | "
            f"{b / s['native'] / rate:.0%} | {s['torch'] * 1e3:.3f} | "
            f"{b / s['torch'] / 1e9:.1f} | {s['torch'] / s['native']:.2f}x |"
        )
        if has_before:
            o = before.get(key(r))
            line += (
                f" {o['seconds']['native'] * 1e3:.3f} | "
                f"{o['seconds']['native'] / s['native']:.2f}x |"
                if o
                else " | |"
            )
        lines.append(line)
    earlier = ""
    if args.before_ref:
        earlier = (
            f" The earlier native column is the kernel built from `{args.before_ref}` "
            f"({before_subject}), timed in this run, taking turns with the others."
        )
    elif has_before:
        earlier = (
            f" The earlier native column is `{args.before}`, measured by this script at "
            f"{json.loads(Path(args.before).read_text())['code']} on the same machine."
        )
    Path(args.report).write_text(
        f"# CPU decode attention: native kernel vs torch reference ({datetime.date.today()})\n\n"
        + "\n\n".join(__doc__.split("\n\n")[2:]).strip()
        + f"\n\nMachine: {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {args.threads} threads, read rate {rate / 1e9:.1f} GB/s, "
        f"code {code_version()}.{earlier}\n\n"
        + "\n".join(lines)
        + f"\n\n**Summary:** `{summary}`\n\nCommand: `python bench/cpu_attention.py "
        + " ".join(sys.argv[1:])
        + "`\n"
    )


if __name__ == "__main__":
    main()
