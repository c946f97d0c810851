"""Needle-in-a-haystack evaluation: haystacks of an exact token length with needles at chosen
depths, graded answers, and a grid runner over the durable job queue.

A haystack is generated filler prose (varied sentences from word lists, deterministic by seed,
no downloads) cut to exactly `length` tokens of the model's tokenizer, with each needle
sentence inserted on a sentence boundary at its depth (0 = the start, 100 = the end). Every
haystack of one length uses the same filler, so haystacks of different depths share their
tokens up to the shallower needle: run deepest first and the prefix cache computes each
shared prefix once (`grid_order`).

A needle is a fact with a random key (a name, a number, a city, ...) and the question that
asks for it; an answer scores 100 when it contains the key after normalisation (case,
punctuation and spacing ignored), 0 otherwise; a multi-needle cell scores the percentage of its
keys found.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class TokenizerLike(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


# -- filler ---------------------------------------------------------------------------------

_SUBJECTS = [
    "The old ferryman",
    "A young teacher",
    "The council",
    "Our neighbour",
    "The baker",
    "A travelling merchant",
    "The harbour master",
    "The village doctor",
    "An elderly weaver",
    "The night watchman",
    "A curious child",
    "The librarian",
    "The miller's daughter",
    "A retired sailor",
    "The choir",
    "The blacksmith",
    "A group of students",
    "The gardener",
]
_VERBS = [
    "repaired",
    "painted",
    "counted",
    "described",
    "carried",
    "planted",
    "studied",
    "measured",
    "cleaned",
    "sold",
    "borrowed",
    "visited",
    "mapped",
    "photographed",
    "rebuilt",
    "guarded",
]
_OBJECTS = [
    "the stone bridge",
    "an old wooden cart",
    "the long garden wall",
    "a box of letters",
    "the chapel roof",
    "three barrels of apples",
    "the eastern road",
    "a map of the valley",
    "the broken clock",
    "a basket of herbs",
    "the market stalls",
    "the narrow stairs",
    "a crate of lanterns",
    "the mill wheel",
    "the fishing nets",
    "the school benches",
]
_TIMES = [
    "before sunrise",
    "after the spring rains",
    "on a quiet Sunday",
    "during the long winter",
    "late in the evening",
    "at the start of the harvest",
    "while the bells rang",
    "in the first week of autumn",
    "after the market closed",
    "on a windy afternoon",
]
_PLACES = [
    "near the river",
    "behind the town hall",
    "at the edge of the forest",
    "by the harbour",
    "on the hill above the village",
    "in the old quarter",
    "beside the chapel",
    "along the coast road",
    "in the walled garden",
    "under the big oak",
]
_CLAUSES = [
    "and nobody complained about the noise",
    "because the weather had finally turned",
    "although the work took longer than planned",
    "so that the children could watch",
    "while a dog slept in the shade",
    "and the neighbours brought bread and tea",
    "as the old custom required",
    "though few people noticed at the time",
    "and the result pleased almost everyone",
    "before anyone else was awake",
]
_OBSERVATIONS = [
    "The air smelled of salt and cut grass.",
    "A few gulls circled overhead.",
    "Somewhere a radio played an old song.",
    "The clouds moved slowly over the hills.",
    "Smoke rose from several chimneys.",
    "It was the kind of day people remember.",
    "The streets were almost empty.",
    "Rain was expected by nightfall.",
]


def filler_sentences(seed: int) -> Iterator[str]:
    """An endless, deterministic stream of varied filler sentences."""
    rng = random.Random(seed)
    while True:
        kind = rng.random()
        if kind < 0.15:
            yield rng.choice(_OBSERVATIONS)
            continue
        sentence = (
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_PLACES)} {rng.choice(_TIMES)}"
        )
        if kind < 0.6:
            sentence += f", {rng.choice(_CLAUSES)}"
        yield sentence + "."


# -- needles --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Needle:
    sentence: str
    """The fact inserted into the haystack."""
    question: str
    """Asks for the fact; asked after the document."""
    key: str
    """What a right answer contains."""


_FIRST = ["Ingrid", "Tomas", "Amara", "Lukas", "Priya", "Mateo", "Yuki", "Nadia", "Oskar", "Leila"]
_LAST = ["Solberg", "Okafor", "Brennan", "Vasquez", "Lindqvist", "Moreau", "Takahashi", "Novak"]
_CITIES = [
    "Valparaiso",
    "Tromso",
    "Marrakesh",
    "Kraków",
    "Hobart",
    "Cartagena",
    "Tallinn",
    "Nagasaki",
]
_THINGS = ["saffron", "juniper", "cardamom", "smoked paprika", "lemon balm", "wild fennel"]
_COLOURS = ["cobalt blue", "burnt orange", "sea green", "crimson", "ochre", "violet"]


_NEEDLE_KINDS: list[tuple[str, str, Callable[[random.Random], str]]] = [
    (
        "The pass code of the lighthouse door is {}.",
        "What is the pass code of the lighthouse door?",
        lambda rng: str(rng.randrange(100000, 1000000)),
    ),
    (
        "The person who found the silver compass was {}.",
        "Who found the silver compass?",
        lambda rng: f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
    ),
    (
        "The secret meeting of the map makers took place in {}.",
        "In which city did the secret meeting of the map makers take place?",
        lambda rng: rng.choice(_CITIES),
    ),
    (
        "The special ingredient of the winter stew is {}.",
        "What is the special ingredient of the winter stew?",
        lambda rng: rng.choice(_THINGS),
    ),
    (
        "The door of the observatory was painted {}.",
        "What colour was the door of the observatory painted?",
        lambda rng: rng.choice(_COLOURS),
    ),
]
"""The built-in facts: sentence and question templates, and how a random key is drawn."""


def builtin_needle(seed: int) -> Needle:
    """One of the built-in facts, with a random key, chosen by seed."""
    rng = random.Random(f"needle-{seed}")
    sentence, question, draw = _NEEDLE_KINDS[rng.randrange(len(_NEEDLE_KINDS))]
    key = draw(rng)
    return Needle(sentence.format(key), question, key)


def load_needles(path: str | Path) -> list[Needle]:
    """Custom needles: JSONL lines of {"needle": sentence, "question": ..., "answer": key}."""
    needles = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from e
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) and row[k].strip() for k in ("needle", "question", "answer")
        ):
            raise ValueError(
                f'{path}:{number}: each line needs non-empty "needle", "question" and "answer" '
                "strings"
            )
        if normalize(row["answer"]) not in normalize(row["needle"]):
            raise ValueError(f"{path}:{number}: the answer {row['answer']!r} is not in the needle")
        needles.append(Needle(row["needle"].strip(), row["question"].strip(), row["answer"]))
    if not needles:
        raise ValueError(f"{path} holds no needle")
    return needles


def normalize(text: str) -> str:
    """Lower case without accents, digit-group separators dropped, other punctuation to
    spaces, runs of spaces to one: 'Tomas  Berg.' -> 'tomas berg', '123,456' -> '123456'."""
    text = unicodedata.normalize("NFKD", text).lower()
    text = "".join(c for c in text if not unicodedata.combining(c))  # Kraków -> krakow
    text = re.sub(r"(?<=\d)[,.'\u2019 _](?=\d{3}\b)", "", text)  # 123,456 -> 123456
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return re.sub(r"\s+", " ", text).strip()


def score_answer(answer: str, keys: Sequence[str]) -> float:
    """100 x the fraction of keys the answer contains (normalised)."""
    said = f" {normalize(answer)} "
    found = sum(f" {normalize(k)} " in said for k in keys)
    return 100.0 * found / len(keys)


# -- haystacks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Haystack:
    text: str
    num_tokens: int
    needle_token_starts: list[int]
    """Token index where each needle begins (tokenizing the text up to it)."""


def needle_depths(depth: float, count: int) -> list[float]:
    """Depths (percent) of `count` needles for a cell of `depth`: the first at depth, the rest
    spread evenly between it and the end."""
    return [depth + (100.0 - depth) * j / count for j in range(count)]


def build_haystack(
    tokenizer: TokenizerLike,
    length: int,
    depths: Sequence[float],
    needles: Sequence[Needle],
    seed: int = 0,
) -> Haystack:
    """`length` tokens of filler (seeded) with needle i inserted at depths[i] percent, on the
    sentence boundary nearest below that share of the filler."""
    if len(depths) != len(needles) or not needles:
        raise ValueError(f"{len(depths)} depths for {len(needles)} needles")
    for d in depths:
        if not 0 <= d <= 100:
            raise ValueError(f"depth {d} is outside 0..100 (percent)")

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    need_tokens = sum(count(n.sentence) + 1 for n in needles)
    if length < need_tokens + 16:
        raise ValueError(
            f"a haystack of {length} tokens cannot hold its needles ({need_tokens} tokens) and "
            "some filler; ask for a longer one"
        )
    budget = length - need_tokens - 4  # filler tokens before the cut; a margin for joins
    sentences: list[str] = []
    cum = [0]  # filler tokens before sentence i (counted one sentence at a time)
    stream = filler_sentences(seed)
    while cum[-1] < length + 64:
        s = next(stream)
        sentences.append(s)
        cum.append(cum[-1] + count(" " + s))
    order = sorted(range(len(needles)), key=lambda i: depths[i])
    # Needle i goes before the first sentence whose start passes depth * budget.
    at = {}
    for i in order:
        target = depths[i] / 100.0 * budget
        at[i] = max(k for k in range(len(sentences) + 1) if cum[k] <= target)
    parts: list[str] = []
    marks: list[int] = []  # index in parts where each needle (in `order`) is
    k = 0
    for i in order:
        parts.extend(sentences[k : at[i]])
        marks.append(len(parts))
        parts.append(needles[i].sentence)
        k = at[i]
    head = " ".join(parts)
    tail_ids = tokenizer.encode(" " + " ".join(sentences[k:]), add_special_tokens=False)
    base = count(head)
    if base > length:
        raise ValueError(f"needles at {list(depths)} do not fit {length} tokens")
    need = length - base
    text = None
    for take in range(min(need + 3, len(tail_ids)), max(need - 8, 0) - 1, -1):
        candidate = head + tokenizer.decode(tail_ids[:take])
        if count(candidate) == length:
            text = candidate
            break
    if text is None:  # a tokenizer whose joins never land exactly: pad with spaces
        raise ValueError(f"could not cut a haystack of exactly {length} tokens")
    starts = [count(" ".join(parts[:m])) if m else 0 for m in marks]
    by_needle = [0] * len(needles)
    for i, start in zip(order, starts):
        by_needle[i] = start
    return Haystack(text=text, num_tokens=length, needle_token_starts=by_needle)


# -- grids ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    length: int
    depth: float
    repeat: int

    @property
    def key(self) -> str:
        return f"{self.length}/{self.depth:g}/{self.repeat}"


def grid_order(lengths: Sequence[int], depths: Sequence[float], repeats: int) -> list[Cell]:
    """Cells in the order that profits most from the prefix cache: lengths ascending, depths
    deepest first (each haystack shares the filler up to its needle with the one before)."""
    return [
        Cell(length, depth, r)
        for length in sorted(set(lengths))
        for depth in sorted(set(depths), reverse=True)
        for r in range(repeats)
    ]


def parse_lengths(text: str) -> list[int]:
    """'1k,4k,16k' or '1024,4096' -> token counts (k = 1,024)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", part)
        if not m:
            raise ValueError(f"--lengths: {part!r} is not a token count like 4096, 4k or 1m")
        value = float(m[1]) * {"": 1, "k": 1024, "m": 1024 * 1024}[m[2]]
        if value != int(value):
            raise ValueError(f"--lengths: {part!r} is not a whole number of tokens")
        if value < 1:
            raise ValueError(f"--lengths: {part!r} is not a token count >= 1")
        out.append(int(value))
    return out


def parse_depths(text: str) -> list[float]:
    """'0:100:10' (start:stop:step, stop included) or '0,50,100' -> percents."""
    if ":" in text:
        try:
            start, stop, step = (float(x) for x in text.split(":"))
        except ValueError as e:
            raise ValueError(f"--depths {text!r}: use start:stop:step, e.g. 0:100:10") from e
        if step <= 0 or start > stop:
            raise ValueError(f"--depths {text!r}: need start <= stop and step > 0")
        n = int(round((stop - start) / step))
        values = [start + i * step for i in range(n + 1) if start + i * step <= stop + 1e-9]
    else:
        try:
            values = [float(x) for x in text.split(",")]
        except ValueError as e:
            raise ValueError(f"--depths {text!r}: use 0,50,100 or 0:100:10") from e
    for v in values:
        if not 0 <= v <= 100:
            raise ValueError(f"--depths: {v:g} is outside 0..100 (percent of the haystack)")
    return values


@dataclass
class GridSettings:
    model: str
    lengths: list[int]
    depths: list[float]
    repeats: int
    num_needles: int
    seed: int
    max_new_tokens: int
    needle_file: str | None
    tp: int
    cp: int
    rope: str
    quant_policy: int

    def fingerprint(self) -> str:
        """What makes two runs' cells the same work (the mesh is not part of it)."""
        keep = dataclasses.asdict(self)
        for k in ("lengths", "depths", "repeats", "tp", "cp"):
            keep.pop(k)
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def cell_needles(settings: GridSettings, cell: Cell, custom: list[Needle] | None) -> list[Needle]:
    """The needles of one cell: per repeat (and needle slot) a seeded choice."""
    out = []
    for j in range(settings.num_needles):
        pick = settings.seed * 1_000_003 + cell.repeat * 101 + j
        if custom:
            out.append(custom[random.Random(pick).randrange(len(custom))])
        else:
            out.append(builtin_needle(pick))
    return out


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """The cells already in a results.jsonl (key -> row); a torn last line is ignored."""
    rows: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row["cell"]] = row
    return rows


def summarize(rows: Sequence[dict[str, Any]], settings: GridSettings) -> dict[str, Any]:
    """Per-length, per-cell and overall mean scores, prefill counts and the settings."""
    by_length: dict[int, list[float]] = {}
    by_cell: dict[str, list[float]] = {}
    for r in rows:
        by_length.setdefault(r["length"], []).append(r["score"])
        by_cell.setdefault(f"{r['length']}/{r['depth']:g}", []).append(r["score"])
    scores = [r["score"] for r in rows]
    return {
        "settings": dataclasses.asdict(settings),
        "overall": sum(scores) / len(scores) if scores else None,
        "per_length": {str(k): sum(v) / len(v) for k, v in sorted(by_length.items())},
        "per_cell": {k: sum(v) / len(v) for k, v in by_cell.items()},
        "num_cells": len(rows),
        "prefill_tokens_computed": sum(r["prefill_tokens"] for r in rows),
        "prefill_tokens_naive": sum(r["prompt_tokens"] for r in rows),
    }


def draw_heatmap(summary: dict[str, Any], path: Path, title: str) -> None:
    """depth x length, coloured by mean score (0 red .. 100 green), each cell labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary["settings"]
    lengths, depths = sorted(s["lengths"]), sorted(s["depths"])
    grid = [
        [summary["per_cell"].get(f"{length}/{d:g}", float("nan")) for length in lengths]
        for d in depths
    ]
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 3, 0.45 * len(depths) + 2))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_short(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("haystack length (tokens)")
    ax.set_ylabel("needle depth")
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            if v == v:
                ax.text(x, y, f"{v:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="score")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Lines of per-cell score differences (b - a) between two summaries."""
    cells = sorted(
        set(a["per_cell"]) | set(b["per_cell"]),
        key=lambda k: (int(k.split("/")[0]), float(k.split("/")[1])),
    )
    lines = [f"{'length':>8} {'depth':>6} {'A':>6} {'B':>6} {'B-A':>6}"]
    for k in cells:
        length, depth = k.split("/")
        sa, sb = a["per_cell"].get(k), b["per_cell"].get(k)
        diff = f"{sb - sa:+.0f}" if sa is not None and sb is not None else "n/a"
        fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        lines.append(f"{length:>8} {depth + '%':>6} {fmt(sa):>6} {fmt(sb):>6} {diff:>6}")
    oa, ob = a.get("overall"), b.get("overall")
    if oa is not None and ob is not None:
        lines.append(f"overall: A {oa:.1f}, B {ob:.1f}, B-A {ob - oa:+.1f}")
    return lines


def run_grid(
    rt: Any,
    settings: GridSettings,
    out_dir: Path,
    custom: list[Needle] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every cell not yet in out_dir/results.jsonl as a job on `rt`'s durable queue (one
    at a time, deepest first, so each shares the cached prefix of the one before), append a
    line per cell, and write summary.json and heatmap.png. A rerun of the same grid resumes:
    cells already written are skipped; a cell whose job finished after the last write is read
    back from the queue (same idempotency key) without computing it again."""
    import time

    from dist_runtime.progress import Phase
    from dist_runtime.sampling_params import SamplingParams

    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.jsonl"
    grid_path = out_dir / "grid.json"
    fingerprint = settings.fingerprint()
    if grid_path.exists():
        previous = json.loads(grid_path.read_text(encoding="utf-8"))
        if previous.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out_dir} holds results of another grid (model, needles, seed or length of "
                "the answers differ); give another --out or remove it"
            )
    grid_path.write_text(
        json.dumps({"fingerprint": fingerprint, **dataclasses.asdict(settings)}, indent=1),
        encoding="utf-8",
    )
    done = read_results(results_path)
    cells = grid_order(settings.lengths, settings.depths, settings.repeats)
    todo = [c for c in cells if c.key not in done]
    tokenizer = rt.tokenizer
    params = SamplingParams(max_new_tokens=settings.max_new_tokens)
    with (
        open(results_path, "a", encoding="utf-8") as out,
        Phase(
            "needle cells", "cell", len(cells), enabled=progress, initial=len(cells) - len(todo)
        ) as bar,
    ):
        if len(todo) < len(cells):
            logger.info(
                "%d of %d cells already in %s; computing %d",
                len(cells) - len(todo),
                len(cells),
                results_path,
                len(todo),
            )
        for cell in todo:
            needles = cell_needles(settings, cell, custom)
            depths = needle_depths(cell.depth, len(needles))
            hay = build_haystack(tokenizer, cell.length, depths, needles, seed=settings.seed)
            before = rt.engine.stats()["num_prompt_tokens_computed"]
            started = time.perf_counter()
            job_id = rt.submit(
                hay.text,
                [n.question for n in needles],
                params,
                idempotency_key=f"needle-{fingerprint}-{cell.key}",
            )
            answers = rt.result(job_id)
            seconds = time.perf_counter() - started
            computed = int(rt.engine.stats()["num_prompt_tokens_computed"] - before)
            scores = [score_answer(a, [n.key]) for a, n in zip(answers, needles)]
            row = {
                "cell": cell.key,
                "length": cell.length,
                "depth": cell.depth,
                "repeat": cell.repeat,
                "needles": [dataclasses.asdict(n) for n in needles],
                "needle_depths": depths,
                "needle_token_starts": hay.needle_token_starts,
                "answers": answers,
                "answer": answers[0] if len(answers) == 1 else answers,
                "score": sum(scores) / len(scores),
                "prefill_tokens": computed,
                "prompt_tokens": rt.status(job_id).prefill_tokens_total,  # counted at submit
                "seconds": round(seconds, 3),
                "job_id": job_id,
            }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            done[cell.key] = row
            bar.update_to(bar.n + 1)
    rows = [done[c.key] for c in cells if c.key in done]
    summary = summarize(rows, settings)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    title = (
        f"{Path(settings.model).name}  tp={settings.tp} cp={settings.cp}  RoPE {settings.rope}"
        + (f"  KV int{settings.quant_policy}" if settings.quant_policy else "")
        + f"\nneedle retrieval: {summary['overall']:.1f} overall"
        + (f", {settings.num_needles} needles per cell" if settings.num_needles > 1 else "")
    )
    draw_heatmap(summary, out_dir / "heatmap.png", title)
    return summary
