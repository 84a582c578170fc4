"""The README's first-hour commands, read from the README as `bench/newcomer_path.py` runs them, are commands the
project accepts: every `data_prep` command parses, and every `pretrain` command's overrides pass the check made
before Hydra composes. A renamed option or key that the README still uses fails here, not on a newcomer's first day.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from data_prep.__main__ import build_parser
from pretrain.overrides import check_overrides

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from newcomer_path import newcomer_commands  # noqa: E402


def _words(command: str, variables: dict[str, str]) -> list[str]:
    command = command.replace("\\\n", " ")  # backslash-newline: one shell line
    for name, value in variables.items():
        command = command.replace(f"${name}", value)
    return shlex.split(command, comments=True)


def test_first_hour_commands_parse():
    commands = newcomer_commands((REPO / "README.md").read_text(encoding="utf-8"))
    assert commands[:4] == ["python3 -m venv .venv && . .venv/bin/activate", commands[1], commands[2], "make quickstart"]
    variables: dict[str, str] = {}
    seen = {"data_prep": 0, "pretrain": 0, "pretrain.report": 0}
    for command in commands[4:]:
        if "=" in command.split()[0]:  # NAME="..." (a shell variable the next commands use)
            name, value = command.split("=", 1)
            variables[name] = " ".join(shlex.split(value.replace("\\\n", " ")))
            continue
        words = _words(command, variables)
        assert words[:2] == ["python", "-m"], command
        module, arguments = words[2], words[3:]
        seen[module] += 1
        if module == "data_prep":
            build_parser(only=arguments[0]).parse_args(arguments)  # argparse exits on an unknown option
        elif module == "pretrain":
            checked = check_overrides(arguments)  # raises OverrideError naming every unknown key
            assert checked is not None
    assert seen == {"data_prep": 4, "pretrain": 3, "pretrain.report": 2}, seen
