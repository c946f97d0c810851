"""What a new user meets first: `launch/run.py` on the demo model, its help, its errors.

The subprocess tests run the README's command as a user would (stdout and stderr captured, so
not a terminal): right answers, the document prefilled once, one line per phase in order, no
carriage-return bars, no Ray start-up chatter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dist_runtime.config import ConfigError, ModelConfig, ParallelConfig, valid_tp_sizes
from dist_runtime.formats.demo_model import DEMO_HF_CONFIG, demo_model_path
from dist_runtime.jobs.doc_qa import qa_prompts
from dist_runtime.text.chat import encode_chat
from dist_runtime.text.documents import harbor_report
from dist_runtime.text.tokenizer import Tokenizer
from launch import chat as chat_cli
from launch import run as run_cli
from launch import serve as serve_cli
from tests.conftest import REPO_ROOT

RUN = REPO_ROOT / "launch" / "run.py"
PHASES = ["loaded weights", "ready:", "prefill:", "decode:"]


def _run(args: list[Any], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run(
        [sys.executable, str(RUN), *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _summary(stdout: str) -> dict[str, int]:
    m = re.search(
        r"(\d+) (?:answers?|replies|reply) in [\d.]+ s; prefill ([\d,]+) tokens computed \+ "
        r"([\d,]+) from the prefix cache",
        stdout,
    )
    assert m, stdout
    return {
        "items": int(m[1]),
        "computed": int(m[2].replace(",", "")),
        "cached": int(m[3].replace(",", "")),
    }


def _assert_clean_phases(stderr: str) -> None:
    assert "\r" not in stderr, "carriage-return bars off a terminal"
    assert "Traceback" not in stderr, stderr
    assert "warning" not in stderr.lower(), stderr  # e.g. Ray's auth-token notice
    assert "\x1b[" not in stderr, "colour codes off a terminal"
    positions = [stderr.find(p) for p in PHASES]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), stderr
    for phase in ("prefill:", "decode:"):
        # one summary line per phase; a phase past 30 s also prints "... so far" lines
        summaries = [
            line
            for line in stderr.splitlines()
            if line.startswith(phase) and not line.endswith(" so far")
        ]
        assert len(summaries) == 1, stderr


@pytest.fixture(scope="module")
def suggested_tp() -> list[int]:
    """What `--tp 2` (which cannot shard the demo model) suggests instead."""
    proc = _run(["--tp", "2", "--prompt", "Hi", "--max-new-tokens", "2"], timeout=60)
    assert proc.returncode == 2
    assert "--tp 2 cannot shard this model" in proc.stderr, proc.stderr
    return list(json.loads(proc.stderr.rsplit("choose --tp from ", 1)[1]))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_folder(str(demo_model_path()))
    assert tok is not None
    return tok


# -- the README's first command --------------------------------------------------------------


@pytest.mark.usefixtures("ray_cluster")  # its tests' Ray must exist first: the CLI starts its own
def test_readme_command_answers_right_and_prefills_the_document_once(
    tokenizer: Tokenizer, suggested_tp: list[int]
) -> None:
    tp = max(suggested_tp)  # 3, the README's command: a suggested value starts
    proc = _run(["--tp", tp])
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = harbor_report()
    for question, fact in zip(doc.questions, doc.answers):
        answer = proc.stdout.split(f"### Q: {question}\n", 1)[1].split("\n###", 1)[0]
        assert fact in answer, (question, answer)
    summary = _summary(proc.stdout)
    assert summary["items"] == 3 and "3 answers in" in proc.stdout
    # Prefill is the document once plus each question's own tokens (and at most a block each).
    prompts = qa_prompts(tokenizer, doc.text, doc.questions)
    shared = len(os.path.commonprefix(prompts))
    tails = sum(len(p) - shared for p in prompts)
    assert summary["computed"] <= shared + tails + 16 * len(prompts), summary
    assert summary["cached"] >= len(prompts) * (shared // 16 * 16) - 16, summary
    assert "hit rate" in proc.stdout
    _assert_clean_phases(proc.stderr)
    assert f"started {tp} workers on Ray" in proc.stderr
    assert proc.stderr.count("loaded weights") == 1  # one line per run, not per worker


def test_one_question_and_a_prompt_through_the_chat_template(
    tokenizer: Tokenizer, suggested_tp: list[int]
) -> None:
    question = "Who is the mayor of Kelmsby?"
    proc = _run(["--tp", min(suggested_tp), "-q", question])  # 1, the other suggested value
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 answer in" in proc.stdout and "Tomas Berg" in proc.stdout
    assert "document: 2,092 tokens, 1 question\n" in proc.stderr
    _assert_clean_phases(proc.stderr)

    prompt = "Name a colour of the sky."
    templated = _run(["--tp", "1", "--prompt", prompt, "--max-new-tokens", "4"])
    raw = _run(["--tp", "1", "--prompt", prompt, "--max-new-tokens", "4", "--raw"])
    for p in (templated, raw):
        assert p.returncode == 0, p.stderr[-3000:]
        assert "1 reply in" in p.stdout
    chat_ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    assert _summary(templated.stdout)["computed"] == len(chat_ids)
    assert _summary(raw.stdout)["computed"] == len(tokenizer.encode(prompt))


@pytest.mark.parametrize(
    ("n", "what", "words"),
    [(1, "reply", "1 reply"), (2, "reply", "2 replies"), (3, "answer", "3 answers")],
)
def test_run_summary_counts_in_english(n: int, what: str, words: str) -> None:
    before = dict.fromkeys(
        (
            "num_prompt_tokens_computed",
            "prefix_cache_queried_tokens",
            "prefix_cache_hit_tokens",
            "num_generated_tokens",
            "num_worker_restarts",
            "num_resumed_requests",
        ),
        0,
    )
    after = {**before, "num_prompt_tokens_computed": 62, "num_generated_tokens": 16}
    line = run_cli.run_summary(n, what, 15.9, before, after)  # type: ignore[arg-type]
    assert line.startswith(f"{words} in 15.9 s; prefill 62 tokens computed"), line
    assert line.endswith("generated 16 tokens"), line
    failed = {**after, "num_worker_restarts": 1, "num_resumed_requests": 3}
    line = run_cli.run_summary(n, what, 15.9, before, failed)  # type: ignore[arg-type]
    assert line.endswith("generated 16 tokens; 1 worker group replaced after a failure, "
                         "3 requests went on"), line  # fmt: skip


# -- help and errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parser", [run_cli.build_parser, serve_cli.build_parser, chat_cli.build_parser]
)
def test_help_gives_every_flag_a_line_and_its_default(parser: Any) -> None:
    for action in parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = action.help or ""
        assert "default" in text or text.startswith("the same as"), action.option_strings


def test_help_groups_flags_and_prints_examples_intact() -> None:
    out = _run(["--help"], timeout=60).stdout
    assert "--model /models/internlm2_5-7b-chat \\\n" in out  # the line continuation survives
    for group in ("model:", "parallelism and devices:", "memory:", "scheduling:", "output:"):
        assert f"\n{group}\n" in out, group
    assert "\nsampling (greedy unless --temperature > 0):\n" in out
    assert "\njobs and service:\n" in out


def _model(heads: int, kv_heads: int, intermediate: int) -> ModelConfig:
    hf = {
        **DEMO_HF_CONFIG,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "head_dim": 64,
        "hidden_size": 64 * heads,
    }
    return ModelConfig.from_dict(hf)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "intermediate"),
    [(9, 3, 1536), (32, 8, 14336), (48, 8, 16384), (16, 16, 5504), (8, 4, 160), (12, 2, 4096)],
)
def test_every_tp_suggestion_satisfies_every_constraint(
    heads: int, kv_heads: int, intermediate: int
) -> None:
    """A refused tp suggests exactly the sizes that pass every check (so following the
    suggestion never runs into the next constraint)."""
    model = _model(heads, kv_heads, intermediate)
    valid = valid_tp_sizes(model)
    assert 1 in valid
    for tp in range(1, heads + 3):
        if tp in valid:
            ParallelConfig(tp=tp).check_model(model)
            continue
        with pytest.raises(ConfigError) as info:
            ParallelConfig(tp=tp).check_model(model)
        suggested = json.loads(str(info.value).rsplit("choose tp from ", 1)[1])
        assert suggested == valid and info.value.key == "parallel.tp"
        for choice in suggested:
            ParallelConfig(tp=choice).check_model(model)


def test_the_suggestion_lists_the_tp_values_that_start(suggested_tp: list[int]) -> None:
    """`--tp 2` on the demo model suggests [1, 3]; the two demo runs above start at exactly
    those values (each asks for its tp from this suggestion)."""
    assert suggested_tp == [1, 3]


def test_yaml_values_are_named_by_key_and_file(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("parallel:\n  tp: 0\n", encoding="utf-8")
    assert run_cli.main(["--config", str(bad), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "parallel.tp must be an integer >= 1, got 0" in err and str(bad) in err
    assert "--tp" not in err

    # A value that only the model refuses (8 heads, tp 3) is found at start: key and file.
    unshardable = tmp_path / "tp3.yaml"
    unshardable.write_text(f"model: {tiny_llama_dir}\nparallel:\n  tp: 3\n", encoding="utf-8")
    assert run_cli.main(["--config", str(unshardable), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "tp=3 cannot shard this model" in err and f"(parallel.tp in {unshardable})" in err


def test_dry_run_without_model_plans_the_demo_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli.main(["--dry-run", "--tp", "3", "--session-len", "8192"]) == 0
    out = capsys.readouterr().out
    assert "tp=3 cp=1" in out and "session_len=8,192" in out and "fits: yes" in out
    # The memory would hold far more; the plan names the RoPE limit as the longest session.
    assert "max session_len at tp=3 cp=1: 8,192 (the model's RoPE limit; the memory holds" in out


def test_demo_config_matches_the_converted_checkpoint() -> None:
    converted = json.loads((demo_model_path() / "config.json").read_text(encoding="utf-8"))
    converted.pop("_name_or_path", None)
    assert converted == DEMO_HF_CONFIG


def test_rope_extrapolation_is_opt_in(capsys: pytest.CaptureFixture[str]) -> None:
    """Past the demo model's 8,192 positions: refused with a way out, planned once allowed."""
    assert run_cli.main(["--dry-run", "--session-len", "12000"]) == 2
    assert "--rope-scaling-factor" in capsys.readouterr().err
    assert run_cli.main(["--dry-run", "--session-len", "12000", "--allow-rope-extrapolation"]) == 0
    assert "session_len=12,000" in capsys.readouterr().out
