"""Streams kept alive while they wait (a long prefill before the first token): SSE comments
(Anthropic's ping on /v1/messages) between events, and a closed stream closes what it wraps."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from dist_runtime import Runtime
from dist_runtime.server.app import ServerSettings, create_app
from dist_runtime.server.calls import SSE_COMMENT, keep_alive


def test_pings_fill_the_silences_and_closing_closes_the_body() -> None:
    closed: list[bool] = []

    async def slow() -> Any:
        try:
            yield "a"
            await asyncio.sleep(0.25)
            yield "b"
            await asyncio.sleep(10)  # the client leaves while this waits
            yield "never"
        finally:
            closed.append(True)

    async def run() -> list[str]:
        got = []
        stream = keep_alive(slow(), 0.05)
        async for event in stream:
            got.append(event)
            if event == "b":
                for _ in range(2):  # pings while the body waits
                    got.append(await stream.__anext__())
                await stream.aclose()  # as Starlette does when the client disconnects
                break
        return got

    got = asyncio.run(run())
    assert got[0] == "a" and got[-3] == "b" and got[-2:] == [SSE_COMMENT] * 2
    assert 2 <= got.count(SSE_COMMENT) - 2 <= 8  # about 0.25 s / 0.05 s between a and b
    assert closed == [True]


async def _stream(app: Any, path: str, body: dict[str, Any]) -> str:
    """A streamed POST through the ASGI app; the raw SSE text."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 0),
             "server": ("127.0.0.1", 0),
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())]}  # fmt: skip
    sent: list[bytes] = []
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not sent:
            sent.append(b"")
            return {"type": "http.request", "body": raw, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    parts: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    await app(scope, receive, send)
    return b"".join(parts).decode()


def test_a_kept_alive_stream_still_parses(tiny_llama_dir: Path) -> None:
    """With a keep-alive every millisecond, the events between the comments are the stream's
    own: their content equals the answer, and /v1/messages pings as Anthropic does."""
    with Runtime(model=str(tiny_llama_dir), session_len=256, device="cpu",
                 dtype="float32") as rt:  # fmt: skip
        app = create_app(rt, ServerSettings(served_model_name="m", sse_keepalive_s=0.001))
        ask = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40,
               "temperature": 0, "ignore_eos": True}  # fmt: skip
        text = asyncio.run(_stream(app, "/v1/chat/completions", {**ask, "stream": True}))
        whole = asyncio.run(_stream(app, "/v1/chat/completions", ask))
        messages = asyncio.run(_stream(app, "/v1/messages", {
            "messages": ask["messages"], "max_tokens": 40, "stream": True}))  # fmt: skip
    events = [e for e in text.split("\n\n") if e]
    data = [e.removeprefix("data: ") for e in events if not e.startswith(":")]
    assert data[-1] == "[DONE]"
    content = "".join(json.loads(d)["choices"][0]["delta"].get("content") or ""
                      for d in data[:-1])  # fmt: skip
    assert content == json.loads(whole)["choices"][0]["message"]["content"]
    assert all(e == SSE_COMMENT.strip() for e in events if e.startswith(":"))
    kinds = [e.split("\n")[0] for e in messages.split("\n\n") if e]
    assert kinds[0] == "event: message_start" and kinds[-1] == "event: message_stop"
    assert set(kinds) <= {"event: message_start", "event: content_block_start", "event: ping",
                          "event: content_block_delta", "event: content_block_stop",
                          "event: message_delta", "event: message_stop"}  # fmt: skip
