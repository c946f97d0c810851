"""Needle-in-a-haystack evaluation: haystacks, scoring, the grid over the job queue, resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import Runtime
from dist_runtime.formats.demo_model import demo_model_path
from dist_runtime.needle import (
    GridSettings,
    Needle,
    build_haystack,
    builtin_needle,
    filler_sentences,
    grid_order,
    load_needles,
    normalize,
    parse_depths,
    parse_lengths,
    run_grid,
    score_answer,
)
from dist_runtime.text.tokenizer import Tokenizer
from launch import needle as needle_cli
from tests.conftest import REPO_ROOT

NEEDLE_CLI = REPO_ROOT / "launch" / "needle.py"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_folder(str(demo_model_path()))
    assert tok is not None
    return tok


def _count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


# -- haystacks and scoring ------------------------------------------------------------------


@pytest.mark.parametrize("length", [300, 512, 1024, 4096])
@pytest.mark.parametrize("depth", [0, 10, 50, 90, 100])
def test_haystack_has_the_exact_length_and_the_needle_at_its_depth(
    tokenizer: Tokenizer, length: int, depth: float
) -> None:
    needle = builtin_needle(int(depth))
    hay = build_haystack(tokenizer, length, [depth], [needle], seed=3)
    assert _count(tokenizer, hay.text) == length
    assert hay.text.count(needle.sentence) == 1
    start = hay.needle_token_starts[0]
    before = hay.text[: hay.text.index(needle.sentence)]
    assert abs(_count(tokenizer, before) - start) <= 1
    # On a sentence boundary, within one sentence of the requested share of the filler.
    assert before == "" or before.endswith(". ")
    filler = length - _count(tokenizer, needle.sentence)
    longest_sentence = 40
    assert abs(start - depth / 100 * filler) <= longest_sentence, (start, depth, filler)


def test_filler_is_varied_and_deterministic() -> None:
    first = [s for _, s in zip(range(300), filler_sentences(5))]
    assert first == [s for _, s in zip(range(300), filler_sentences(5))]
    assert first != [s for _, s in zip(range(300), filler_sentences(6))]
    assert len(set(first)) > 250  # not one sentence repeated


def test_multi_needle_haystack(tokenizer: Tokenizer) -> None:
    needles = [builtin_needle(i) for i in range(3)]
    hay = build_haystack(tokenizer, 1024, [0, 40, 80], needles, seed=1)
    assert _count(tokenizer, hay.text) == 1024
    assert hay.needle_token_starts == sorted(hay.needle_token_starts)
    assert all(hay.text.count(n.sentence) == 1 for n in needles)


@pytest.mark.parametrize(
    ("answer", "keys", "score"),
    [
        ("The pass code is 123,456.", ["123456"], 100.0),
        ("It was TOMAS   berg!", ["Tomas Berg"], 100.0),
        ("They met in Kraków.", ["Krakow"], 100.0),
        ("The code is 1234567.", ["123456"], 0.0),  # a key inside a longer number is not it
        ("Saffron and cardamom.", ["saffron", "juniper"], 50.0),
        ("I do not know.", ["violet"], 0.0),
    ],
)
def test_scoring_normalises_case_accents_and_punctuation(
    answer: str, keys: list[str], score: float
) -> None:
    assert score_answer(answer, keys) == score


def test_normalize() -> None:
    assert normalize("  O'Brien, 1,234,567 -- ok. ") == "o brien 1234567 ok"


def test_grid_parsing_and_order() -> None:
    assert parse_lengths("1k, 4096,2K") == [1024, 4096, 2048]
    assert parse_depths("0:100:25") == [0, 25, 50, 75, 100]
    assert parse_depths("0,50,100") == [0, 50, 100]
    for bad in ("1x", "0.3k", "0"):
        with pytest.raises(ValueError, match="--lengths"):
            parse_lengths(bad)
    with pytest.raises(ValueError, match="outside 0..100"):
        parse_depths("0,150")
    order = grid_order([1024, 512], [0, 100], repeats=2)
    assert [c.key for c in order][:4] == ["512/100/0", "512/100/1", "512/0/0", "512/0/1"]


def test_custom_needles_file(tmp_path: Path) -> None:
    path = tmp_path / "n.jsonl"
    path.write_text(
        json.dumps({"needle": "The boat is called Juno.", "question": "Name?", "answer": "Juno"})
        + "\n",
        encoding="utf-8",
    )
    assert load_needles(path) == [Needle("The boat is called Juno.", "Name?", "Juno")]
    path.write_text(json.dumps({"needle": "x", "question": "y", "answer": "z"}), encoding="utf-8")
    with pytest.raises(ValueError, match="not in the needle"):
        load_needles(path)


def test_lengths_past_the_rope_limit_name_lengths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session is derived from --lengths: the error names --lengths and the longest that
    fits the demo model's 8,192 positions, not a --session-len the user never typed."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the runtime started for lengths the model cannot hold")

    monkeypatch.setattr(needle_cli, "start_runtime", forbidden)
    out = tmp_path / "grid"
    assert needle_cli.main(["--lengths", "10k", "--depths", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --lengths 10,240 needs a session of 10,544 tokens"), err
    assert "keep --lengths at most 7,888" in err and "--rope-scaling-factor" in err, err
    assert "--session-len" not in err and err.count("\n") == 1, err
    assert not out.exists()


# -- grids on the demo model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def rt1() -> Iterator[Runtime]:
    with Runtime(tp=1, device="cpu", dtype="float32", session_len=1536) as rt:
        yield rt


def _settings(tp: int, **kw: Any) -> GridSettings:
    base: dict[str, Any] = dict(
        model=str(demo_model_path()),
        lengths=[512, 1024],
        depths=[0.0, 50.0, 100.0],
        repeats=1,
        num_needles=1,
        seed=0,
        max_new_tokens=32,
        needle_file=None,
        tp=tp,
        cp=1,
        rope="test",
        quant_policy=0,
    )
    base.update(kw)
    return GridSettings(**base)


def test_prefix_sharing_across_depths(rt1: Runtime, tmp_path: Path) -> None:
    """Two depths of one length: the second haystack reuses the first's cached filler."""
    one_cell = _settings(1, lengths=[512], depths=[50.0])
    two_cells = _settings(1, lengths=[512], depths=[100.0, 50.0], seed=1)
    one = run_grid(rt1, one_cell, tmp_path / "one", None, False)
    two = run_grid(rt1, two_cells, tmp_path / "two", None, False)
    assert two["prefill_tokens_computed"] < 1.7 * one["prefill_tokens_computed"]
    assert two["prefill_tokens_naive"] > 1.9 * one["prefill_tokens_naive"]


def test_rerunning_a_finished_grid_reports_no_rate(
    rt1: Runtime, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every cell already done: the summary says so instead of a rate of cells computed in no
    time (it used to print "2 cells in 0.0 s, 114,135.7 cell/s")."""
    settings = _settings(1, lengths=[512], depths=[50.0])
    first = run_grid(rt1, settings, tmp_path, None, False)
    capsys.readouterr()
    again = run_grid(rt1, settings, tmp_path, None, True)
    err = capsys.readouterr().err
    assert "needle cells: 1 cell, all already done" in err, err
    assert "cell/s" not in err
    assert again["overall"] == first["overall"]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1


def test_phase_rate_counts_only_this_runs_units() -> None:
    import io

    from dist_runtime.progress import Phase

    out = io.StringIO()
    with Phase("needle cells", "cell", 6, file=out, initial=2) as bar:
        bar.start -= 10.0  # as if it had run for 10 s
        bar.update_to(6)
    assert out.getvalue() == "needle cells: 6 cells (2 already done), 4 in 10.0 s, 0.4 cell/s\n"


def test_phase_since_counts_from_when_the_work_began() -> None:
    """A decode phase whose first tokens came while other prompts still prefilled counts its
    time from the first of them."""
    import io
    import time

    from dist_runtime.progress import Phase

    out = io.StringIO()
    with Phase("decode", "token", 4, file=out, since=time.monotonic() - 8.0) as bar:
        bar.update_to(4)
    assert out.getvalue() == "decode: 4 tokens in 8.0 s, 0.5 token/s\n"


@pytest.mark.usefixtures("ray_cluster")
def _grid_tp1(rt1: Runtime, out: Path) -> list[dict[str, Any]]:
    summary = run_grid(rt1, _settings(1), out, None, False)
    assert summary["overall"] == 100.0, summary
    for name in ("results.jsonl", "summary.json", "heatmap.png"):
        assert (out / name).stat().st_size > 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["length"] for r in rows} == {512, 1024}
    assert all(r["prefill_tokens"] <= r["prompt_tokens"] for r in rows)
    assert summary["prefill_tokens_computed"] < summary["prefill_tokens_naive"]
    return rows


def test_grid_end_to_end(rt1: Runtime, tmp_path: Path) -> None:
    _grid_tp1(rt1, tmp_path / "tp1")


@pytest.mark.slow  # ~35 s more: a tp 3 Runtime over Ray runs the same grid
def test_tp3_gives_the_same_answers(rt1: Runtime, tmp_path: Path) -> None:
    rows = _grid_tp1(rt1, tmp_path / "tp1")
    with Runtime(tp=3, device="cpu", dtype="float32", session_len=1536) as rt3:
        summary3 = run_grid(rt3, _settings(3), tmp_path / "tp3", None, False)
    rows3 = [json.loads(x) for x in (tmp_path / "tp3" / "results.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows3] == [r["answer"] for r in rows]
    assert summary3["overall"] == 100.0
    compare = needle_cli.main(["--compare", str(tmp_path / "tp1"), str(tmp_path / "tp3")])
    assert compare == 0


def test_a_killed_grid_resumes_without_recomputing(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    argv = [
        sys.executable,
        str(NEEDLE_CLI),
        "--tp",
        "1",
        "--lengths",
        "512",
        "--depths",
        "0:100:25",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        results = out / "results.jsonl"
        while time.monotonic() < deadline:
            if results.exists() and len(results.read_text().splitlines()) >= 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # no clean-up at all
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = {json.loads(x)["cell"]: x for x in results.read_text().splitlines()}
    assert 2 <= len(first) < 5
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = results.read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert len(rows) == 5 and len({r["cell"] for r in rows}) == 5
    for line in lines[: len(first)]:  # the finished cells are kept as they were
        assert line == first[json.loads(line)["cell"]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cells"] == 5 and "overall" in again.stdout
