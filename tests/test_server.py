"""The HTTP server in a subprocess on a free loopback port, driven by the official `openai`
client and by raw HTTP: responses, streaming, usage, errors, keys, concurrency, disconnects
and the document-QA job endpoints."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pydantic
import pytest

openai = pytest.importorskip("openai")

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, model: Path, tmp: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"server-{self.port}.log", "w")  # noqa: SIM115
        self.job_dir = tmp / f"jobs-{self.port}"
        args = [
            sys.executable, str(REPO_ROOT / "launch" / "serve.py"), "--model", str(model),
            "--device", "cpu", "--dtype", "float32", "--session-len", "512",
            "--block-size", "16", "--num-blocks", "256", "--port", str(self.port),
            "--job-dir", str(self.job_dir), *extra,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, (tmp / f"server-{self.port}.log").read_text()
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict[str, Any] | None = None,
        key: str | None = KEY,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if key is not None:
            req.add_header("Authorization", f"Bearer {key}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except json.JSONDecodeError:
            return status, raw.decode()

    def metric(self, name: str) -> float:
        _, text = self.request("GET", "/metrics")
        match = re.search(rf"^dist_runtime:{name} ([0-9.e+-]+)$", text, re.M)
        assert match, name
        return float(match.group(1))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


ADAPTER = "tiny-lora"
"""A random LoRA adapter the module's server serves beside the base model."""


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dist_runtime.formats.lora_adapter import write_random_adapter

    return write_random_adapter(tmp_path_factory.mktemp("adapter"), tiny_llama_dir, seed=5)


@pytest.fixture(scope="module")
def server(
    tiny_llama_dir: Path, adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    s = Server(
        tiny_llama_dir,
        tmp_path_factory.mktemp("server"),
        *(
            "--lora-modules",
            f"{ADAPTER}={adapter_dir}",
            "--max-loras",
            "2",
            "--enable-lora-loading",
            "--api-keys",
            f"{KEY},other",
            "--max-request-mb",
            "1",
            "--num-speculative-tokens",
            "4",
            "--draft-policy",
            "fixed",
        ),
    )
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Any:
    from dist_runtime.text.tokenizer import Tokenizer

    return Tokenizer.from_folder(tiny_llama_dir)


def test_every_answer_carries_a_request_id(client: Any, server: Server) -> None:
    """x-request-id: the caller's own when usable, else a new one (the client's _request_id);
    on errors too."""
    ask = dict(model=None, prompt="The tide", max_tokens=2)
    raw = client.completions.with_raw_response.create(
        **ask, extra_headers={"x-request-id": "trace-42/a"}
    )
    assert raw.headers["x-request-id"] == "trace-42/a"
    made = client.completions.create(**ask)._request_id
    assert made.startswith("req_") and len(made) == 36
    raw = client.completions.with_raw_response.create(
        **ask, extra_headers={"x-request-id": "not one; " + "x" * 200}
    )
    assert raw.headers["x-request-id"].startswith("req_")  # not plain: replaced
    for key in (KEY, "wrong"):  # a 400 and a 401
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", "{}", {"Authorization": f"Bearer {key}",
                                                      "x-request-id": "e1"})  # fmt: skip
        r = conn.getresponse()
        assert r.status in (400, 401) and r.getheader("x-request-id") == "e1"
        conn.close()
    server.log.flush()
    text = Path(server.log.name).read_text()  # the access lines name the id
    assert "POST /v1/completions 200" in text and "id=trace-42/a" in text


def test_models(client: Any, tiny_llama_dir: Path, adapter_dir: Path) -> None:
    model, adapter = client.models.list().data
    assert model.id == tiny_llama_dir.name and model.model_extra["max_model_len"] == 512
    assert model.model_extra["parent"] is None
    assert adapter.id == ADAPTER and adapter.model_extra["parent"] == model.id
    assert adapter.model_extra["root"] == str(adapter_dir)
    assert client.models.retrieve(ADAPTER).model_extra["parent"] == model.id


def test_adapter_answers_on_every_route(
    client: Any, server: Server, tiny_llama_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    """`model` names the LoRA adapter: completions give the merged checkpoint's answer (the
    adapter folded into the weights, run in this process), and chat, Responses and Messages
    answer the same chat prompt alike, naming the adapter; the base model answers otherwise."""
    from dist_runtime import Runtime, SamplingParams
    from dist_runtime.formats.lora_adapter import merge_adapter

    ids = [5, 17, 99, 200, 31, 64, 7, 250, 12, 80]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    merged = merge_adapter(tiny_llama_dir, adapter_dir, tmp_path / "merged")
    with Runtime(model=str(merged), session_len=512, device="cpu", dtype="float32") as rt:
        expected = rt.generate([ids], params)[0].text
    kw: dict[str, Any] = dict(
        prompt=ids, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    got = client.completions.create(model=ADAPTER, **kw)
    assert got.model == ADAPTER and got.choices[0].text == expected
    base = client.completions.create(model=tiny_llama_dir.name, **kw)
    assert base.model == tiny_llama_dir.name and base.choices[0].text != expected

    question = [{"role": "user", "content": "Tell me about the harbour."}]
    chat = client.chat.completions.create(
        model=ADAPTER, messages=question, max_tokens=10, temperature=0
    )
    text = chat.choices[0].message.content
    assert chat.model == ADAPTER
    streamed = client.chat.completions.create(
        model=ADAPTER, messages=question, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(streamed)
    assert {c.model for c in chunks} == {ADAPTER}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    plain = client.chat.completions.create(
        model=tiny_llama_dir.name, messages=question, max_tokens=10, temperature=0
    )
    assert plain.choices[0].message.content != text
    response = client.responses.create(
        model=ADAPTER, input=question[0]["content"], max_output_tokens=10, temperature=0
    )
    assert response.model == ADAPTER and response.output_text == text
    status, message = server.request(
        "POST",
        "/v1/messages",
        {"model": ADAPTER, "messages": question, "max_tokens": 10, "temperature": 0},
    )
    assert status == 200 and message["model"] == ADAPTER
    assert message["content"][0]["text"] == text


def test_adapters_loaded_and_unloaded_over_http(
    client: Any, server: Server, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: a folder loaded at run time is
    listed and answers under its name, as the same folder served from start does; a name
    loaded already, a bad folder and an unknown name are refused with the reason; unloaded, it
    is gone from the list and a request naming it is a 404."""
    from dist_runtime.formats.lora_adapter import write_random_adapter

    folder = write_random_adapter(tmp_path / "late", tiny_llama_dir, seed=6)
    body = {"lora_name": "late-lora", "lora_path": str(folder)}
    status, text = server.request("POST", "/v1/load_lora_adapter", body)
    assert status == 200 and text == "Success: LoRA adapter 'late-lora' added successfully."
    ids = [m.id for m in client.models.list().data]
    assert ids[1:] == [ADAPTER, "late-lora"]
    assert server.metric("lora_adapters_loaded") == 2 and server.metric("lora_slots") == 2
    _, text = server.request("GET", "/metrics")
    assert 'dist_runtime:lora_requests{adapter="late-lora",state="running"} 0.0' in text
    kw: dict[str, Any] = dict(prompt=[5, 17, 99], max_tokens=6, temperature=0)
    late = client.completions.create(model="late-lora", **kw)
    assert late.model == "late-lora"
    assert late.choices[0].text != client.completions.create(model=ADAPTER, **kw).choices[0].text

    status, err = server.request("POST", "/v1/load_lora_adapter", body)
    assert status == 409 and "loaded already" in err["error"]["message"]
    # both slots hold adapters: a third is registered, and loaded when a request needs it (in
    # place of the least recently used, here the start adapter)
    loads = server.metric("lora_adapter_loads_total")
    third = {"lora_name": "third", "lora_path": str(folder)}
    assert server.request("POST", "/v1/load_lora_adapter", third)[0] == 200
    assert server.metric("lora_adapter_loads_total") == loads
    assert client.completions.create(model="third", **kw).choices[0].text == late.choices[0].text
    assert server.metric("lora_adapter_loads_total") == loads + 1
    assert server.request("POST", "/v1/unload_lora_adapter", {"lora_name": "third"})[0] == 200
    bad = {"lora_name": "bad", "lora_path": str(tmp_path / "missing")}
    status, err = server.request("POST", "/v1/load_lora_adapter", bad)
    assert status == 400 and "no such directory" in err["error"]["message"]
    served = {"lora_name": ids[0], "lora_path": str(folder)}
    status, err = server.request("POST", "/v1/load_lora_adapter", served)
    assert status == 400 and "served model's name" in err["error"]["message"]

    status, text = server.request("POST", "/v1/unload_lora_adapter", {"lora_name": "late-lora"})
    assert status == 200 and text == "Success: LoRA adapter 'late-lora' removed successfully."
    assert [m.id for m in client.models.list().data][1:] == [ADAPTER]
    assert server.metric("lora_adapters_loaded") == 1
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late-lora", **kw)
    status, err = server.request("POST", "/v1/unload_lora_adapter", {"lora_name": "late-lora"})
    assert status == 404 and err["error"]["code"] == "model_not_found"
    # the same folder under another name: the answer it gave before
    status, _ = server.request(
        "POST", "/v1/load_lora_adapter", {"lora_name": "late-2", "lora_path": str(folder)}
    )
    assert status == 200
    assert client.completions.create(model="late-2", **kw).choices[0].text == late.choices[0].text
    assert server.request("POST", "/v1/unload_lora_adapter", {"lora_name": "late-2"})[0] == 200


def test_lora_loading_needs_reserved_slots(tiny_llama_dir: Path) -> None:
    """--enable-lora-loading without --max-loras is refused before the model loads."""
    args = [sys.executable, str(REPO_ROOT / "launch" / "serve.py"), "--model", str(tiny_llama_dir)]
    proc = subprocess.run(
        [*args, "--enable-lora-loading", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --enable-lora-loading loads adapters into reserved slots; add --max-loras N"
    )


def test_unknown_model_is_a_404_naming_the_adapters(client: Any, server: Server) -> None:
    with pytest.raises(openai.NotFoundError, match=ADAPTER):
        client.chat.completions.create(
            model="other-lora", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    job = {"model": "other-lora", "document": "A short text.", "questions": ["What?"]}
    status, body = server.request("POST", "/v1/jobs", job)
    assert status == 404 and ADAPTER in body["error"]["message"]
    status, body = server.request("POST", "/v1/jobs", {**job, "model": ADAPTER, "max_tokens": 4})
    assert status == 200, body
    _wait_done(server, body["id"], what="the adapter's job did not finish")
    (answer,) = server.request("GET", f"/v1/jobs/{body['id']}/result")[1]["answers"]
    assert isinstance(answer, str)


def test_chat_stream_equals_non_stream_and_usage(
    client: Any, tokenizer: Any, tiny_llama_dir: Path
) -> None:
    from dist_runtime.text.chat import encode_chat

    messages = [{"role": "user", "content": "Tell me about the harbour and its keeper."}]
    kw: dict[str, Any] = dict(
        model=tiny_llama_dir.name, messages=messages, max_tokens=12, temperature=0
    )
    full = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "length" and full.choices[0].message.role == "assistant"
    assert full.usage.prompt_tokens == len(encode_chat(tokenizer, messages))
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(
        client.chat.completions.create(
            **kw,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])


def test_return_token_ids(server: Server, client: Any, tokenizer: Any) -> None:
    """vLLM's return_token_ids: the prompt's ids and each choice's generated ids, the same
    streamed (the prompt's on the first chunk, each chunk's new ids on it) as whole."""
    chat = dict(model=None, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                temperature=0)  # fmt: skip
    want = {"return_token_ids": True, "ignore_eos": True}
    out = client.chat.completions.create(**chat, extra_body=want).model_dump()
    status, counted = server.request("POST", "/tokenize", {"messages": chat["messages"]})
    assert status == 200 and out["prompt_token_ids"] == counted["tokens"]
    ids = out["choices"][0]["token_ids"]
    assert len(ids) == 6 and tokenizer.decode(ids) == out["choices"][0]["message"]["content"]
    plain = client.chat.completions.create(**chat, extra_body={"ignore_eos": True}).model_dump()
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]
    chunks = [c.model_dump() for c in
              client.chat.completions.create(**chat, stream=True, extra_body=want)]  # fmt: skip
    assert chunks[0]["prompt_token_ids"] == counted["tokens"]
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks[1:] for t in c["choices"][0]["token_ids"]] == ids
    prompts = ["The tide", "A harbour"]
    done = client.completions.create(model=None, prompt=prompts, max_tokens=4, temperature=0,
                                     extra_body=want).model_dump()  # fmt: skip
    for choice, prompt in zip(done["choices"], prompts):
        assert choice["prompt_token_ids"] == tokenizer.encode(prompt)
        assert tokenizer.decode(choice["token_ids"]) == choice["text"]
    streamed: dict[int, list[int]] = {0: [], 1: []}
    for c in client.completions.create(model=None, prompt=prompts, max_tokens=4, temperature=0,
                                       stream=True, extra_body=want):  # fmt: skip
        (choice,) = c.model_dump()["choices"]
        streamed[choice["index"]] += choice["token_ids"]
    assert [streamed[0], streamed[1]] == [c["token_ids"] for c in done["choices"]]


def test_completion_add_special_tokens(client: Any, tokenizer: Any) -> None:
    """vLLM's add_special_tokens on the completion route: false sends the text's tokens
    alone (no BOS), the same answer as those ids sent as the prompt."""
    bare = tokenizer.encode("The tide", add_special_tokens=False)
    assert tokenizer.encode("The tide") != bare  # this tokenizer adds BOS by default
    ask = dict(model=None, max_tokens=4, temperature=0)
    out = client.completions.create(prompt="The tide", **ask,
                                    extra_body={"add_special_tokens": False})  # fmt: skip
    same = client.completions.create(prompt=bare, **ask)
    assert out.usage.prompt_tokens == len(bare) and out.choices[0].text == same.choices[0].text


def test_chat_add_special_tokens(server: Server, tokenizer: Any) -> None:
    """vLLM's chat add_special_tokens: true puts the tokenizer's BOS before what the chat
    template writes (off by default: the template writes the prompt); /tokenize counts the
    same either way."""
    bos = tokenizer.encode("a")[: -len(tokenizer.encode("a", add_special_tokens=False))]
    assert bos
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            "return_token_ids": True}  # fmt: skip
    ids = {}
    for special in (False, True):
        status, out = server.request(
            "POST", "/v1/chat/completions", {**body, "add_special_tokens": special}
        )
        assert status == 200, out
        ids[special] = out["prompt_token_ids"]
        status, counted = server.request(
            "POST", "/tokenize", {"messages": body["messages"], "add_special_tokens": special}
        )
        assert counted["tokens"] == ids[special]
    assert ids[True] == bos + ids[False]


def test_an_unknown_field_is_ignored_and_logged_once(server: Server, client: Any) -> None:
    """A field the API does not have is ignored (as OpenAI-compatible servers do), and its
    name goes to the server's log once, so a misspelt option does not go unnoticed."""
    ask = dict(model=None, prompt="The tide", max_tokens=2, temperature=0)
    for _ in range(2):
        out = client.completions.create(**ask, extra_body={"temprature_typo": 0.5})
        assert out.usage.completion_tokens == 2
    server.log.flush()
    log = Path(server.log.name).read_text()
    line = "CompletionRequest fields ignored (not part of this API): temprature_typo"
    assert log.count(line) == 1, log[-2000:]


def test_continuous_usage_stats(client: Any, tokenizer: Any) -> None:
    """vLLM's stream_options.continuous_usage_stats: every chunk carries its choice's usage
    so far, counting up to the final usage; per prompt on the completion route."""
    usage = {"include_usage": True, "continuous_usage_stats": True}
    chat = list(client.chat.completions.create(
        model=None, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
        stream=True, stream_options=usage, extra_body={"ignore_eos": True},
    ))  # fmt: skip
    final = chat[-1].usage
    assert final.completion_tokens == 6 and chat[-1].choices == []
    counts = [c.usage.completion_tokens for c in chat[:-1]]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == 6
    assert all(c.usage.prompt_tokens == final.prompt_tokens for c in chat)
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
               for c in chat)  # fmt: skip
    prompts = ["The tide", "A much longer prompt about the harbour"]
    sizes = [len(tokenizer.encode(p)) for p in prompts]
    chunks = list(client.completions.create(
        model=None, prompt=prompts, max_tokens=4, temperature=0, stream=True,
        stream_options=usage, extra_body={"ignore_eos": True},
    ))  # fmt: skip
    last: dict[int, Any] = {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        assert c.usage.prompt_tokens == sizes[choice.index]
        assert c.usage.completion_tokens >= last.get(choice.index, 0)
        last[choice.index] = c.usage.completion_tokens
    assert last == {0: 4, 1: 4} and chunks[-1].usage.prompt_tokens == sum(sizes)


def test_chat_logprobs_and_n(client: Any, tiny_llama_dir: Path) -> None:
    out = client.chat.completions.create(
        model=tiny_llama_dir.name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0.8,
        seed=3,
        n=2,
        logprobs=True,
        top_logprobs=3,
    )
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        content = choice.logprobs.content
        assert len(content) == out.usage.completion_tokens // 2 or len(content) <= 4
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


def test_completions_prompt_forms_and_echo(client: Any, tokenizer: Any) -> None:
    ids = tokenizer.encode("The lighthouse keeper")
    by_text = client.completions.create(
        model=None, prompt="The lighthouse keeper", max_tokens=5, temperature=0
    )
    by_ids = client.completions.create(model=None, prompt=ids, max_tokens=5, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)
    many = client.completions.create(
        model=None, prompt=["The lighthouse keeper", "A tide"], max_tokens=5, temperature=0
    )
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == by_text.choices[0].text
    echoed = client.completions.create(
        model=None, prompt="The lighthouse keeper", max_tokens=5, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "The lighthouse keeper" + by_text.choices[0].text
    stream = client.completions.create(
        model=None, prompt="The lighthouse keeper", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == by_text.choices[0].text


def test_shared_prefix_reports_cached_tokens(client: Any) -> None:
    prefix = "Report of the harbour council. " * 20
    first = client.completions.create(model=None, prompt=prefix + "First?", max_tokens=2)
    second = client.completions.create(model=None, prompt=prefix + "Second?", max_tokens=2)
    assert first.usage.prompt_tokens > 64
    assert second.usage.prompt_tokens_details.cached_tokens >= 64


def test_keys(server: Server) -> None:
    assert server.request("GET", "/v1/models", key=None)[0] == 401
    status, body = server.request("GET", "/v1/models", key="wrong")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert server.request("GET", "/v1/models", key="other")[0] == 200
    assert server.request("GET", "/health", key=None)[0] == 200
    # SageMaker's /ping (GET or POST) answers as /health; /version names the package's
    for method in ("GET", "POST"):
        assert server.request(method, "/ping", key=None) == (200, {"status": "ok"})
    import tomllib

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert server.request("GET", "/version", key=None) == (
        200, {"version": pyproject["project"]["version"]}
    )  # fmt: skip
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize(
    ("body", "status", "param", "match"),
    [
        ({"prompt": "x", "temperature": 5}, 400, "temperature", r"less than or equal to 2"),
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", r"greater than or equal to 0"),
        ({"prompt": "x", "top_p": "high"}, 400, "top_p", r"valid number"),
        ({"prompt": "x", "n": 100}, 400, "n", r"less than or equal to 16"),
        ({}, 400, "prompt", r"[Ff]ield required"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model", r"does not exist"),
        ({"prompt": "word " * 600, "max_tokens": 4}, 400, "prompt", r"over session_len 512"),
        ({"prompt": [[1, 2], [999999]]}, 400, "prompt", r"outside \[0, 512\)"),
        ({"prompt": [1, "a"]}, 400, "prompt", r"must be one of str, list\[str\]"),
        ({"prompt": "x", "stop": ["ok", ""]}, 400, "stop", r"must not be empty"),
    ],
)
def test_errors(server: Server, body: dict[str, Any], status: int, param: str, match: str) -> None:
    got, answer = server.request("POST", "/v1/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert re.search(match, error["message"]), error
    if param is not None:
        assert error["param"] == param


def test_malformed_requests_never_500(server: Server) -> None:
    for raw in (b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"):
        status, body = server.request("POST", "/v1/chat/completions", raw)
        assert status == 400 and "error" in body, (raw, body)
    status, body = server.request("POST", "/v1/chat/completions", {"messages": "hi"})
    assert status == 400 and body["error"]["param"] == "messages"
    for _ in range(5):  # the 413 once raced the upload: a broken pipe about 1 in 10
        status, body = server.request("POST", "/v1/completions", b"x" * (2 * 2**20))
        assert status == 413 and body["error"]["code"] == "request_too_large"
    assert server.request("GET", "/v1/nowhere")[0] == 404


def test_oversized_chunked_body_is_413(server: Server) -> None:
    """A body without a Content-Length is counted, whichever way the route reads it."""

    def chunks(n: int) -> Iterator[bytes]:
        for _ in range(n):
            yield b"x" * 65536

    for n in (32, 3):  # 2 MiB: over the 1 MiB limit; 192 KiB: under it, parsed as JSON
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            conn.request(
                "POST",
                "/v1/completions",
                body=chunks(n),
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            body = json.loads(response.read())
        finally:
            conn.close()
        if n == 32:
            assert response.status == 413 and body["error"]["code"] == "request_too_large"
        else:
            assert response.status == 400 and "error" in body, body


def test_sixteen_concurrent_streams(client: Any) -> None:
    prompts = [f"Caller {i} writes about pier {i}." for i in range(16)]
    want = [
        client.completions.create(model=None, prompt=p, max_tokens=10, temperature=0)
        .choices[0]
        .text
        for p in prompts
    ]
    got: dict[int, str] = {}

    def stream(i: int) -> None:
        parts = client.completions.create(
            model=None, prompt=prompts[i], max_tokens=10, temperature=0, stream=True
        )
        got[i] = "".join(c.choices[0].text for c in parts)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(16)] == want


def test_disconnect_frees_blocks(server: Server) -> None:
    before = server.metric("kv_cache_used_blocks")
    body = json.dumps(
        {"prompt": "A story about the sea.", "max_tokens": 400, "stream": True,
         "ignore_eos": True}
    ).encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while received.count(b"data: ") < 3:
            part = sock.recv(4096)
            assert part and b" 200 OK" in received + part, received + part
            received += part
        assert server.metric("kv_cache_used_blocks") > before
    deadline = time.monotonic() + 30
    while server.metric("kv_cache_used_blocks") != before:
        assert time.monotonic() < deadline, "the disconnected stream kept its blocks"
        time.sleep(0.05)
    assert server.metric("num_requests_running") == 0


def test_jobs_endpoints(server: Server) -> None:
    doc = "The harbour master keeps the tide tables. The lighthouse keeper is Ada Brennan. " * 3
    status, job = server.request(
        "POST", "/v1/jobs", {"document": doc, "questions": ["Who?", "What?"], "max_tokens": 4}
    )
    assert status == 200 and job["prefill_tokens_total"] > 0, job
    _wait_done(server, job["id"])
    status, result = server.request("GET", f"/v1/jobs/{job['id']}/result")
    assert status == 200 and len(result["answers"]) == 2
    listed = server.request("GET", "/v1/jobs")[1]["data"]
    assert job["id"] in [j["id"] for j in listed]
    assert server.request("GET", "/v1/jobs/nope")[0] == 404
    assert server.request("DELETE", "/v1/jobs/nope")[0] == 404
    status, body = server.request("POST", "/v1/jobs", {"document": doc, "questions": []})
    assert status == 400 and body["error"]["param"] == "questions"
    _, text = server.request("GET", "/metrics")
    assert 'dist_runtime:jobs{state="done"}' in text
    assert "dist_runtime:time_to_first_token_seconds_bucket" in text
    # vLLM's per-request phases: the job's two questions at least went through each
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens"):  # fmt: skip
        assert server.metric(f"{name}_count") >= 2, name
    assert server.metric('request_generation_tokens_bucket{le="4.0"}') >= 2  # max_tokens 4
    assert "dist_runtime:prefix_cache_disk_hits_total 0.0" in text  # (no disk tier here)
    assert "dist_runtime:disk_kv_blocks 0.0" in text
    assert "dist_runtime:disk_kv_unread_blocks_total 0.0" in text
    assert "dist_runtime:disk_kv_adopted_blocks_total 0.0" in text
    assert "dist_runtime:disk_kv_shared_evicted_blocks_total 0.0" in text


def _wait_done(server: Server, job_id: str, timeout: float = 60, what: str = "") -> None:
    """Poll a job until it is done (failing the test past `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while server.request("GET", f"/v1/jobs/{job_id}")[1]["state"] != "done":
        assert time.monotonic() < deadline, what or f"job {job_id} did not finish"
        time.sleep(0.05)


def _job_answers(server: Server, body: dict[str, Any]) -> list[str]:
    status, job = server.request("POST", "/v1/jobs", body)
    assert status == 200, job
    _wait_done(server, job["id"])
    answers: list[str] = server.request("GET", f"/v1/jobs/{job['id']}/result")[1]["answers"]
    return answers


def test_job_sampling_options_and_unknown_fields(server: Server, tokenizer: Any) -> None:
    """A job takes the completion route's sampling options (a stop string cuts its answers, a
    logit bias forces a token); a field the job API does not know is a 400 naming it."""
    doc = "The ferry leaves pier 4 at seven. The harbour master is Tom Reyes."
    ask = {"document": doc, "questions": ["Who is the harbour master?"], "max_tokens": 12,
           "ignore_eos": True}  # fmt: skip
    (full,) = _job_answers(server, ask)
    stop = full[3:6]
    assert stop.strip() and full.find(stop) == 3
    (cut,) = _job_answers(server, {**ask, "stop": [stop]})
    assert cut == full[:3]
    (forced,) = _job_answers(server, {**ask, "logit_bias": {"77": 100}})
    assert forced == tokenizer.decode([77] * 12)
    # a thinking budget is stored with the job and read back; an answer that opens no
    # thinking is left as it is
    assert _job_answers(server, {**ask, "thinking_token_budget": 0}) == [full]
    for field, value in (("top_k", 5), ("min_p", 0.1), ("presence_penalty", 0.5),
                         ("frequency_penalty", 0.5), ("min_tokens", 2), ("stop_token_ids", [2]),
                         ("logit_bias", {"5": -1}), ("allowed_token_ids", [5, 6]),
                         ("bad_words", ["pier"])):  # fmt: skip
        status, job = server.request("POST", "/v1/jobs", {**ask, field: value})
        assert status == 200, (field, job)
    for field, value in (("temprature", 0.5), ("n", 2), ("top_k", -1), ("stop", 3)):
        status, body = server.request("POST", "/v1/jobs", {**ask, field: value})
        assert status == 400 and body["error"]["param"] == field, (field, body)


def test_job_list_pages_and_filters(server: Server) -> None:
    """GET /v1/jobs lists every job oldest first; `state` keeps one state, `order=desc` puts
    the newest first, and `limit` / `after` page through them (OpenAI's cursor pagination)."""
    doc = "The ferry leaves pier 4 at seven."
    made = [
        server.request("POST", "/v1/jobs", {"document": doc, "questions": [f"Q{i}?"],
                                            "max_tokens": 1})[1]["id"]
        for i in range(3)
    ]  # fmt: skip
    for job_id in made:
        _wait_done(server, job_id)
    every = [j["id"] for j in server.request("GET", "/v1/jobs")[1]["data"]]
    assert every[-3:] == made
    done = server.request("GET", "/v1/jobs?state=done")[1]["data"]
    assert {j["state"] for j in done} == {"done"} and set(made) <= {j["id"] for j in done}
    newest = server.request("GET", "/v1/jobs?order=desc&limit=2")[1]
    assert [j["id"] for j in newest["data"]] == made[::-1][:2] and newest["has_more"]
    rest = server.request("GET", f"/v1/jobs?order=desc&limit=2&after={newest['last_id']}")[1]
    assert rest["data"][0]["id"] == made[0]
    for query, param in (("state=finished", "state"), ("order=up", "order"), ("limit=0", "limit")):
        status, body = server.request("GET", f"/v1/jobs?{query}")
        assert status == 400 and body["error"]["param"] == param, body


def test_job_idempotency_key_reused_for_another_job_is_409(server: Server) -> None:
    doc = "The ferry leaves pier 4 at seven. The harbour master is Tom Reyes."
    body = {"document": doc, "questions": ["Who?"], "max_tokens": 2, "idempotency_key": "k-409"}
    status, job = server.request("POST", "/v1/jobs", body)
    assert status == 200, job
    status, again = server.request("POST", "/v1/jobs", body)  # a retry: the same job
    assert status == 200 and again["id"] == job["id"]
    for change in ({"questions": ["Where?"]}, {"document": doc + " More."}, {"max_tokens": 3}):
        status, err = server.request("POST", "/v1/jobs", {**body, **change})
        assert status == 409, (change, err)
        assert err["error"]["param"] == "idempotency_key"
        assert err["error"]["type"] == "invalid_request_error"
        assert "'k-409'" in err["error"]["message"] and job["id"] in err["error"]["message"]
    assert [j["id"] for j in server.request("GET", "/v1/jobs")[1]["data"]].count(job["id"]) == 1
    _wait_done(server, job["id"])


def test_concurrency_limit(tiny_llama_dir: Path, tmp_path: Path) -> None:
    s = Server(tiny_llama_dir, tmp_path, "--max-concurrent-requests", "1")
    try:
        body = {"prompt": "x", "max_tokens": 300, "stream": True, "ignore_eos": True}
        results: list[int] = []

        def call() -> None:
            results.append(s.request("POST", "/v1/completions", body, key=None)[0])

        first = threading.Thread(target=call)
        first.start()
        deadline = time.monotonic() + 30
        while s.metric("num_requests_running") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, answer = s.request("POST", "/v1/completions", {"prompt": "y"}, key=None)
        assert status == 429 and answer["error"]["type"] == "rate_limit_exceeded"
        first.join(60)
        assert results == [200]
    finally:
        s.close()


def test_job_from_an_uploaded_file(server: Server) -> None:
    boundary = "----dist-runtime-test"
    doc = "The lighthouse keeper is Ada Brennan. " * 4
    parts = [
        ("questions", None, "Who keeps the light?"),
        ("questions", None, "Who is Ada?"),
        ("max_tokens", None, "3"),
        ("file", "report.txt", doc),
    ]
    body = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n{value}\r\n".encode()
    body += f"--{boundary}--\r\n".encode()
    status, job = server.request(
        "POST",
        "/v1/jobs",
        body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert status == 200 and job["num_questions"] == 2, job
    deadline = time.monotonic() + 60
    while (state := server.request("GET", f"/v1/jobs/{job['id']}")[1]["state"]) != "done":
        assert state in ("queued", "running") and time.monotonic() < deadline, state
        time.sleep(0.1)
    assert len(server.request("GET", f"/v1/jobs/{job['id']}/result")[1]["answers"]) == 2


def test_models_retrieve(client: Any, tiny_llama_dir: Path) -> None:
    model = client.models.retrieve(tiny_llama_dir.name)
    assert model.id == tiny_llama_dir.name and model.model_extra["max_model_len"] == 512
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def _complete_and_leave(server: Server, ask: dict[str, Any]) -> None:
    """POST a completion over a raw socket and close it once the engine runs the request."""
    body = json.dumps(ask).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 30
        while server.metric("num_requests_running") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_non_streamed_request_aborted_on_disconnect(server: Server) -> None:
    def aborted() -> float:
        _, text = server.request("GET", "/metrics")
        match = re.search(
            r'^dist_runtime:request_success_total\{finished_reason="abort"\} (\S+)$', text, re.M
        )
        return float(match.group(1)) if match else 0.0

    before = aborted()
    _complete_and_leave(server, {"prompt": "The sea", "max_tokens": 500, "ignore_eos": True})
    deadline = time.monotonic() + 30
    while aborted() == before:  # without the abort it ends by length, never 'abort'
        assert time.monotonic() < deadline, "the disconnected request ran on"
        time.sleep(0.05)
    assert server.metric("num_requests_running") == 0


def test_a_beam_search_stops_when_its_client_leaves(server: Server) -> None:
    """A beam search of 400 steps (4 beams, EOS ignored): its client leaves as it starts, and
    it stops within a few steps instead of running its 400 for nobody."""
    steps = server.metric("engine_steps_total")
    _complete_and_leave(server, {"prompt": "The sea", "max_tokens": 400, "n": 4,
                                 "ignore_eos": True, "use_beam_search": True})  # fmt: skip
    deadline, idle_since = time.monotonic() + 60, None
    while True:  # idle (nothing running or waiting) for a whole second
        busy = server.metric("num_requests_running") + server.metric("num_requests_waiting")
        now = time.monotonic()
        if busy:
            idle_since = None
            assert now < deadline, "the beam search went on after its client left"
        elif idle_since is None:
            idle_since = now
        elif now - idle_since > 1.0:
            break
        time.sleep(0.02)
    assert server.metric("engine_steps_total") - steps < 100


def test_streamed_logprobs_include_held_back_tokens(client: Any) -> None:
    # A long stop string holds text back, so some engine deltas carry tokens but no text yet;
    # their logprobs must still reach the client with the text they make.
    kw: dict[str, Any] = dict(
        model=None,
        messages=[{"role": "user", "content": "Tell me about the harbour."}],
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stop=["\u2603" * 30],
        extra_body={"ignore_eos": True},
    )
    full = client.chat.completions.create(**kw)
    want = [(t.token, t.logprob) for t in full.choices[0].logprobs.content]
    assert len(want) == full.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(**kw, stream=True))
    got = [
        (t.token, t.logprob)
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=1e-3)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content


def test_completion_logprobs_text_offsets(client: Any) -> None:
    kw: dict[str, Any] = dict(
        model=None, prompt="The lighthouse keeper", max_tokens=8, temperature=0, logprobs=1
    )
    full = client.completions.create(**kw).choices[0]
    assert full.logprobs.text_offset[0] == 0
    sent = 0
    offsets: list[int] = []
    for chunk in client.completions.create(**kw, stream=True):
        choice = chunk.choices[0]
        if choice.logprobs and choice.logprobs.tokens:
            # offsets count characters of the whole completion, not of this chunk
            assert choice.logprobs.text_offset[0] == sent, (sent, choice)
            offsets += choice.logprobs.text_offset
        sent += len(choice.text)
    assert len(offsets) == 8 and offsets == sorted(offsets)


def test_completion_echo_with_logprobs(client: Any, tokenizer: Any, tiny_llama_dir: Path) -> None:
    """What lm-evaluation-harness's `local-completions` sends to score a text: the prompt's
    tokens come first with their log-probabilities (the first has none), equal to the Python
    API's prompt_logprobs, then the generated ones; text offsets run over the whole text."""
    from dist_runtime import Runtime, SamplingParams

    ids = tokenizer.encode("The lighthouse keeper")  # BOS first
    kw: dict[str, Any] = dict(
        model=None,
        max_tokens=3,
        temperature=0,
        echo=True,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    choice = client.completions.create(prompt=ids, **kw).choices[0]
    lp, n = choice.logprobs, len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == choice.text  # ids echo as their text, BOS included
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(n + 3)]
    with Runtime(model=str(tiny_llama_dir), session_len=512, device="cpu", dtype="float32") as rt:
        (out,) = rt.generate(
            [ids],
            SamplingParams(max_new_tokens=3, prompt_logprobs=2, logprobs=2, ignore_eos=True),
        )
    assert out.prompt_logprobs is not None and out.logprobs is not None
    second = out.prompt_logprobs[1]
    assert second is not None
    want = [e.logprob for e in [*out.prompt_logprobs[1:], *out.logprobs] if e is not None]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert list(lp.top_logprobs[1]) == [
        tokenizer.token_bytes(t).decode(errors="backslashreplace") for t in second.top
    ]
    # A text prompt echoes as sent: the BOS the tokenizer added takes no characters.
    by_text = client.completions.create(prompt="The lighthouse keeper", **kw).choices[0]
    assert by_text.text.startswith("The lighthouse keeper")
    assert by_text.logprobs.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert by_text.logprobs.text_offset[:2] == [0, 0]
    assert "".join(by_text.logprobs.tokens[1:]) == by_text.text
    # Streamed: the first chunk carries the prompt's entries.
    chunks = [c.choices[0] for c in client.completions.create(prompt=ids, stream=True, **kw)]
    assert chunks[0].logprobs.token_logprobs[0] is None
    streamed = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    assert streamed == lp.tokens
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == lp.text_offset


def test_completion_echo_of_zero_tokens_scores_the_prompt(client: Any, tokenizer: Any) -> None:
    """max_tokens=0 with echo (OpenAI's legacy API, vLLM, lm-evaluation-harness's older
    loglikelihood requests): the choice is the prompt with its tokens' log-probabilities, those
    of a request that generates; nothing is generated or counted. Without echo the text is
    empty; the chat route still asks for at least one token."""
    ids = tokenizer.encode("The lighthouse keeper")
    kw: dict[str, Any] = dict(model=None, temperature=0, echo=True, logprobs=2)
    generating = client.completions.create(prompt=ids, max_tokens=3, **kw).choices[0]
    out = client.completions.create(prompt=ids, max_tokens=0, **kw)
    (choice,) = out.choices
    n = len(ids)
    assert choice.finish_reason == "length" and choice.text == "".join(choice.logprobs.tokens)
    assert choice.logprobs.tokens == generating.logprobs.tokens[:n]
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        generating.logprobs.token_logprobs[1:n], abs=1e-6
    )
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (n, 0)
    chunks = list(client.completions.create(prompt=ids, max_tokens=0, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == (
        choice.logprobs.tokens
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    plain = client.completions.create(model=None, prompt="A tide", max_tokens=0)
    assert (plain.choices[0].text, plain.usage.completion_tokens) == ("", 0)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model=None, messages=[{"role": "user", "content": "Hi"}], max_tokens=0
        )


def test_vllm_prompt_logprobs_field(client: Any, tokenizer: Any) -> None:
    ids = tokenizer.encode("A tide")
    out = client.completions.create(
        model=None, prompt=ids, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 1}
    )
    choice = out.choices[0]
    scored = choice.model_extra["prompt_logprobs"]
    assert choice.logprobs is None and len(scored) == len(ids) and scored[0] is None
    for pos in range(1, len(ids)):
        entries = scored[pos]
        assert str(ids[pos]) in entries and 1 <= len(entries) <= 2
        assert min(e["rank"] for e in entries.values() if e["rank"] is not None) == 1
    chat = client.chat.completions.create(
        model=None,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        extra_body={"prompt_logprobs": 0},
    )
    scored = chat.choices[0].model_extra["prompt_logprobs"]
    assert scored[0] is None and all(len(e) == 1 for e in scored[1:])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=None, prompt="Hi", extra_body={"prompt_logprobs": 21})
    assert e.value.body["param"] == "prompt_logprobs"


def test_null_fields_take_their_defaults(server: Server) -> None:
    nulls = dict.fromkeys(
        ("model", "temperature", "top_p", "n", "stream", "stop", "seed", "max_tokens",
         "presence_penalty", "frequency_penalty", "stream_options", "user")
    )  # fmt: skip
    status, body = server.request(
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], **nulls, "logprobs": None,
         "top_logprobs": None, "max_completion_tokens": 3},
    )  # fmt: skip
    assert status == 200, body
    assert len(body["choices"]) == 1 and body["usage"]["completion_tokens"] <= 3
    status, body = server.request(
        "POST", "/v1/completions", {"prompt": "Hi", **nulls, "echo": None, "logprobs": None}
    )
    assert status == 200, body
    assert body["choices"][0]["logprobs"] is None and body["usage"]["completion_tokens"] <= 16
    status, body = server.request("POST", "/v1/completions", {"prompt": None})
    assert status == 400 and body["error"]["param"] == "prompt"


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}], "tools": [
            {"type": "function", "function": {"name": "g"}}]}, "functions"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
        ("/v1/chat/completions", {"response_format": {"type": "regex"}},
         "response_format.type"),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema"}},
         "response_format"),
        ("/v1/chat/completions", {"response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": 1}}}},
         "response_format"),
        ("/v1/chat/completions", {"logit_bias": {"5": 300}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {"99999": 1}}, "logit_bias"),
        ("/v1/completions", {"allowed_token_ids": [99999]}, "allowed_token_ids"),
        ("/v1/completions", {"allowed_token_ids": []}, "allowed_token_ids"),
        ("/v1/completions", {"bad_words": [" "]}, "bad_words"),
        ("/v1/completions", {"bad_words": ["x"], "use_beam_search": True, "n": 2},
         "bad_words"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/completions", {"best_of": 2, "n": 3}, "best_of"),
        ("/v1/completions", {"best_of": 3, "stream": True}, "best_of"),
        ("/v1/completions", {"best_of": 3, "use_beam_search": True}, "best_of"),
        ("/v1/completions", {"thinking_token_budget": 3, "use_beam_search": True},
         "thinking_token_budget"),
        ("/v1/chat/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"suffix": " end"}, "suffix"),
        ("/v1/completions", {"guided_grammar": 'root ::= root "a" | "b"'}, "guided_grammar"),
        ("/v1/chat/completions", {"guided_regex": "a", "guided_grammar": 'root ::= "a"'},
         "guided_grammar"),
        ("/v1/chat/completions", {"structured_outputs": {"structural_tag": '{"a": 1}'}},
         "structured_outputs.structural_tag"),
        ("/v1/completions", {"structured_outputs": {"disable_any_whitespace": True}},
         "structured_outputs.disable_any_whitespace"),
        ("/v1/completions", {"guided_whitespace_pattern": "[ ]?"}, "guided_whitespace_pattern"),
        ("/v1/completions", {"structured_outputs": {"regx": "a"}}, "structured_outputs.regx"),
        ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}},
         "structured_outputs"),
        ("/v1/completions", {"structured_outputs": {"grammar": "root ::= x"}},
         "structured_outputs.grammar"),
        ("/v1/completions", {"structured_outputs": {"json": "{not json"}},
         "structured_outputs.json"),
        ("/v1/chat/completions", {"structured_outputs": {"regex": "a"},
                                  "response_format": {"type": "json_object"}},
         "structured_outputs"),
        ("/v1/completions", {"structured_outputs": {"choice": ["a"]}, "guided_choice": ["a"]},
         "structured_outputs"),
        ("/v1/chat/completions", {"messages": [{"role": "critic", "content": "4"}]},
         "messages.0.role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
         "messages.0.content"),
    ],
)  # fmt: skip
def test_unsupported_fields_are_refused(
    server: Server, path: str, extra: dict[str, Any], param: str
) -> None:
    base: dict[str, Any] = {"max_tokens": 2}
    base.update(
        {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"}
    )
    status, body = server.request("POST", path, {**base, **extra})
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"


def test_harmless_values_of_unsupported_fields_pass(client: Any) -> None:
    out = client.chat.completions.create(
        model=None,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        response_format={"type": "text"},
        tool_choice="none",
        logit_bias={},
    )
    assert out.choices[0].finish_reason in ("length", "stop")


def test_developer_role_is_the_system_role(client: Any) -> None:
    def chat(role: str) -> Any:
        return client.chat.completions.create(
            model=None,
            messages=[{"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            max_tokens=4,
            temperature=0,
        )

    developer, system = chat("developer"), chat("system")
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens
    assert developer.choices[0].message.content == system.choices[0].message.content


GUIDED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "count": {"type": "integer"},
        "words": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["answer", "count", "words"],
    "additionalProperties": False,
}


def test_response_format_json_schema(client: Any) -> None:
    """The random-weight model writes schema-valid JSON only because of the masks; streamed
    and whole answers agree, and the completions route takes it as an extra field."""
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": GUIDED_SCHEMA}}
    messages = [{"role": "user", "content": "Answer in JSON."}]
    kwargs = dict(model=None, messages=messages, max_tokens=400, temperature=0)
    whole = client.chat.completions.create(response_format=fmt, **kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), GUIDED_SCHEMA)
    chunks = client.chat.completions.create(response_format=fmt, stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        choice.message.content
    )
    done = client.completions.create(
        model=None, prompt="JSON:", max_tokens=400, extra_body={"response_format": fmt}
    )
    jsonschema.validate(json.loads(done.choices[0].text), GUIDED_SCHEMA)


def _whitespace_outside_strings(text: str) -> bool:
    in_string = escaped = False
    for c in text:
        if in_string:
            escaped, in_string = (not escaped and c == "\\"), in_string and (escaped or c != '"')
        elif c == '"':
            in_string = True
        elif c in " \t\n\r":
            return True
    return False


def test_disable_any_whitespace_makes_guided_json_compact(client: Any) -> None:
    """vLLM's structured_outputs.disable_any_whitespace: the schema's JSON with no whitespace
    outside strings, with the JSON in structured_outputs or a response_format; a 400 with a
    guide that is not JSON."""
    assert _whitespace_outside_strings('{"a": 1}') and not _whitespace_outside_strings('{"a b":1}')
    ask: dict[str, Any] = dict(model=None, prompt="JSON:", max_tokens=400, temperature=1.0)
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": GUIDED_SCHEMA}}
    compact = {"disable_any_whitespace": True}
    for seed in range(3):
        for extra in ({"structured_outputs": {"json": GUIDED_SCHEMA, **compact}},
                      {"response_format": fmt, "structured_outputs": compact}):  # fmt: skip
            text = client.completions.create(seed=seed, extra_body=extra, **ask).choices[0].text
            jsonschema.validate(json.loads(text), GUIDED_SCHEMA)
            assert not _whitespace_outside_strings(text), text
    loose = [
        client.completions.create(seed=seed, extra_body={"response_format": fmt}, **ask)
        .choices[0]
        .text
        for seed in range(3)
    ]
    assert any(_whitespace_outside_strings(t) for t in loose)  # (what the option changes)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            extra_body={"structured_outputs": {"regex": "a+", **compact}}, **ask
        )
    assert info.value.body["param"] == "structured_outputs.disable_any_whitespace"


def test_settings_that_leave_no_token_are_a_400_not_a_server_error(server: Server) -> None:
    """A request whose own settings rule out every token at a step (a guided choice none of
    whose tokens allowed_token_ids allows; fuzzing found bad_words against a schema's key) is
    the client's error: a 400 naming the cause, streamed as an invalid_request_error event."""
    body = {"prompt": "Pick", "max_tokens": 4, "guided_choice": ["yes", "no"],
            "allowed_token_ids": [7]}  # fmt: skip
    status, out = server.request("POST", "/v1/completions", body)
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error"
    assert "no token is left to sample" in out["error"]["message"]
    status, raw = server.request("POST", "/v1/completions", {**body, "stream": True})
    assert status == 200
    errors = [json.loads(line[6:]) for line in raw.splitlines() if '"error"' in line]
    assert [e["error"]["type"] for e in errors] == ["invalid_request_error"], raw


def test_best_of_returns_the_most_likely_of_the_completions_sampled(client: Any) -> None:
    """best_of samples that many completions and returns the n with the highest mean
    log-probability per token, best first; usage counts every one sampled. The oracle: the
    same request with n=best_of (the same seeds), ranked here."""
    ask: dict[str, Any] = dict(model=None, prompt="The harbor", max_tokens=6, seed=11)
    every = client.completions.create(n=4, logprobs=0, temperature=1.0, **ask)
    mean = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every.choices]
    ranked = [every.choices[i].text for i in sorted(range(4), key=lambda i: -mean[i])]
    assert len(set(ranked)) > 1  # (distinct samples: the ranking has something to do)
    best = client.completions.create(n=2, temperature=1.0, best_of=4, **ask)
    assert [c.text for c in best.choices] == ranked[:2]
    assert [c.index for c in best.choices] == [0, 1]
    assert all(c.logprobs is None for c in best.choices)
    assert best.usage.completion_tokens == every.usage.completion_tokens
    with_lp = client.completions.create(n=1, logprobs=2, temperature=1.0, best_of=4, **ask)
    assert with_lp.choices[0].text == ranked[0]
    assert len(with_lp.choices[0].logprobs.top_logprobs[0]) == 2


def test_response_format_json_object(client: Any) -> None:
    outs = client.chat.completions.create(
        model=None,
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"},
        max_tokens=48,
        n=3,
        seed=1,
    )
    for choice in outs.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.message.content.lstrip()[:1] == "{"


def test_structured_output_parse_with_a_pydantic_model(client: Any) -> None:
    """The official client's `parse` sends a strict schema made from a pydantic model and
    parses the answer back into it."""

    class Reply(pydantic.BaseModel):
        answer: Literal["yes", "no"]
        sure: bool
        words: list[Literal["a", "b"]] = pydantic.Field(max_length=2)

    out = client.beta.chat.completions.parse(
        model=None,
        messages=[{"role": "user", "content": "Reply."}],
        response_format=Reply,
        max_tokens=300,
        temperature=0,
    )
    assert isinstance(out.choices[0].message.parsed, Reply)


def test_job_with_a_json_schema(server: Server) -> None:
    """A document-QA job's answers held to a schema; a bad schema is a 400 before queueing."""
    doc = "The ferry leaves pier 4 at seven. The harbour master is Tom Reyes."
    fmt = {"type": "json_schema", "json_schema": {"schema": GUIDED_SCHEMA}}
    body = {"document": doc, "questions": ["Who?", "When?"], "max_tokens": 400,
            "temperature": 0.8, "seed": 3, "response_format": fmt}  # fmt: skip
    status, job = server.request("POST", "/v1/jobs", body)
    assert status == 200, job
    _wait_done(server, job["id"], timeout=120)
    answers = server.request("GET", f"/v1/jobs/{job['id']}/result")[1]["answers"]
    for answer in answers:
        jsonschema.validate(json.loads(answer), GUIDED_SCHEMA)
    bad = {**body, "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "string", "format": "email", "pattern": "a\\b"}}}}  # fmt: skip
    status, err = server.request("POST", "/v1/jobs", bad)
    assert status == 400 and err["error"]["param"] == "response_format"
    assert "/pattern" in err["error"]["message"] and "\\b" in err["error"]["message"]


def test_logit_bias(client: Any, tokenizer: Any) -> None:
    """OpenAI's logit_bias: +100 on one token makes the answer that token, four times."""
    out = client.completions.create(
        model=None, prompt="Hello", max_tokens=4, temperature=0, logit_bias={"77": 100}
    )
    assert out.choices[0].text == tokenizer.decode([77] * 4)
    assert out.usage.completion_tokens == 4


def test_allowed_token_ids_and_bad_words(client: Any, tokenizer: Any) -> None:
    """vLLM's allowed_token_ids (every token one of them) and bad_words (the word never
    written) as extra body fields, on both routes."""
    words = [" tea", " w", " explains"]
    allowed = [t for w in words for t in tokenizer.encode(w, add_special_tokens=False)]
    assert len(allowed) == 3  # one token each
    ask = dict(model=None, prompt="The scheduler reads", max_tokens=8, temperature=0)
    out = client.completions.create(**ask, extra_body={"allowed_token_ids": allowed})
    text = out.choices[0].text
    assert out.usage.completion_tokens == 8 and set(text.split()) <= {w.strip() for w in words}
    chat = dict(model=None, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                temperature=0)  # fmt: skip
    free = client.chat.completions.create(**chat, extra_body={"allowed_token_ids": allowed})
    said = free.choices[0].message.content.split()
    assert said and set(said) <= {w.strip() for w in words}
    held = client.chat.completions.create(
        **chat, extra_body={"allowed_token_ids": allowed, "bad_words": [said[0]]}
    )
    assert said[0] not in held.choices[0].message.content.split()
    assert held.usage.completion_tokens == 8


def test_return_tokens_as_token_ids(client: Any, tokenizer: Any) -> None:
    """vLLM's return_tokens_as_token_ids: logprobs name tokens as `token_id:N`, on the
    completion route (tokens, top_logprobs keys, streamed too) and the chat route (token, with
    `bytes` still the token's own)."""
    ask = dict(model=None, prompt="The tide", max_tokens=5, temperature=0, logprobs=2)
    named = client.completions.create(**ask)
    out = client.completions.create(**ask, extra_body={"return_tokens_as_token_ids": True})
    assert out.choices[0].text == named.choices[0].text
    lp = out.choices[0].logprobs
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert all(t.startswith("token_id:") for t in lp.tokens)
    assert tokenizer.decode(ids) == out.choices[0].text
    assert lp.token_logprobs == pytest.approx(named.choices[0].logprobs.token_logprobs)
    for top, want in zip(lp.top_logprobs, named.choices[0].logprobs.top_logprobs):
        assert sorted(top.values()) == pytest.approx(sorted(want.values()))
        assert all(k.startswith("token_id:") for k in top)
    stream = client.completions.create(
        **ask, stream=True, extra_body={"return_tokens_as_token_ids": True}
    )
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.tokens]  # fmt: skip
    assert streamed == lp.tokens
    chat = client.chat.completions.create(
        model=None, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2, extra_body={"return_tokens_as_token_ids": True},
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    ids = [int(e.token.removeprefix("token_id:")) for e in content]
    assert [bytes(e.bytes) for e in content] == [tokenizer.token_bytes(t) for t in ids]
    assert all(t.token.startswith("token_id:") for e in content for t in e.top_logprobs)


def test_vllm_guided_choice_and_guided_json(client: Any) -> None:
    out = client.completions.create(
        model=None, prompt="Sentiment:", max_tokens=8, n=4, seed=1,
        extra_body={"guided_choice": ["good", "bad"]},
    )  # fmt: skip
    assert {c.text for c in out.choices} <= {"good", "bad"}
    out = client.chat.completions.create(
        model=None, messages=[{"role": "user", "content": "JSON"}], max_tokens=400,
        temperature=0, extra_body={"guided_json": GUIDED_SCHEMA},
    )  # fmt: skip
    jsonschema.validate(json.loads(out.choices[0].message.content), GUIDED_SCHEMA)


def test_vllm_guided_regex(client: Any) -> None:
    out = client.completions.create(
        model=None, prompt="Phone:", max_tokens=20, n=2, seed=4,
        extra_body={"guided_regex": r"\d{3}-\d{4}"},
    )  # fmt: skip
    for choice in out.choices:
        assert re.fullmatch(r"\d{3}-\d{4}", choice.text) and choice.finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=None, prompt="x", max_tokens=2, extra_body={"guided_regex": "(?=a)"}
        )
    assert info.value.body["param"] == "guided_regex"


WORDS_GRAMMAR = 'root ::= ("yes" | "no") ", " [a-z]{2,6}'
NESTED_GRAMMAR = """
root ::= "[" list? "]"
list ::= item ("," item)?     # at most two items
item ::= [0-9] | root
"""


def in_nested_lists(text: str) -> bool:
    """Whether `text` is in NESTED_GRAMMAR's language, checked without a grammar: compact JSON
    of a list of at most two items, each a digit or such a list."""

    def ok(value: Any) -> bool:
        return (
            isinstance(value, list)
            and len(value) <= 2
            and all(ok(x) or (type(x) is int and 0 <= x <= 9) for x in value)
        )

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return ok(value) and json.dumps(value, separators=(",", ":")) == text


def test_vllm_guided_grammar(client: Any) -> None:
    """GBNF grammars (vLLM's `guided_grammar`) on both routes: every answer is in the
    grammar's language and ends there; the recursive one nests lists in lists."""
    checks = {
        WORDS_GRAMMAR: lambda text: bool(re.fullmatch(r"(yes|no), [a-z]{2,6}", text)),
        NESTED_GRAMMAR: in_nested_lists,
    }
    for grammar, check in checks.items():
        extra = {"extra_body": {"guided_grammar": grammar}, "n": 4, "seed": 1}
        done = client.completions.create(model=None, prompt="List:", max_tokens=60, **extra)
        chat = client.chat.completions.create(
            model=None, messages=[{"role": "user", "content": "A list"}], max_tokens=60, **extra
        )
        answers = [(c.text, c.finish_reason) for c in done.choices]
        answers += [(c.message.content, c.finish_reason) for c in chat.choices]
        for text, finish in answers:
            assert check(text) and finish == "stop", (grammar, text, finish)
        if grammar == NESTED_GRAMMAR:
            assert any(text.startswith("[[") for text, _ in answers), answers
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=None, messages=[{"role": "user", "content": "x"}], max_tokens=2,
            extra_body={"guided_grammar": 'root ::= root "a" | "b"'},
        )  # fmt: skip
    assert info.value.body["param"] == "guided_grammar"
    assert "left-recursive" in info.value.body["message"]


def test_vllm_structured_outputs(client: Any) -> None:
    """vLLM's newer `structured_outputs` object guides as the guided_* fields do; the knobs
    that do not change the answer are taken, those that would are refused by name."""

    def complete(structured: dict[str, Any]) -> list[Any]:
        out = client.completions.create(
            model=None, prompt="Answer:", max_tokens=60, n=2, seed=2,
            extra_body={"structured_outputs": structured},
        )  # fmt: skip
        assert all(c.finish_reason == "stop" for c in out.choices), out.choices
        return [c.text for c in out.choices]

    for text in complete({"grammar": NESTED_GRAMMAR, "disable_fallback": True}):
        assert in_nested_lists(text), text
    for text in complete({"regex": r"\d{3}-\d{4}", "backend": "xgrammar"}):
        assert re.fullmatch(r"\d{3}-\d{4}", text)
    assert set(complete({"choice": ["good", "bad"]})) <= {"good", "bad"}
    small = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"],
             "additionalProperties": False}  # fmt: skip
    for schema in (small, json.dumps(small)):  # a schema, or its JSON text
        for text in complete({"json": schema}):
            jsonschema.validate(json.loads(text), small)
    out = client.completions.create(
        model=None, prompt="JSON:", max_tokens=8,
        extra_body={"structured_outputs": {"json_object": True}},
    )  # fmt: skip
    assert out.choices[0].text.lstrip()[:1] == "{"
    chat = client.chat.completions.create(
        model=None, messages=[{"role": "user", "content": "Answer"}], max_tokens=20,
        extra_body={"structured_outputs": {"grammar": WORDS_GRAMMAR}},
    )  # fmt: skip
    assert re.fullmatch(r"(yes|no), [a-z]{2,6}", chat.choices[0].message.content)
    with pytest.raises(openai.BadRequestError) as info:
        complete({"regex": "a", "whitespace_pattern": " *"})
    assert info.value.body["param"] == "structured_outputs.whitespace_pattern"


def test_body_limit_reads_the_upload_before_answering_413() -> None:
    """In process: the 413 goes out only once the client's body is read (up to the drain
    bound), so the client is not cut off mid-upload; a body under the limit without a
    Content-Length reaches the route whole, and later messages (a disconnect) still do."""
    import asyncio

    from dist_runtime.server.app import _BodyLimit

    async def route(scope: Any, receive: Any, send: Any) -> None:
        first = await receive()
        later = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen = [len(first["body"]), first["more_body"], later["type"]]
        await send({"type": "http.response.body", "body": json.dumps(seen).encode()})

    def run(
        n_chunks: int, length: int | None, drain: int, expect: bool = False
    ) -> tuple[list[Any], int]:
        chunks = [
            {"type": "http.request", "body": b"x" * 1000, "more_body": i < n_chunks - 1}
            for i in range(n_chunks)
        ] + [{"type": "http.disconnect"}]
        sent: list[Any] = []
        read = 0
        read_when_answered: list[int] = []

        async def receive() -> Any:
            nonlocal read
            read += 1
            return chunks[read - 1]

        async def send(message: Any) -> None:
            if message["type"] == "http.response.start":
                read_when_answered.append(read)
            sent.append(message)

        headers = [] if length is None else [(b"content-length", str(length).encode())]
        if expect:
            headers.append((b"expect", b"100-continue"))
        limit = _BodyLimit(route, max_bytes=10_000)
        limit.drain_bytes = drain  # set below its 4x-limit floor to test the bound
        scope = {"type": "http", "method": "POST", "headers": headers}
        asyncio.run(limit(scope, receive, send))
        return sent, read_when_answered[0]

    for length in (20_000, None):  # by Content-Length and chunked
        sent, read = run(20, length, drain=1_000_000)
        assert sent[0]["status"] == 413 and b"request_too_large" in sent[1]["body"]
        assert read == 20  # the whole upload was read before the answer
        sent, read = run(20, length, drain=15_000)
        assert sent[0]["status"] == 413
        assert read < 20  # past the drain bound: answered without reading it all
    # a client waiting on `Expect: 100-continue` gets its 413 before sending anything
    sent, read = run(20, 20_000, drain=1_000_000, expect=True)
    assert sent[0]["status"] == 413 and read == 0
    sent, _ = run(5, None, drain=1_000_000)
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"]) == [5000, False, "http.disconnect"]


def test_tokenize_counts_what_the_routes_would_send(server: Server, client: Any) -> None:
    """vLLM's /tokenize: a prompt or chat messages (with tools) tokenized as the completion /
    chat route would, so a caller can check a long document fits `max_model_len`."""
    prompt = "The tide turns at the pier."
    status, body = server.request("POST", "/tokenize", {"prompt": prompt})
    assert status == 200, body
    done = client.completions.create(model=None, prompt=prompt, max_tokens=1)
    assert body["count"] == len(body["tokens"]) == done.usage.prompt_tokens
    assert body["max_model_len"] == 512 and body["token_strs"] is None
    messages = [{"role": "user", "content": prompt}]
    tools = [{"type": "function", "function": {"name": "tide", "parameters": {"type": "object"}}}]
    for extra in ({}, {"tools": tools}):
        status, chat = server.request("POST", "/tokenize", {"messages": messages, **extra})
        assert status == 200, chat
        answer = client.chat.completions.create(
            model=None, messages=messages, max_tokens=1, **extra
        )
        assert chat["count"] == answer.usage.prompt_tokens
    assert chat["count"] > body["count"]  # the template and the tools' text
    status, bare = server.request(
        "POST", "/tokenize",
        {"prompt": prompt, "add_special_tokens": False, "return_token_strs": True},
    )  # fmt: skip
    assert bare["tokens"] == body["tokens"][1:]  # no BOS
    assert "".join(bare["token_strs"]) == prompt
    status, back = server.request("POST", "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == "<s>" + prompt


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
        ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ],
)
def test_tokenize_errors_name_the_field(
    server: Server, path: str, payload: dict[str, Any], param: str
) -> None:
    status, body = server.request("POST", path, payload)
    assert status in (400, 404) and body["error"]["param"] == param, body
    assert server.request("POST", path, {"prompt": "a"}, key="wrong")[0] == 401


def test_priority_is_taken_and_checked(server: Server, client: Any) -> None:
    """vLLM's `priority` extra on every generation route and on jobs (a job's stays with it
    in the queue); a value that is not an integer is a 400 naming it."""
    for path, body in (
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 1}),
        ("/v1/responses", {"input": "Hi", "max_output_tokens": 1}),
    ):  # fmt: skip
        status, out = server.request("POST", path, {**body, "priority": -3})
        assert status == 200, (path, out)
        status, out = server.request("POST", path, {**body, "priority": "soon"})
        assert status == 400 and out["error"]["param"] == "priority", (path, out)
    status, job = server.request(
        "POST", "/v1/jobs",
        {"document": "The pier is long.", "questions": ["How long?"], "max_tokens": 2,
         "priority": 7},
    )  # fmt: skip
    assert status == 200, job
    import sqlite3

    from dist_runtime.jobs.store import DB_NAME

    with sqlite3.connect(server.job_dir / DB_NAME) as db:
        (params,) = db.execute("SELECT params FROM jobs WHERE id = ?", (job["id"],)).fetchone()
    assert json.loads(params)["priority"] == 7


def test_choices_say_which_stop_ended_them(client: Any) -> None:
    """vLLM's `stop_reason`: the stop string that cut the text; null for a length finish."""
    ask: dict[str, Any] = dict(model=None, prompt="The tide", max_tokens=24, temperature=0,
                               extra_body={"ignore_eos": True})  # fmt: skip
    full = client.completions.create(**ask).choices[0]
    assert full.finish_reason == "length" and full.model_extra["stop_reason"] is None
    at = next(i for i in range(1, len(full.text) - 1) if full.text.find(full.text[i : i + 2]) == i)
    stop = full.text[at : at + 2]
    cut = client.completions.create(stop=[stop, "never-seen"], **ask).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:at]
    assert cut.model_extra["stop_reason"] == stop
    kept = client.completions.create(stop=[stop], **{**ask, "extra_body": {
        "ignore_eos": True, "include_stop_str_in_output": True}}).choices[0]  # fmt: skip
    assert kept.finish_reason == "stop" and kept.text == full.text[: at + len(stop)]
    # vLLM's stop_token_ids: with every id a stop, the first token ends it (and adds no text)
    every = {**ask, "extra_body": {"ignore_eos": True, "stop_token_ids": list(range(512))}}
    out = client.completions.create(**every)
    first = out.choices[0]
    assert first.finish_reason == "stop" and first.text == "" and out.usage.completion_tokens == 1
    assert isinstance(first.model_extra["stop_reason"], int)
    # vLLM's min_tokens holds those stops back (here with drafts on: none before it)
    some = {**ask, "extra_body": {"ignore_eos": True, "stop_token_ids": list(range(1, 512, 2)),
                                  "min_tokens": 5}}  # fmt: skip
    out = client.completions.create(**some)
    assert out.usage.completion_tokens > 5 and out.choices[0].finish_reason == "stop"
    everything_held = {**every["extra_body"], "min_tokens": 3}
    for extra, match in ((everything_held, "no token to pick"),
                         ({"min_tokens": 25}, "min_tokens must be")):  # fmt: skip
        with pytest.raises(openai.BadRequestError, match=match) as info:
            client.completions.create(**{**ask, "extra_body": extra})
        assert info.value.body["param"] == "min_tokens"


def test_vllm_beam_search(server: Server, client: Any) -> None:
    """use_beam_search (vLLM's): the n best beams are the choices, best first, with their
    tokens' log-probabilities when asked; one beam is the greedy answer; on chat too; what
    would sample, hold back or stream is a 400 naming the field. The metrics count it as one
    request, not one per beam and step."""
    ask: dict[str, Any] = dict(model=None, max_tokens=6, temperature=0)
    beam = {"use_beam_search": True, "ignore_eos": True}
    lengths = 'request_success_total{finished_reason="length"}'
    client.completions.create(prompt="The harbor", extra_body=beam, **ask)  # (the counter)
    before = server.metric(lengths)
    out = client.completions.create(prompt="The harbor", n=3, extra_body=beam, **ask)
    assert server.metric(lengths) == before + 1
    texts = [c.text for c in out.choices]
    assert len(set(texts)) == 3 and [c.index for c in out.choices] == [0, 1, 2]
    assert {c.finish_reason for c in out.choices} == {"length"}
    assert out.usage.completion_tokens == 18
    one = client.completions.create(prompt="The harbor", n=1, extra_body=beam, **ask)
    greedy = client.completions.create(prompt="The harbor", extra_body={"ignore_eos": True},
                                       **ask)  # fmt: skip
    assert one.choices[0].text == greedy.choices[0].text
    scored = client.completions.create(prompt="The harbor", n=2, logprobs=2, extra_body=beam,
                                       **ask)  # fmt: skip
    sums = [sum(c.logprobs.token_logprobs) for c in scored.choices]
    assert sums == sorted(sums, reverse=True)  # (one length: best first is most likely first)
    assert all(len(c.logprobs.tokens) == 6 for c in scored.choices)
    assert all(len(t) == 2 for c in scored.choices for t in c.logprobs.top_logprobs)
    messages = [{"role": "user", "content": "Hello"}]
    chat = client.chat.completions.create(messages=messages, n=2, extra_body=beam, logprobs=True,
                                          top_logprobs=1, **ask)  # fmt: skip
    assert len({c.message.content for c in chat.choices}) == 2
    assert all(len(c.logprobs.content) == 6 for c in chat.choices)
    bad: list[tuple[str, dict[str, Any]]] = [
        ("stream", {"stream": True}), ("stop", {"stop": ["."]}),
        ("n", {"n": 11}), ("temperature", {"temperature": 0.7}), ("echo", {"echo": True}),
    ]  # fmt: skip
    for field, extra in bad:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(prompt="x", **{**ask, **extra}, extra_body=beam)
        assert info.value.body["param"] == field, field
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(messages=messages, tools=[tool], extra_body=beam, **ask)
    assert info.value.body["param"] == "tools"


def test_vllm_prompt_and_cache_options(client: Any) -> None:
    """truncate_prompt_tokens keeps the prompt's last tokens; cache_salt keeps cached K/V among
    requests with the same salt; options that would change the answer unseen are 400s."""
    ids = [(7 * i) % 500 + 3 for i in range(48)]
    ask: dict[str, Any] = dict(model=None, max_tokens=4, temperature=0)
    cut = client.completions.create(prompt=ids, **ask,
                                    extra_body={"truncate_prompt_tokens": 20})  # fmt: skip
    tail = client.completions.create(prompt=ids[-20:], **ask)
    assert cut.usage.prompt_tokens == 20 and cut.choices[0].text == tail.choices[0].text

    def cached(salt: str) -> int:
        out = client.completions.create(prompt=ids, **ask, extra_body={"cache_salt": salt})
        return int(out.usage.prompt_tokens_details.cached_tokens)

    first = cached("alice")
    assert cached("bob") == 0 and cached("alice") > first  # alice's blocks, not bob's
    for field, value in (("length_penalty", 2.0), ("logits_processors", ["f"])):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(prompt="x", **ask, extra_body={field: value})
        assert info.value.body["param"] == field
    # (special tokens are joined without spaces whatever spaces_between_special_tokens says,
    # as vLLM's fast tokenizers do)
    plain = client.completions.create(prompt=ids, **ask, extra_body={"skip_special_tokens": False})
    for spaced in (True, False):
        extra = {"skip_special_tokens": False, "spaces_between_special_tokens": spaced}
        out = client.completions.create(prompt=ids, **ask, extra_body=extra)
        assert out.choices[0].text == plain.choices[0].text


def test_continue_final_message_continues_the_assistant(
    server: Server, client: Any, tokenizer: Any
) -> None:
    """vLLM's continue_final_message: the prompt ends inside the assistant's turn, right after
    its start, and the answer is what follows (the completion route given those ids agrees)."""
    from dist_runtime.text.chat import encode_chat

    messages = [{"role": "user", "content": "Where is the pier?"},
                {"role": "assistant", "content": "The pier is"}]  # fmt: skip
    out = client.chat.completions.create(
        model=None, messages=messages, max_tokens=6, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )  # fmt: skip
    ids = encode_chat(tokenizer, messages, continue_final_message=True)
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("assistant\nThe pier is")
    same = client.completions.create(model=None, prompt=ids, max_tokens=6, temperature=0)
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.content == same.choices[0].text
    status, body = server.request(
        "POST", "/v1/chat/completions",
        {"messages": messages, "max_tokens": 1, "continue_final_message": True,
         "add_generation_prompt": True},
    )  # fmt: skip
    assert status == 400 and body["error"]["param"] == "add_generation_prompt", body
    status, body = server.request(
        "POST", "/v1/chat/completions",
        {"messages": messages[:1], "max_tokens": 1, "continue_final_message": True},
    )  # fmt: skip
    assert status == 400 and "must be the assistant's" in body["error"]["message"], body


def test_chat_echo_and_a_closed_last_turn(server: Server, client: Any, tokenizer: Any) -> None:
    """vLLM's chat echo: the content starts with the assistant's last message (streamed in
    the first chunk), not with a user's. add_generation_prompt: false alone ends the prompt
    with the last turn closed, as HF's apply_chat_template(add_generation_prompt=False); a
    required call then is a 400; /tokenize counts both ways as the chat route does."""
    from dist_runtime.text.chat import encode_chat

    messages = [{"role": "user", "content": "Where is the pier?"},
                {"role": "assistant", "content": "The pier is"}]  # fmt: skip
    ask = dict(model=None, max_tokens=6, temperature=0)
    go_on = {"continue_final_message": True, "add_generation_prompt": False}
    plain = client.chat.completions.create(messages=messages, **ask, extra_body=go_on)
    echoed = client.chat.completions.create(
        messages=messages, **ask, extra_body={**go_on, "echo": True}
    )
    assert echoed.choices[0].message.content == "The pier is" + plain.choices[0].message.content
    stream = client.chat.completions.create(
        messages=messages, **ask, stream=True, extra_body={**go_on, "echo": True}
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
        echoed.choices[0].message.content
    )
    asked = client.chat.completions.create(messages=messages[:1], **ask, extra_body={"echo": True})
    alone = client.chat.completions.create(messages=messages[:1], **ask)
    assert asked.choices[0].message.content == alone.choices[0].message.content
    closed = client.chat.completions.create(
        messages=messages, **ask, extra_body={"add_generation_prompt": False}
    )
    ids = encode_chat(tokenizer, messages, add_generation_prompt=False)
    assert closed.usage.prompt_tokens == len(ids)
    assert not tokenizer.decode(ids, skip_special_tokens=False).endswith("assistant\n")
    same = client.completions.create(model=None, prompt=ids, max_tokens=6, temperature=0)
    assert closed.choices[0].message.content == same.choices[0].text
    for extra, count in (({"add_generation_prompt": False}, len(ids)),
                         (go_on, len(encode_chat(tokenizer, messages,
                                                 continue_final_message=True)))):  # fmt: skip
        status, body = server.request("POST", "/tokenize", {"messages": messages, **extra})
        assert status == 200 and body["count"] == count, body
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    status, body = server.request(
        "POST", "/v1/chat/completions",
        {"messages": messages, "max_tokens": 1, "add_generation_prompt": False,
         "tools": tools, "tool_choice": "required"},
    )  # fmt: skip
    assert status == 400 and body["error"]["param"] == "tool_choice", body


def test_job_priority_needs_a_job_dir(tiny_llama_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "serve.py"), "--model", str(tiny_llama_dir),
         "--device", "cpu", "--job-priority", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "--job-priority applies to the queued jobs" in done.stderr


def test_speculative_decoding_behind_the_server(server: Server, client: Any) -> None:
    """The module's server drafts (`--num-speculative-tokens 4 --draft-policy fixed`, so the
    step times of a loaded test machine do not hold the drafts back): a prompt whose answer
    repeats itself streams the same tokens as its plain completion, several tokens to a chunk
    where a step kept a draft, and /metrics counts the drafts."""
    from tests.dist_runtime.test_speculative import _prompts

    prompt = _prompts()[1]  # the tiny model's answer soon repeats one token
    drafted = server.metric("spec_decode_num_draft_tokens_total")
    whole = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=prompt,
        max_tokens=40,
        temperature=0,
        logprobs=1,
    )
    chunks = list(
        client.completions.create(
            model=whole.model,
            prompt=prompt,
            max_tokens=40,
            temperature=0,
            logprobs=1,
            stream=True,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    streamed = [
        t
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.tokens
    ]
    assert streamed == whole.choices[0].logprobs.tokens and len(streamed) == 40
    assert any(
        len(c.choices[0].logprobs.tokens) > 1 for c in chunks if c.choices and c.choices[0].logprobs
    )
    assert server.metric("spec_decode_num_draft_tokens_total") > drafted
    assert server.metric("spec_decode_num_accepted_tokens_total") > 0


def test_predicted_outputs(client: Any) -> None:
    """OpenAI's `prediction`: the answer equals the one without it, and usage says how many
    draft tokens were kept and rejected."""
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Repeat after me: the harbour opens at dawn."}]
    kw: dict[str, Any] = dict(model=model, messages=messages, max_tokens=30, temperature=0)
    plain = client.chat.completions.create(**kw)
    text = plain.choices[0].message.content
    predicted = client.chat.completions.create(
        **kw, prediction={"type": "content", "content": text}
    )
    assert predicted.choices[0].message.content == text
    details = predicted.usage.completion_tokens_details
    # the text re-encoded need not split into the tokens the model picked: kept where it does
    assert details.accepted_prediction_tokens > 0
    parts = client.chat.completions.create(
        **kw,
        prediction={"type": "content", "content": [{"type": "text", "text": "nothing like it"}]},
    )
    assert parts.choices[0].message.content == text
    assert parts.usage.completion_tokens == plain.usage.completion_tokens
