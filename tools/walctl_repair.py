"""``walctl repair``: cut a damaged log at its first damage, over :func:`wal.repair`."""

from __future__ import annotations

import click

import wal

from .cliutil import dump_json, json_option, log_argument, require_log, wal_errors

__all__ = ["repair"]


@click.command(name="repair")
@log_argument
@json_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation before cutting.")
def repair(log: str, as_json: bool, yes: bool) -> None:
    """Cut LOG at its first damage so that it opens again.

    Run it only when LOG is not open for writing. A valid log is left
    unchanged. Otherwise every byte after the damage is copied to LOG/broken/
    (fsynced) before the damaged segment is truncated and later segments are
    removed; the report names the first lost LSN, to re-fetch from a replica.

    \b
    Example:
        walctl verify node1.wal || walctl repair --yes node1.wal
    """
    with wal_errors(log):
        require_log(log)
        # LOG-14: held across the prompt, so no node starts appending between it and the cut
        with wal.LogLock(log, purpose="repairing it") as lock:
            report = wal.verify(log)
            if not report.ok and not yes:
                e = report.error or {}
                click.confirm(
                    f"Cut {log} at segment {e.get('segment')}, offset {e.get('offset')} (LSN {e.get('lsn')} "
                    f"and every later record leave this log)?",
                    abort=True, err=True,
                )
            result = wal.repair(log, lock=lock)
    if as_json:
        dump_json(result.to_dict(), indent=2)
    elif result.cut_segment is None:
        click.echo(f"{log}: valid, nothing to repair (last LSN {result.last_lsn})")
    else:
        click.echo(
            f"{log}: cut at segment {result.cut_segment}, offset {result.cut_offset}; "
            f"last LSN now {result.last_lsn}; LSN {result.first_lost_lsn} onward lost from this log"
        )
        for path in result.backups:
            click.echo(f"  kept {path}")
