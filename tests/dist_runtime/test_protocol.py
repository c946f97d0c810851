"""Control-plane messages: exact round trips, and strict decoding that only raises ProtocolError."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_runtime.protocol import (
    PromptLogprobs,
    ProtocolError,
    SampledToken,
    SamplingSpec,
    SeqStep,
    StepPlan,
    StepResult,
    decode,
    encode,
)

SPEC = SamplingSpec(
    temperature=0.7,
    top_k=40,
    top_p=0.9,
    min_p=0.05,
    repetition_penalty=1.1,
    seed=2**62,
    logprobs=-1,
    bias_ids=[5],
    bias_values=[-2.5],
    allowed_ids=[1, 7, 511],
    bad_words=[[4], [9, 12, 3]],
)
PLAN = StepPlan(
    step_id=7,
    seqs=[
        SeqStep(
            seq_id=3,
            token_ids=[1, 2, 3, 511],
            start_pos=0,
            new_blocks=[9, 4],
            is_new=True,
            sample=False,
            sampling=SPEC,
        ),
        SeqStep(seq_id=1, token_ids=[5], start_pos=40, new_blocks=[], is_new=False, sample=True),
        SeqStep(
            seq_id=2,
            token_ids=[6],
            start_pos=9,
            new_blocks=[],
            is_new=False,
            sample=True,
            allowed_tokens=b"\x00\x81\xff",
        ),
    ],
    finished_seq_ids=[0, 2],
)
RESULT = StepResult(
    step_id=7,
    tokens=[
        SampledToken(
            seq_id=1, token_id=17, logprob=-0.25, top_ids=[17, 3], top_logprobs=[-0.25, -2.0]
        ),
        SampledToken(seq_id=3, token_id=0, logprob=-9.5, top_ids=[], top_logprobs=[]),
    ],
)


def plain(msg: Any) -> Any:
    return msgpack.unpackb(encode(msg), raw=False)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("msg", [PLAN, RESULT, StepPlan(step_id=0, seqs=[], finished_seq_ids=[])])
def test_round_trip(msg: Any) -> None:
    data = encode(msg)
    assert isinstance(data, bytes)
    back = decode(data, type(msg))
    assert back == msg
    assert encode(back) == data


def test_round_trip_keeps_types() -> None:
    back = decode(encode(PLAN), StepPlan)
    assert back.seqs[1].sampling is None
    assert isinstance(back.seqs[0].sampling, SamplingSpec)
    assert back.seqs[0].sampling.seed == 2**62  # 64-bit seeds survive
    assert all(type(t) is int for t in back.seqs[0].token_ids)
    assert type(back.seqs[0].is_new) is bool


def test_decoded_messages_are_frozen_with_their_own_defaults() -> None:
    """Decoding fills a message in directly; it stays frozen, equal by its fields, and a
    field left out gets its default (a fresh list each time)."""
    raw = plain(PLAN)
    del raw["seqs"][1]["cached_token_ids"], raw["seqs"][1]["rope_base"]
    a, b = decode(pack(raw), StepPlan), decode(pack(raw), StepPlan)
    assert a == b and a.seqs[1].rope_base == 0.0 and a.seqs[1].cached_token_ids == []
    assert a.seqs[1].cached_token_ids is not b.seqs[1].cached_token_ids
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.seqs[0].start_pos = 5  # type: ignore[misc]
    token = decode(encode(RESULT), StepResult).tokens[0]
    assert dataclasses.replace(token, logprob=-2.0).logprob == -2.0
    assert repr(token).startswith("SampledToken(seq_id=")


def test_lists_of_floats_keep_float_elements() -> None:
    raw = plain(RESULT)
    raw["tokens"][0]["top_logprobs"] = [-1, -0.5]
    back = decode(pack(raw), StepResult).tokens[0].top_logprobs
    assert back == [-1.0, -0.5] and [type(v) for v in back] == [float, float]


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode(RESULT)
    assert decode(bytearray(data), StepResult) == RESULT  # type: ignore[arg-type]
    assert decode(memoryview(data), StepResult) == RESULT  # type: ignore[arg-type]


def test_int_for_float_field_becomes_float() -> None:
    raw = plain(RESULT)
    raw["tokens"][0]["logprob"] = -1
    token = decode(pack(raw), StepResult).tokens[0]
    assert token.logprob == -1.0 and type(token.logprob) is float


# -- strict decoding -------------------------------------------------------------------------


def _mutated(path: tuple[Any, ...], value: Any = dataclasses.MISSING) -> bytes:
    """The encoded PLAN with the field at `path` replaced (or deleted when value is MISSING)."""
    raw = plain(PLAN)
    node = raw
    for key in path[:-1]:
        node = node[key]
    if value is dataclasses.MISSING:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return pack(raw)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_mutated(("priority",), 1), r"StepPlan: unknown fields \['priority'\]"),
        (
            _mutated(
                (
                    "seqs",
                    0,
                    "lora",
                ),
                "x",
            ),
            r"StepPlan\.seqs\[0\]: unknown fields \['lora'\]",
        ),
        (
            _mutated(
                (
                    "seqs",
                    0,
                    "sampling",
                    "beam",
                ),
                2,
            ),
            r"sampling: unknown fields \['beam'\]",
        ),
        (_mutated(("step_id",)), r"StepPlan: missing field 'step_id'"),
        (_mutated(("seqs", 1, "start_pos")), r"StepPlan\.seqs\[1\]: missing field 'start_pos'"),
        (_mutated(("seqs", 0, "sampling", "seed")), r"sampling: missing field 'seed'"),
        (_mutated(("step_id",), "7"), r"StepPlan\.step_id: expected int, got str"),
        (_mutated(("step_id",), 7.0), r"StepPlan\.step_id: expected int, got float"),
        (_mutated(("step_id",), True), r"StepPlan\.step_id: expected int, got bool"),
        (_mutated(("seqs", 0, "token_ids", 2), False), r"token_ids\[2\]: expected int, got bool"),
        (_mutated(("seqs", 0, "is_new"), 1), r"is_new: expected bool, got int"),
        (_mutated(("seqs", 0, "sampling", "top_p"), "0.9"), r"top_p: expected float, got str"),
        (_mutated(("seqs", 0, "sampling", "top_p"), True), r"top_p: expected float, got bool"),
        (_mutated(("seqs",), {"0": 1}), r"StepPlan\.seqs: expected a list, got dict"),
        (_mutated(("seqs", 0, "token_ids"), b"\x01\x02"), r"token_ids: expected a list, got bytes"),
        (_mutated(("seqs", 0), [1, 2]), r"StepPlan\.seqs\[0\]: expected a map, got list"),
        (_mutated(("seqs", 0, "sampling"), 3), r"sampling: expected a map, got int"),
        (_mutated(("finished_seq_ids",), None), r"finished_seq_ids: expected a list, got NoneType"),
        (pack([7, [], []]), r"StepPlan: expected a map, got list"),
        (pack(None), r"StepPlan: expected a map, got NoneType"),
        (b"", r"StepPlan: undecodable msgpack"),
        (b"\xc1", r"StepPlan: undecodable msgpack"),  # 0xc1 is never used by msgpack
        (b"\x93\x01\x02", r"StepPlan: undecodable msgpack"),  # truncated array
        (encode(PLAN)[:-3], r"StepPlan: undecodable msgpack"),
        (encode(PLAN) + b"\x00", r"StepPlan: undecodable msgpack"),  # trailing bytes
        (pack({1: 2}), r"StepPlan: undecodable msgpack"),  # integer map keys are refused
        (b"\xa2\xff\xfe", r"StepPlan: undecodable msgpack"),  # str that is not UTF-8
        (b"\x91" * 100_000 + b"\xc0", r"StepPlan: undecodable msgpack"),  # nesting bomb
        (b"\xdd\xff\xff\xff\xff", r"StepPlan: undecodable msgpack"),  # 4G-item array header
    ],
    ids=[
        "unknown-top",
        "unknown-nested",
        "unknown-in-spec",
        "missing-top",
        "missing-nested",
        "missing-in-spec",
        "str-for-int",
        "float-for-int",
        "bool-for-int",
        "bool-in-int-list",
        "int-for-bool",
        "str-for-float",
        "bool-for-float",
        "map-for-list",
        "bytes-for-list",
        "list-for-map",
        "int-for-optional-map",
        "none-for-list",
        "array-message",
        "nil-message",
        "empty",
        "reserved-byte",
        "truncated-array",
        "truncated-message",
        "trailing-bytes",
        "int-map-keys",
        "bad-utf8",
        "deep-nesting",
        "huge-length",
    ],
)
def test_strict_decoding(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(data, StepPlan)


def test_oversized_payload() -> None:
    data = encode(PLAN)
    assert decode(data, StepPlan, max_bytes=len(data)) == PLAN
    with pytest.raises(ProtocolError, match=rf"StepPlan payload of {len(data)} bytes exceeds"):
        decode(data, StepPlan, max_bytes=len(data) - 1)


def test_non_bytes_input() -> None:
    with pytest.raises(ProtocolError, match=r"expected bytes for StepResult, got str"):
        decode(encode(RESULT).decode("latin-1"), StepResult)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=r"expected bytes for StepPlan, got dict"):
        decode(plain(PLAN), StepPlan)  # type: ignore[arg-type]


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


# -- fuzzing ---------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # fixed examples: the suite is reproducible
    suppress_health_check=[HealthCheck.too_slow],
)


def _decode_or_protocol_error(data: bytes) -> None:
    for cls in (StepPlan, StepResult):
        try:
            msg = decode(data, cls)
        except ProtocolError:
            continue
        assert isinstance(msg, cls)
        assert decode(encode(msg), cls) == msg


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_or_protocol_error(data)


@FUZZ
@given(
    base=st.sampled_from([encode(PLAN), encode(RESULT)]),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete", "truncate"]),
            st.integers(0, 10_000),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_fuzz_mutated_payloads(base: bytes, edits: list[tuple[str, int, int]]) -> None:
    data = bytearray(base)
    for op, pos, byte in edits:
        i = pos % (len(data) + 1)
        if op == "flip" and i < len(data):
            data[i] ^= byte or 1
        elif op == "insert":
            data.insert(i, byte)
        elif op == "delete" and i < len(data):
            del data[i]
        elif op == "truncate":
            del data[i:]
    _decode_or_protocol_error(bytes(data))


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=8)
)
_FIELD_NAMES = st.sampled_from(
    [
        "step_id",
        "seqs",
        "finished_seq_ids",
        "seq_id",
        "token_ids",
        "start_pos",
        "new_blocks",
        "is_new",
        "sample",
        "sampling",
        "temperature",
        "seed",
        "tokens",
        "token_id",
        "logprob",
        "top_ids",
        "top_logprobs",
        "other",
    ]
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_FIELD_NAMES, inner, max_size=6),
    max_leaves=20,
)


@FUZZ
@given(st.dictionaries(_FIELD_NAMES, _VALUES, max_size=6))
def test_fuzz_structured_maps(raw: dict[str, Any]) -> None:
    """Maps with real field names and arbitrary values get past msgpack into field checks."""
    _decode_or_protocol_error(pack(raw))


@FUZZ
@given(path_index=st.integers(0, 10_000), value=_VALUES)
def test_fuzz_one_field_replaced(path_index: int, value: Any) -> None:
    """Replace one field anywhere in a valid plan: the result decodes or is refused cleanly."""
    raw = plain(PLAN)
    paths: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            paths.append((*path, key))
            if isinstance(child, (dict, list)):
                walk(child, (*path, key))

    walk(raw, ())
    path = paths[path_index % len(paths)]
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _decode_or_protocol_error(pack(raw))


def test_prompt_logprob_fields_round_trip_and_default() -> None:
    step = SeqStep(
        seq_id=4,
        token_ids=[7, 8, 9],
        start_pos=16,
        new_blocks=[],
        is_new=False,
        sample=False,
        prompt_logprobs=2,
        prompt_logprob_rows=3,
        next_prompt_token=10,
    )
    result = StepResult(
        step_id=1,
        tokens=[],
        prompt_logprobs=[
            PromptLogprobs(
                seq_id=4,
                start_pos=16,
                logprobs=[-1.5, -0.5],
                top_k=1,
                top_ids=[3, 9],
                top_logprobs=[-0.25, -0.5],
            )
        ],
    )
    assert decode(encode(step), SeqStep) == step
    assert decode(encode(result), StepResult) == result
    # a payload without the new fields (an older sender) decodes with them off
    old = {k: v for k, v in plain(PLAN.seqs[1]).items() if "prompt" not in k}
    assert decode(msgpack.packb(old), SeqStep).prompt_logprobs == -1
    assert decode(encode(RESULT), StepResult).prompt_logprobs == []
