"""docs/cli-reference.md, generated from ``walctl --help`` of every command.

``python -m tools.cli_reference`` rewrites the page; ``--check`` exits 1
when the checked-in page differs from what the help pages say now.
tests/test_docs.py runs the same comparison, so a changed option or help
text cannot leave the reference behind.

Each section is exactly what ``walctl PATH --help`` prints in a terminal at
least 80 columns wide. A group that takes an argument before its subcommand
(``walctl cursor LOG list``) shows it in the usage line, as ``--help`` does.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

import click

__all__ = ["HELP_WIDTH", "PAGE", "commands", "help_text", "render"]

HELP_WIDTH = 78  # what click uses in any terminal 80 or more columns wide (it caps at 80, less 2)
PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "cli-reference.md")

_HEADER = """\
# walctl command reference

Every `walctl` command and subcommand with its `--help`, as printed in a
terminal at least 80 columns wide. This page is generated: run `python -m
tools.cli_reference` after changing a command (the test suite fails while it
differs). [Using walctl](walctl.md) explains the commands with examples.
"""


def commands(group: click.Group, ctx: click.Context) -> Iterator[tuple[tuple[str, ...], click.Context]]:
    """Every command below ``group`` (depth first, sorted), with the context ``--help`` would see."""
    for name in sorted(group.commands):
        command = group.commands[name]
        sub = click.Context(command, info_name=name, parent=ctx, **command.context_settings)
        yield _words(sub), sub
        if isinstance(command, click.Group):
            yield from commands(command, sub)


def _root() -> tuple[click.Group, click.Context]:
    from tools.walctl import cli

    settings = {**cli.context_settings, "terminal_width": HELP_WIDTH}
    return cli, click.Context(cli, info_name="walctl", **settings)


def help_text(args: list[str]) -> str:
    """What ``walctl ARGS --help`` prints, for command words ``args`` (no group arguments)."""
    cli, ctx = _root()
    command: click.Command = cli
    for word in args:
        assert isinstance(command, click.Group), f"{command.name} has no subcommands"
        command = command.commands[word]
        ctx = click.Context(command, info_name=word, parent=ctx, **command.context_settings)
    return ctx.get_help()


def render() -> str:
    """The whole page: the top-level help, then one section per command path."""
    cli, ctx = _root()
    sections = [("walctl", ctx)] + [(" ".join(("walctl",) + words), sub) for words, sub in commands(cli, ctx)]
    out = [_HEADER]
    for title, sub in sections:
        out += [f"## `{title}`", "", "```text", sub.get_help(), "```", ""]
    return "\n".join(out)


def _words(ctx: click.Context) -> tuple[str, ...]:
    """The command words of ``ctx`` without the group arguments (``cursor list``, not ``cursor LOG list``)."""
    words = []
    while ctx.parent is not None:
        words.append(ctx.info_name)
        ctx = ctx.parent
    return tuple(reversed(words))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from the help pages")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        with open(PAGE, encoding="utf-8") as f:
            if f.read() != page:
                print(f"{PAGE} differs from walctl --help: run python -m tools.cli_reference", file=sys.stderr)
                return 1
        return 0
    with open(PAGE, "w", encoding="utf-8") as f:
        f.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
