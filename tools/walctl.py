"""``walctl``: the operator's command line for mailwal nodes and their logs.

This module holds only the click group; each command lives in a small module
(``tools/walctl_<name>.py`` for the log, ``tools/cmd_*.py`` for nodes and
clusters) as a thin layer over :mod:`wal` and :mod:`engine`: the libraries
raise typed errors and never print, the commands format results and map
errors to exit statuses (see :mod:`tools.cliutil`). The group
(:class:`~tools.cliutil.WalctlGroup`) turns whatever a command let through
into one ``Error:`` line, unless ``--debug``. To add a command, write a
module with a ``click.Command`` and register it below.
"""

from __future__ import annotations

import click

from .bench_imap import bench_imap_command
from .bench_lmtp import bench_lmtp_command
from .bench_reconcile import bench_reconcile
from .bench_replication import bench_replication_command
from .bench_store import bench_store
from .bench_wal import bench_wal_command
from .cliutil import CONTEXT_SETTINGS, DEBUG_KEY, WalctlGroup
from .cmd_admin import ADMIN_COMMANDS
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


@click.group(cls=WalctlGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="mailwal", prog_name="walctl")
@click.option("--debug", is_flag=True, help="Show the full traceback of an unexpected error.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """The operator's command line for mailwal nodes and their logs.

    Create and run nodes (init, serve, follow), watch and steer a cluster
    (status, failover, promote, check, quarantine), look into and change a
    node's mail and users (digest, mailbox, messages, flags, expunge, user,
    export, import), and read, check, repair or benchmark a write-ahead log
    (verify, replay, cursor, repair, reconcile, bench). NODE is a node
    directory; LOG is a log directory (NODE/log.wal).

    Exit status: 0 success, 1 the operation failed or found damage (the
    one `Error:` line says why), 2 bad usage or a bad node.toml.

    \b
    Example:
        walctl init node1 --name node1
        walctl serve node1 --lmtp 127.0.0.1:2424 --listen 127.0.0.1:7001
        walctl status node1
        walctl verify node1/log.wal
    """
    ctx.meta[DEBUG_KEY] = debug


for _command in (verify, replay, cursor, repair, bench):
    cli.add_command(_command)
cli.add_command(reconcile)
bench.add_command(bench_wal_command)
bench.add_command(bench_reconcile)
for _command in NODE_COMMANDS:
    cli.add_command(_command)
for _command in CLUSTER_COMMANDS:  # serve here (with replication) replaces cmd_node's LMTP-only serve
    cli.add_command(_command)
bench.add_command(bench_lmtp_command)
cli.add_command(torture)
bench.add_command(bench_replication_command)
bench.add_command(bench_imap_command)
bench.add_command(bench_store)
for _command in MAILDIR_COMMANDS:  # export, import (Maildir)
    cli.add_command(_command)
for _command in ADMIN_COMMANDS:  # user, flags, expunge
    cli.add_command(_command)
