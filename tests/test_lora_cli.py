"""LoRA adapters from the command line: `launch/run.py --lora-modules NAME=DIR --adapter NAME`
answers as the checkpoint with the adapter merged into its weights does, an `adapter` key on a
`--jobs` line picks the adapter for that job only, and a name that was not loaded is refused
(exit 2, one line naming it). On the demo model, whose answers are readable text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch import run as run_cli

ENGINE = ["--device", "cpu", "--dtype", "float32", "--session-len", "1024", "--log-level", "ERROR"]
PROMPT = "Name three colors of the sea."


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dist_runtime.formats.demo_model import demo_model_path
    from dist_runtime.formats.lora_adapter import merge_adapter, write_random_adapter

    tmp = tmp_path_factory.mktemp("lora-cli")
    model = demo_model_path()
    adapter = write_random_adapter(tmp / "adapter", model, std=0.02, seed=3)
    return {"model": model, "adapter": adapter, "merged": merge_adapter(model, adapter, tmp / "m")}


def _answer(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert run_cli.main([*argv, "--prompt", PROMPT, "--max-new-tokens", "16", *ENGINE]) == 0
    out = capsys.readouterr().out
    head, _, rest = out.partition(f"### prompt: {PROMPT}\n")
    assert rest, out
    return rest.split("\n\n")[0]


def test_adapter_answers_as_the_merged_checkpoint(
    demo: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    lora = ["--lora-modules", f"sea={demo['adapter']}"]
    with_adapter = _answer(capsys, ["--model", str(demo["model"]), *lora, "--adapter", "sea"])
    merged = _answer(capsys, ["--model", str(demo["merged"])])
    base = _answer(capsys, ["--model", str(demo["model"]), *lora])
    assert with_adapter == merged != base
    assert len(with_adapter.split()) >= 3


def test_jobs_line_picks_its_adapter(
    demo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = "The harbour master is Tom Reyes. The ferry leaves pier 4 at seven."
    job: dict[str, object] = {"document": doc, "questions": ["Name three colors of the sea."]}

    def run(model: Path, lines: list[dict[str, object]], *extra: str) -> list[str]:
        jobs, out = tmp_path / "jobs.jsonl", tmp_path / "out.jsonl"
        jobs.write_text("".join(json.dumps(x) + "\n" for x in lines))
        argv = ["--model", str(model), "--jobs", str(jobs), "--out", str(out), *extra]
        assert run_cli.main([*argv, "--max-new-tokens", "12", *ENGINE]) == 0
        capsys.readouterr()
        records = [json.loads(x) for x in out.read_text().splitlines()]
        return [r["answers"][0] for r in sorted(records, key=lambda r: r["line"])]

    lora = ("--lora-modules", f"sea={demo['adapter']}")
    adapted, plain = run(demo["model"], [{**job, "adapter": "sea"}, job], *lora)
    (merged,) = run(demo["merged"], [job])
    assert adapted == merged != plain


def test_an_adapter_not_loaded_is_refused(
    demo: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(demo["model"]), "--prompt", "hi", "--adapter", "nope", *ENGINE]
    assert run_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "adapter 'nope' is not loaded (loaded: none)" in err and "--lora-modules" in err
