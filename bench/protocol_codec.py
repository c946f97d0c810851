"""Host time of the step messages' codec: every step's plan and result cross it twice.

    python bench/protocol_codec.py
    python bench/protocol_codec.py --report docs/benchmarks/protocol_codec_cpu_<date>.md

The driver encodes each step's `StepPlan` and every worker decodes it; tp rank 0 encodes the
`StepResult` and the driver decodes it (the in-process executor too, so that both executors
run one path). On a GPU that time is host time between kernels the device waits through.

* ours: `dist_runtime.protocol.encode` / `decode`, whose per-type codecs are built once from
  the messages' type hints (lists of scalars checked by their element types in one pass);
* reflective: the same strict checks done by walking the type hints for every value (what the
  protocol did before), kept here as the baseline; both decode the same bytes to equal messages.

Cases: decode steps at batch 1, 8 and 64 (one new block every 16 steps), a batch of 8 results
with and without 5 top logprobs, and one 8,192-token prefill chunk of a new sequence. A step
costs plan encode + plan decode + result encode + result decode; the summary line gives ours
vs reflective per step shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import platform
import sys
import timeit
import types
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402

from dist_runtime.protocol import (  # noqa: E402
    SampledToken,
    SamplingSpec,
    SeqStep,
    StepPlan,
    StepResult,
    decode,
    encode,
)

SPEC = SamplingSpec(
    temperature=0.7, top_k=40, top_p=0.9, min_p=0.0, repetition_penalty=1.0, seed=1, logprobs=-1
)


def decode_plan(batch: int) -> StepPlan:
    seqs = [
        SeqStep(
            seq_id=i,
            token_ids=[100 + i],
            start_pos=1000 + i,
            new_blocks=[i] if i % 16 == 0 else [],
            is_new=False,
            sample=True,
        )
        for i in range(batch)
    ]
    return StepPlan(step_id=7, seqs=seqs, finished_seq_ids=[])


def prefill_plan(tokens: int, block_size: int = 16) -> StepPlan:
    seq = SeqStep(
        seq_id=0,
        token_ids=list(range(tokens)),
        start_pos=0,
        new_blocks=list(range(tokens // block_size)),
        is_new=True,
        sample=True,
        sampling=SPEC,
    )
    return StepPlan(step_id=1, seqs=[seq], finished_seq_ids=[])


def result(batch: int, top: int = 0) -> StepResult:
    tokens = [
        SampledToken(
            seq_id=i,
            token_id=200 + i,
            logprob=-0.5,
            top_ids=list(range(top)),
            top_logprobs=[-1.0] * top,
        )
        for i in range(batch)
    ]
    return StepResult(step_id=7, tokens=tokens)


# -- the reflective baseline -------------------------------------------------------------------


def reflective_encode(msg: Any) -> bytes:
    return msgpack.packb(_to_plain(msg), use_bin_type=True)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def reflective_decode(data: bytes, cls: Any) -> Any:
    return _from_plain(msgpack.unpackb(data, raw=False, strict_map_key=True), cls, cls.__name__)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_plain(raw: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if raw is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_plain(raw, inner, where)
    if origin is list:
        if not isinstance(raw, list):
            raise ValueError(f"{where}: expected a list")
        (item,) = typing.get_args(tp)
        return [_from_plain(v, item, f"{where}[{i}]") for i, v in enumerate(raw)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a map")
        fields = {f.name: f for f in dataclasses.fields(tp)}
        if set(raw) - set(fields):
            raise ValueError(f"{where}: unknown fields")
        hints = _hints(tp)  # type: ignore[arg-type]
        kwargs = {
            name: _from_plain(raw[name], hints[name], f"{where}.{name}")
            for name in fields
            if name in raw
        }
        return tp(**kwargs)  # type: ignore[operator]
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[tp](raw)
    if not ok:
        raise ValueError(f"{where}: expected {tp.__name__}")
    return float(raw) if tp is float else raw


# -- timing ------------------------------------------------------------------------------------


def best_us(fn: Any, number: int, repeats: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeats)) / number * 1e6


def measure(msg: Any, repeats: int) -> dict[str, float]:
    cls = type(msg)
    data = encode(msg)
    assert reflective_encode(msg) == data, "the two encoders disagree"
    assert decode(data, cls) == reflective_decode(data, cls) == msg, "the decoders disagree"
    number = max(20, int(20_000 / max(1, len(data) // 16)))
    return {
        "bytes": len(data),
        "ours_enc": best_us(lambda: encode(msg), number, repeats),
        "ours_dec": best_us(lambda: decode(data, cls), number, repeats),
        "refl_enc": best_us(lambda: reflective_encode(msg), number, repeats),
        "refl_dec": best_us(lambda: reflective_decode(data, cls), number, repeats),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--prefill-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--report", help="markdown report path")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    cases: list[tuple[str, Any]] = []
    for b in batches:
        cases.append((f"decode plan b{b}", decode_plan(b)))
        cases.append((f"result b{b}", result(b)))
    cases.append(("result b8, 5 top logprobs", result(8, 5)))
    cases.append(
        (f"prefill plan {args.prefill_tokens:,} tokens", prefill_plan(args.prefill_tokens))
    )
    rows = {name: measure(msg, args.repeats) for name, msg in cases}

    lines = [
        "| message | bytes | ours encode (us) | ours decode (us) | reflective encode (us) "
        "| reflective decode (us) | ours / reflective (enc + dec) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        ours, refl = r["ours_enc"] + r["ours_dec"], r["refl_enc"] + r["refl_dec"]
        lines.append(
            f"| {name} | {r['bytes']:,} | {r['ours_enc']:.1f} | {r['ours_dec']:.1f} | "
            f"{r['refl_enc']:.1f} | {r['refl_dec']:.1f} | {refl / ours:.1f}x |"
        )
    steps = []
    for b in batches:
        plan, res = rows[f"decode plan b{b}"], rows[f"result b{b}"]
        ours = sum(plan[k] + res[k] for k in ("ours_enc", "ours_dec"))
        refl = sum(plan[k] + res[k] for k in ("refl_enc", "refl_dec"))
        steps.append(f"decode b{b} {ours:.0f} vs {refl:.0f} us/step ({refl / ours:.1f}x)")
    pre = rows[f"prefill plan {args.prefill_tokens:,} tokens"]
    pre_ours, pre_refl = pre["ours_enc"] + pre["ours_dec"], pre["refl_enc"] + pre["refl_dec"]
    steps.append(
        f"prefill {args.prefill_tokens:,} tokens {pre_ours:.0f} vs {pre_refl:.0f} us "
        f"({pre_refl / pre_ours:.1f}x)"
    )
    summary = "protocol-codec: ours vs reflective: " + ", ".join(steps)
    table = "\n".join(lines)
    print(table)
    print(summary)
    if args.report:
        machine = f"{platform.machine()}, Python {platform.python_version()}"
        Path(args.report).write_text(
            f"# Step message codec (compiled vs reflective) ({datetime.date.today()})\n\n"
            + __doc__.split("\n\n", 2)[2]
            + f"\nMachine: {machine}, msgpack "
            f"{'.'.join(map(str, msgpack.version))}, best of {args.repeats}.\n\n"
            + table
            + f"\n\n**Summary:** `{summary}`\n\nCommand: `python bench/protocol_codec.py "
            f"--report {args.report}`\n"
        )


if __name__ == "__main__":
    main()
