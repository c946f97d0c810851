"""The /v1/batches runner against a scripted ASGI app (no model): busy answers tried again,
server errors kept as answers at the end, the priority offset, a stop that leaves the batch for
the next runner, and a torn answer log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dist_runtime.server import batches as batches_module
from dist_runtime.server.batches import BatchRunner, BatchStore

CHAT = "/v1/chat/completions"


class ScriptedApp:
    """An ASGI app answering each POST with `reply(custom body) -> (status, body)`; a reply of
    None holds the request until the client disconnects (then 499)."""

    def __init__(self, reply: Callable[[dict[str, Any]], tuple[int, dict[str, Any]] | None]):
        self.reply = reply
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = json.loads((await receive())["body"])
        self.seen.append(body)
        answer = self.reply(body)
        if answer is None:
            while (await receive())["type"] != "http.disconnect":
                pass
            answer = (499, {"error": {"message": "the client disconnected"}})
        status, out = answer
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(out).encode()})


def _store(tmp_path: Path, n: int, window: str = "24h") -> tuple[BatchStore, str]:
    store = BatchStore(tmp_path / "batches")
    lines = [
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT,
                    "body": {"messages": [], "n_": i}})
        for i in range(n)
    ]  # fmt: skip
    store.path("file-in").write_text("\n".join(lines) + "\n")
    store.add_file("file-in", "in.jsonl", "batch", 0)
    batch = store.create_batch("file-in", CHAT, window)
    assert batch["status"] == "in_progress"
    return store, batch["id"]


def _ok(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return 200, {"id": f"chatcmpl-{body['n_']}", "usage": {"prompt_tokens": 3,
                                                         "completion_tokens": 2}}  # fmt: skip


async def _run(runner: BatchRunner, batch_id: str) -> None:
    runner.start(batch_id)
    await asyncio.wait_for(runner._tasks[batch_id], timeout=30)


def _answers(store: BatchStore, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in store.path(file_id).read_text().splitlines()]


def test_busy_answers_are_tried_again_and_server_errors_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batches_module, "RETRY_SECONDS", (0.01, 0.02))
    store, batch_id = _store(tmp_path, 4)
    tries: dict[int, int] = {}

    def reply(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        n = body["n_"]
        tries[n] = tries.get(n, 0) + 1
        if n == 1 and tries[n] <= 2:
            return 429, {"error": {"message": "busy"}}
        if n == 2 and tries[n] == 1:
            return 503, {"error": {"message": "engine restarting"}}
        if n == 3:
            return 500, {"error": {"message": "internal server error"}}
        return _ok(body)

    app = ScriptedApp(reply)
    answered: list[int] = []
    runner = BatchRunner(store, app, [(b"authorization", b"Bearer k")], 2, 5, answered.append)
    asyncio.run(_run(runner, batch_id))
    assert tries == {0: 1, 1: 3, 2: 2, 3: 1}
    assert all(b["priority"] == 5 for b in app.seen)  # the batch priority offset
    batch = store.batch(batch_id)
    assert batch is not None and batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert [a["custom_id"] for a in _answers(store, batch["output_file_id"])] == ["r0", "r1", "r2"]
    errors = _answers(store, batch["error_file_id"])
    assert [(a["custom_id"], a["response"]["status_code"]) for a in errors] == [("r3", 500)]
    assert sorted(answered) == [200, 200, 200, 500]
    assert batch["usage"]["input_tokens"] == 9 and batch["usage"]["output_tokens"] == 6
    assert not store.log_path(batch_id).exists()


def test_a_stopped_runner_leaves_the_batch_to_the_next(tmp_path: Path) -> None:
    store, batch_id = _store(tmp_path, 6)
    # the first runner answers r0 and r1, then holds r2 until it is stopped
    first = ScriptedApp(lambda b: _ok(b) if b["n_"] < 2 else None)

    async def stop_midway() -> None:
        runner = BatchRunner(store, first, [], 1, 0)
        runner.start(batch_id)
        while len(first.seen) < 3:
            await asyncio.sleep(0.01)
        await runner.stop()

    asyncio.run(stop_midway())
    batch = store.batch(batch_id)
    assert batch is not None and batch["status"] == "in_progress"
    assert batch["request_counts"]["completed"] == 2
    log = store.log_path(batch_id)
    kept = log.read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in kept] == ["r0", "r1"]
    log.write_text(kept[0] + "\n" + kept[1][:15])  # the process died writing r1's line
    second = ScriptedApp(_ok)
    store.close()
    store = BatchStore(tmp_path / "batches")
    asyncio.run(_run(BatchRunner(store, second, [], 2, 0), batch_id))
    assert sorted(b["n_"] for b in second.seen) == [1, 2, 3, 4, 5]  # r0 is not run again
    batch = store.batch(batch_id)
    assert batch is not None and batch["status"] == "completed"
    answers = _answers(store, batch["output_file_id"])
    assert [a["custom_id"] for a in answers] == [f"r{i}" for i in range(6)]
    assert answers[0] == json.loads(kept[0])


def test_a_batch_found_past_its_window_expires_without_running(tmp_path: Path) -> None:
    store, batch_id = _store(tmp_path, 3, window="1s")
    store.update(batch_id, lambda b: b.update(expires_at=b["created_at"] - 1))
    app = ScriptedApp(_ok)
    asyncio.run(_run(BatchRunner(store, app, [], 2, 0), batch_id))
    batch = store.batch(batch_id)
    assert batch is not None and batch["status"] == "expired" and not app.seen
    errors = _answers(store, batch["error_file_id"])
    assert [a["error"]["code"] for a in errors] == ["batch_expired"] * 3
    assert batch["output_file_id"] is None


def test_a_missing_input_file_fails_the_batch(tmp_path: Path) -> None:
    store, batch_id = _store(tmp_path, 2)
    store.path("file-in").unlink()  # behind the server's back
    asyncio.run(_run(BatchRunner(store, ScriptedApp(_ok), [], 2, 0), batch_id))
    batch = store.batch(batch_id)
    assert batch is not None and batch["status"] == "failed"
    assert batch["errors"]["data"][0]["code"] == "input_file_missing"


def test_an_answer_that_cannot_be_recorded_stops_the_batch_for_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk, say: the batch stops unfinished (not `expired`), and the next runner
    answers the rest."""
    import sqlite3

    store, batch_id = _store(tmp_path, 4)
    update = store.update
    calls = {"n": 0}

    def failing(batch: str, change: Any, files: Any = (), durable: bool = True) -> Any:
        calls["n"] += 1
        if not durable and calls["n"] > 2:  # the second answer's counter
            raise sqlite3.OperationalError("database or disk is full")
        return update(batch, change, files, durable)

    monkeypatch.setattr(store, "update", failing)
    asyncio.run(_run(BatchRunner(store, ScriptedApp(_ok), [], 1, 0), batch_id))
    batch = store.batch(batch_id)
    assert batch is not None and batch["status"] == "in_progress"
    monkeypatch.setattr(store, "update", update)
    asyncio.run(_run(BatchRunner(store, ScriptedApp(_ok), [], 1, 0), batch_id))
    batch = store.batch(batch_id)
    assert batch is not None and batch["status"] == "completed"
    answers = _answers(store, batch["output_file_id"])
    assert [a["custom_id"] for a in answers] == [f"r{i}" for i in range(4)]


def test_a_keys_files_are_held_to_its_quota(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """--max-files-gb-per-key: an upload that would take the key past it is a 413 (and not
    kept); another key has its own room."""
    import uuid

    from dist_runtime import Runtime
    from dist_runtime.server.app import ServerSettings, create_app
    from dist_runtime.server.batch_lines import call

    def upload(app: Any, key: str, size: int) -> tuple[int, Any]:
        boundary = uuid.uuid4().hex
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data'
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="d.txt"\r\n\r\n{"x" * size}\r\n--{boundary}--\r\n'
        ).encode()
        form = f"multipart/form-data; boundary={boundary}".encode()
        headers = [(b"authorization", f"Bearer {key}".encode()), (b"content-type", form)]
        status, raw = asyncio.run(call(app, "/v1/files", body, headers))
        return status, json.loads(raw)

    with Runtime(model=str(tiny_llama_dir), session_len=128, device="cpu",
                 job_dir=str(tmp_path / "jobs")) as rt:  # fmt: skip
        settings = ServerSettings(
            served_model_name="m",
            api_keys=("ka", "kb"),
            api_key_names=("a", "b"),
            max_files_bytes_per_key=1000,
        )
        app = create_app(rt, settings)
        assert upload(app, "ka", 600)[0] == 200
        status, err = upload(app, "ka", 600)
        assert status == 413 and err["error"]["code"] == "storage_limit_exceeded"
        assert "--max-files-gb-per-key" in err["error"]["message"]
        assert upload(app, "kb", 600)[0] == 200  # b's own room
        store = app.state.batches.store
        assert [f["bytes"] for f in store.files(None, "a")] == [600]  # the refused one is gone
        assert len(list(store.files_dir.iterdir())) == 2


def test_a_key_is_held_to_its_share_of_the_requests(tiny_llama_dir: Path) -> None:
    """--max-concurrent-requests-per-key: a key with its requests in flight gets a 429 for
    more; another key still gets in."""
    from dist_runtime import Runtime
    from dist_runtime.server.app import ServerSettings, create_app
    from dist_runtime.server.batch_lines import call

    def ask(key: str, tokens: int) -> Any:
        body = json.dumps({"prompt": "x", "max_tokens": tokens, "ignore_eos": True}).encode()
        return call(app, "/v1/completions", body, [(b"authorization", f"Bearer {key}".encode())])

    with Runtime(model=str(tiny_llama_dir), session_len=512, device="cpu") as rt:
        settings = ServerSettings(served_model_name="m", api_keys=("ka", "kb"),
                                  max_concurrent_requests_per_key=1)  # fmt: skip
        app = create_app(rt, settings)

        async def run() -> list[int]:
            long = asyncio.ensure_future(ask("ka", 400))
            while not app.state.server.in_flight_by.get("key1"):
                await asyncio.sleep(0.001)
            second, other = await asyncio.gather(ask("ka", 2), ask("kb", 2))
            first = await long
            return [first[0], second[0], other[0]]

        assert asyncio.run(run()) == [200, 429, 200]
        assert app.state.server.in_flight_by == {}


def test_lines_split_at_newlines_only(tmp_path: Path) -> None:
    """A request or answer holding U+2028 (written raw, as json.dumps(ensure_ascii=False) does)
    is one line, not two."""
    from dist_runtime.server.batch_lines import keep_answers, read_answers

    store = BatchStore(tmp_path / "batches")
    body = {"messages": [{"role": "user", "content": "a\u2028b"}]}
    line = json.dumps({"custom_id": "r0", "url": CHAT, "body": body}, ensure_ascii=False)
    store.path("file-in").write_text(line + "\n", encoding="utf-8")
    store.add_file("file-in", "in.jsonl", "batch", 0)
    batch = store.create_batch("file-in", CHAT, "24h")
    assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 1
    log = tmp_path / "answers.jsonl"
    answer = {"custom_id": "r0", "response": {"status_code": 200, "body": {"text": "x\u2028y"}}}
    log.write_text(json.dumps(answer, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_answers(log) == {"r0": answer} == keep_answers(log)
    assert log.read_text(encoding="utf-8").count("\n") == 1  # nothing rewritten
