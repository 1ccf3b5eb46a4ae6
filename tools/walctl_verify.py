"""``walctl verify``: check a whole log, read-only, over :func:`wal.verify`."""

from __future__ import annotations

import os

import click

import wal
from wal.segment import list_segments

from .cliutil import EXIT_FAILED, describe_damage, dump_json, json_option, log_argument, stderr_console, wal_errors

__all__ = ["verify"]


def _segment_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for _, name in list_segments(path))


def _run_verify(path: str) -> wal.VerifyReport:
    console = stderr_console()
    if console is None:
        return wal.verify(path)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    total = _segment_bytes(path)
    with Progress(
        TextColumn("verify"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as progress:
        task = progress.add_task("verify", total=total)
        pending = [0]

        def on_bytes(n: int) -> None:  # redraw per MiB, not per record
            pending[0] += n
            if pending[0] >= 1 << 20:
                progress.advance(task, pending[0])
                pending[0] = 0

        return wal.verify(path, on_bytes=on_bytes)


@click.command(name="verify")
@log_argument
@json_option
def verify(log: str, as_json: bool) -> None:
    """Check every segment header, frame, record hash and chain link of LOG.

    Read-only: nothing is changed. Exit status 0 when the log is valid; a torn
    final write (which opening the log would trim) is reported but still
    valid. Exit status 1 when the log is damaged: the report names the first
    bad segment, byte offset and LSN. A progress bar is drawn on stderr only
    when it is a terminal.

    \b
    Example:
        walctl verify /var/lib/mailwal/node1.wal
        walctl verify --json node1.wal | jq .last_lsn
    """
    with wal_errors(log):
        report = _run_verify(log)
    if as_json:
        dump_json(report.to_dict(), indent=2)
    else:
        span = f"LSN {report.first_lsn}..{report.last_lsn}" if report.records else "no records"
        if not report.ok:
            span = (f"LSN {report.first_lsn}..{report.last_lsn} verified before the damage"
                    if report.records else "none verified before the damage")
        state = "valid" if report.ok else "DAMAGED"
        click.echo(f"{log}: {state}")
        click.echo(f"  log id     {report.log_id}")
        click.echo(f"  segments   {report.segments}")
        click.echo(f"  records    {report.records} ({span})")
        if report.ok:
            click.echo(f"  bytes      {report.bytes}")
            click.echo(f"  last hash  {report.last_hash}")
        if report.torn_tail:
            t = report.torn_tail
            click.echo(
                f"  torn tail  {t['bytes']} bytes at segment {t['segment']} offset {t['offset']} "
                f"({t['reason']}); opening the log trims it (copied to torn/ first)"
            )
        if report.error:
            e = report.error
            lsn = f", LSN {e['lsn']}" if e["lsn"] is not None else ""
            click.echo(f"  damage     segment {e['segment']}, offset {e['offset']}{lsn}: {e['reason']}")
    if not report.ok:
        e = report.error or {}
        lsn = f", LSN {e.get('lsn')}" if e.get("lsn") is not None else ""
        where = f"segment {e.get('segment')}, offset {e.get('offset')}{lsn}"
        click.echo(f"Error: {describe_damage(where, str(e.get('reason')), log)}", err=True)
        click.get_current_context().exit(EXIT_FAILED)
