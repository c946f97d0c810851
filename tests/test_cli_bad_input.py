"""Bad input to the command lines (`launch/run.py`, `launch/submit.py`) fails before any work
starts: exit status 2, one `error: ...` line on stderr naming the value (argparse's usage and
error for malformed flags), no traceback, nothing queued.

The subprocess tests run the scripts as a user would, with an empty demo-model cache and no
package index, so a check that ran only after fetching the demo model would fail them. The
in-process table covers every other flag through `main(argv)` with the demo model, the
Runtime and the job queues replaced by fakes that fail the test if they are reached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import runtime as runtime_module
from dist_runtime.jobs.client import JobClient
from dist_runtime.jobs.store import JobState
from launch import run as run_cli
from launch import submit as submit_cli
from tests.conftest import REPO_ROOT

RUN = REPO_ROOT / "launch" / "run.py"
SUBMIT = REPO_ROOT / "launch" / "submit.py"
CPU = ["--device", "cpu", "--dtype", "float32", "--log-level", "ERROR"]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Inputs the cases point at: good and bad documents, job files and YAML."""
    f = {
        "doc": tmp_path / "doc.txt",
        "latin1": tmp_path / "latin1.txt",
        "blank": tmp_path / "blank.txt",
        "dir": tmp_path / "a-dir",
        "missing": tmp_path / "missing.txt",
        "typo_yaml": tmp_path / "typo.yaml",
        "bad_yaml": tmp_path / "bad.yaml",
        "jobs": tmp_path / "in.jsonl",
        "jobs_mnt0": tmp_path / "mnt0.jsonl",
        "jobs_qint": tmp_path / "qint.jsonl",
        "jobs_blank_doc": tmp_path / "blankdoc.jsonl",
        "jobs_empty": tmp_path / "empty.jsonl",
        "jobdir": tmp_path / "jobs",
    }
    f["doc"].write_text("The keeper of the light is Ada Brennan.\n", encoding="utf-8")
    f["latin1"].write_bytes(b"caf\xe9 au lait\n")
    f["blank"].write_text("  \n\n", encoding="utf-8")
    f["dir"].mkdir()
    f["typo_yaml"].write_text("sesion_len: 8\n", encoding="utf-8")
    f["bad_yaml"].write_text("model: [unclosed\n", encoding="utf-8")

    def jsonl(path: Path, *lines: dict[str, Any]) -> None:
        path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")

    jsonl(f["jobs"], {"document": "The keeper is Ada.", "questions": ["Who?"]})
    jsonl(
        f["jobs_mnt0"],
        {"document": "d", "questions": ["q"]},
        {"document": "d", "questions": ["q"], "max_new_tokens": 0},
    )
    jsonl(f["jobs_qint"], {"document": "d", "questions": ["q", 3]})
    jsonl(f["jobs_blank_doc"], {"document": " ", "questions": ["q"]})
    f["jobs_empty"].write_text("\n", encoding="utf-8")
    return f


# -- as a user runs them ----------------------------------------------------------------------


def _cli(script: Path, args: list[Any], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DIST_RUNTIME_CACHE": str(cwd / "empty-cache"),  # no demo model here ...
        "PIP_NO_INDEX": "1",  # ... and no download of it either
        "PYTHONWARNINGS": "ignore",
    }
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def _assert_rejected(
    proc: subprocess.CompletedProcess[str], *names: str, one_line: bool = True
) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines and "error: " in lines[-1], proc.stderr[-2000:]
    for name in names:
        assert name in lines[-1], lines[-1]
    if one_line:
        assert len(lines) == 1, proc.stderr[-2000:]


RUN_CASES: list[tuple[list[str], list[str], bool]] = [
    # (argv, texts the error line names, one line only)
    (["--tp", "0"], ["--tp must be an integer >= 1, got 0"], True),
    (["--log-level", "LOUD"], ["--log-level", "'LOUD'"], False),
    (["--config", "{typo_yaml}"], ["unknown keys ['sesion_len']", "typo.yaml"], True),
    (["--doc", "{latin1}", "-q", "q"], ["latin1.txt", "not UTF-8", "0xe9", "convert it"], True),
    (["--jobs", "{jobs_mnt0}", "--out", "{dir}/a.jsonl"], ["mnt0.jsonl:2: max_new_tokens"], True),
    (["--serve", "--no-ray-service", "--job-dir", "{doc}"], ["doc.txt", "is a file"], True),
    (["--out", "{dir}/a.jsonl"], ["--out", "--jobs"], True),
]


@pytest.mark.parametrize(
    ("argv", "names", "one_line"),
    RUN_CASES,
    ids=["tp-0", "log-level", "yaml-typo", "doc-not-utf8", "jobs-line", "job-dir-file", "out"],
)
def test_run_cli_rejects(
    files: dict[str, Path], tmp_path: Path, argv: list[str], names: list[str], one_line: bool
) -> None:
    args = [a.format(**files) for a in argv]
    _assert_rejected(_cli(RUN, args, tmp_path), *names, one_line=one_line)


@pytest.mark.parametrize("script", [RUN, REPO_ROOT / "launch" / "chat.py"])
@pytest.mark.parametrize("argv", [["--help"], ["--tp", "0"]])
def test_help_and_flag_errors_answer_without_loading_torch(
    tmp_path: Path, script: Path, argv: list[str]
) -> None:
    """--help and a bad flag answer before torch loads (it alone takes seconds to import):
    the Runtime, the demo model's conversion and LoRA's tensor code load once the flags pass."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(script)!r}, *{argv!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=90
    )
    assert proc.stdout.splitlines()[-1] == f"exit {0 if argv == ['--help'] else 2} False", (
        proc.stdout[-2000:] + proc.stderr[-2000:]
    )


def test_run_cli_out_in_a_missing_directory_queues_nothing(
    files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "no-such-dir" / "answers.jsonl"
    args = ["--jobs", files["jobs"], "--out", out, "--job-dir", files["jobdir"]]
    _assert_rejected(_cli(RUN, args, tmp_path), "no-such-dir", "does not exist")
    assert not files["jobdir"].exists()  # no queue opened, no job queued


def test_run_cli_dry_run_checks_like_a_start(tiny_llama_dir: Path, tmp_path: Path) -> None:
    args = ["--dry-run", "--model", tiny_llama_dir, "--session-len", "0"]
    _assert_rejected(_cli(RUN, args, tmp_path), "--session-len must be an integer >= 2, got 0")


def test_run_cli_corrupt_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "ckpt"))
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    proc = _cli(RUN, ["--model", folder, "--prompt", "hi", *CPU], tmp_path)
    _assert_rejected(proc, shard.name, "not a readable safetensors file", "re-convert")


def test_run_cli_document_over_session_len(tiny_llama_dir: Path, tmp_path: Path) -> None:
    doc = tmp_path / "long.txt"
    doc.write_text("The tide was high at dawn. " * 40, encoding="utf-8")
    args = ["--model", tiny_llama_dir, "--session-len", "64", "--doc", doc, "-q", "When?", *CPU]
    proc = _cli(RUN, [*args, "--max-new-tokens", "8"], tmp_path)
    # The model loads first (the prompt is tokenized with it), so progress bars may precede it.
    # In the flags' names, with every way out: a longer session, fewer new tokens, less text.
    _assert_rejected(
        proc,
        "--max-new-tokens 8",
        "over --session-len 64; raise --session-len (with --cp",
        "lower --max-new-tokens or shorten the document",
        one_line=False,
    )
    assert proc.stdout == ""


def test_submit_cli_bad_timeout_queues_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    files["jobdir"].mkdir()
    args = ["--job-dir", files["jobdir"], "--doc", files["doc"], "-q", "q", "--wait"]
    proc = _cli(SUBMIT, [*args, "--timeout", "-1"], tmp_path)
    _assert_rejected(proc, "--timeout must be a number of seconds >= 0, got -1.0")
    assert proc.stdout == ""  # no job id printed ...
    assert JobClient(files["jobdir"]).jobs() == []  # ... and none queued


SUBMIT_CASES: list[tuple[list[str], list[str], bool]] = [
    (["--job-dir", "{jobdir}", "--status", "a", "--cancel", "b"], ["--cancel", "--status"], False),
    # No --job-dir: the checks run before any Ray connection is tried.
    (["--doc", "{missing}", "-q", "q"], ["missing.txt", "No such file"], True),
    (["--job-dir", "{missing}", "--list"], ["missing.txt", "is not a directory"], True),
]


@pytest.mark.parametrize(
    ("argv", "names", "one_line"), SUBMIT_CASES, ids=["two-actions", "no-doc", "no-job-dir"]
)
def test_submit_cli_rejects(
    files: dict[str, Path], tmp_path: Path, argv: list[str], names: list[str], one_line: bool
) -> None:
    args = [a.format(**files) for a in argv]
    _assert_rejected(_cli(SUBMIT, args, tmp_path), *names, one_line=one_line)
    assert not files["missing"].exists()  # a mistyped --job-dir is not created


# -- every other flag, in process -------------------------------------------------------------


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fail the test if the CLI gets as far as the demo model, a Runtime or a job queue."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("bad input got past the checks")

    for module, name in [
        (run_cli, "demo_model_path"),
        (runtime_module, "Runtime"),
        (submit_cli, "_RayQueue"),
        (submit_cli, "_DirQueue"),
    ]:
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.chdir(tmp_path)


RUN_TABLE: list[Any] = [
    pytest.param(["--cp", "-1"], "--cp must be an integer >= 1, got -1", id="cp"),
    pytest.param(
        ["--session-len", "1"], "--session-len must be an integer >= 2, got 1", id="session-len"
    ),
    pytest.param(
        ["--block-size", "0"], "--block-size must be a power of two, got 0", id="block-size"
    ),
    pytest.param(
        ["--num-blocks", "-3"],
        "--num-blocks must be a positive integer or null, got -3",
        id="num-blocks",
    ),
    pytest.param(
        ["--quant-policy", "2"],
        "--quant-policy must be one of [0, 8, 4] (0: no KV quantization, 8: int8, 4: int4), got 2",
        id="quant-policy",
    ),
    pytest.param(
        ["--cpu-kv-cache-gb", "0"],
        "--cpu-kv-cache-gb must be a number of GiB > 0 (or left out: one full session's), got 0.0",
        id="cpu-kv-cache-gb",
    ),
    pytest.param(
        ["--max-num-seqs", "0"],
        "--max-num-seqs must be a positive integer, got 0",
        id="max-num-seqs",
    ),
    pytest.param(
        ["--num-speculative-tokens", "-1"],
        "--num-speculative-tokens must be an integer in [0, 16] (0: no speculative decoding), "
        "got -1",
        id="num-speculative-tokens",
    ),
    pytest.param(
        ["--chat-template", "no-such-template.jinja"],
        "--chat-template 'no-such-template.jinja' is neither a file nor a Jinja template",
        id="chat-template",
    ),
    pytest.param(
        ["--priority-aging-s", "-5"],
        "--priority-aging-s must be a number of seconds >= 0 (0: no aging), got -5.0",
        id="priority-aging-s",
    ),
    pytest.param(
        ["--rope-scaling-factor", "0.5"],
        "--rope-scaling-factor must be a number >= 1, got 0.5",
        id="rope-factor",
    ),
    pytest.param(
        ["--max-new-tokens", "0"],
        "--max-new-tokens must be an integer >= 1, got 0",
        id="max-new-tokens",
    ),
    pytest.param(
        ["--temperature", "-1"],
        "--temperature must be >= 0 (0 = greedy), got -1.0",
        id="temperature",
    ),
    pytest.param(["--top-p", "0"], "--top-p must be in (0, 1], got 0.0", id="top-p"),
    pytest.param(
        ["--collective-timeout", "0"],
        "--collective-timeout must be a positive number of seconds, got 0.0",
        id="collective-timeout",
    ),
    pytest.param(
        ["--step-timeout", "-5"],
        "--step-timeout must be a positive number of seconds, got -5.0",
        id="step-timeout",
    ),
    pytest.param(
        ["--request-retries", "-1"],
        "--request-retries must be an integer >= 0, got -1",
        id="request-retries",
    ),
    pytest.param(
        ["--master-addr", ""], "--master-addr must be a host name or IP address", id="master-addr"
    ),
    pytest.param(["--seed", "-1"], "--seed must be a non-negative integer", id="seed"),
    pytest.param(
        ["--thinking-budget", "-2"],
        "--thinking-budget must be an integer >= 0 or None, got -2",
        id="thinking-budget",
    ),
    pytest.param(
        ["--json-schema", "{missing}"],
        "--json-schema {missing}: cannot read it (No such file or directory)",
        id="json-schema-missing",
    ),
    pytest.param(
        ["--json-schema", '{{"type": "array", "uniqueItems": true}}'],  # (braces doubled)
        "--json-schema: #: JSON Schema keyword 'uniqueItems' is not supported",
        id="json-schema-keyword",
    ),
    pytest.param(
        ["--json", "--json-schema", "{{}}"],
        "give --json-schema or --json, not both",
        id="json-both",
    ),
    pytest.param(
        ["--grammar", "{missing}"],
        "--grammar {missing}: cannot read it (No such file or directory)",
        id="grammar-missing",
    ),
    pytest.param(
        ["--grammar", 'root ::= root "a" | "a"'],
        "--grammar: rule root is left-recursive (root -> root)",
        id="grammar-left-recursive",
    ),
    pytest.param(
        ["--json", "--grammar", 'root ::= "a"'],
        "give one of guided_choice, guided_regex, --grammar, --json-schema and --json",
        id="grammar-and-json",
    ),
    pytest.param(
        ["--config", "{missing}"], "config file '{missing}' does not exist", id="config-missing"
    ),
    pytest.param(
        ["--config", "{bad_yaml}"], "config file '{bad_yaml}' is not valid YAML", id="config-syntax"
    ),
    pytest.param(
        ["--doc", "{missing}", "-q", "q"],
        "cannot read --doc '{missing}': No such file",
        id="doc-missing",
    ),
    pytest.param(
        ["--doc", "{dir}", "-q", "q"], "cannot read --doc '{dir}': Is a directory", id="doc-dir"
    ),
    pytest.param(["--doc", "{blank}", "-q", "q"], "--doc '{blank}' holds no text", id="doc-blank"),
    pytest.param(
        ["--doc", "{doc}"], "--doc needs at least one -q/--question", id="doc-no-question"
    ),
    pytest.param(
        ["--doc", "{doc}", "-q", " "], "-q/--question 1 is empty (' ')", id="question-blank"
    ),
    pytest.param(["--prompt", ""], "--prompt 1 is empty ('')", id="prompt-blank"),
    pytest.param(
        ["--prompt", "hi", "--doc", "{doc}", "-q", "q"],
        "do not combine it with --doc/-q",
        id="prompt-and-doc",
    ),
    pytest.param(
        ["--jobs", "{missing}", "--out", "o.jsonl"],
        "cannot read --jobs '{missing}'",
        id="jobs-missing",
    ),
    pytest.param(["--jobs", "{jobs}"], "--jobs needs --out FILE", id="jobs-no-out"),
    pytest.param(["--jobs", "{jobs_empty}", "--out", "o.jsonl"], "holds no job", id="jobs-empty"),
    pytest.param(
        ["--jobs", "{jobs_qint}", "--out", "o.jsonl"],
        "qint.jsonl:1: questions must be",
        id="jobs-question-types",
    ),
    pytest.param(
        ["--jobs", "{jobs_blank_doc}", "--out", "o.jsonl"],
        "blankdoc.jsonl:1: document must",
        id="jobs-blank-document",
    ),
    pytest.param(
        ["--jobs", "{jobs}", "--out", "{dir}"], "--out '{dir}' is a directory", id="out-is-dir"
    ),
    pytest.param(
        ["--serve", "--jobs", "{jobs}", "--out", "o.jsonl"],
        "--serve and --jobs are separate",
        id="serve-and-jobs",
    ),
    pytest.param(
        ["--serve", "-q", "q"], "--doc/-q/--prompt do not apply to --serve", id="serve-and-question"
    ),
    pytest.param(["--no-ray-service"], "apply to --serve only", id="ray-flags-without-serve"),
    pytest.param(
        ["--serve", "--temperature", "0.7", "--max-new-tokens", "8"],
        "--max-new-tokens, --temperature do not apply to --serve",
        id="sampling-flags-with-serve",
    ),
    pytest.param(
        ["--job-dir", "{jobdir}", "--prompt", "hi"],
        "--job-dir is the queue of --serve or --jobs",
        id="job-dir-without-queue",
    ),
    pytest.param(
        ["--device-memory-gib", "80"],
        "--device-memory-gib only sizes the --dry-run plan",
        id="memory-without-dry-run",
    ),
    pytest.param(
        ["--dry-run", "--model", "{model}", "--device-memory-gib", "-1"],
        "got -1.0",
        id="dry-run-memory",
    ),
    pytest.param(
        ["--dry-run", "--model", "{model}", "--block-size", "12"],
        "power of two, got 12",
        id="dry-run-block-size",
    ),
    pytest.param(
        ["--dry-run", "--model", "{model}", "--config", "{typo_yaml}"],
        "unknown keys ['sesion_",
        id="dry-run-yaml",
    ),
    pytest.param(
        ["--lora-modules", "sql"],
        "--lora-modules 'sql' must be NAME=DIR (e.g. sql=",
        id="lora-modules-no-dir",
    ),
    pytest.param(
        ["--lora-modules", "a={doc}", "a={dir}"], "--lora-modules names 'a' twice", id="lora-twice"
    ),
    pytest.param(
        ["--dry-run", "--model", "{model}", "--lora-modules", "x={dir}"],
        "LoRA adapter 'x' ({dir}): adapter_config.json is missing",
        id="dry-run-lora-folder",
    ),
    pytest.param(
        ["--dry-run", "--model", "{model}", "--tp", "3"],
        "--tp 3 cannot shard this model",
        id="dry-run-tp",
    ),
    pytest.param(
        ["--dry-run", "--model", "{model}", "--session-len", "8192"],
        "--session-len 8192 is over the 4096 tokens this model's RoPE supports",
        id="dry-run-rope-limit",
    ),
]


@pytest.mark.usefixtures("nothing_starts")
@pytest.mark.parametrize(("argv", "message"), RUN_TABLE)
def test_run_main_rejects(
    files: dict[str, Path],
    tiny_llama_dir: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    names = {**files, "model": tiny_llama_dir}
    assert run_cli.main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert message.format(**names) in err
    if "YAML" not in message:  # PyYAML's message marks the line and column on lines of its own
        assert err.count("\n") == 1, err
    assert not files["jobdir"].exists()


def test_run_main_missing_model_folder(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Runtime itself refuses the folder before it starts anything."""
    import dist_runtime.engine.engine as engine_module

    def forbidden(config: Any) -> Any:
        raise AssertionError("workers were started for a missing model folder")

    monkeypatch.setattr(engine_module, "create_executor", forbidden)
    argv = ["--model", str(files["missing"]), "--prompt", "hi", "--device", "cpu"]
    assert run_cli.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: model folder '{files['missing']}' does not exist; pass --model with a folder "
        "holding config.json and *.safetensors\n"
    )


SUBMIT_TABLE: list[Any] = [
    pytest.param([], "give --doc FILE and at least one -q/--question", id="nothing"),
    pytest.param(
        ["--doc", "{doc}"], "give --doc FILE and at least one -q/--question", id="no-question"
    ),
    pytest.param(["-q", "q"], "give --doc FILE and at least one -q/--question", id="no-doc"),
    pytest.param(["--doc", "{doc}", "-q", ""], "-q/--question 1 is empty", id="question-blank"),
    pytest.param(
        ["--doc", "{dir}", "-q", "q"], "cannot read --doc '{dir}': Is a directory", id="doc-dir"
    ),
    pytest.param(
        ["--doc", "{latin1}", "-q", "q"],
        "0xe9 at offset 3); convert it to UTF-8, or pass --repl",
        id="doc-not-utf8",
    ),
    pytest.param(
        ["--doc", "{doc}", "-q", "q", "--max-new-tokens", "0"],
        "--max-new-tokens must be an integer >= 1, got 0",
        id="max-new-tokens",
    ),
    pytest.param(
        ["--doc", "{doc}", "-q", "q", "--timeout", "5"],
        "--timeout is how long --wait or --resu",
        id="timeout-without-wait",
    ),
    pytest.param(
        ["--doc", "{doc}", "-q", "q", "--wait", "--timeout", "nan"], "got nan", id="timeout-nan"
    ),
    pytest.param(
        ["--status", "x", "-q", "q"],
        "--doc/-q submit a new job; do not combine them",
        id="status-and-question",
    ),
    pytest.param(
        ["--job-dir", "{doc}", "--list"], "--job-dir '{doc}' is not a directory", id="job-dir-file"
    ),
]


@pytest.mark.usefixtures("nothing_starts")
@pytest.mark.parametrize(("argv", "message"), SUBMIT_TABLE)
def test_submit_main_rejects(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert submit_cli.main([a.format(**files) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(**files) in err


def test_submit_main_unknown_job_ids(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    JobClient(files["jobdir"]).close()  # an empty queue
    for action in ("--status", "--result", "--cancel"):
        assert submit_cli.main(["--job-dir", str(files["jobdir"]), action, "nope"]) == 2
        assert "error: no job 'nope' in " in capsys.readouterr().err


def test_submit_wait_timeout_has_its_own_exit_code(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """No service drains this queue: --wait runs out of --timeout, which is not bad input
    (exit 2) but exit 124, with the job id and the commands that follow it up."""
    jobdir = str(files["jobdir"])
    JobClient(jobdir).close()
    argv = ["--job-dir", jobdir, "--doc", str(files["doc"]), "-q", "Who?", "--wait"]
    assert submit_cli.main([*argv, "--timeout", "0.2"]) == submit_cli.EXIT_TIMEOUT == 124
    out, err = capsys.readouterr()
    job_id = out.strip()
    assert err.startswith(f"error: job {job_id} not finished after --timeout 0.2 s (it is queued)")
    for action in ("--status", "--result", "--cancel"):
        assert f"python launch/submit.py --job-dir {jobdir} {action} {job_id}" in err
    assert submit_cli.main(["--job-dir", jobdir, "--result", job_id, "--timeout", "0"]) == 124
    assert JobClient(jobdir).status(job_id).state is JobState.QUEUED  # nothing cancelled it
    assert "124" in _submit_help()


def _submit_help() -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        submit_cli.parse_args(["--help"])
    return buf.getvalue()


def test_submit_idempotency_key_of_another_job_exits_2(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    jobdir = str(files["jobdir"])
    JobClient(jobdir).close()
    argv = ["--job-dir", jobdir, "--doc", str(files["doc"]), "--idempotency-key", "nightly-7"]
    assert submit_cli.main([*argv, "-q", "Who?"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert submit_cli.main([*argv, "-q", "Who?"]) == 0  # a retry: the same job, the same id
    assert capsys.readouterr().out.strip() == job_id
    assert submit_cli.main([*argv, "-q", "Where?"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(
        f"error: --idempotency-key 'nightly-7' already belongs to job {job_id}, whose "
        "questions differ; nothing was queued"
    )
    assert [j.job_id for j in JobClient(jobdir).jobs()] == [job_id]


def test_submit_main_without_a_ray_cluster(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = pytest.importorskip("ray")

    def no_cluster(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", no_cluster)
    argv = ["--doc", str(files["doc"]), "-q", "q", "--address", "10.0.0.9:6379"]
    assert submit_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no Ray cluster at --address '10.0.0.9:6379'" in err and "--job-dir" in err


def test_run_main_workers_that_cannot_start(
    files: dict[str, Path],
    tiny_llama_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dist_runtime.engine.executor.base import WorkerError

    def too_big(config: Any) -> Any:
        raise WorkerError("tp*cp = 8 workers need 8 CPU but the Ray cluster has 4; lower tp/cp")

    monkeypatch.setattr(runtime_module, "Runtime", too_big)
    argv = ["--model", str(tiny_llama_dir), "--prompt", "hi", "--tp", "8"]
    assert run_cli.main(argv) == 1
    assert capsys.readouterr().err == (
        "error: tp*cp = 8 workers need 8 CPU but the Ray cluster has 4; lower tp/cp\n"
    )


def test_sampling_flags_reach_sampling_params() -> None:
    """--thinking-budget (with the other sampling flags) becomes the SamplingParams field."""
    args = run_cli.build_parser().parse_args(["--thinking-budget", "5", "--temperature", "0.5"])
    params = run_cli.sampling_params(args)
    assert params.thinking_budget == 5 and params.temperature == 0.5
    assert run_cli.sampling_params(run_cli.build_parser().parse_args([])).thinking_budget is None
