"""The README's commands are written as the launchers take them.

Every `python launch/<script>.py ...` command in the README (continuation lines joined,
comments dropped) parses with that script's own argument parser; the `--dry-run` plans, which
need no GPU and no checkpoint, run for real. The demo commands that start a model run in
tests/test_first_run.py and tests/test_chat_cli.py.
"""

from __future__ import annotations

import importlib
import re
import shlex

import pytest

from tests.conftest import REPO_ROOT


def readme_commands() -> list[list[str]]:
    """The README's launcher commands as argv lists (after `python launch/x.py`)."""
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    commands, current = [], ""
    for line in lines:
        if current:
            current += " " + line.strip()
        elif line.startswith("    ") and re.search(r"\bpython3? launch/\w+\.py", line):
            current = line.strip()
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1]
            continue
        for part in current.split("&&"):
            words = shlex.split(part, comments=True)
            for i, word in enumerate(words):
                if re.fullmatch(r"launch/\w+\.py", word):
                    commands.append(words[i:])
                    break
        current = ""
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_launcher_commands() -> None:
    scripts = {c[0] for c in COMMANDS}
    assert {"launch/run.py", "launch/chat.py", "launch/serve.py", "launch/needle.py"} <= scripts
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_readme_command_parses(command: list[str]) -> None:
    script, argv = re.fullmatch(r"launch/(\w+)\.py", command[0])[1], command[1:]  # type: ignore[index]
    if script == "run" and "--chat" in argv:  # run.py hands --chat to the chat's parser
        script, argv = "chat", [a for a in argv if a != "--chat"]
    module = importlib.import_module(f"launch.{script}")
    parse = module.build_parser().parse_args if hasattr(module, "build_parser") else None
    if parse is None:
        parse = module.parse_args
    try:
        parse(argv)
    except SystemExit as e:  # argparse's way of refusing a flag
        pytest.fail(f"README command {' '.join(command)!r} does not parse (exit {e.code})")


DRY_RUNS = [c for c in COMMANDS if c[0] == "launch/run.py" and "--dry-run" in c]


@pytest.mark.parametrize("command", DRY_RUNS, ids=[" ".join(c)[:60] for c in DRY_RUNS])
def test_readme_dry_runs_run(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from launch import run

    assert run.main(command[1:]) in (0, 1)  # 1: does not fit, with a suggestion
    assert "memory plan per worker" in capsys.readouterr().out
