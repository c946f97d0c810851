"""launch/chat.py, the terminal chat, on the demo model (SmolLM2-135M-Instruct, greedy, CPU).

One subprocess drives the script through a pipe as a user would (two turns, an unknown command,
bad /doc paths, /reset, /doc and a question about the document, /help, then EOF). The rest runs
in process on one module-scoped Runtime(tp=1): the history in the second prompt, /exit, the
document's KV reused from the prefix cache on the next turn, Ctrl-C during a reply (request
aborted, KV freed, turn dropped) and at the prompt, dropping old turns at session_len, and flags
that fail before the model loads.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TextIO, cast

import pytest
import torch

from dist_runtime import Runtime, SamplingParams
from dist_runtime import runtime as runtime_module
from dist_runtime.formats.demo_model import demo_model_path
from dist_runtime.text.documents import harbor_report
from launch import chat
from tests.conftest import REPO_ROOT

CHAT = REPO_ROOT / "launch" / "chat.py"
MAX_NEW_TOKENS = 32
DOC = harbor_report(num_sections=4)
"""About 450 tokens; the greedy demo model answers its mayor question with "Tomas Berg"."""
MAYOR = DOC.questions[1]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine torch's second thread makes small CPU
    steps many times slower (see tests/test_demo_model.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def rt() -> Iterator[Runtime]:
    with Runtime(model=str(demo_model_path()), tp=1, device="cpu", dtype="float32") as runtime:
        yield runtime


@pytest.fixture
def doc_file(tmp_path: Path) -> Path:
    path = tmp_path / "kelmsby.txt"
    path.write_text(DOC.text, encoding="utf-8")
    return path


def session(rt: Runtime, max_new_tokens: int = MAX_NEW_TOKENS, **kw: Any) -> chat.ChatSession:
    args = chat.parse_args(["--tp", "1", "--max-new-tokens", str(max_new_tokens)])
    s = chat.ChatSession.from_args(rt, args)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def loop(s: chat.ChatSession, text: str, stdout: io.StringIO | None = None) -> tuple[int, str, str]:
    """Run the chat loop on `text` as stdin: (status, stdout, stderr)."""
    out, err = stdout or io.StringIO(), io.StringIO()
    status = chat.chat_loop(s, io.StringIO(text), out, err)
    return status, out.getvalue(), err.getvalue()


def test_piped_session(tmp_path: Path, doc_file: Path) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 au lait\n")
    lines = [
        "Hi! My name is Ana.",
        "What is my name?",
        "/bogus",
        f"/doc {tmp_path / 'missing.txt'}",
        f"/doc {latin1}",
        "/reset",
        f"/doc {doc_file}",
        MAYOR,
        "/help",
    ]  # then EOF
    result = subprocess.run(
        [sys.executable, str(CHAT), "--tp", "1", "--device", "cpu", "--dtype", "float32"]
        + ["--max-new-tokens", str(MAX_NEW_TOKENS), "--log-level", "WARNING"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # stdout: the three replies, each ended by a newline, then /help; no prompt through a pipe.
    assert result.stdout.endswith(chat.HELP + "\n")
    replies = result.stdout[: -len(chat.HELP) - 1]
    assert ">>>" not in result.stdout
    assert DOC.answers[1] in replies.splitlines()[-1]
    assert len([line for line in replies.splitlines() if line.strip()]) >= 3
    # stderr: one line per notice or error, in order.
    notes = result.stderr.splitlines()
    expected = [
        r"unknown command /bogus; /help lists the commands",
        r"error: cannot read '.*missing\.txt': No such file or directory",
        r"error: '.*latin1\.txt' is not UTF-8 text \(byte 0xe9 at offset 3\)",
        r"conversation reset",
        r"loaded .*kelmsby\.txt \([\d,]+ tokens\)",
    ]
    assert len(notes) == len(expected), notes
    for note, pattern in zip(notes, expected):
        assert re.match(pattern, note), (note, pattern)


def test_history_in_the_next_prompt_and_exit(rt: Runtime) -> None:
    s = session(rt)
    first, second = "Hi! My name is Ana.", "What is my name?"
    status, out, err = loop(s, f"{first}\n\n{second}\n/exit\nnever read\n")
    assert status == 0 and err == ""
    assert [q for q, _ in s.history] == [first, second]
    assert all(reply.strip() for _, reply in s.history)
    assert out == "".join(reply + "\n" for _, reply in s.history)
    assert s.last_output is not None
    prompt = rt.tokenizer.decode(s.last_output.prompt_token_ids) if rt.tokenizer else ""
    assert first in prompt and s.history[0][1].strip() in prompt
    assert prompt.index(first) < prompt.index(s.history[0][1].strip()) < prompt.index(second)

    status, out, err = loop(s, "/reset\n")  # then EOF
    assert (status, out, err) == (0, "", "conversation reset\n")
    assert s.history == [] and s.document is None


def test_document_tokens_come_from_the_prefix_cache(rt: Runtime, doc_file: Path) -> None:
    s = session(rt)
    status, out, err = loop(s, f"/doc {doc_file}\n{MAYOR}\n")
    assert status == 0, err
    match = re.fullmatch(r"loaded .* \(([\d,]+) tokens\); .*\n", err)
    assert match, err
    doc_tokens = int(match.group(1).replace(",", ""))
    assert DOC.answers[1] in s.history[0][1]
    first = s.last_output
    assert first is not None

    before = rt.engine.stats()["prefix_cache_hit_tokens"]
    status, out, err = loop(s, f"{DOC.questions[0]}\n")
    assert status == 0 and err == ""
    second = s.last_output
    assert second is not None and second is not first
    assert len(s.history) == 2 and s.history[1][1].strip()
    # The second prompt starts with the whole first one (document included) ...
    assert second.prompt_token_ids[: len(first.prompt_token_ids)] == first.prompt_token_ids
    # ... and every full block of it came from the cache.
    block = rt.engine.blocks.block_size
    assert second.num_cached_tokens >= len(first.prompt_token_ids) // block * block
    assert second.num_cached_tokens > doc_tokens
    assert rt.engine.stats()["prefix_cache_hit_tokens"] - before == second.num_cached_tokens


class _InterruptOnWrite(io.StringIO):
    """A stdout where the first write of a reply piece raises KeyboardInterrupt (as Ctrl-C)."""

    fired = False

    def write(self, s: str) -> int:
        if not self.fired and s.strip():
            self.fired = True
            raise KeyboardInterrupt
        return super().write(s)


def test_ctrl_c_stops_the_reply_and_keeps_the_session(rt: Runtime) -> None:
    s = session(rt, max_new_tokens=200)
    stats = rt.engine.stats()
    out = _InterruptOnWrite()
    status, _, err = loop(s, "Count from 1 to 100, one number per line.\nSay hi.\n", stdout=out)
    assert status == 0
    assert err.startswith("interrupted: the reply was stopped")
    assert [q for q, _ in s.history] == ["Say hi."]  # the interrupted turn was dropped
    assert s.last_output is not None
    assert rt.engine.wait_idle(30)
    after = rt.engine.stats()
    assert after["num_running"] == 0 and after["num_free_blocks"] == after["num_blocks"]
    generated = after["num_generated_tokens"] - stats["num_generated_tokens"]
    assert generated - len(s.last_output.token_ids) < 100  # not the 200 it would have run to


def test_ctrl_c_at_the_prompt_quits(rt: Runtime) -> None:
    class Interrupting:
        def isatty(self) -> bool:
            return False

        def readline(self) -> str:
            raise KeyboardInterrupt

    stdin = cast(TextIO, Interrupting())
    status = chat.chat_loop(session(rt), stdin, io.StringIO(), io.StringIO())
    assert status == chat.INTERRUPTED == 130


def test_old_turns_are_dropped_at_session_len(rt: Runtime) -> None:
    """A session_len of 200 (the chat's view; the engine's is larger): three earlier turns
    do not fit with a new question, the oldest go, the document stays first."""
    small = SimpleNamespace(
        tokenizer=rt.tokenizer,
        config=SimpleNamespace(session_len=200, model=rt.config.model),
        add_requests=rt.add_requests,
    )
    s = chat.ChatSession(cast(Runtime, small), SamplingParams(max_new_tokens=16, temperature=0))
    s.document = "The mayor of Kelmsby is Tomas Berg."
    s.history = [(f"Tell me fact number {i}.", "Sure: " + "water is wet. " * 8) for i in range(3)]
    status, out, err = loop(s, "Who is the mayor?\n" + "word " * 300 + "\nThanks!\n")
    assert status == 0 and out.strip()
    dropped = (
        r"dropped the (oldest turn|\d oldest turns) to stay within --session-len 200 "
        r"\(the document is kept\)"
    )
    notes = err.splitlines()
    assert re.fullmatch(dropped, notes[0]), notes
    assert re.match(r"error: the document and this message take \d+ prompt tokens", notes[1])
    assert all(re.fullmatch(dropped, note) for note in notes[2:]), notes
    assert s.history[-1][0] == "Thanks!" and len(s.history) <= 3
    assert s.last_output is not None and len(s.last_output.prompt_token_ids) + 16 <= 200
    prompt = rt.tokenizer.decode(s.last_output.prompt_token_ids) if rt.tokenizer else ""
    assert "Tomas Berg" in prompt and "fact number 0" not in prompt


def test_help_states_defaults_and_bad_flags_fail_before_loading(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = chat.build_parser().format_help()
    for flag, default in [
        ("--max-new-tokens", "512"),
        ("--temperature", "0.0"),
        ("--top-p", "1.0"),
        ("--top-k", "0"),
        ("--system", "none"),
    ]:
        assert re.search(rf"{flag} \S+\s+[^\n]*\(default: {default}[,)]", text), flag
    assert "/doc FILE" in text

    def no_runtime(*a: Any, **k: Any) -> None:
        raise AssertionError("the runtime must not start")

    monkeypatch.setattr(runtime_module, "Runtime", no_runtime)
    monkeypatch.setattr(chat, "with_model", no_runtime)
    for argv in (["--max-new-tokens", "0"], ["--temperature", "-1"], ["--top-p", "0"]):
        assert chat.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {argv[0]} ") and err.count("\n") == 1, err


def test_adapter_command_switches_the_model_answering(tmp_path: Path) -> None:
    """/adapter NAME answers with a loaded LoRA adapter, /adapter alone with the base model
    again; a name not loaded is an error note and changes nothing."""
    from dist_runtime.formats.lora_adapter import write_random_adapter

    adapter = write_random_adapter(tmp_path / "lora", demo_model_path(), std=0.02, seed=3)
    with Runtime(
        model=str(demo_model_path()),
        device="cpu",
        dtype="float32",
        lora_modules={"sea": str(adapter)},
    ) as runtime:
        question = "Name three colors of the sea."

        def ask(*commands: str) -> tuple[str, str]:
            s = session(runtime, max_new_tokens=12)
            status, out, err = loop(s, "".join(c + "\n" for c in commands) + question + "\n")
            assert status == 0
            return out, err

        base, err = ask()
        assert err == ""
        adapted, err = ask("/adapter sea")
        assert err == "answering with adapter sea\n" and adapted != base
        again, err = ask("/adapter sea", "/adapter")
        assert err.endswith("answering with the base model\n") and again == base
        same, err = ask("/adapter nope")
        assert err == "error: adapter 'nope' is not loaded (loaded: ['sea'])\n" and same == base
