"""``walctl bench``: the group of throughput benchmarks.

Each bench is a command in its own module (``tools/bench_<name>.py``),
registered on this group in :mod:`tools.walctl`, and prints its tables
through :mod:`tools.bench_report`.
"""

from __future__ import annotations

import click

from .cliutil import CONTEXT_SETTINGS

__all__ = ["bench"]


@click.group(name="bench", context_settings=CONTEXT_SETTINGS)
def bench() -> None:
    """Measure throughput against a raw ceiling measured in the same run.

    Every figure comes with the plainest code doing the same I/O on the same
    disk, and the ratio between them; speed is never asserted by tests.

    \b
    Example:
        walctl bench wal
    """
