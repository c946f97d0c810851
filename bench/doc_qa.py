"""CPU document-QA benchmark: one long document, many questions, with and without prefix caching.

Three systems answer the same questions about the same document in one process, one after
the other, with the same `torch.set_num_threads(--threads)`, fp32 and greedy decoding with the
same `max_new_tokens` (EOS ends an answer early, in all three alike):

1. **ours, prefix caching on**: a fresh `Runtime` (in-process executor, tp=1) with
   `CacheConfig(enable_prefix_caching=True)`; ONE timed call: what `rt.ask(document,
   questions, params)` does after building one chat prompt per question with the document
   first (`dist_runtime.jobs.doc_qa.qa_prompts`, built before the clock starts):
   `rt.add_requests(prompts, params, share_prefix=True)` and waiting on the handles. The engine
   computes the prompts' common prefix (chat header + document) once, then runs all questions:
   each question finds the document's full KV blocks in the prefix cache and computes only its
   own tail (the partial last block of the shared prefix plus the question), then all
   questions decode together.
2. **ours, prefix caching off**: the same, with `CacheConfig(enable_prefix_caching=False)`:
   every prompt is prefilled in full (chunked into steps of at most `--max-batched-tokens`
   tokens, several prompts per step), then all decode together.
3. **HF transformers**: `LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)` (default
   `sdpa` attention, `DynamicCache`), one `generate(do_sample=False, max_new_tokens=...)` per
   question, one after the other (batch 1, no padding), on exactly the token ids that `ask`
   builds (`qa_prompts` with the runtime's tokenizer, built before the clock starts). Its
   `eos_token_id` is set to the runtime's EOS set so both stop on the same tokens.

How each number is measured:

* Wall time: `time.perf_counter()` around the one `add_requests` call and the wait for its
  handles (ours; it includes detokenizing the answers) or around the loop of `generate`
  calls, one per question (HF; prompts prebuilt, answers not decoded). Ratios are wall-time
  ratios: no-cache / cache and HF / cache (> 1: the cached run is faster). The aim of the
  benchmark is no-cache / cache >= 4.
* Warm-up (untimed): before its timed call each system works through a DIFFERENT short
  document (the pass-key haystack, 2 questions). Ours: a fresh Runtime per run, which runs the
  `ask` pattern on that document's raw text (no chat template): one prefill of the document,
  then both questions over it (over the cached document with caching) decoding together; raw
  text shares no KV block with the timed chat prompts, so the timed run gets no cache hits
  from the warm-up (the report gives what the shared-prefix pass found cached: should be 0).
  HF: one `generate` per question on the chat prompts of that document.
* Prompt tokens computed: `rt.engine.scheduler.num_prompt_tokens_computed` after minus before the
  timed call (prompt tokens whose K/V the workers computed; prefix-cache hits excluded). It
  includes the shared-prefix pass.
* Prefix-cache hit rate: `rt.prefix_cache_stats()` after minus before the timed call: prompt
  tokens found in the cache / prompt tokens looked up (including the shared-prefix pass's own
  lookup).
* Breakdown of our runs: `executor.execute` is wrapped to time every step; a step is a decode
  step when every sequence in it computes one token, else a prefill step (which may carry
  decodes too). Host time = wall time - time inside steps (prompt building, scheduling,
  detokenization). The shared-prefix pass is also timed as a whole (steps and host work). For
  HF, prefill = from the `generate` call to the first new token's logits (a no-op logits
  processor stamps it), decode = the rest of the call.
* CPU time and minor page faults: `getrusage(RUSAGE_SELF)` after minus before each timed call
  (user and system CPU seconds, `ru_minflt`; our executor runs in this process). Temporaries
  above glibc's mmap threshold (32 MiB at most: the activations of a prefill chunk, the K and
  V a decode step gathers, ~50 MB each per layer in the default run) come from fresh pages
  every time, and touching them costs a fault per 4 KiB page; in a VM a fault can cost much
  more than on bare metal, so these explain runs much slower than the same work elsewhere.
* Other CPU: the share of the machine's CPU time (/proc/stat) that other processes used during
  each timed call (the machine's busy time minus this process's CPU time). With as many torch
  threads as cores, a core taken by another process stalls every parallel region, so a run
  with much other CPU is slower than an undisturbed one; the report flags runs at >= 10%.
* KV cache: both of our runtimes get `num_blocks` = enough blocks for every question's full
  session at once plus one more (so the no-cache run never has to preempt; preemptions are
  counted and reported), block size 16, scheduler budget `--max-batched-tokens` tokens/step.
* Agreement: the answers' token ids (ours from the `RequestOutput`s behind `ask`, EOS
  included when generated; HF's new tokens) are compared pairwise; fp32 greedy runs should
  mostly agree, but tiny numerical differences (attention split into chunks vs one sdpa call)
  can flip a near-tie, so this is reported, not asserted.

By default each system runs once (the whole benchmark takes about 10 minutes on 2 cores);
`--repeats N` alternates the three systems N times, each time with a fresh Runtime, and keeps
each system's fastest run (other processes only ever add time).

Run from the repository root (no installation needed):

    python bench/doc_qa.py --quick      # smoke run: ~600-token document, 4 questions, 8 tokens
    python bench/doc_qa.py --report docs/benchmarks/doc_qa_cpu_<date>.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import re
import resource
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaForCausalLM, LogitsProcessor, LogitsProcessorList  # noqa: E402

from bench.machine import code_version, cpu_counters, cpu_model, usable_cores  # noqa: E402
from dist_runtime import CacheConfig, Runtime, SamplingParams, SchedulerConfig  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from dist_runtime.jobs.doc_qa import qa_prompts  # noqa: E402
from dist_runtime.protocol import StepPlan  # noqa: E402
from dist_runtime.text.documents import Document, harbor_report, passkey_haystack  # noqa: E402
from dist_runtime.text.tokenizer import Tokenizer  # noqa: E402

BLOCK_SIZE = 16
CACHE = "ours, prefix caching"
NO_CACHE = "ours, no prefix caching"
HF = "HF transformers, one by one"
AIM = 4.0
"""Wanted speed-up of the cached run over the uncached one."""
NOISY = 0.1
"""Share of the machine used by other processes above which a timed run counts as disturbed."""
WARMUP_DOC = passkey_haystack(pass_key=4242, num_filler=8)
WARMUP_QUESTIONS = ["What is the pass key?", "What colour is the sky?"]
_HEADING = re.compile(r"^## (\w+): the (.+)$", re.MULTILINE)


# -- workload -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    document: str
    num_sections: int
    doc_tokens: int
    """Tokens of the document text alone (no chat template, no special tokens)."""
    questions: list[str]
    prompts: list[list[int]]
    """Token ids of one chat prompt per question, exactly as `Runtime.ask` builds them."""
    new_tokens: int
    threads: int
    max_batched_tokens: int

    @property
    def shared_tokens(self) -> int:
        """Length of the prompts' common prefix (chat header + document + fixed text)."""
        return len(os.path.commonprefix(self.prompts))

    @property
    def session_len(self) -> int:
        return max(len(p) for p in self.prompts) + self.new_tokens + BLOCK_SIZE

    @property
    def num_blocks(self) -> int:
        """Every question's whole session at once, plus one more (the shared-prefix pass)."""
        per_seq = -(-self.session_len // BLOCK_SIZE)
        return (len(self.prompts) + 1) * per_seq


def pick_document(
    tokenizer: Tokenizer, target: int, sections: int | None, seed: int
) -> tuple[Document, int]:
    """harbor_report with `sections` sections, or the count whose text is closest to target."""
    if sections is not None:
        return harbor_report(seed=seed, num_sections=sections), sections
    best: tuple[int, Document, int] | None = None
    n = 1
    while True:
        doc = harbor_report(seed=seed, num_sections=n)
        count = len(tokenizer.encode(doc.text, add_special_tokens=False))
        if best is None or abs(count - target) < best[0]:
            best = (abs(count - target), doc, n)
        if count >= target:
            return best[1], best[2]
        n += 1


def make_questions(doc: Document, count: int) -> list[str]:
    """The document's own questions, then one per distinct section heading, all distinct."""
    questions = list(doc.questions)
    for month, name in _HEADING.findall(doc.text):
        q = f"What did the {name} do in {month}?"
        if q not in questions:
            questions.append(q)
    if len(questions) < count:
        raise SystemExit(
            f"the document yields only {len(questions)} distinct questions, --questions is "
            f"{count}; use a longer document"
        )
    return questions[:count]


# -- measuring ------------------------------------------------------------------------------


def own_usage() -> tuple[int, float, float]:
    """This process's (minor page faults, user s, system s) so far; our executor runs here."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_minflt, ru.ru_utime, ru.ru_stime


class OthersCPU:
    """Share of the machine's CPU time that other processes used since construction, and this
    process's minor page faults and user / system CPU seconds meanwhile."""

    def __init__(self) -> None:
        self.start, self.process_s = cpu_counters(), time.process_time()
        self.usage = own_usage()

    def own(self) -> tuple[int, float, float]:
        return tuple(b - a for a, b in zip(self.usage, own_usage()))  # type: ignore[return-value]

    def fraction(self) -> float | None:
        end = cpu_counters()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return None
        own = time.process_time() - self.process_s
        return max(end[0] - self.start[0] - own, 0.0) / (end[1] - self.start[1])


@dataclasses.dataclass
class Run:
    """One timed run of one system."""

    name: str
    wall_s: float
    answers: list[str]
    tokens: list[list[int]]
    prefill_s: float
    """Ours: time in steps that compute prompt tokens; HF: call start to first logits."""
    decode_s: float
    others_cpu: float | None
    """Share of the machine's CPU that other processes used during the timed call."""
    usage: tuple[int, float, float]
    """This process's minor page faults (fresh memory touched), user and system CPU seconds
    during the timed call."""
    prefill_steps: int = 0
    decode_steps: int = 0
    host_s: float | None = None
    shared_pass_s: float | None = None
    """Ours with caching: the whole shared-prefix pass (its steps and host work)."""
    shared_pass_steps_s: float | None = None
    shared_pass_hits: int | None = None
    """Prompt tokens the shared-prefix pass found cached before it ran (from the warm-up)."""
    prompt_tokens_computed: int | None = None
    queried_tokens: int | None = None
    hit_tokens: int | None = None
    preemptions: int | None = None

    @property
    def hit_rate(self) -> float | None:
        if self.queried_tokens is None or self.hit_tokens is None:
            return None
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


# -- our runtime ----------------------------------------------------------------------------


@contextmanager
def recording(rt: Runtime) -> Iterator[dict[str, Any]]:
    """Time every executor step; the engine's step records say which steps were the
    shared-prefix pass's (the only request running then: the questions wait for it)."""
    rec: dict[str, Any] = {"steps": []}
    executor = rt.engine.executor
    assert executor is not None
    execute = executor.execute
    first_step = rt.engine.stats()["num_steps"]

    def timed_execute(plan: StepPlan) -> Any:
        t0 = time.perf_counter()
        out = execute(plan)
        decode = all(len(s.token_ids) == 1 for s in plan.seqs)
        rec["steps"].append((plan.step_id, time.perf_counter() - t0, decode))
        return out

    executor.execute = timed_execute  # type: ignore[method-assign]
    try:
        yield rec
    finally:  # back to the class method
        del executor.execute
        records = [r for r in rt.engine.recent_steps() if r.step_id >= first_step]
        shared = [r for r in records if all(i.startswith("prefix-") for i in r.request_ids)]
        shared_ids = {r.step_id for r in shared}
        rec["shared_s"] = sum(r.seconds for r in shared)
        rec["shared_prefill"] = sum(r.num_prefill_tokens for r in shared)
        rec["steps"] = [(t, decode, i in shared_ids) for i, t, decode in rec["steps"]]


def warm_up_ours(rt: Runtime, params: SamplingParams) -> None:
    """The ask() pattern on the warm-up document, as raw text (no chat template).

    Through `ask` the warm-up prompts would start with the chat template's fixed header, whose
    full blocks the timed prompts would then find in the prefix cache. Raw text shares no
    block with the timed prompts, and the calls still run every kind of step the timed call
    runs: a prefill from scratch (the shared prefix), prompts over a cached prefix (with
    caching), and batched decoding of sequences of different lengths.
    """
    doc = rt.encode(WARMUP_DOC)
    prompts = [doc + rt.encode(f"\nQuestion: {q}") for q in WARMUP_QUESTIONS]
    rt.generate([doc], SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True))
    rt.generate(prompts, params)


def run_ours(
    folder: Path, work: Workload, caching: bool, log: Callable[[str], None]
) -> tuple[Run, list[int]]:
    """A fresh Runtime: untimed warm-up on another document, then one timed ask().

    Also returns the EOS ids the runtime stops on (HF gets the same).
    """
    name = CACHE if caching else NO_CACHE
    rt = Runtime(
        model=str(folder),
        device="cpu",
        dtype="float32",
        session_len=work.session_len,
        cache=CacheConfig(
            enable_prefix_caching=caching, block_size=BLOCK_SIZE, num_blocks=work.num_blocks
        ),
        scheduler=SchedulerConfig(max_num_batched_tokens=work.max_batched_tokens),
    )
    try:
        if rt.tokenizer is None:
            raise RuntimeError(f"{folder} has no tokenizer")
        eos_ids = sorted(set(rt.model_config.eos_token_ids) | set(rt.tokenizer.eos_token_ids))
        params = SamplingParams(max_new_tokens=work.new_tokens, temperature=0.0)
        t0 = time.perf_counter()
        warm_up_ours(rt, params)
        log(f"  {name}: warm-up {time.perf_counter() - t0:.1f} s")
        before = rt.prefix_cache_stats()
        computed0 = rt.engine.scheduler.num_prompt_tokens_computed
        preempt0 = rt.engine.scheduler.num_preemptions
        with recording(rt) as rec:
            others = OthersCPU()
            t0 = time.perf_counter()
            handles = rt.add_requests(work.prompts, params, share_prefix=True)
            outs = [h.result() for h in handles]
            wall = time.perf_counter() - t0
            others_cpu, usage = others.fraction(), others.own()
        after = rt.prefix_cache_stats()
        answers = [o.text for o in outs]
        steps = rec["steps"]
        run = Run(
            name=name,
            wall_s=wall,
            answers=answers,
            tokens=[list(o.token_ids) for o in outs],
            prefill_s=sum(t for t, decode, _ in steps if not decode),
            decode_s=sum(t for t, decode, _ in steps if decode),
            others_cpu=others_cpu,
            usage=usage,
            prefill_steps=sum(1 for _, decode, _ in steps if not decode),
            decode_steps=sum(1 for _, decode, _ in steps if decode),
            host_s=wall - sum(t for t, _, _ in steps),
            shared_pass_s=rec["shared_s"] if caching else None,
            shared_pass_steps_s=sum(t for t, _, shared in steps if shared) if caching else None,
            shared_pass_hits=work.shared_tokens - rec["shared_prefill"] if caching else None,
            prompt_tokens_computed=rt.engine.scheduler.num_prompt_tokens_computed - computed0,
            queried_tokens=int(after["queried_tokens"] - before["queried_tokens"]),
            hit_tokens=int(after["hit_tokens"] - before["hit_tokens"]),
            preemptions=rt.engine.scheduler.num_preemptions - preempt0,
        )
    finally:
        rt.shutdown()
    return run, eos_ids


# -- HF transformers ------------------------------------------------------------------------


class _Stamp(LogitsProcessor):
    """No-op logits processor: HF calls it once per new token, right after the forward."""

    def __init__(self, stamps: list[float]):
        self.stamps = stamps

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


class HFRunner:
    """HF `generate` per question, batch 1, on the same prompt token ids as ours."""

    def __init__(self, folder: Path, eos_ids: list[int], tokenizer: Tokenizer, new_tokens: int):
        self.model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        gen = self.model.generation_config
        gen.eos_token_id = eos_ids
        gen.pad_token_id = eos_ids[0]
        gen.do_sample = False
        self.tokenizer = tokenizer
        self.new_tokens = new_tokens
        self.num_params = sum(p.numel() for p in self.model.parameters())

    def answer(self, prompt: list[int]) -> tuple[list[int], float, float]:
        """(new token ids, prefill s, decode s) of one question."""
        ids = torch.tensor([prompt], dtype=torch.long)
        stamps: list[float] = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([_Stamp(stamps)]),
            )
        t1 = time.perf_counter()
        return out[0, ids.shape[1] :].tolist(), stamps[0] - t0, t1 - stamps[0]

    def warm_up(self) -> None:
        for prompt in qa_prompts(self.tokenizer, WARMUP_DOC, WARMUP_QUESTIONS):
            self.answer(prompt)

    def run(self, work: Workload) -> Run:
        tokens: list[list[int]] = []
        prefill = decode = 0.0
        others = OthersCPU()
        t0 = time.perf_counter()
        for prompt in work.prompts:
            toks, pre, dec = self.answer(prompt)
            tokens.append(toks)
            prefill += pre
            decode += dec
        wall = time.perf_counter() - t0
        others_cpu, usage = others.fraction(), others.own()
        answers = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        return Run(HF, wall, answers, tokens, prefill, decode, others_cpu, usage)


# -- comparing and reporting ----------------------------------------------------------------


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, str]:
    """(identical answers, text) for two systems' answer token ids."""
    same = sum(x == y for x, y in zip(a, b))
    text = f"{same}/{len(a)} identical"
    firsts = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            at = next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            firsts.append(f"q{i + 1}@{at}")
    if firsts:
        text += f" (first differing token: {', '.join(firsts)})"
    return same, text


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _int(x: int | None) -> str:
    return "-" if x is None else str(x)


def _pct(x: float | None) -> str:
    return "unknown" if x is None else f"{100 * x:.0f}%"


def _cell(text: str, limit: int = 80) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary_line(work: Workload, runs: dict[str, Run]) -> str:
    c, n, h = runs[CACHE], runs[NO_CACHE], runs[HF]
    return (
        f"doc_qa: {len(work.questions)} q on {work.doc_tokens}-tok doc: cache {c.wall_s:.1f} s, "
        f"no-cache {n.wall_s:.1f} s ({n.wall_s / c.wall_s:.2f}x), HF {h.wall_s:.1f} s "
        f"({h.wall_s / c.wall_s:.2f}x)"
    )


def aim_line(runs: dict[str, Run]) -> str:
    ratio = runs[NO_CACHE].wall_s / runs[CACHE].wall_s
    verdict = "met" if ratio >= AIM else "NOT met"
    return f"aim (cached >= {AIM:g}x faster than no-cache): {verdict} ({ratio:.2f}x)"


def breakdown(work: Workload, run: Run) -> list[str]:
    """Where one of our runs spent its wall time (seconds and share)."""
    parts = []
    question_prefill = run.prefill_s
    if run.shared_pass_s is not None and run.shared_pass_steps_s is not None:
        computed = work.shared_tokens - (run.shared_pass_hits or 0)
        parts.append(
            f"shared-prefix pass (the document, {computed} prompt tokens computed once) "
            f"{run.shared_pass_s:.2f} s"
        )
        question_prefill -= run.shared_pass_steps_s
    prefill_tokens = (run.prompt_tokens_computed or 0) - (
        work.shared_tokens - (run.shared_pass_hits or 0) if run.shared_pass_s is not None else 0
    )
    parts.append(
        f"{'question ' if run.shared_pass_s is not None else ''}prefill "
        f"({prefill_tokens} prompt tokens) {question_prefill:.2f} s"
    )
    per_step = run.decode_s / run.decode_steps * 1e3 if run.decode_steps else 0.0
    parts.append(
        f"decode ({run.decode_steps} batched steps, {per_step:.0f} ms/step) {run.decode_s:.2f} s"
    )
    parts.append(f"host {_s(run.host_s)} s")
    return parts


def decode_ms_per_token(run: Run) -> float:
    """Decode time per generated token after the first, per sequence."""
    tokens = sum(max(len(t) - 1, 0) for t in run.tokens)
    return run.decode_s / tokens * 1e3 if tokens else 0.0


def render_report(
    *,
    work: Workload,
    runs: dict[str, Run],
    walls: dict[str, list[float]],
    agree: dict[str, str],
    num_params: int,
    summary: str,
    command: str,
    elapsed_s: float,
    others_cpu: float | None,
    version: str,
    seed: int,
) -> str:
    cache = runs[CACHE]
    lengths = [len(p) for p in work.prompts]
    repeats = len(walls[CACHE])
    noisy = [r.name for r in runs.values() if r.others_cpu is None or r.others_cpu >= NOISY]
    lines = [
        f"# CPU document-QA benchmark: prefix caching vs none vs HF ({datetime.date.today()})",
        "",
        "Produced by `bench/doc_qa.py`; its docstring says exactly how each number is measured.",
        "",
        f"**Summary:** `{summary}`",
        "",
        f"**{aim_line(runs)}**",
        "",
        "## Machine and software",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- CPU: {cpu_model()}, os.cpu_count() = {os.cpu_count()} logical cores "
        f"({usable_cores()} usable by this process)",
        f"- torch threads: {work.threads} (`torch.set_num_threads`, same for all three systems)",
        f"- Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {platform.platform()}",
        f"- code: {version}",
        f"- CPU used by other processes during the whole benchmark: {_pct(others_cpu)} of the "
        "machine (from /proc/stat, minus this process's own CPU time); per timed run in the "
        "table",
        *(
            [
                "",
                f"> **Noisy run:** other processes used >= {100 * NOISY:.0f}% of the machine "
                f"during the timed run of {', '.join(noisy)}. With as many torch threads as "
                "cores, a busy core stalls every parallel region, so such a run can be much "
                "slower than an undisturbed one; treat its wall time and ratios as approximate.",
            ]
            if noisy
            else []
        ),
        "",
        "## Model and workload",
        "",
        "- model: SmolLM2-135M-Instruct (the demo model, `demo_model_path()`), fp32, "
        f"{num_params / 1e6:.1f} M parameters",
        f"- document: `harbor_report(seed={seed}, num_sections={work.num_sections})`, "
        f"**{work.doc_tokens} tokens** (text alone); every prompt puts it first via the chat "
        f"template; the prompts share their first {work.shared_tokens} tokens",
        f"- {len(work.questions)} questions (the document's own "
        f"{min(3, len(work.questions))} plus one per section heading), prompt lengths "
        f"{min(lengths)}-{max(lengths)} tokens ({sum(lengths)} in all): "
        + ", ".join(map(str, lengths)),
        f"- greedy, up to {work.new_tokens} new tokens per answer (EOS stops an answer early)",
        f"- ours: in-process executor (tp=1), paged KV cache of {work.num_blocks} blocks of "
        f"{BLOCK_SIZE} tokens, scheduler budget {work.max_batched_tokens} tokens/step, torch "
        "reference kernels on CPU; a fresh Runtime per setting and repeat",
        "- HF: `LlamaForCausalLM.generate`, default sdpa attention and DynamicCache, batch 1",
        "- each system: untimed warm-up on a different short document (2 questions), then "
        + (
            "one timed run"
            if repeats == 1
            else f"{repeats} timed runs (systems alternating); the table shows the fastest"
        ),
        "",
        "## Results",
        "",
        "Ratio = the system's wall time / the cached run's (> 1: the cached run is faster). "
        "Other CPU = share of the machine used by other processes during that timed run.",
        "",
        "| system | wall (s) | ratio | other CPU | prompt tokens computed | prefix-cache hits "
        "| prefill (s) | decode (s) | host (s) | steps (prefill + decode) | preemptions "
        "| CPU user + system (s) | minor page faults |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs.values():
        hits = (
            "-"
            if run.hit_rate is None
            else f"{run.hit_tokens}/{run.queried_tokens} ({100 * run.hit_rate:.1f}%)"
        )
        steps = f"{run.prefill_steps} + {run.decode_steps}" if run.host_s is not None else "-"
        computed = sum(lengths) if run.name == HF else run.prompt_tokens_computed
        lines.append(
            f"| {run.name} | {run.wall_s:.2f} | {run.wall_s / cache.wall_s:.2f}x "
            f"| {_pct(run.others_cpu)} | {computed} | {hits} | {run.prefill_s:.2f} "
            f"| {run.decode_s:.2f} | {_s(run.host_s)} | {steps} | {_int(run.preemptions)} "
            f"| {run.usage[1]:.1f} + {run.usage[2]:.1f} | {run.usage[0]} |"
        )
    lines += [
        "",
        "Prefill / decode: for ours, the time inside executor steps that compute prompt tokens "
        "/ only one token per sequence; host = wall - all steps (prompt building and "
        "tokenization, scheduling, detokenization). For HF, prefill = call start to the first "
        "token's logits, summed over questions; decode = the rest. HF computes every prompt "
        "token (no cache across calls). CPU user + system and minor page faults: this "
        "process's, during the timed call (`getrusage`); a minor fault is a 4 KiB page of "
        "freshly allocated memory touched for the first time, paid in system time (and, in a "
        "VM, possibly in host time that shows in neither column).",
    ]
    if repeats > 1:
        lines += ["", "Every repeat's wall time (s):", ""]
        lines += [f"- {n}: {', '.join(f'{w:.2f}' for w in ws)}" for n, ws in walls.items()]
    lines += [
        "",
        "## Where the time goes",
        "",
        f"- {CACHE}: " + "; ".join(breakdown(work, cache)) + ". The shared-prefix pass found "
        f"{cache.shared_pass_hits} tokens cached before it ran (0: nothing came from the "
        "warm-up).",
        f"- {NO_CACHE}: " + "; ".join(breakdown(work, runs[NO_CACHE])) + ".",
        f"- {HF}: prefill {runs[HF].prefill_s:.2f} s, decode {runs[HF].decode_s:.2f} s.",
        "- decode time per generated token (after the first) per sequence: "
        + ", ".join(f"{n} {decode_ms_per_token(r):.1f} ms" for n, r in runs.items())
        + " (ours decodes all questions in one batch, HF one at a time).",
        "",
        "## Answers",
        "",
        "Answer token ids, pairwise:",
        "",
        *[f"- {k}: {v}" for k, v in agree.items()],
        "",
        "| # | question | ours (cache) | HF |",
        "|---:|---|---|---|",
    ]
    for i, q in enumerate(work.questions):
        lines.append(
            f"| {i + 1} | {_cell(q, 60)} | {_cell(cache.answers[i])} "
            f"| {_cell(runs[HF].answers[i])} |"
        )
    lines += [
        "",
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
        f"Wall time of the whole benchmark: {elapsed_s:.0f} s.",
        "",
    ]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: ~600-token document, 4 questions, 8 new tokens",
    )
    p.add_argument(
        "--doc-tokens",
        type=int,
        help="document length to aim for; picks harbor_report's section count (default 4000, "
        "quick 600)",
    )
    p.add_argument("--sections", type=int, help="harbor_report sections (overrides --doc-tokens)")
    p.add_argument("--questions", type=int, help="number of questions (default 16, quick 4)")
    p.add_argument("--new-tokens", type=int, help="max new tokens per answer (default 32, quick 8)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed runs per system, alternating; the fastest counts (default 1)",
    )
    p.add_argument(
        "--max-batched-tokens",
        type=int,
        default=8192,
        help="our scheduler's token budget per step (default 8192)",
    )
    p.add_argument("--seed", type=int, default=7, help="harbor_report seed (default 7)")
    p.add_argument("--report", type=Path, help="write a markdown report to this path")
    args = p.parse_args(argv)
    args.doc_tokens = args.doc_tokens or (600 if args.quick else 4000)
    args.questions = args.questions or (4 if args.quick else 16)
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    for name in (
        "doc_tokens",
        "questions",
        "new_tokens",
        "threads",
        "repeats",
        "max_batched_tokens",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.questions < 2:
        p.error("--questions must be >= 2 (one question has nothing to share)")
    if args.sections is not None and args.sections < 1:
        p.error("--sections must be >= 1")
    return args


def log_run(run: Run, work: Workload, log: Callable[[str], None]) -> None:
    if run.name == HF:
        detail = f"prefill {run.prefill_s:.2f} s, decode {run.decode_s:.2f} s"
    else:
        detail = (
            "; ".join(breakdown(work, run))
            + f"; prompt tokens computed {run.prompt_tokens_computed}, prefix-cache hits "
            f"{run.hit_tokens}/{run.queried_tokens}, preemptions {run.preemptions}"
        )
        if run.shared_pass_hits:
            detail += f"; WARNING: {run.shared_pass_hits} tokens were cached by the warm-up"
    faults, user, system = run.usage
    log(
        f"  {run.name}: {run.wall_s:.2f} s ({detail}); other CPU {_pct(run.others_cpu)}; "
        f"this process: CPU user {user:.1f} s + system {system:.1f} s, {faults} minor page faults"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    whole = OthersCPU()
    version = code_version()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    folder = demo_model_path()
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer is None:
        raise SystemExit(f"{folder} has no tokenizer")
    doc, sections = pick_document(tokenizer, args.doc_tokens, args.sections, args.seed)
    questions = make_questions(doc, args.questions)
    work = Workload(
        document=doc.text,
        num_sections=sections,
        doc_tokens=len(tokenizer.encode(doc.text, add_special_tokens=False)),
        questions=questions,
        prompts=qa_prompts(tokenizer, doc.text, questions),
        new_tokens=args.new_tokens,
        threads=args.threads,
        max_batched_tokens=args.max_batched_tokens,
    )
    log(f"model {folder}; torch threads {args.threads}")
    log(
        f"document: harbor_report(seed={args.seed}, num_sections={sections}), "
        f"{work.doc_tokens} tokens; prompts share {work.shared_tokens} tokens"
    )
    for i, (q, p) in enumerate(zip(questions, work.prompts)):
        log(f"  q{i + 1:<2} {len(p)} prompt tokens: {q}")

    best: dict[str, Run] = {}
    walls: dict[str, list[float]] = {CACHE: [], NO_CACHE: [], HF: []}
    changed: set[str] = set()
    hf: HFRunner | None = None

    def keep(run: Run) -> None:
        log_run(run, work, log)
        walls[run.name].append(run.wall_s)
        if run.name in best and best[run.name].tokens != run.tokens:
            changed.add(run.name)
        if run.name not in best or run.wall_s < best[run.name].wall_s:
            best[run.name] = run

    for r in range(args.repeats):
        if args.repeats > 1:
            log(f"repeat {r + 1}/{args.repeats}")
        eos_ids: list[int] = []
        for caching in (True, False):
            run, eos_ids = run_ours(folder, work, caching, log)
            keep(run)
            gc.collect()
        if hf is None:
            hf = HFRunner(folder, eos_ids, tokenizer, work.new_tokens)
            t0 = time.perf_counter()
            hf.warm_up()
            log(f"  {HF}: warm-up {time.perf_counter() - t0:.1f} s")
        keep(hf.run(work))
    assert hf is not None
    runs = {name: best[name] for name in (CACHE, NO_CACHE, HF)}
    for name in sorted(changed):
        log(f"WARNING: {name}: the answers' tokens changed between repeats")

    toks = {name: run.tokens for name, run in runs.items()}
    agree = {
        "cache vs no-cache": agreement(toks[CACHE], toks[NO_CACHE])[1],
        "cache vs HF": agreement(toks[CACHE], toks[HF])[1],
        "no-cache vs HF": agreement(toks[NO_CACHE], toks[HF])[1],
    }
    all_three = sum(a == b == c for a, b, c in zip(toks[CACHE], toks[NO_CACHE], toks[HF]))
    agree["all three"] = f"{all_three}/{len(questions)} identical"
    for k, v in agree.items():
        log(f"answers {k}: {v}")
    for i, q in enumerate(questions):
        log(f"  q{i + 1:<2} {q} -> {runs[CACHE].answers[i]!r}")
    others = whole.fraction()
    log(f"CPU used by other processes during the whole benchmark: {_pct(others)} of the machine")
    summary = summary_line(work, runs)
    if args.report is not None:
        command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]])
        report = render_report(
            work=work,
            runs=runs,
            walls=walls,
            agree=agree,
            num_params=hf.num_params,
            summary=summary,
            command=command,
            elapsed_s=time.perf_counter() - started,
            others_cpu=others,
            version=version,
            seed=args.seed,
        )
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report, encoding="utf-8")
        log(f"wrote {args.report}")
    print(aim_line(runs))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
