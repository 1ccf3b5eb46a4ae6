"""``walctl``: the operator's command line for mailwal logs.

This module holds only the click group; each command lives in its own small
module (``tools/walctl_<name>.py``) as a thin layer over :mod:`wal`: the
library raises typed errors and never prints, the commands format results and
map errors to exit statuses (see :mod:`tools.cliutil`). To add a command,
write a module with a ``click.Command`` and register it below.
"""

from __future__ import annotations

import click

from .bench_lmtp import bench_lmtp_command
from .bench_reconcile import bench_reconcile
from .bench_replication import bench_replication_command
from .bench_store import bench_store
from .cliutil import CONTEXT_SETTINGS
from .cmd_cluster import CLUSTER_COMMANDS
from .cmd_maildir import MAILDIR_COMMANDS
from .cmd_node import NODE_COMMANDS
from .cmd_reconcile import reconcile
from .walctl_bench import bench
from .walctl_cursor import cursor
from .walctl_repair import repair
from .walctl_replay import replay
from .walctl_verify import verify
from .torture import torture

__all__ = ["cli"]


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="mailwal", prog_name="walctl")
def cli() -> None:
    """Inspect, check and benchmark mailwal write-ahead logs.

    LOG is a log directory (conventionally *.wal). Exit status: 0 success,
    1 the log is damaged or the operation failed, 2 bad usage.

    \b
    Example:
        walctl verify node1.wal
        walctl replay node1.wal --from indexer --json
    """


for _command in (verify, replay, cursor, repair, bench):
    cli.add_command(_command)
cli.add_command(reconcile)
bench.add_command(bench_reconcile)
for _command in NODE_COMMANDS:
    cli.add_command(_command)
for _command in CLUSTER_COMMANDS:  # serve here (with replication) replaces cmd_node's LMTP-only serve
    cli.add_command(_command)
bench.add_command(bench_lmtp_command)
cli.add_command(torture)
bench.add_command(bench_replication_command)
bench.add_command(bench_store)
for _command in MAILDIR_COMMANDS:  # export, import (Maildir)
    cli.add_command(_command)
