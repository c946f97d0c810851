"""CPU benchmark of the Batch API (/v1/batches): a batch against the same requests sent directly,
and interactive requests while a batch runs, at batch priority 1 (the default) and 0.

    python bench/batch_api.py [--requests 32] [--new-tokens 64] [--interactive 5] [--report PATH]

Each mode starts `launch/serve.py` on the demo model (SmolLM2-135M-Instruct, fp32, in-process
executor, prefix caching off so no request profits from another's prompt) on a free loopback
port:

* **batch**: `--requests` chat completions (different ~30-token prompts, exactly
  `--new-tokens` tokens each: greedy, EOS ignored) as one batch file: upload,
  `POST /v1/batches`, then `GET /v1/batches/{id}` every 50 ms until `completed`; the wall time
  from the upload to the status read `completed` (so up to one poll late). Before it, a
  warm-up: `--requests` other requests sent directly and a two-request batch.
* **direct**: the same requests sent at once from as many client threads; the wall time from
  the first send to the last answer. Their texts must equal the batch's output file (checked).
* **interactive during a batch**: a batch of 4 x `--requests` such requests is created; 1 s
  later, while its requests fill the engine's `max_num_seqs` (64) and more wait,
  `--interactive` chat requests (8 tokens each) are sent at once; their latency (send to whole
  answer) p50 and max. Run with
  `--batch-priority 1` (interactive requests at 0 go first, preempting batch requests) and
  `--batch-priority 0` (first come, first served).

One summary line; `--report` writes markdown.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_report_header  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, model: Path, work: Path, *extra: str):
        self.port = free_port()
        log = work / f"server-{self.port}.log"
        config = work / "no_prefix_cache.yaml"  # no request profits from another's prompt
        config.write_text("cache:\n  enable_prefix_caching: false\n")
        args = [
            sys.executable, str(REPO_ROOT / "launch" / "serve.py"), "--model", str(model),
            "--device", "cpu", "--dtype", "float32", "--session-len", "1024",
            "--config", str(config), "--port", str(self.port), "--log-level", "WARNING",
            "--job-dir", str(work / f"jobs-{self.port}"), *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start")

    def request(
        self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json"
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request(method, path, body, {"Content-Type": ctype} if body is not None else {})
        r = conn.getresponse()
        raw = r.read()
        conn.close()
        try:
            return r.status, json.loads(raw)
        except json.JSONDecodeError:
            return r.status, raw.decode()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, out = self.request("POST", path, json.dumps(body).encode())
        if status != 200:
            raise SystemExit(f"POST {path}: HTTP {status}: {str(out)[:300]}")
        return dict(out)

    def upload(self, lines: list[str]) -> str:
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="requests.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n'
            ).encode()
            + ("\n".join(lines) + "\n").encode()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        status, out = self.request(
            "POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}"
        )
        if status != 200:
            raise SystemExit(f"upload: HTTP {status}: {str(out)[:300]}")
        return str(out["id"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def chat(text: str, tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True}  # fmt: skip


def prompt(i: int) -> str:
    return f"Request {i}: describe pier {i} of the harbour in some detail."


def run_batch(server: Server, bodies: list[dict[str, Any]]) -> tuple[str, float]:
    """Upload and create a batch; (batch id, seconds from the upload to the create)."""
    lines = [
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": body})
        for i, body in enumerate(bodies)
    ]  # fmt: skip
    start = time.perf_counter()
    file_id = server.upload(lines)
    batch = server.post(
        "/v1/batches",
        {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
         "completion_window": "24h"},
    )  # fmt: skip
    return str(batch["id"]), time.perf_counter() - start


def wait_batch(server: Server, batch_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        _, batch = server.request("GET", f"/v1/batches/{batch_id}")
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return dict(batch)
        time.sleep(0.05)
    raise SystemExit(f"batch {batch_id} did not end")


def direct(server: Server, bodies: list[dict[str, Any]]) -> tuple[float, list[str]]:
    """Every request at once from its own thread: (wall seconds, texts)."""
    texts: list[str] = [""] * len(bodies)

    def one(i: int) -> None:
        out = server.post("/v1/chat/completions", bodies[i])
        texts[i] = out["choices"][0]["message"]["content"]

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, texts


def direct_and_batch(server: Server, n: int, tokens: int) -> dict[str, Any]:
    bodies = [chat(prompt(i), tokens) for i in range(n)]
    direct(server, [chat(prompt(n + i), tokens) for i in range(n)])  # warm-up at full size
    wait_batch(server, run_batch(server, [chat("warm up", 4)] * 2)[0])  # the batch path too
    start = time.perf_counter()
    batch_id, _ = run_batch(server, bodies)
    batch = wait_batch(server, batch_id)
    took = time.perf_counter() - start
    if batch["status"] != "completed" or batch["request_counts"]["completed"] != n:
        raise SystemExit(f"the batch ended {batch['status']}: {batch['request_counts']}")
    _, raw = server.request("GET", f"/v1/files/{batch['output_file_id']}/content")
    answers = [json.loads(x) for x in raw.splitlines()]
    got = [a["response"]["body"]["choices"][0]["message"]["content"] for a in answers]
    wall, texts = direct(server, bodies)
    if got != texts:
        raise SystemExit("the batch's answers differ from the direct ones")
    return {"direct_s": wall, "batch_s": took, "tokens": n * tokens}


def interactive_during_batch(server: Server, n: int, tokens: int, asks: int) -> dict[str, Any]:
    batch_id, _ = run_batch(server, [chat(prompt(1000 + i), tokens) for i in range(4 * n)])
    time.sleep(1.0)
    waits = [0.0] * asks

    def ask(i: int) -> None:
        start = time.perf_counter()
        server.post("/v1/chat/completions", chat(f"Quick question {i}: where is pier {i}?", 8))
        waits[i] = time.perf_counter() - start

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(asks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batch = wait_batch(server, batch_id)
    return {"p50": statistics.median(waits), "max": max(waits), "status": batch["status"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--interactive", type=int, default=5)
    p.add_argument("--report", type=Path)
    args = p.parse_args()
    model = demo_model_path()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="batch_bench_") as tmp:
        work = Path(tmp)
        server = Server(model, work)
        try:
            results["throughput"] = direct_and_batch(server, args.requests, args.new_tokens)
            results["priority 1"] = interactive_during_batch(
                server, args.requests, args.new_tokens, args.interactive
            )
        finally:
            server.close()
        server = Server(model, work, "--batch-priority", "0")
        try:
            results["priority 0"] = interactive_during_batch(
                server, args.requests, args.new_tokens, args.interactive
            )
        finally:
            server.close()
    t = results["throughput"]
    direct_tps, batch_tps = t["tokens"] / t["direct_s"], t["tokens"] / t["batch_s"]
    hi, lo = results["priority 1"], results["priority 0"]
    summary = (
        f"batch_api: {args.requests} requests x {args.new_tokens} tokens: batch "
        f"{batch_tps:.0f} tok/s vs direct {direct_tps:.0f} tok/s ({batch_tps / direct_tps:.2f}x); "
        f"interactive during a batch p50 {hi['p50']:.2f} s at batch priority 1 vs "
        f"{lo['p50']:.2f} s at 0"
    )
    print(summary)
    if args.report:
        import torch

        lines = cpu_report_header("Batch API on CPU", summary, torch.get_num_threads())
        lines += [
            "",
            "| run | wall s | output tok/s |",
            "|---|---:|---:|",
            f"| direct ({args.requests} client threads) | {t['direct_s']:.2f} | {direct_tps:.0f} |",
            f"| one batch (upload to `completed`) | {t['batch_s']:.2f} | {batch_tps:.0f} |",
            "",
            f"{args.interactive} interactive chat requests (8 tokens) sent at once while a "
            f"batch of {4 * args.requests} requests runs:",
            "",
            "| batch priority | latency p50 s | max s |",
            "|---|---:|---:|",
            f"| 1 (default) | {hi['p50']:.2f} | {hi['max']:.2f} |",
            f"| 0 | {lo['p50']:.2f} | {lo['max']:.2f} |",
            "",
        ]
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
