"""Every `python train.py` / `python evaluate.py` command in README.md composes as printed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import ROOT
from zoo.cli import check_overrides, expand_home_and_variables


def readme_commands() -> list[tuple[str, list[str]]]:
    """(config name, arguments) of each command in the README's shell blocks, continuation lines joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    text = re.sub(r"<[^<>\n]*>", "x", text)  # placeholders such as <run> stand for the reader's own names
    commands = []
    for line in text.splitlines():
        for part in line.split("&&"):
            found = re.match(r"\s*python (train|evaluate)\.py(.*)", part)
            if found:
                words = shlex.split(found.group(2), comments=True)
                commands.append(("train" if found.group(1) == "train" else "eval", words))
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check() -> None:
    assert len(COMMANDS) > 40


@pytest.mark.parametrize(("config_name", "args"), COMMANDS, ids=[" ".join(a)[:80] for _, a in COMMANDS])
def test_a_readme_command_composes(
    config_name: str, args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if args[:1] == ["--help"]:
        return
    monkeypatch.setenv("PWD", str(tmp_path))  # files a command names under $PWD (an Optuna study) land here
    monkeypatch.setattr("zoo.cli.shutil.which", lambda name: f"/usr/bin/{name}")  # as on a SLURM login node
    check_overrides(config_name, [expand_home_and_variables(a) for a in args])
