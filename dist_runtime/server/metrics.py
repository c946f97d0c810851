"""Prometheus metrics, read from the engine's counters and observed as its requests end.

Names follow vLLM's (`vllm:num_requests_running` ...) under a `dist_runtime:` prefix, so
existing dashboards need only the prefix changed. Gauges and totals are read from
`Engine.stats()` at scrape time; latency histograms are filled by an engine finish listener, on
the engine thread, from each handle's timestamps. Handlers compute nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dist_runtime.engine.engine import Engine
from dist_runtime.engine.handle import RequestHandle
from dist_runtime.engine.outputs import RequestOutput

P = "dist_runtime:"

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TOKEN_COUNT_BUCKETS = tuple(float(2**k) for k in range(0, 21, 2))
"""1, 4, 16, ... 1,048,576 tokens."""
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)


class _EngineCollector(Collector):
    def __init__(self, engine: Engine, job_counts: Callable[[], dict[str, int]] | None):
        self.engine = engine
        self.job_counts = job_counts
        self.batch_counts: Callable[[], dict[str, int]] = dict

    def collect(self) -> Iterator[Any]:
        s = self.engine.stats()
        used = s["num_blocks"] - s["num_free_blocks"]
        gauges = {
            "num_requests_running": ("Requests in the engine's running batch", s["num_running"]),
            "num_requests_waiting": ("Requests waiting to be admitted", s["num_waiting"]),
            "kv_cache_usage_perc": (
                "Fraction of KV blocks in use (1 = full)",
                used / s["num_blocks"] if s["num_blocks"] else 0.0,
            ),
            "kv_cache_used_blocks": ("KV blocks held by requests", used),
            "disk_kv_blocks": (
                "KV blocks the disk tier of the prefix cache holds",
                s["disk_kv_blocks"],
            ),
            "engine_alive": ("1 while the engine runs", float(self.engine.is_alive)),
            "engine_replacing_workers": (
                "1 while the engine replaces a failed worker group (requests wait)",
                float(self.engine.replacing_workers),
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(P + name, doc, value=value)
        counters = {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache", "queries"),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache", "hits"),
            "prefix_cache_host_hits": (
                "Prompt tokens copied back from the host tier of the prefix cache",
                "host_hits",
            ),
            "host_kv_saved_blocks": (
                "KV blocks copied to the host tier as the device cache evicted them",
                "saved",
            ),
            "prefix_cache_disk_hits": (
                "Prompt tokens read back from the disk tier of the prefix cache",
                "disk_hits",
            ),
            "disk_kv_saved_blocks": ("KV blocks written to the disk tier", "disk_saved"),
            "disk_kv_adopted_blocks": (
                "KV blocks found in the disk tier that another runtime on the directory wrote",
                "disk_adopted",
            ),
            "disk_kv_shared_evicted_blocks": (
                "KV blocks other runtimes on the disk tier's directory wrote, deleted to keep "
                "it within this runtime's bound",
                "disk_shared_evicted",
            ),
            "disk_kv_unread_blocks": (
                "KV blocks whose disk-tier file failed its check when read back (computed again)",
                "disk_unread",
            ),
            "prompt_tokens_computed": ("Prompt tokens the workers computed", "computed"),
            "generation_tokens": ("Tokens generated", "generated"),
            "num_preemptions": ("Sequences preempted (recomputed later)", "preemptions"),
            "worker_restarts": (
                "Worker groups replaced after a worker died or hung",
                "restarts",
            ),
            "requests_resumed": (
                "Running requests that went on after a worker failure (recomputed on the new "
                "workers)",
                "resumed",
            ),
            "steps_retried": (
                "Steps that failed with their workers alive (their requests computed them again)",
                "retried",
            ),
            "engine_steps": ("Engine steps run", "steps"),
            "spec_decode_num_draft_tokens": (
                "Draft tokens checked (speculative decoding by prompt lookup)",
                "drafted",
            ),
            "spec_decode_num_accepted_tokens": ("Draft tokens the model kept", "accepted"),
        }
        values = {
            "queries": s["prefix_cache_queried_tokens"],
            "hits": s["prefix_cache_hit_tokens"],
            "host_hits": s["prefix_cache_host_hit_tokens"],
            "saved": s["host_kv_saved_blocks"],
            "disk_hits": s["prefix_cache_disk_hit_tokens"],
            "disk_saved": s["disk_kv_saved_blocks"],
            "disk_unread": s["disk_kv_unread_blocks"],
            "disk_adopted": s["disk_kv_adopted_blocks"],
            "disk_shared_evicted": s["disk_kv_shared_evicted_blocks"],
            "computed": s["num_prompt_tokens_computed"],
            "generated": s["num_generated_tokens"],
            "preemptions": s["num_preemptions"],
            "restarts": s["num_worker_restarts"],
            "resumed": s["num_resumed_requests"],
            "retried": s["num_retried_steps"],
            "steps": s["num_steps"],
            "drafted": s["num_draft_tokens"],
            "accepted": s["num_accepted_tokens"],
        }
        for name, (doc, key) in counters.items():
            yield CounterMetricFamily(P + name, doc, value=values[key])
        adapters = self.engine.adapter_stats()
        if adapters or self.engine.config.max_loras is not None:
            yield GaugeMetricFamily(
                P + "lora_adapters_loaded", "LoRA adapters loaded", value=len(adapters)
            )
            slots = self.engine.config.max_loras or len(self.engine.config.lora_modules)
            yield GaugeMetricFamily(P + "lora_slots", "LoRA adapter slots per worker", value=slots)
            yield CounterMetricFamily(
                P + "lora_adapter_loads",
                "LoRA adapters loaded into a slot while running (on demand or by request)",
                value=self.engine.num_adapter_loads,
            )
            requests = GaugeMetricFamily(
                P + "lora_requests",
                "Requests of each LoRA adapter, running or waiting",
                labels=["adapter", "state"],
            )
            for name, (running, waiting) in sorted(adapters.items()):
                requests.add_metric([name, "running"], running)
                requests.add_metric([name, "waiting"], waiting)
            yield requests
        tenants = self.engine.tenant_stats()
        if tenants:
            in_engine = GaugeMetricFamily(
                P + "api_key_engine_requests",
                "Requests of each API key in the engine, running or waiting",
                labels=["key", "state"],
            )
            service = GaugeMetricFamily(
                P + "api_key_fair_share_service",
                "Service the fair share counted for each API key: prompt tokens computed plus 2 "
                "per generated token, lifted to the least served active key's on a return from "
                "idle (the key with the least goes next among one priority)",
                labels=["key"],
            )
            for name, (running, waiting, served) in sorted(tenants.items()):
                in_engine.add_metric([name, "running"], running)
                in_engine.add_metric([name, "waiting"], waiting)
                service.add_metric([name], served)
            yield in_engine
            yield service
        batch_counts = self.batch_counts()
        if batch_counts:
            batches = GaugeMetricFamily(
                P + "batches", "Batches (/v1/batches) by status", labels=["status"]
            )
            for status, count in sorted(batch_counts.items()):
                batches.add_metric([status], count)
            yield batches
        if self.job_counts is not None:
            jobs = GaugeMetricFamily(
                P + "jobs", "Jobs in the durable queue by state", labels=["state"]
            )
            for state, count in sorted(self.job_counts().items()):
                jobs.add_metric([state], count)
            yield jobs


class ServerMetrics:
    """A registry of the engine's metrics; `render()` is the /metrics body."""

    def __init__(self, engine: Engine, job_counts: Callable[[], dict[str, int]] | None = None):
        self.registry = CollectorRegistry()
        self._collector = _EngineCollector(engine, job_counts)
        self.registry.register(self._collector)
        self.ttft = Histogram(
            P + "time_to_first_token_seconds",
            "Seconds from a request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            P + "time_per_output_token_seconds",
            "Seconds per output token after the first",
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds",
            "Seconds from a request's arrival to its end",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            P + "request_queue_time_seconds",
            "Seconds a request waited before its first step",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prefill_time = Histogram(
            P + "request_prefill_time_seconds",
            "Seconds from a request's first step to its first token (its prefill)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decode_time = Histogram(
            P + "request_decode_time_seconds",
            "Seconds from a request's first token to its end",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_prompt_tokens = Histogram(
            P + "request_prompt_tokens",
            "Prompt tokens of ended requests",
            buckets=TOKEN_COUNT_BUCKETS,
            registry=self.registry,
        )
        self.request_generation_tokens = Histogram(
            P + "request_generation_tokens",
            "Tokens generated by ended requests",
            buckets=TOKEN_COUNT_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            P + "prompt_tokens", "Prompt tokens of ended requests", registry=self.registry
        )
        self.success = Counter(
            P + "request_success",
            "Requests ended, by finish reason ('error' for failed ones)",
            ["finished_reason"],
            registry=self.registry,
        )
        self.key_requests = Counter(
            P + "api_key_requests",
            "Requests ended, by the API key they came with (--api-keys NAME=KEY names it)",
            ["key"],
            registry=self.registry,
        )
        self.key_prompt_tokens = Counter(
            P + "api_key_prompt_tokens",
            "Prompt tokens of ended requests, by API key",
            ["key"],
            registry=self.registry,
        )
        self.key_generation_tokens = Counter(
            P + "api_key_generation_tokens",
            "Tokens generated, by API key",
            ["key"],
            registry=self.registry,
        )
        self.batch_requests = Counter(
            P + "batch_requests",
            "Batch requests answered, by outcome (completed: a 2xx; failed: refused)",
            ["outcome"],
            registry=self.registry,
        )
        engine.add_finish_listener(self.observe)

    @property
    def batch_counts(self) -> Callable[[], dict[str, int]]:
        return self._collector.batch_counts

    @batch_counts.setter
    def batch_counts(self, counts: Callable[[], dict[str, int]]) -> None:
        """Where the batches' counts by status come from (the /v1/batches store)."""
        self._collector.batch_counts = counts

    def observe_whole(
        self, owner: str | None, finish_reason: str, prompt_tokens: int, generated: int
    ) -> None:
        """A request's success, its tokens and its key's counts (once for a request run as
        many engine requests, a beam search)."""
        self.success.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generated)
        if owner is not None:
            self.key_requests.labels(owner).inc()
            self.key_prompt_tokens.labels(owner).inc(prompt_tokens)
            self.key_generation_tokens.labels(owner).inc(generated)

    def batch_answer(self, status: int) -> None:
        self.batch_requests.labels("completed" if status < 300 else "failed").inc()

    def observe(
        self, handle: RequestHandle, output: RequestOutput | None, error: BaseException | None
    ) -> None:
        """The engine's finish listener: it runs before the handle is done, so a caller that
        reads /metrics after its answer sees its request counted."""
        if handle.part_of is not None:
            return  # a step of a larger request: `observe_whole` counts that one
        reason = "error" if error is not None or output is None else output.finish_reason
        self.observe_whole(handle.owner, reason, handle.num_prompt_tokens, handle.num_output_tokens)
        end = handle.finish_time or handle.arrival_time
        self.e2e.observe(end - handle.arrival_time)
        scheduled = handle.first_scheduled_time
        if scheduled is not None:
            self.queue_time.observe(max(0.0, scheduled - handle.arrival_time))
            if handle.first_token_time is not None:
                self.prefill_time.observe(max(0.0, handle.first_token_time - scheduled))
        if handle.first_token_time is not None:
            self.decode_time.observe(max(0.0, end - handle.first_token_time))
        if handle.first_token_time is not None:
            self.ttft.observe(handle.first_token_time - handle.arrival_time)
            if handle.num_output_tokens > 1:
                per = (end - handle.first_token_time) / (handle.num_output_tokens - 1)
                self.tpot.observe(per)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
