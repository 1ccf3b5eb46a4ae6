"""``walctl cursor``: named consumer positions of a log, over :class:`wal.CursorStore`.

The store is used directly, without opening the log for writing: cursors are
independent files replaced atomically, so this works while a node runs.
"""

from __future__ import annotations

import click

import wal

from .cliutil import CONTEXT_SETTINGS, dump_json, json_option, log_argument, require_log, wal_errors

__all__ = ["cursor"]


def _store(ctx: click.Context) -> wal.CursorStore:
    return wal.CursorStore(ctx.obj["cursor_log"], wal.OS_FILEOPS)


@click.group(name="cursor", context_settings=CONTEXT_SETTINGS)
@log_argument
@click.pass_context
def cursor(ctx: click.Context, log: str) -> None:
    """List, read, move or drop the named cursors of LOG.

    A cursor is a name and the last LSN its consumer has finished with;
    'walctl replay --from NAME' starts at the LSN after it. Cursors are kept
    durably beside the segments (cursors/NAME.cursor).

    \b
    Example:
        walctl cursor node1.wal list
        walctl cursor node1.wal set indexer 1200
    """
    with wal_errors(log):
        require_log(log)
    ctx.ensure_object(dict)
    ctx.obj["cursor_log"] = log


@cursor.command(name="list")
@json_option
@click.pass_context
def cursor_list(ctx: click.Context, as_json: bool) -> None:
    """Print every cursor and its LSN.

    \b
    Example:
        walctl cursor node1.wal list --json
    """
    with wal_errors():
        cursors = _store(ctx).list()
    if as_json:
        dump_json(cursors)
    elif not cursors:
        click.echo("no cursors")
    else:
        width = max(len(n) for n in cursors)
        for name, lsn in cursors.items():
            click.echo(f"{name:<{width}}  {lsn}")


@cursor.command(name="get")
@click.argument("name")
@json_option
@click.pass_context
def cursor_get(ctx: click.Context, name: str, as_json: bool) -> None:
    """Print the LSN of cursor NAME (exit status 1 if there is none).

    \b
    Example:
        walctl cursor node1.wal get indexer
    """
    with wal_errors():
        lsn = _store(ctx).get(name)
    if as_json:
        dump_json({"name": name, "lsn": lsn})
    else:
        click.echo(lsn)


@cursor.command(name="set")
@click.argument("name")
@click.argument("lsn", type=click.IntRange(min=0))
@click.option("--rewind", is_flag=True, help="Allow moving the cursor back to a lower LSN.")
@click.option("--force", is_flag=True, help="Allow an LSN the log does not hold (past its end or already dropped).")
@click.pass_context
def cursor_set(ctx: click.Context, name: str, lsn: int, rewind: bool, force: bool) -> None:
    """Store LSN as the last LSN consumed by cursor NAME, durably.

    LSN 0 means nothing consumed yet. Refuses to move a cursor backwards
    unless --rewind, and refuses an LSN the log does not hold unless --force.

    \b
    Example:
        walctl cursor node1.wal set indexer 1200
        walctl cursor node1.wal set indexer 0 --rewind
    """
    log = ctx.obj["cursor_log"]
    with wal_errors():
        if lsn > 0 and not force:
            try:
                held = next(iter(wal.LogReader(log).records(lsn, lsn)), None)
            except wal.LsnNotAvailableError as exc:
                raise click.ClickException(
                    f"LSN {lsn} is below the first LSN the log still holds ({exc.first}); "
                    f"use --force to store it anyway"
                ) from exc
            if held is None:
                raise click.ClickException(
                    f"LSN {lsn} is past the end of the log; use --force to store it anyway"
                )
        _store(ctx).set(name, lsn, allow_backwards=rewind)
    click.echo(f"cursor {name} = {lsn}")


@cursor.command(name="drop")
@click.argument("name")
@click.pass_context
def cursor_drop(ctx: click.Context, name: str) -> None:
    """Remove cursor NAME (its consumer's position is forgotten).

    Dropping a stale cursor lets retention delete the segments it held back.

    \b
    Example:
        walctl cursor node1.wal drop old-indexer
    """
    with wal_errors():
        _store(ctx).drop(name)
    click.echo(f"cursor {name} dropped")
