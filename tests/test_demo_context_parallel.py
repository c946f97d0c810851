"""Context parallelism on the demo model: the pass-key answer at cp=2 and cp=3 equals cp=1.

A separate module from test_demo_model.py, whose module-scoped tp=3 runtime holds three of the
session Ray cluster's four CPUs while that module runs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import Runtime, SamplingParams
from dist_runtime.config import SchedulerConfig
from dist_runtime.formats.demo_model import demo_model_path
from dist_runtime.text.chat import encode_chat, history_to_messages
from dist_runtime.text.documents import passkey_haystack
from dist_runtime.text.tokenizer import Tokenizer

SESSION_LEN = 4096
PASSKEY_SEED = 1234


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return demo_model_path()


@pytest.fixture(scope="module")
def haystack(model_dir: Path) -> tuple[int, list[int]]:
    tokenizer = Tokenizer.from_folder(str(model_dir))
    assert tokenizer is not None
    key = random.Random(f"{PASSKEY_SEED}-cp").randint(10_000, 99_999)
    return key, encode_chat(tokenizer, history_to_messages(passkey_haystack(key, position=0.5)))


@pytest.fixture(scope="module")
def single(model_dir: Path, haystack: tuple[int, list[int]]) -> Iterator[list[int]]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    key, prompt = haystack
    with Runtime(
        model=str(model_dir), device="cpu", dtype="float32", session_len=SESSION_LEN
    ) as rt:
        (out,) = rt.generate([prompt], PARAMS)
    torch.set_num_threads(previous)
    assert str(key) in out.text
    yield out.token_ids


PARAMS = SamplingParams(max_new_tokens=16, temperature=0.0)


# cp 3 on demand (-m slow): the tiny-model meshes of tests/test_context_parallel.py cover cp 3.
@pytest.mark.parametrize("cp", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_pass_key_with_context_parallelism(
    ray_cluster: Any,
    model_dir: Path,
    haystack: tuple[int, list[int]],
    single: list[int],
    cp: int,
) -> None:
    """The haystack sharded over cp ranks (prefill chunks of 256 tokens per rank, so the later
    chunks attend over KV spread across ranks) gives cp=1's reply token for token."""
    _, prompt = haystack
    assert len(prompt) > 1200
    with Runtime(
        model=str(model_dir),
        cp=cp,
        device="cpu",
        dtype="float32",
        session_len=SESSION_LEN,
        scheduler=SchedulerConfig(max_num_batched_tokens=256),
    ) as rt:
        (got,) = rt.generate([prompt], PARAMS)
    assert got.token_ids == single
