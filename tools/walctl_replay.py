"""``walctl replay``: print records from an LSN or a stored cursor, over :class:`wal.LogReader`."""

from __future__ import annotations

import io
import json
import os
import sys
import threading

import blake3
import cbor2
import click

import wal

from .cliutil import b64, json_option, log_argument, require_log, to_jsonable, wal_errors

__all__ = ["replay", "resolve_start", "record_view", "RECORD_FIELDS"]

#: Fields every replayed record carries; payload map keys that collide with
#: them are kept under ``payload`` instead of being merged.
RECORD_FIELDS = ("lsn", "epoch", "type", "hash")

_CURSOR_PREFIX = "cursor:"


def resolve_start(log: str, spec: str | None) -> int:
    """The first LSN to replay for ``--from``.

    ``spec`` is an LSN (all digits), ``cursor:NAME``, or a cursor NAME. A
    cursor's value is the last LSN its consumer finished, so replay starts at
    value + 1. None means the first LSN the log still holds.

    Raises:
        wal.CursorError: no such cursor, or an invalid name.
    """
    if spec is None:
        return wal.LogReader(log).first_lsn()
    if spec.isdigit():
        return int(spec)
    name = spec[len(_CURSOR_PREFIX):] if spec.startswith(_CURSOR_PREFIX) else spec
    return wal.CursorStore(log, wal.OS_FILEOPS).get(name) + 1


def _decode(payload: bytes) -> tuple[bool, object]:
    """Decode the whole payload as CBOR; (False, None) unless it is exactly one CBOR item."""
    fp = io.BytesIO(payload)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except Exception:
        return False, None
    if fp.tell() != len(payload):
        return False, None
    return True, value


def record_view(rec: wal.Record, *, bodies: bool) -> dict:
    """The JSON-ready view of one record (the ``replay --json`` contract).

    ``lsn``, ``epoch``, ``type``, ``hash`` (hex), then the payload: a CBOR map
    is merged field by field; any other CBOR value is ``payload``; bytes that
    are not one CBOR item are ``raw_size`` and ``raw_blake3`` (``raw`` in
    base64 with ``bodies``). A bytes ``body`` field becomes ``body_size`` and
    ``body_guid`` (blake3 hex) unless ``bodies``, then ``body`` in base64.
    Other bytes values are hex.
    """
    out: dict = {"lsn": rec.lsn, "epoch": rec.epoch, "type": rec.type, "hash": rec.hash.hex()}
    ok, value = _decode(rec.payload)
    if not ok:
        out["raw_size"] = len(rec.payload)
        out["raw_blake3"] = blake3.blake3(rec.payload).hexdigest()
        if bodies:
            out["raw"] = b64(rec.payload)
        return out
    if not isinstance(value, dict):
        out["payload"] = to_jsonable(value)
        return out
    clashes = {}
    for key, val in value.items():
        key = str(key)
        if key == "body" and isinstance(val, (bytes, bytearray)):
            if bodies:
                out["body"] = b64(bytes(val))
            else:
                out["body_size"] = len(val)
                out["body_guid"] = blake3.blake3(bytes(val)).hexdigest()
        elif key in RECORD_FIELDS:
            clashes[key] = to_jsonable(val)
        else:
            out[key] = to_jsonable(val)
    if clashes:
        out["payload"] = clashes
    return out


def _text_line(view: dict) -> str:
    head = f"LSN {view['lsn']}  epoch {view['epoch']}  type {view['type']}  hash {view['hash'][:16]}"
    rest = " ".join(
        f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in view.items() if k not in RECORD_FIELDS and k != "body"
    )
    return head + ("  " + rest if rest else "")


def _body_text(rec: wal.Record) -> str | None:
    ok, value = _decode(rec.payload)
    if ok and isinstance(value, dict) and isinstance(value.get("body"), (bytes, bytearray)):
        text = bytes(value["body"]).decode("utf-8", errors="replace")
        return "\n".join("    " + line for line in text.splitlines())
    return None


def _progress_bar(log: str, first: int, to_lsn: int | None):
    """(Progress, task) on stderr when stderr is a terminal and the records go
    elsewhere (a file or a pipe); None otherwise, so output stays clean."""
    from .cliutil import stderr_console

    console = stderr_console()
    if console is None or sys.stdout.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    last = to_lsn
    if last is None:
        from wal.epochs import SeekReader

        with SeekReader(log) as r:
            last = r.last()[0]
    progress = Progress(TextColumn("replay"), BarColumn(), MofNCompleteColumn(), console=console, transient=True)
    task = progress.add_task("replay", total=max(0, last - first + 1))
    progress.start()
    return progress, task


@click.command(name="replay")
@log_argument
@click.option("--from", "start", metavar="CURSOR",
              help="An LSN, or a stored cursor's name (replay starts after the cursor's LSN; "
                   "write cursor:NAME for a cursor whose name is all digits). Default: the first LSN in the log.")
@click.option("--to", "to_lsn", type=click.IntRange(min=0), metavar="LSN", help="Stop after this LSN (inclusive).")
@json_option
@click.option("--bodies", is_flag=True, help="Print message bodies (base64 in JSON) instead of their size and GUID.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new records as they are appended, until Ctrl-C.")
def replay(log: str, start: str | None, to_lsn: int | None, as_json: bool, bodies: bool, follow: bool) -> None:
    """Print the records of LOG from an LSN or a stored cursor, verified.

    Every record is checked against the hash chain before it is printed.
    --json prints one JSON object per line with lsn, epoch, type, hash (hex)
    and the payload's fields. Damage stops the replay with an error naming
    segment, offset and LSN (exit status 1).

    \b
    Example:
        walctl replay node1.wal --from 1 --to 20
        walctl replay node1.wal --from indexer --json     # after cursor "indexer"
        walctl replay node1.wal --from 500 --follow --bodies
    """
    stop = threading.Event()
    with wal_errors(log):
        require_log(log)
        first = resolve_start(log, start)
        reader = wal.LogReader(log)
        bar = _progress_bar(log, first, to_lsn) if not follow else None  # stderr on a terminal, stdout elsewhere
        try:
            for rec in reader.records(first, to_lsn, follow=follow, stop=stop):
                if bar is not None and rec.lsn % 256 == 0:
                    bar[0].update(bar[1], completed=rec.lsn - first + 1)
                view = record_view(rec, bodies=bodies)
                if as_json:
                    click.echo(json.dumps(view, ensure_ascii=False))
                else:
                    click.echo(_text_line(view))
                    if bodies:
                        body = _body_text(rec)
                        if body:
                            click.echo(body)
                if follow:
                    sys.stdout.flush()
        except KeyboardInterrupt:
            stop.set()  # Ctrl-C is how --follow ends: a clean stop, exit 0
        except BrokenPipeError:
            # The reader of our output went away (e.g. `| head`): stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            if bar is not None:
                bar[0].stop()
