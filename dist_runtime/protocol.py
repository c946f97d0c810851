"""Control-plane messages between the driver and the workers.

Every message is a frozen dataclass encoded as a msgpack map. Decoding is strict: unknown
fields, missing fields, wrong types and oversized payloads raise `ProtocolError`; nothing is
ever unpickled. The driver sends every worker the same `StepPlan`; tp rank 0 answers with a
`StepResult`.

Workers keep per-sequence state (block table, token history for penalties, random stream), so
a plan carries deltas: a sequence's sampling spec only when it is new, and only the blocks
appended since the last step.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar, get_args, get_origin

import msgpack

MAX_MESSAGE_BYTES = 256 << 20
"""Largest payload accepted (a 1M-token prompt chunk of int64 ids is well below this)."""


class ProtocolError(ValueError):
    """A control-plane payload that does not decode into the expected message."""


@dataclass(frozen=True, kw_only=True)
class SamplingSpec:
    """The sampling parameters a worker needs (stop strings stay on the driver)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int
    logprobs: int  # -1: none
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    num_prompt_tokens: int = 0
    """Where the output starts: presence and frequency penalties count output tokens only."""

    @property
    def needs_history(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass(frozen=True, kw_only=True)
class SeqStep:
    """One sequence's work in a step: compute `token_ids` at positions start_pos.."""

    seq_id: int
    token_ids: list[int]
    start_pos: int
    new_blocks: list[int]
    """Block ids appended to this sequence's block table since the last step."""
    is_new: bool
    """Reset worker-side state for this id (first chunk of a prompt, or a recompute)."""
    sample: bool
    """Sample a token after this chunk (false for non-final prefill chunks)."""
    sampling: SamplingSpec | None = None
    """Present when is_new."""
    rope_base: float = 0.0
    """With is_new: this sequence's RoPE base (dynamic NTK past the trained length); 0 keeps
    the model's own."""
    cached_token_ids: list[int] = dataclasses.field(default_factory=list)
    """With is_new and a penalty that reads the history: the tokens before start_pos (found in
    the prefix cache, so never sent to the workers as token_ids)."""


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    step_id: int
    seqs: list[SeqStep]
    finished_seq_ids: list[int]
    """Sequences whose worker-side state can be dropped before this step runs."""


@dataclass(frozen=True, kw_only=True)
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True, kw_only=True)
class StepResult:
    step_id: int
    tokens: list[SampledToken]


M = TypeVar("M")


def encode(msg: Any) -> bytes:
    return msgpack.packb(_to_plain(msg), use_bin_type=True)


def decode(data: bytes, cls: type[M], max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes for {cls.__name__}, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProtocolError(
            f"{cls.__name__} payload of {len(data)} bytes exceeds the {max_bytes}-byte cap"
        )
    try:
        raw = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"{cls.__name__}: undecodable msgpack ({type(e).__name__}: {e})") from e
    return _from_plain(raw, cls, cls.__name__)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _from_plain(raw: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if raw is None and type(None) in get_args(tp):
            return None
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _from_plain(raw, inner[0], where)
    if origin is list:
        if not isinstance(raw, list):
            raise ProtocolError(f"{where}: expected a list, got {type(raw).__name__}")
        (item,) = get_args(tp)
        return [_from_plain(v, item, f"{where}[{i}]") for i, v in enumerate(raw)]
    if dataclasses.is_dataclass(tp):
        return _dataclass_from_plain(raw, tp, where)
    return _scalar(raw, tp, where)


def _dataclass_from_plain(raw: Any, cls: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ProtocolError(f"{where}: expected a map, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise ProtocolError(f"{where}: unknown fields {unknown}")
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING:
                raise ProtocolError(f"{where}: missing field {name!r}")
            continue
        kwargs[name] = _from_plain(raw[name], hints[name], f"{where}.{name}")
    return cls(**kwargs)


def _scalar(raw: Any, tp: Any, where: str) -> Any:
    if tp is bool:
        ok = isinstance(raw, bool)
    elif tp is int:
        ok = isinstance(raw, int) and not isinstance(raw, bool)
    elif tp is float:
        ok = isinstance(raw, (int, float)) and not isinstance(raw, bool)
        raw = float(raw) if ok else raw
    elif tp is str:
        ok = isinstance(raw, str)
    else:
        raise ProtocolError(f"{where}: unsupported field type {tp!r}")
    if not ok:
        raise ProtocolError(f"{where}: expected {tp.__name__}, got {type(raw).__name__}")
    return raw
