"""Every walctl command (recursively, subgroups included) is documented and has help text."""

from __future__ import annotations

import os

import click
import pytest

from tools.walctl import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        path = prefix + (name,)
        yield path, command
        if isinstance(command, click.Group):
            yield from _commands(command, path)


COMMANDS = list(_commands(cli))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _shows(line: str, path: tuple[str, ...]) -> bool:
    """Whether ``line`` shows ``walctl <path...>``: the command right after ``walctl``,
    subcommand words later on the same line (group arguments may sit between them,
    as in ``walctl cursor LOG list``)."""
    tokens = line.replace("`", " ").split()
    for i, tok in enumerate(tokens):
        if tok == "walctl" and i + 1 < len(tokens) and tokens[i + 1] == path[0]:
            rest = iter(tokens[i + 2:])
            if all(any(t == word for t in rest) for word in path[1:]):
                return True
    return False


def test_there_are_commands():
    assert {"verify", "replay", "cursor", "bench"} <= {p[0] for p, _ in COMMANDS}


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p))
def test_command_is_in_readme(path):
    lines = _readme().splitlines()
    assert any(_shows(line, path) for line in lines), f"README.md never shows 'walctl {' '.join(path)}'"


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_command_has_help_text(path, command):
    assert (command.help or "").strip(), f"walctl {' '.join(path)} has no help text"
    for param in command.params:
        if isinstance(param, click.Option):
            assert (param.help or "").strip(), f"walctl {' '.join(path)} option {param.opts} has no help"
