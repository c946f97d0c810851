"""OpenAI's Files and Batch APIs (/v1/files, /v1/batches) on the HTTP server, driven by the
official `openai` client: answers equal to the routes' own, bad files refused with every bad
line, cancel, expiry, and a batch that outlives a killed server."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")

from test_server import KEY, Server  # noqa: E402

CHAT = "/v1/chat/completions"
BOB = "bobs-key"
"""A second key of the module's server: usage is accounted per key."""


def _line(custom_id: str, body: dict[str, Any], url: str = CHAT) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _chat(text: str, max_tokens: int = 6) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}  # fmt: skip


def _client(server: Server) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _upload(client: Any, lines: list[str]) -> Any:
    return client.files.create(file=("requests.jsonl", "\n".join(lines).encode()), purpose="batch")


def _wait(client: Any, batch_id: str, until: tuple[str, ...], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)


def _lines(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tiny_llama_dir, tmp_path_factory.mktemp("batches"), "--api-keys",
               f"alice={KEY},bob={BOB}", "--max-batch-requests", "2", "--max-request-mb",
               "0.004", "--max-file-mb", "0.05", "--min-priority", "-1",
               "--key-weights", "alice=2")  # fmt: skip
    yield s
    s.close()


def test_a_batch_answers_as_the_routes_do(server: Server) -> None:
    client = _client(server)
    lines = [
        _line("pier", _chat("Where is the pier?")),
        _line("lamp", _chat("Light the lamp.", 5)),
        _line("nobody", {**_chat("Hi"), "model": "no-such-model"}),
        _line("bad", {"messages": "not a list"}),
    ]
    upload = _upload(client, lines)
    assert upload.purpose == "batch" and upload.bytes == len("\n".join(lines).encode())
    batch = client.batches.create(input_file_id=upload.id, endpoint=CHAT,
                                  completion_window="24h", metadata={"run": "one"})  # fmt: skip
    assert batch.status == "in_progress" and batch.request_counts.total == 4
    batch = _wait(client, batch.id, ("completed",))
    assert batch.metadata == {"run": "one"} and batch.completed_at is not None
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (4, 2, 2)
    done, refused = _lines(client, batch.output_file_id), _lines(client, batch.error_file_id)
    assert [a["custom_id"] for a in done] == ["pier", "lamp"]  # input order
    assert [a["custom_id"] for a in refused] == ["nobody", "bad"]
    assert [a["response"]["status_code"] for a in refused] == [404, 400]
    assert refused[1]["response"]["body"]["error"]["param"] == "messages"
    for answer, body in zip(done, (_chat("Where is the pier?"), _chat("Light the lamp.", 5))):
        status, direct = server.request("POST", CHAT, body)
        got = answer["response"]["body"]
        assert status == answer["response"]["status_code"] == 200 and answer["error"] is None
        assert got["choices"] == direct["choices"]
        assert got["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    assert batch.usage is not None
    assert batch.usage.input_tokens == sum(a["response"]["body"]["usage"]["prompt_tokens"]
                                           for a in done)  # fmt: skip
    assert batch.usage.output_tokens == 6 + 5
    # the files and the batch are listed; output files are named after the batch
    ids = {f.id for f in client.files.list()}
    assert {upload.id, batch.output_file_id, batch.error_file_id} <= ids
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert [b.id for b in client.batches.list(limit=100)][0] == batch.id
    assert server.metric('batch_requests_total{outcome="completed"}') >= 2


def test_a_bad_file_fails_its_batch_with_every_bad_line(server: Server) -> None:
    client = _client(server)
    upload = _upload(client, [
        _line("a", _chat("x")),
        "{oops",
        _line("b", _chat("y"), url="/v1/completions"),
        _line("a", _chat("z")),
        _line("c", {**_chat("w"), "stream": True}),
    ])  # fmt: skip
    batch = client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None
    errors = [(e.line, e.code) for e in batch.errors.data]
    assert errors == [(2, "invalid_json_line"), (3, "mismatched_endpoint"),
                      (4, "duplicate_custom_id"), (5, "invalid_request")]  # fmt: skip
    assert "repeats line 1" in batch.errors.data[2].message
    with pytest.raises(openai.NotFoundError, match="no file 'file-none'"):
        client.batches.create(input_file_id="file-none", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings",
                              completion_window="24h")  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="completion_window 'soon'"):
        client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="soon")
    with pytest.raises(openai.BadRequestError, match="purpose must be one of"):
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    # uploads have their own limit: over --max-request-mb (4 KiB) is fine, over 50 KiB is not
    assert _upload(client, [_line(f"r{i}", _chat("x" * 100)) for i in range(40)]).bytes > 4096
    with pytest.raises(openai.APIStatusError, match="--max-file-mb") as e:
        _upload(client, [_line(f"r{i}", _chat("x" * 1000)) for i in range(60)])
    assert e.value.status_code == 413
    empty = _upload(client, [""])
    batch = client.batches.create(input_file_id=empty.id, endpoint=CHAT, completion_window="24h")
    assert batch.status == "failed" and batch.errors.data[0].code == "empty_file"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_none")


def _slow_batch(client: Any, n: int, window: str = "24h") -> Any:
    upload = _upload(client, [_line(f"r{i}", _chat(f"Count to {i}.", 400)) for i in range(n)])
    return client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window=window)


def _accounts_for_every_request(client: Any, batch: Any, n: int, code: str) -> None:
    done, other = _lines(client, batch.output_file_id), _lines(client, batch.error_file_id)
    ids = [a["custom_id"] for a in done + other]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))  # each once
    unrun = [a for a in other if a["response"] is None]
    assert unrun and all(a["error"]["code"] == code for a in unrun)
    assert batch.request_counts.completed == len(done) < n


def test_cancel_stops_a_batch_and_keeps_what_it_answered(server: Server) -> None:
    client = _client(server)
    batch = _slow_batch(client, 12)
    with pytest.raises(openai.ConflictError, match="cancel the batch first"):
        client.files.delete(batch.input_file_id)
    _wait(client, batch.id, ("in_progress",))
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = _wait(client, batch.id, ("cancelled",))
    assert batch.cancelled_at is not None
    _accounts_for_every_request(client, batch, 12, "batch_cancelled")
    with pytest.raises(openai.ConflictError, match="only a batch in progress"):
        client.batches.cancel(batch.id)
    assert client.files.delete(batch.input_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(batch.input_file_id)


def test_a_batch_past_its_window_expires(server: Server) -> None:
    client = _client(server)
    batch = _slow_batch(client, 40, window="1s")  # about 0.15 s a request, 2 at once, here
    batch = _wait(client, batch.id, ("expired",))
    assert batch.expired_at is not None
    _accounts_for_every_request(client, batch, 40, "batch_expired")


def test_a_batch_outlives_a_killed_server(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The server dies mid-batch (SIGKILL); the next one on the job directory answers the
    rest, each request once, the answers those of the routes."""
    job_dir = tmp_path / "jobs"
    args = ("--api-keys", KEY, "--max-batch-requests", "1", "--job-dir", str(job_dir))
    n = 8
    lines = [_line(f"r{i}", _chat(f"Story {i}:", 60)) for i in range(n)]
    first = Server(tiny_llama_dir, tmp_path, *args)
    try:
        client = _client(first)
        upload = _upload(client, lines)
        batch = client.batches.create(input_file_id=upload.id, endpoint=CHAT,
                                      completion_window="24h")  # fmt: skip
        deadline = time.monotonic() + 60
        while client.batches.retrieve(batch.id).request_counts.completed < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first.proc.kill()
        first.proc.wait(30)
        log = job_dir / "batches" / f"{batch.id}.answers.jsonl"
        assert 2 <= len(log.read_text().splitlines()) < n  # left mid-batch
    finally:
        first.close()
    second = Server(tiny_llama_dir, tmp_path, *args)
    try:
        client = _client(second)
        done = _wait(client, batch.id, ("completed",))
        assert done.request_counts.completed == n and done.error_file_id is None
        answers = _lines(client, done.output_file_id)
        assert [a["custom_id"] for a in answers] == [f"r{i}" for i in range(n)]
        for i in (0, n - 1):  # one answered before the kill, one after
            _, direct = second.request("POST", CHAT, _chat(f"Story {i}:", 60))
            assert answers[i]["response"]["body"]["choices"] == direct["choices"]
    finally:
        second.close()


DOC = "The lighthouse keeper is Ada Brennan. The ferry leaves pier 4 at seven. " * 4


def _document(client: Any) -> str:
    return str(client.files.create(file=("doc.txt", DOC.encode()), purpose="user_data").id)


def _choices(server: Server, path: str, body: dict[str, Any]) -> Any:
    status, out = server.request("POST", path, body)
    assert status == 200, out
    return out


def _parts(ref: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": "Read this:\n"}, {"type": "file", "file": ref},
            {"type": "text", "text": "\nWho keeps the light?"}]  # fmt: skip


def test_an_uploaded_document_stands_where_a_message_names_it(server: Server) -> None:
    """A file part (an upload's file_id or base64 file_data) answers as its text inlined, on
    the chat, Responses and Messages routes, /tokenize, and a QA job."""
    client = _client(server)
    file_id = _document(client)
    data = base64.b64encode(DOC.encode()).decode()
    inline = [{"role": "user", "content": f"Read this:\n{DOC}\nWho keeps the light?"}]
    want = _choices(server, CHAT, {"messages": inline, "max_tokens": 6, "temperature": 0})
    for ref in ({"file_id": file_id}, {"file_data": f"data:text/plain;base64,{data}"}):
        parts = _parts(ref)
        got = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": parts}],
            max_tokens=6,
            temperature=0,
        )
        assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
        assert got.usage is not None and got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    # /tokenize counts it as the chat route builds it
    parts = _parts({"file_id": file_id})
    counted = _choices(server, "/tokenize", {"messages": [{"role": "user", "content": parts}]})
    assert counted["count"] == want["usage"]["prompt_tokens"]
    # the Responses API's input_file part
    text = _choices(server, "/v1/responses", {"input": inline, "max_output_tokens": 6,
                                               "temperature": 0})["output"][0]  # fmt: skip
    response = client.responses.create(
        input=[{"role": "user", "content": [
            {"type": "input_text", "text": "Read this:\n"},
            {"type": "input_file", "file_id": file_id},
            {"type": "input_text", "text": "\nWho keeps the light?"}]}],
        max_output_tokens=6, temperature=0,
    )  # fmt: skip
    assert response.output_text == text["content"][0]["text"]
    # Anthropic's document block: a text source, and a file source
    question = {"type": "text", "text": "Who keeps the light?"}
    plain = _choices(server, "/v1/messages", {"max_tokens": 6, "temperature": 0, "messages": [
        {"role": "user", "content": f"Harbour notes\n\n{DOC}Who keeps the light?"}]})  # fmt: skip
    for source in ({"type": "text", "media_type": "text/plain", "data": DOC},
                   {"type": "file", "file_id": file_id}):  # fmt: skip
        block = {"type": "document", "source": source, "title": "Harbour notes"}
        got = _choices(server, "/v1/messages", {"max_tokens": 6, "temperature": 0, "messages": [
            {"role": "user", "content": [block, question]}]})  # fmt: skip
        assert got["content"] == plain["content"]

        def prompt(u: dict[str, Any]) -> int:  # input_tokens are those not cached
            return int(u["input_tokens"] + u.get("cache_read_input_tokens", 0))

        assert prompt(got["usage"]) == prompt(plain["usage"])
    # a QA job on the upload answers as one given the text
    answers = []
    for doc in ({"document": DOC}, {"document_file_id": file_id}):
        job = _choices(server, "/v1/jobs", {**doc, "questions": ["Who?"], "max_tokens": 4})
        deadline = time.monotonic() + 60
        while server.request("GET", f"/v1/jobs/{job['id']}")[1]["state"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        answers.append(server.request("GET", f"/v1/jobs/{job['id']}/result")[1]["answers"])
    assert answers[0] == answers[1]


def test_a_file_part_that_cannot_be_read_is_a_400_naming_it(server: Server) -> None:
    client = _client(server)
    binary = client.files.create(file=("x.bin", b"\xff\xfe\x00binary"), purpose="user_data").id

    def chat(ref: dict[str, Any]) -> tuple[int, Any]:
        parts = [{"type": "text", "text": "Hi"}, {"type": "file", "file": ref}]
        return server.request("POST", CHAT, {"messages": [{"role": "user", "content": parts}]})

    status, body = chat({"file_id": "file-none"})
    assert status == 404 and body["error"]["param"] == "messages.0.content.1.file.file_id"
    status, body = chat({"file_id": binary})
    assert status == 400 and "not UTF-8 text" in body["error"]["message"]
    status, body = chat({"file_data": "not base64!"})
    assert status == 400 and body["error"]["param"] == "messages.0.content.1.file.file_data"
    status, body = chat({"file_id": binary, "file_data": "eA=="})
    assert status == 400 and "one of them" in body["error"]["message"]
    status, body = server.request("POST", "/v1/responses", {"input": [{"role": "user", "content": [
        {"type": "input_file", "file_url": "https://example.com/a.pdf"}]}]})  # fmt: skip
    assert status == 400 and body["error"]["param"] == "input.0.content.0.file_url"
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                          "data": "JVBERi0="}}  # fmt: skip
    status, body = server.request("POST", "/v1/messages", {"max_tokens": 4, "messages": [
        {"role": "user", "content": [pdf]}]})  # fmt: skip
    assert status == 400 and "no PDF" in body["error"]["message"]
    status, body = server.request("POST", "/v1/jobs", {"document": "d", "document_file_id": binary,
                                                       "questions": ["q"]})  # fmt: skip
    assert status == 400 and "one of them" in body["error"]["message"], body
    status, body = server.request("POST", "/v1/jobs", {"document_file_id": "file-none",
                                                       "questions": ["q"]})  # fmt: skip
    assert status == 404 and body["error"]["param"] == "document_file_id"


def test_usage_is_accounted_to_the_key_and_a_batch_to_its_creator(server: Server) -> None:
    """`--api-keys NAME=KEY`: requests, tokens and the fair share's service per key name in
    /metrics and the access log; a batch's requests count for the key that created it (bob's
    here), not the runner's."""
    bob = openai.OpenAI(base_url=server.url + "/v1", api_key=BOB, max_retries=0)
    for i in range(2):  # (the first: alice's counters exist even when this test runs alone)
        _client(server).chat.completions.create(model=None, messages=[{"role": "user",
                                                "content": "Hi"}], max_tokens=3)  # fmt: skip
        if i == 0:
            before = server.metric('api_key_requests_total{key="alice"}')
    assert server.metric('api_key_requests_total{key="alice"}') == before + 1
    # the fair share counted alice's prompt tokens and 2 per generated token; nothing is left
    assert server.metric('api_key_fair_share_service{key="alice"}') >= 3 * 2
    assert server.metric('api_key_engine_requests{key="alice",state="running"}') == 0
    upload = _upload(bob, [_line(f"b{i}", _chat(f"Hello {i}", 4)) for i in range(2)])
    batch = bob.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
    _wait(bob, batch.id, ("completed",))
    assert server.metric('api_key_requests_total{key="bob"}') == 2
    assert server.metric('api_key_generation_tokens_total{key="bob"}') == 8
    assert server.metric('api_key_requests_total{key="alice"}') == before + 1
    server.log.flush()
    assert "key=bob" in Path(server.log.name).read_text()


def test_api_keys_take_names() -> None:
    from launch.serve import parse_api_keys

    assert parse_api_keys("k1, alice=k2,=k3,abc=") == (
        ("k1", "k2", "=k3", "abc="),
        ("key1", "alice", "key3", "key4"),
    )
    with pytest.raises(ValueError, match="names 'a' twice"):
        parse_api_keys("a=1,a=2")


def test_key_weights_parse_and_halve_a_keys_count(server: Server) -> None:
    """--key-weights alice=2: the same request counts half as much of alice's service as of
    bob's, so alice gets twice the turns; bad entries are named."""
    from launch.serve import parse_key_weights

    assert parse_key_weights(" alice=2, bob=0.5") == {"alice": 2.0, "bob": 0.5}
    for bad in ("alice", "alice=0", "alice=-1", "alice=x", "alice=inf"):
        with pytest.raises(ValueError, match="is not NAME=W"):
            parse_key_weights(bad)
    bob = openai.OpenAI(base_url=server.url + "/v1", api_key=BOB, max_retries=0)
    deltas = []
    for client, name in ((_client(server), "alice"), (bob, "bob")):
        client.completions.create(model=None, prompt="Hello", max_tokens=1)  # (the gauge)
        gauge = f'api_key_fair_share_service{{key="{name}"}}'
        before = server.metric(gauge)
        client.completions.create(model=None, prompt="Hello there", max_tokens=4,
                                  extra_body={"ignore_eos": True})  # fmt: skip
        deltas.append(server.metric(gauge) - before)
    assert deltas[1] > 0 and deltas[0] * 2 == deltas[1], deltas


def test_files_expire(server: Server) -> None:
    """Batch files are kept 30 days unless told otherwise (OpenAI's default), documents until
    deleted; `expires_after` and a batch's `output_expires_after` set it."""
    client = _client(server)
    month = 30 * 86400
    doc = client.files.create(file=("d.txt", b"text"), purpose="user_data")
    requests = _upload(client, [_line("a", _chat("x", 2))])
    soon = client.files.create(file=("s.jsonl", _line("a", _chat("x", 2)).encode()),
                               purpose="batch",
                               expires_after={"anchor": "created_at", "seconds": 3600})  # fmt: skip
    assert doc.expires_at is None and requests.expires_at == requests.created_at + month
    assert soon.expires_at == soon.created_at + 3600
    batch = client.batches.create(input_file_id=soon.id, endpoint=CHAT, completion_window="24h",
                                  output_expires_after={"anchor": "created_at",
                                                        "seconds": 7200})  # fmt: skip
    batch = _wait(client, batch.id, ("completed",))
    out = client.files.retrieve(batch.output_file_id)
    assert out.expires_at == out.created_at + 7200
    with pytest.raises(openai.BadRequestError, match="expires_after.seconds"):
        client.files.create(file=("x.jsonl", b"{}"), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 60})  # fmt: skip


def test_expired_files_are_deleted_but_not_a_running_batchs_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dist_runtime.server import batches as module

    store = module.BatchStore(tmp_path)
    for name in ("old", "in-use", "kept"):
        store.path(name).write_text(_line("a", _chat("x")) + "\n")
    store.add_file("old", "old.jsonl", "batch", 1, 3600)
    store.add_file("in-use", "in.jsonl", "batch", 1, 3600)
    store.add_file("kept", "kept.txt", "user_data", 1, None)
    assert store.create_batch("in-use", CHAT, "24h")["status"] == "in_progress"
    now = time.time()
    monkeypatch.setattr(module.time, "time", lambda: now + 7200)
    assert store.purge_expired() == 1
    assert store.file("old") is None and not store.path("old").exists()
    assert store.file("in-use") is not None and store.file("kept") is not None
    assert store.purge_expired() == 0  # (at most once a minute)


def test_a_key_sees_only_its_own_files_and_batches(server: Server) -> None:
    """With several keys each one's uploads, batches and their outputs are its own: another
    key's are absent from its lists and 404s by id (also named in a chat's file part)."""
    alice = _client(server)
    bob = openai.OpenAI(base_url=server.url + "/v1", api_key=BOB, max_retries=0)
    mine = alice.files.create(file=("doc.txt", b"Alice's notes."), purpose="user_data")
    batch = alice.batches.create(input_file_id=_upload(alice, [_line("a", _chat("x", 2))]).id,
                                 endpoint=CHAT, completion_window="24h")  # fmt: skip
    batch = _wait(alice, batch.id, ("completed",))
    assert mine.id in {f.id for f in alice.files.list()}
    assert not {mine.id, batch.output_file_id} & {f.id for f in bob.files.list()}
    assert batch.id not in {b.id for b in bob.batches.list(limit=100)}
    for call in (
        lambda: bob.files.retrieve(mine.id),
        lambda: bob.files.content(mine.id),
        lambda: bob.files.delete(batch.output_file_id),
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    parts = [{"type": "file", "file": {"file_id": mine.id}}]
    status, body = server.request("POST", CHAT, {"messages": [{"role": "user", "content": parts}]},
                                  key=BOB)  # fmt: skip
    assert status == 404 and body["error"]["param"] == "messages.0.content.0.file.file_id"
    assert alice.files.content(batch.output_file_id).text  # still the owner's


def test_a_key_sees_only_its_own_jobs(server: Server) -> None:
    """Document-QA jobs too: another key's are absent from a key's list and 404s; idempotency
    keys are per key; a job's tokens count for the key that submitted it."""
    job = {"document": "The keeper is Ada.", "questions": ["Who?"], "max_tokens": 3,
           "idempotency_key": "same-key"}  # fmt: skip
    before = server.metric('api_key_generation_tokens_total{key="alice"}')
    status, mine = server.request("POST", "/v1/jobs", job)
    assert status == 200, mine
    status, theirs = server.request("POST", "/v1/jobs", {**job, "document": "Other."}, key=BOB)
    assert status == 200 and theirs["id"] != mine["id"]  # bob's own key space: no conflict
    deadline = time.monotonic() + 60
    while server.request("GET", f"/v1/jobs/{mine['id']}")[1]["state"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    listed = {j["id"] for j in server.request("GET", "/v1/jobs", key=BOB)[1]["data"]}
    assert theirs["id"] in listed and mine["id"] not in listed
    for method, path in (("GET", f"/v1/jobs/{mine['id']}"), ("DELETE", f"/v1/jobs/{mine['id']}"),
                         ("GET", f"/v1/jobs/{mine['id']}/result")):  # fmt: skip
        assert server.request(method, path, key=BOB)[0] == 404
    assert server.request("GET", f"/v1/jobs/{mine['id']}/result")[0] == 200
    assert server.metric('api_key_generation_tokens_total{key="alice"}') >= before + 1


def test_a_key_cannot_ask_for_more_priority_than_the_server_allows(server: Server) -> None:
    """--min-priority -1: a request, beam search, job or Responses request asking for -2 is a
    400 naming priority; -1 is served."""
    client = _client(server)
    ask: dict[str, Any] = dict(model=None, messages=[{"role": "user", "content": "Hi"}],
                               max_tokens=2)  # fmt: skip
    assert client.chat.completions.create(**ask, extra_body={"priority": -1}).choices
    refused = [
        lambda: client.chat.completions.create(**ask, extra_body={"priority": -2}),
        lambda: client.completions.create(model=None, prompt="Hi", max_tokens=2, n=2,
                                          extra_body={"priority": -2, "use_beam_search": True}),
        lambda: client.responses.create(model=None, input="Hi", max_output_tokens=2,
                                        extra_body={"priority": -2}),
    ]  # fmt: skip
    for call in refused:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.body["param"] == "priority" and "--min-priority" in str(info.value)
    status, body = server.request("POST", "/v1/jobs", {"document": "d", "questions": ["q"],
                                                       "priority": -2})  # fmt: skip
    assert status == 400 and body["error"]["param"] == "priority", body


def test_service_tiers_run_a_level_apart(server: Server) -> None:
    """OpenAI's service_tier: "flex" runs a level behind interactive requests, "priority" a
    level ahead where --min-priority (-1 here) allows it, else as "default"; the response
    names the tier used, streamed chunks too, on the Responses route as well."""
    client = _client(server)
    ask: dict[str, Any] = dict(model=None, messages=[{"role": "user", "content": "Hi"}],
                               max_tokens=2)  # fmt: skip
    cases = [("flex", 0, "flex"), ("priority", 0, "priority"), ("priority", -1, "default"),
             ("auto", 0, "default"), (None, 0, "default")]  # fmt: skip
    for tier, priority, used in cases:
        out = client.chat.completions.create(**ask, service_tier=tier,  # type: ignore[arg-type]
                                             extra_body={"priority": priority})  # fmt: skip
        assert out.service_tier == used, (tier, priority)
    chunks = list(client.chat.completions.create(**ask, service_tier="flex", stream=True))
    assert {c.service_tier for c in chunks} == {"flex"}
    r = client.responses.create(model=None, input="Hi", max_output_tokens=2, service_tier="flex")
    assert r.service_tier == "flex"
