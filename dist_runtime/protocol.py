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
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, get_args, get_origin

import msgpack

MAX_MESSAGE_BYTES = 256 << 20
"""Largest payload accepted (a 1M-token prompt chunk of int64 ids is well below this)."""


class ProtocolError(ValueError):
    """A control-plane payload that does not decode into the expected message."""


def reads_history(
    repetition_penalty: float,
    presence_penalty: float,
    frequency_penalty: float,
    bad_words: list[list[int]],
) -> bool:
    """Whether the workers' sampler reads a sequence's earlier tokens: penalties, or a bad
    word of more than one token."""
    return (
        repetition_penalty != 1.0
        or presence_penalty != 0.0
        or frequency_penalty != 0.0
        or any(len(w) > 1 for w in bad_words)
    )


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
    bias_ids: list[int] = dataclasses.field(default_factory=list)
    """Token ids with a logit bias (OpenAI's logit_bias), sorted."""
    bias_values: list[float] = dataclasses.field(default_factory=list)
    """Their biases, added to the logits before sampling."""
    allowed_ids: list[int] = dataclasses.field(default_factory=list)
    """The only token ids it may sample, sorted (vLLM's allowed_token_ids); empty: any."""
    bad_words: list[list[int]] = dataclasses.field(default_factory=list)
    """Token sequences it must not complete (vLLM's bad_words): a sequence's last token is
    held back while the output ends with the ones before it."""

    @property
    def needs_history(self) -> bool:
        return reads_history(
            self.repetition_penalty, self.presence_penalty, self.frequency_penalty, self.bad_words
        )

    @property
    def adjusts_logits(self) -> bool:
        """Its logits change before sampling (logit bias, allowed ids, bad words)."""
        return bool(self.bias_ids or self.allowed_ids or self.bad_words)


LAST_SAMPLED = -1
"""A decode step's token id that stands for the token the worker sampled for this sequence in
the step before it, not yet read back by the driver (a step planned ahead: `Engine`'s
asynchronous decode)."""


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
    num_draft_tokens: int = 0
    """The last this many token_ids are a draft to check (speculative decoding): the step
    samples after each of the last num_draft_tokens + 1 tokens and returns the draft tokens
    the model agrees with, up to its first disagreement, then its own next token."""
    sampling: SamplingSpec | None = None
    """Present when is_new."""
    rope_base: float = 0.0
    """With is_new: this sequence's RoPE base (dynamic NTK past the trained length); 0 keeps
    the model's own."""
    adapter: int = 0
    """With is_new: this sequence's LoRA adapter slot (i + 1 for the i-th of
    `RuntimeConfig.lora_modules`); 0 is the base model."""
    cached_token_ids: list[int] = dataclasses.field(default_factory=list)
    """With is_new and a penalty that reads the history: the tokens before start_pos (found in
    the prefix cache, so never sent to the workers as token_ids)."""
    prompt_logprobs: int = -1
    """With k >= 0: score the leading `prompt_logprob_rows` rows of this chunk, each against
    the token after it, with the top k; -1: none."""
    prompt_logprob_rows: int = 0
    """Leading rows of token_ids whose next token is a prompt token (the prompt's last token
    and output tokens of a recompute are not scored)."""
    next_prompt_token: int = -1
    """The prompt token after this chunk: the target of its last row when every row is scored
    (-1 otherwise)."""
    allowed_tokens: bytes | None = None
    """With sample: the tokens this sequence may sample (guided output), a packed mask of the
    logits' width (bit i of byte i // 8, least significant first); None: any token."""
    draft_allowed_tokens: list[bytes] = dataclasses.field(default_factory=list)
    """With a draft and guided output: num_draft_tokens + 1 such masks, one per sampled row
    (row j's after the draft's first j tokens); allowed_tokens is then None."""


@dataclass(frozen=True, kw_only=True)
class KVMove:
    """A KV block copied between a cp rank's device cache and its host tier, or between it
    and its disk tier (`disk` set)."""

    pool: int
    """The cp rank whose workers copy it (each tp rank its own heads)."""
    block: int
    slot: int
    """The block's place in the host tier."""
    to_host: bool
    """True: device block -> host slot (an eviction); False: host slot -> device block."""
    disk: int = 0
    """0: a host-tier copy; DISK_SAVE: write device block `block` to the disk tier under
    `key`; DISK_LOAD: read `key` into device block `block`; DISK_DROP: delete `key`."""
    key: str = ""
    """The block's chained digest, as 32 hex digits (its file is named by it)."""
    parent: str = ""
    """With DISK_SAVE: the digest of the block before it in its chain (the file's name holds
    it too, so the tier's shape is known from a listing)."""


DISK_SAVE, DISK_LOAD, DISK_DROP = 1, 2, 3
DISK_SEEN = "worker.seen"
"""A file each worker touches in its disk-tier directory when it opens it: the driver checks
that it sees the touch (it reads the same directory, so it decides the workers' reads)."""


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    step_id: int
    seqs: list[SeqStep]
    finished_seq_ids: list[int]
    """Sequences whose worker-side state can be dropped before this step runs."""
    kv_moves: list[KVMove] = dataclasses.field(default_factory=list)
    """Copies between the device cache and the host tier, done in order before the step."""


@dataclass(frozen=True, kw_only=True)
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True, kw_only=True)
class PromptLogprobs:
    """Log-probabilities of the prompt tokens at positions start_pos + 1 ..., one per row a
    chunk scored: row i is log P(token[start_pos + i + 1] | tokens[..start_pos + i])."""

    seq_id: int
    start_pos: int
    logprobs: list[float]
    top_k: int
    top_ids: list[int]
    """len(logprobs) * top_k ids, row after row, most likely first."""
    top_logprobs: list[float]


@dataclass(frozen=True, kw_only=True)
class StepResult:
    step_id: int
    tokens: list[SampledToken]
    """One per sampled sequence in plan order; a sequence with a draft has 1 to
    num_draft_tokens + 1 in a row (its accepted draft tokens, then the model's own)."""
    prompt_logprobs: list[PromptLogprobs] = dataclasses.field(default_factory=list)
    """Scored rows of the step's chunks that asked for prompt log-probabilities."""
    failed_seq_ids: list[int] = dataclasses.field(default_factory=list)
    """Sequences whose token could not be sampled (their row raised in the sampler, each row
    tried alone): no token for them; the driver fails their requests, the others go on."""
    failed_reasons: list[str] = dataclasses.field(default_factory=list)
    """The error of each of `failed_seq_ids`, in order."""
    unread_moves: list[int] = dataclasses.field(default_factory=list)
    """Indices in the plan's `kv_moves` of disk reads whose file failed its check on some
    worker: the step ran on no worker (no tokens), and the driver plans it again."""


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
    try:
        return _decoder(cls)(raw)  # type: ignore[no-any-return, arg-type]
    except _Invalid as e:
        raise ProtocolError(f"{cls.__name__}{''.join(reversed(e.path))}: {e}") from None


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encoder(type(value))(value)
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# -- codecs, built once per message type --------------------------------------------------------
# A step's plan and result cross the codec every step (b64 decode plans, 8K-token prefill chunks),
# so each type's encoder and decoder is built once from its type hints: no per-value type
# inspection, paths formatted only for an error, and a list of scalars checked by its element
# types in one pass (msgpack yields exact int / float / bool / str objects).


class _Invalid(Exception):
    """A decoding error; `path` collects the field names and indexes on the way out."""

    def __init__(self, message: str):
        super().__init__(message)
        self.path: list[str] = []


_Decoder = Callable[[Any], Any]
_Encoder = Callable[[Any], Any]
_SCALAR_TYPES: dict[Any, frozenset[type]] = {
    int: frozenset({int}),
    bool: frozenset({bool}),
    str: frozenset({str}),
    bytes: frozenset({bytes}),
    float: frozenset({float, int}),
}


def _got(expected: str, raw: Any) -> _Invalid:
    return _Invalid(f"expected {expected}, got {type(raw).__name__}")


@functools.cache
def _decoder(tp: Any) -> _Decoder:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in get_args(tp) if a is not type(None)]
        decode_inner = _decoder(inner)
        return lambda raw: None if raw is None else decode_inner(raw)
    if origin is list:
        (item,) = get_args(tp)
        return _list_decoder(item)
    if dataclasses.is_dataclass(tp):
        return _dataclass_decoder(tp)
    if tp in _SCALAR_TYPES:
        return _scalar_decoder(tp)
    raise ProtocolError(f"unsupported field type {tp!r}")


def _scalar_decoder(tp: type) -> _Decoder:
    if tp is float:

        def decode_float(raw: Any) -> float:
            if type(raw) is float:
                return raw
            if type(raw) is int:
                return float(raw)
            raise _got("float", raw)

        return decode_float
    name = tp.__name__

    def decode_scalar(raw: Any) -> Any:
        if type(raw) is tp:
            return raw
        raise _got(name, raw)

    return decode_scalar


def _list_decoder(item: Any) -> _Decoder:
    decode_item = _decoder(item)
    allowed = _SCALAR_TYPES.get(item)

    def decode_list(raw: Any) -> list[Any]:
        if type(raw) is not list:
            raise _got("a list", raw)
        if allowed is not None:
            kinds = set(map(type, raw))
            if kinds <= allowed:  # the common case: one pass at C speed
                return list(map(float, raw)) if item is float and int in kinds else raw
        out = []
        for i, v in enumerate(raw):
            try:
                out.append(decode_item(v))
            except _Invalid as e:
                e.path.append(f"[{i}]")
                raise
        return out

    return decode_list


def _dataclass_decoder(cls: Any) -> _Decoder:
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, _Decoder, Callable[[], Any] | None]] = []
    for f in dataclasses.fields(cls):
        default: Callable[[], Any] | None = None
        if f.default is not dataclasses.MISSING:
            default = lambda value=f.default: value  # noqa: E731
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory
        fields.append((f.name, _decoder(hints[f.name]), default))
    names = frozenset(name for name, _, _ in fields)
    # Frozen dataclasses set each field through object.__setattr__ in __init__; a message
    # without __post_init__ is filled in directly (every field, as __init__ would).
    direct = not hasattr(cls, "__post_init__") and not hasattr(cls, "__slots__")

    def decode_dataclass(raw: Any) -> Any:
        if type(raw) is not dict:
            raise _got("a map", raw)
        if not raw.keys() <= names:
            raise _Invalid(f"unknown fields {sorted(set(raw) - names, key=str)}")
        values = {}
        for name, decode_field, default in fields:
            if name in raw:
                try:
                    values[name] = decode_field(raw[name])
                except _Invalid as e:
                    e.path.append(f".{name}")
                    raise
            elif default is None:
                raise _Invalid(f"missing field {name!r}")
            else:
                values[name] = default()
        if not direct:
            return cls(**values)
        obj = object.__new__(cls)
        obj.__dict__.update(values)
        return obj

    return decode_dataclass


@functools.cache
def _encoder(cls: type) -> _Encoder:
    """A dataclass as a map in field order: scalars and lists of scalars as they are (msgpack
    packs tuples as arrays too), nested messages through their own encoders."""
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, _Encoder | None]] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        optional = get_origin(tp) in (typing.Union, types.UnionType)
        if optional:
            (tp,) = [a for a in get_args(tp) if a is not type(None)]
        encode_field: _Encoder | None = None
        if get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
            item = _encoder(get_args(tp)[0])
            encode_field = lambda v, e=item: [e(x) for x in v]  # noqa: E731
        elif dataclasses.is_dataclass(tp):
            encode_field = _encoder(tp)  # type: ignore[arg-type]
        if optional and encode_field is not None:
            encode_field = lambda v, e=encode_field: None if v is None else e(v)  # noqa: E731
        fields.append((f.name, encode_field))

    def encode_dataclass(value: Any) -> dict[str, Any]:
        return {
            name: getattr(value, name) if enc is None else enc(getattr(value, name))
            for name, enc in fields
        }

    return encode_dataclass
