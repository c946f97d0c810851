"""CPU load benchmark of the HTTP server against the in-process Python API on the same requests.

    python bench/serve_load.py [--clients 1,8,32] [--new-tokens 64] [--rounds 2] [--report PATH]

For each N in `--clients`: N client threads each make `--rounds` streaming requests one after
another (different ~20-token prompts, exactly `--new-tokens` tokens each: greedy, EOS ignored).

* **HTTP**: `launch/serve.py` on the demo model in a subprocess on a free loopback port (fp32,
  in-process executor, default settings); each client streams `POST /v1/completions` over
  `http.client` (SSE parsed by hand, so the client costs little CPU) and stamps the first
  content chunk (time to first token).
* **Python API**: a Runtime with the same settings in this process, started after the server
  stopped (the two never share the cores); N client coroutines on one asyncio loop (as the
  server reads its handles) call `rt.add_requests` and `async for` over the handle, stamping
  the first delta. (Threads reading handles instead would contend for the GIL with the engine
  thread and make this baseline slower than the server.)

Reported per N and system: requests/s and output tokens/s over the wall time from the first
request to the last, and TTFT p50 / p99 over all requests. The overhead of HTTP is
1 - HTTP tokens/s / API tokens/s. A warm-up request precedes each system's runs. The greedy
texts of both systems must be equal (checked). One summary line; --report writes markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import json
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.machine import code_version, cpu_model, usable_cores  # noqa: E402
from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SESSION_LEN = 1024

Result = tuple[float, str]
"""(seconds to the first token, the text)."""


def prompt(client: int, round_: int) -> str:
    return f"Client {client}, question {round_}: describe pier {client * 3 + round_} in detail."


def run_load(n: int, rounds: int, one: Callable[[str], Result]) -> dict[str, object]:
    results: dict[tuple[int, int], Result] = {}
    barrier = threading.Barrier(n + 1)

    def client(i: int) -> None:
        barrier.wait()
        for r in range(rounds):
            results[i, r] = one(prompt(i, r))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(v[0] for v in results.values())
    return {
        "wall": wall,
        "ttfts": ttfts,
        "texts": {k: v[1] for k, v in results.items()},
    }


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


# -- HTTP ---------------------------------------------------------------------------------------
def start_server(model: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    args = [
        sys.executable, str(REPO_ROOT / "launch" / "serve.py"), "--model", str(model),
        "--device", "cpu", "--dtype", "float32", "--session-len", str(SESSION_LEN),
        "--port", str(port), "--log-level", "WARNING", "--max-concurrent-requests", "1024",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def http_request(port: int, new_tokens: int) -> Callable[[str], Result]:
    def one(text: str) -> Result:
        body = json.dumps(
            {"prompt": text, "max_tokens": new_tokens, "temperature": 0, "stream": True,
             "ignore_eos": True}
        )  # fmt: skip
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status}: {response.read()[:300]!r}")
        first, parts = None, []
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0]["text"]
            if piece and first is None:
                first = time.perf_counter() - start
            parts.append(piece)
        conn.close()
        return (first if first is not None else time.perf_counter() - start), "".join(parts)

    return one


# -- Python API -------------------------------------------------------------------------------
def run_api_load(rt: Runtime, n: int, rounds: int, new_tokens: int) -> dict[str, object]:
    """N client coroutines on one event loop (as the server reads its handles), each making
    `rounds` streaming requests one after another through `rt.add_requests`."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    results: dict[tuple[int, int], Result] = {}

    async def one(text: str) -> Result:
        start = time.perf_counter()
        (handle,) = rt.add_requests([text], params)
        first, parts = None, []
        async for delta in handle:
            if delta.text and first is None:
                first = time.perf_counter() - start
            parts.append(delta.text)
        return (first if first is not None else time.perf_counter() - start), "".join(parts)

    async def client(i: int) -> None:
        for r in range(rounds):
            results[i, r] = await one(prompt(i, r))

    async def all_clients() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(n)))
        return time.perf_counter() - start

    wall = asyncio.run(all_clients())
    return {
        "wall": wall,
        "ttfts": sorted(v[0] for v in results.values()),
        "texts": {k: v[1] for k, v in results.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=usable_cores())
    p.add_argument("--report", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    model = demo_model_path()
    rows: dict[str, dict[int, dict[str, object]]] = {"HTTP": {}, "API": {}}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = start_server(model, port, log)
    try:
        one = http_request(port, args.new_tokens)
        one("warm-up")
        for n in clients:
            rows["HTTP"][n] = run_load(n, args.rounds, one)
            print(f"HTTP {n} clients: {rows['HTTP'][n]['wall']:.1f} s", flush=True)
    finally:
        server.terminate()
        server.wait(60)
    with Runtime(model=str(model), device="cpu", dtype="float32", session_len=SESSION_LEN) as rt:
        run_api_load(rt, 1, 1, args.new_tokens)  # warm-up
        for n in clients:
            rows["API"][n] = run_api_load(rt, n, args.rounds, args.new_tokens)
            print(f"API  {n} clients: {rows['API'][n]['wall']:.1f} s", flush=True)
    report(args, clients, rows)


def report(
    args: argparse.Namespace, clients: list[int], rows: dict[str, dict[int, dict[str, object]]]
) -> None:
    lines, summary = [], []
    for n in clients:
        h, a = rows["HTTP"][n], rows["API"][n]
        if h["texts"] != a["texts"]:
            raise SystemExit(f"{n} clients: HTTP and API texts differ")
        cells = {}
        for name, r in (("HTTP", h), ("API", a)):
            requests = n * args.rounds
            wall = float(r["wall"])  # type: ignore[arg-type]
            ttfts: list[float] = r["ttfts"]  # type: ignore[assignment]
            cells[name] = (requests / wall, requests * args.new_tokens / wall, ttfts)
            lines.append(
                f"| {n} | {name} | {requests / wall:.2f} | {requests * args.new_tokens / wall:.1f}"
                f" | {pct(ttfts, 0.5) * 1e3:.0f} | {pct(ttfts, 0.99) * 1e3:.0f} |"
            )
        overhead = 1 - cells["HTTP"][1] / cells["API"][1]
        lines.append(f"| {n} | HTTP overhead | | {overhead * 100:+.1f}% | | |")
        summary.append(f"{n}: {overhead * 100:+.1f}%")
    line = (
        f"serve load: HTTP throughput overhead vs the Python API by clients "
        f"{', '.join(summary)} ({args.new_tokens} tokens/request, streamed); texts identical"
    )
    print(line)
    if args.report:
        args.report.write_text(
            f"# HTTP server load on CPU, {datetime.date.today()}\n\n"
            f"`python bench/serve_load.py {' '.join(sys.argv[1:])}`\n\n"
            f"- code: {code_version()}\n- CPU: {cpu_model()}, {usable_cores()} usable cores\n"
            f"- torch {torch.__version__}, Python {platform.python_version()}; demo model "
            "SmolLM2-135M-Instruct fp32, in-process executor, default cache settings, session "
            f"{SESSION_LEN}\n- {args.rounds} streaming requests per client, one after another\n\n"
            "| clients | system | requests/s | output tokens/s | TTFT p50 (ms) | TTFT p99 (ms) |"
            "\n|---|---|---|---|---|---|\n" + "\n".join(lines) + f"\n\n{line}\n"
        )


if __name__ == "__main__":
    main()
