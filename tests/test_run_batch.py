"""launch/run_batch.py: OpenAI batch files through the server's routes in process, answers
equal to the runtime's own, resumption after a torn run, and bad input refused before any model
loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import Runtime, SamplingParams
from launch import run_batch

ENGINE = ["--device", "cpu", "--dtype", "float32", "--session-len", "512"]


def _line(custom_id: str, url: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _requests(prompt_ids: list[int]) -> list[str]:
    chat = [{"role": "user", "content": "Where is the pier?"}]
    return [
        _line("chat", "/v1/chat/completions", {"messages": chat, "max_tokens": 6,
                                                "temperature": 0, "ignore_eos": True}),
        _line("ids", "/v1/completions", {"prompt": prompt_ids, "max_tokens": 5,
                                         "temperature": 0, "ignore_eos": True}),
        _line("resp", "/v1/responses", {"input": "Where is the pier?", "max_output_tokens": 6,
                                        "temperature": 0}),
        _line("bad", "/v1/chat/completions", {"messages": "not a list"}),
    ]  # fmt: skip


def _answers(path: Path) -> dict[str, Any]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    answers = {a["custom_id"]: a for a in lines}
    assert len(answers) == len(lines), "an answer was written twice"
    return answers


def test_batch_answers_equal_the_runtime_and_resume(tiny_llama_dir: Path, tmp_path: Path) -> None:
    prompt_ids = [5, 17, 99, 230, 41]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(_requests(prompt_ids)) + "\n\n")
    argv = ["-i", str(inp), "-o", str(out), "--model", str(tiny_llama_dir), *ENGINE]
    assert run_batch.main(argv) == 0
    answers = _answers(out)
    assert set(answers) == {"chat", "ids", "resp", "bad"}
    for key in ("chat", "ids", "resp"):
        assert answers[key]["response"]["status_code"] == 200, answers[key]
        assert answers[key]["id"].startswith("batch_req_") and answers[key]["error"] is None
    bad = answers["bad"]["response"]
    assert bad["status_code"] == 400 and bad["body"]["error"]["param"] == "messages"
    # the runtime itself, on the same prompts (greedy)
    with Runtime(model=str(tiny_llama_dir), session_len=512, device="cpu",
                 dtype="float32") as rt:  # fmt: skip
        from dist_runtime.text.chat import encode_chat

        assert rt.tokenizer is not None
        chat_ids = encode_chat(rt.tokenizer, [{"role": "user", "content": "Where is the pier?"}])
        want_chat, want_ids = rt.generate(
            [chat_ids, prompt_ids],
            [SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True),
             SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)],
        )  # fmt: skip
    chat_body = answers["chat"]["response"]["body"]
    assert chat_body["choices"][0]["message"]["content"] == want_chat.text
    assert chat_body["usage"]["prompt_tokens"] == len(chat_ids)
    assert answers["ids"]["response"]["body"]["choices"][0]["text"] == want_ids.text
    resp_body = answers["resp"]["response"]["body"]
    assert resp_body["output"][0]["content"][0]["text"] == want_chat.text  # greedy, same prompt
    # a second run has nothing left to do
    assert run_batch.main(argv) == 0 and _answers(out) == answers
    # a run torn mid-write: the cut line is dropped and its request (and the others) rerun
    kept = out.read_text().splitlines()
    out.write_text(kept[0] + "\n" + kept[1][:20])
    assert run_batch.main(argv) == 0
    again = _answers(out)
    survivor = json.loads(kept[0])
    assert set(again) == set(answers) and again[survivor["custom_id"]] == survivor  # not rerun
    for key in ("chat", "ids"):
        first = answers[key]["response"]["body"]["choices"][0]
        assert again[key]["response"]["body"]["choices"][0] == first


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"custom_id": "a", "url": "/v1/completions", "body": {}}', "{oops"],
         "--input line 2 is not JSON"),
        ([_line("a", "/v1/completions", {}), _line("a", "/v1/completions", {})],
         "custom_id 'a' repeats line 1"),
        ([_line("a", "/v1/embeddings", {})], "url '/v1/embeddings' is not one of"),
        ([_line("a", "/v1/completions", {"prompt": "x", "stream": True})], "cannot stream"),
        (['{"custom_id": "", "url": "/v1/completions", "body": {}}'], "custom_id must be"),
        (['{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}'],
         "method must be POST"),
        (['{"custom_id": "a", "url": "/v1/completions", "body": []}'], "body must be"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_loading(
    lines: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    argv = ["-i", str(inp), "-o", str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "none")]
    assert run_batch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err, err
    assert not (tmp_path / "out.jsonl").exists()


def test_an_output_that_is_not_answers_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(_line("a", "/v1/completions", {"prompt": "x"}) + "\n")
    out.write_text("some notes\n")
    assert run_batch.main(["-i", str(inp), "-o", str(out)]) == 2
    assert "--output line 1 is not an answer" in capsys.readouterr().err
    assert run_batch.main(["-i", str(inp), "-o", str(inp)]) == 2
    assert "--output must be another file" in capsys.readouterr().err


def test_a_server_error_is_an_answer_until_a_resumed_run_retries_it(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that fails inside the server gets its 500 line and the batch goes on; the
    next run takes that line out and runs the request again."""
    import dist_runtime.server.app as app_module

    start_chat = app_module.start_chat

    async def flaky(server: Any, sampling: Any, messages: Any, *rest: Any) -> Any:
        if messages[-1].text() == "boom":
            raise RuntimeError("a failure inside the server")
        return await start_chat(server, sampling, messages, *rest)

    monkeypatch.setattr(app_module, "start_chat", flaky)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ask = {"max_tokens": 3, "temperature": 0}
    inp.write_text("\n".join([
        _line("fine", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                               **ask}),
        _line("boom", "/v1/chat/completions", {"messages": [{"role": "user", "content": "boom"}],
                                               **ask}),
    ]) + "\n")  # fmt: skip
    argv = ["-i", str(inp), "-o", str(out), "--model", str(tiny_llama_dir), *ENGINE]
    assert run_batch.main(argv) == 0
    first = _answers(out)
    assert first["fine"]["response"]["status_code"] == 200
    assert first["boom"]["response"]["status_code"] == 500
    monkeypatch.setattr(app_module, "start_chat", start_chat)
    assert run_batch.main(argv) == 0
    again = _answers(out)  # one line per custom_id
    assert again["fine"] == first["fine"] and again["boom"]["response"]["status_code"] == 200
