"""Validation and normalisation of user-facing SamplingParams."""

from __future__ import annotations

from typing import Any

import pytest

from dist_runtime.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", -1),
        ("max_new_tokens", -3),
        ("max_new_tokens", 2.5),
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("top_k", -1),
        ("top_k", 2.0),
        ("min_p", 2.0),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("logprobs", 21),
        ("logprobs", -1),
        ("seed", -1),
        ("seed", 2**63),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop_token_ids", [1, -2]),
        ("priority", 1.5),
        ("priority", "high"),
        ("priority", 2**31),
        ("allowed_token_ids", []),
        ("allowed_token_ids", [3, -1]),
        ("allowed_token_ids", 5),
        ("bad_words", [""]),
        ("bad_words", [3]),
    ],
)
def test_invalid_value_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_unknown_extra_options_rejected() -> None:
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(extra={"frequency_penalty": 0.5})


def test_defaults_are_valid_and_greedy() -> None:
    """One default everywhere: setting only the length keeps greedy decoding."""
    params = SamplingParams()
    assert params.max_new_tokens == 64
    assert params.is_greedy and SamplingParams(max_new_tokens=40).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_new_tokens": 1},
        {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0},
        {"temperature": 2, "top_p": 0.01, "top_k": 1, "min_p": 1.0},
        {"repetition_penalty": 0.5, "seed": 0, "logprobs": 0},
        {"seed": 2**63 - 1, "logprobs": 20},
    ],
)
def test_boundary_values_accepted(overrides: dict[str, Any]) -> None:
    params = SamplingParams(**overrides)
    assert all(getattr(params, k) == v for k, v in overrides.items())


def test_lists_become_tuples() -> None:
    params = SamplingParams(stop=["a", "bc"], stop_token_ids=[2, 7])  # type: ignore[arg-type]
    assert params.stop == ("a", "bc")
    assert params.stop_token_ids == (2, 7)
    assert hash(params) == hash(SamplingParams(stop=("a", "bc"), stop_token_ids=(2, 7)))


def test_single_stop_string_becomes_tuple() -> None:
    assert SamplingParams(stop="x").stop == ("x",)  # type: ignore[arg-type]


def test_frozen() -> None:
    params = SamplingParams()
    with pytest.raises(AttributeError):
        params.temperature = 0.5  # type: ignore[misc]


def test_allowed_ids_and_bad_words_are_stored_as_tuples_and_survive_the_job_store() -> None:
    from dist_runtime.jobs.store import params_from_json, params_to_json

    params = SamplingParams(allowed_token_ids=[9, 2, 9], bad_words="tea")
    assert params.allowed_token_ids == (2, 9) and params.bad_words == ("tea",)
    assert hash(params) == hash(SamplingParams(allowed_token_ids=(2, 9), bad_words=("tea",)))
    assert params_from_json(params_to_json(params)) == params
