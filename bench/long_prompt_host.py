"""CPU benchmark of the host work a question about a long, already cached document costs
before the model runs: tokenizing the prompt, checking its ids, looking it up in the prefix
cache.

    python bench/long_prompt_host.py [--tokens 1048576] [--repeats 3] [--report PATH]

The prompt is the demo model's chat template around a `--tokens`-token document (the bundled
report, repeated) and a question; each repeat asks a new question. Measured, best of
`--repeats`:

- tokenize: the tokenizer encoding the whole prompt (what every request paid before) against
  `Tokenizer.encode`, which reuses the tokens of the previous question's prompt
  (`dist_runtime.text.token_cache`); the two must be equal, which it asserts;
- id checks: the runtime's look at a token-id prompt and the engine's check of its ids
  against the vocabulary, per id in Python (as before, copied here) against the checks at C
  speed (`set(map(type, ids))`, `min`, `max`);
- prefix lookup: `BlockManager.match_prefix` finding the whole document in the prefix cache
  (blocks of 16), with the in-process hashes and with the disk tier's stable digests.

One summary line: the host time per question before and after, by part. `--report` writes a
markdown report.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_report_header  # noqa: E402
from dist_runtime.engine.block_manager import BlockManager  # noqa: E402
from dist_runtime.engine.engine import _check_ids  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from dist_runtime.runtime import Runtime, _as_token_id  # noqa: E402
from dist_runtime.text.chat import build_chat_prompt  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402
from dist_runtime.text.tokenizer import Tokenizer  # noqa: E402


def per_id_prompt(ids: list[int]) -> list[int]:
    """The runtime's look at a token-id prompt as it was: every id tested in Python."""
    text = next((t for t in ids if isinstance(t, (str, bytes))), None)
    assert text is None
    return [_as_token_id(t) for t in ids]


def per_id_check(ids: list[int], vocab_size: int) -> None:
    """The engine's check as it was: every id tested in Python."""
    bad = [
        t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size
    ]
    assert not bad


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=1 << 20, help="document length in tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    tok = Tokenizer(demo_model_path())
    report = harbor_report().text
    per_copy = len(tok.encode(report, add_special_tokens=False))
    doc = report * (args.tokens // per_copy + 1)
    questions = iter(range(10_000))

    def prompt() -> str:
        messages = [{"role": "user", "content": f"{doc}\n\nQuestion {next(questions)}: which "
                     "pier is the longest?"}]  # fmt: skip
        return build_chat_prompt(tok, messages)

    first = prompt()
    ids = tok.encode(first, add_special_tokens=False)  # kept for the next question
    n = len(ids)
    texts = [prompt() for _ in range(args.repeats * 2)]
    whole = best(lambda: tok._backend.encode(texts.pop()), args.repeats)
    reused_times = []
    for _ in range(args.repeats):
        text = texts.pop()
        start = time.perf_counter()
        got = tok.encode(text, add_special_tokens=False)
        reused_times.append(time.perf_counter() - start)
        assert got == tok._backend.encode(text), "reused tokens differ from a whole encoding"
    reused = min(reused_times)
    assert tok.prefix_tokens.hits >= args.repeats
    vocab = tok.vocab_size
    old_check = best(lambda: per_id_check(ids, vocab), args.repeats) + best(
        lambda: per_id_prompt(ids), args.repeats
    )
    new_check = best(lambda: _check_ids(ids, vocab, 0), args.repeats) + best(
        lambda: Runtime._prompt_ids(None, ids, 0),  # type: ignore[arg-type]  # (no self needed)
        args.repeats,
    )

    lookups = {}
    for name, root in (("in-process hashes", None), ("disk tier's digests", 12345)):
        blocks = BlockManager(n // 16 + 8, 16, root=root)
        table: list[int] = []
        blocks.grow(table, n)
        parent = blocks.root_hash
        for i in range(n // 16):
            parent = blocks.register_block(i, table[i], parent, ids[i * 16 : (i + 1) * 16])

        def look(blocks: BlockManager = blocks) -> None:
            found, _ = blocks.match_prefix(ids, n)
            assert len(found) == n // 16
            blocks.free(found)

        lookups[name] = best(look, args.repeats)
    lookup = lookups["in-process hashes"]
    disk = lookups["disk tier's digests"]
    before = whole + old_check + lookup
    after = reused + new_check + lookup
    summary = (
        f"long-prompt-host: a question after a cached {n}-token document costs "
        f"{after * 1e3:.0f} ms of host work instead of {before * 1e3:.0f} ms "
        f"({before / after:.1f}x): tokenize {reused * 1e3:.0f} ms reusing the last prompt's "
        f"tokens vs {whole * 1e3:.0f} ms whole; id checks {new_check * 1e3:.0f} vs "
        f"{old_check * 1e3:.0f} ms; prefix lookup {lookup * 1e3:.0f} ms "
        f"({disk * 1e3:.0f} ms with the disk tier's digests)"
    )
    print(summary)
    if args.report:
        lines = [
            *cpu_report_header("Host work per question on a long document", summary, 1),
            f"- demo tokenizer (SmolLM2, vocab {vocab}); the chat template around the bundled "
            f"report repeated to {n} tokens and a question; best of {args.repeats}",
            "",
            "| part | before | after |",
            "|---|---:|---:|",
            f"| tokenize the prompt | {whole * 1e3:.1f} ms | {reused * 1e3:.1f} ms |",
            f"| check its ids (runtime + engine) | {old_check * 1e3:.1f} ms "
            f"| {new_check * 1e3:.1f} ms |",
            f"| prefix-cache lookup (in-process hashes) | {lookup * 1e3:.1f} ms "
            f"| {lookup * 1e3:.1f} ms |",
            f"| prefix-cache lookup (disk tier's digests) | {disk * 1e3:.1f} ms | (same) |",
            f"| **total (in-process hashes)** | **{before * 1e3:.0f} ms** "
            f"| **{after * 1e3:.0f} ms** |",
        ]
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
