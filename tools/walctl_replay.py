"""``walctl replay``: print records from an LSN or a stored cursor, over :class:`wal.LogReader`.

Mail records are shown by type name (``MessageAppended``) and mailbox name
(:class:`MailboxNames`); ``--json`` keeps the numbers and ids and adds the
names beside them (``type_name``, ``mailbox``).
"""

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

__all__ = ["replay", "resolve_start", "record_view", "RECORD_FIELDS", "MailboxNames"]

#: Fields every replayed record carries; payload map keys that collide with
#: them are kept under ``payload`` instead of being merged.
RECORD_FIELDS = ("lsn", "epoch", "type", "hash")
#: Fields added to a mail record's view: its type's name, its mailbox's name.
NAME_FIELDS = ("type_name", "mailbox")


class MailboxNames:
    """Mailbox id -> name, learnt from the records replayed so far.

    A record naming a mailbox whose defining record (created, renamed) came
    before the replay's first LSN is resolved from the node's store, when
    LOG is a node's log (``NODE/log.wal`` beside ``NODE/store.sqlite``): one
    read-only query per such mailbox, giving its name now (a deleted
    mailbox's last name). Otherwise the id stays unresolved (None).
    """

    def __init__(self, log: str):
        from engine.node import LOG_DIR, STORE_FILE

        self.names: dict[str, str | None] = {}
        log = os.path.abspath(log)
        store = os.path.join(os.path.dirname(log), STORE_FILE)
        self.store_path = store if os.path.basename(log) == LOG_DIR and os.path.isfile(store) else None
        self._conn = None

    def learn(self, event) -> None:
        """Take the name a MailboxCreated / Renamed / Deleted record gives its id."""
        from engine.store.events import MailboxCreated, MailboxDeleted, MailboxRenamed

        if isinstance(event, (MailboxCreated, MailboxDeleted)):
            self.names[event.mailbox_id] = event.name
        elif isinstance(event, MailboxRenamed):
            self.names[event.mailbox_id] = event.new_name

    def name(self, mailbox_id: str) -> str | None:
        if mailbox_id not in self.names:
            self.names[mailbox_id] = self._from_store(mailbox_id)
        return self.names[mailbox_id]

    def _from_store(self, mailbox_id: str) -> str | None:
        import sqlite3

        if self.store_path is None:
            return None
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(f"file:{self.store_path}?mode=ro", uri=True)
            for table in ("mailboxes", "tombstones"):
                row = self._conn.execute(f"SELECT name FROM {table} WHERE mailbox_id=?", (mailbox_id,)).fetchone()
                if row is not None:
                    return row[0]
        except sqlite3.Error:
            self.store_path = None  # not a store we can read: show ids
        return None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

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


def _mail_event(rec: wal.Record):
    """The mail-store event a record holds, or None (another type, or not that event's fields)."""
    from engine.store.events import EVENT_TYPES, decode_event

    if rec.type not in EVENT_TYPES:
        return None
    try:
        return decode_event(rec.type, rec.payload)
    except (ValueError, TypeError):
        return None


def record_view(rec: wal.Record, *, bodies: bool, names: MailboxNames | None = None) -> dict:
    """The JSON-ready view of one record (the ``replay --json`` contract).

    ``lsn``, ``epoch``, ``type``, ``hash`` (hex); for a mail-store record
    (engine.store.events) ``type_name`` (e.g. ``MessageAppended``) and, when
    ``names`` resolves its ``mailbox_id``, ``mailbox``; then the payload: a
    CBOR map is merged field by field; any other CBOR value is ``payload``;
    bytes that are not one CBOR item are ``raw_size`` and ``raw_blake3``
    (``raw`` in base64 with ``bodies``). A bytes ``body`` field becomes
    ``body_size`` and ``body_guid`` (blake3 hex) unless ``bodies``, then
    ``body`` in base64; a ``bodies`` list becomes ``bodies_size`` unless
    ``bodies``. A ``password_hash`` shows its scheme only. Other bytes values are hex.
    """
    out: dict = {"lsn": rec.lsn, "epoch": rec.epoch, "type": rec.type, "hash": rec.hash.hex()}
    event = _mail_event(rec)
    if event is not None:
        out["type_name"] = type(event).__name__
        if names is not None:
            names.learn(event)
            mailbox_id = getattr(event, "mailbox_id", None)
            mailbox = names.name(mailbox_id) if mailbox_id else None
            if mailbox is not None:
                out["mailbox"] = mailbox
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
        elif key == "bodies" and isinstance(val, list) and not bodies:  # MessagesAppended: as "body", per message
            out["bodies_size"] = [len(v) for v in val]
        elif key == "password_hash" and isinstance(val, str):  # UserPasswordSet: the scheme, never the hash
            out["password_hash"] = val[:val.index("}") + 1] if val.startswith("{") else "$" + val.split("$")[1] + "$..."
        elif key in RECORD_FIELDS or (key in NAME_FIELDS and key in out):
            clashes[key] = to_jsonable(val)
        else:
            out[key] = to_jsonable(val)
    if clashes:
        out["payload"] = clashes
    return out


def _text_line(view: dict) -> str:
    """One record for people: the type's name (or number), the mailbox's name in place of its id."""
    kind = view.get("type_name") or f"type {view['type']}"
    head = f"LSN {view['lsn']}  epoch {view['epoch']}  {kind}  hash {view['hash'][:16]}"
    hidden = {*RECORD_FIELDS, "type_name", "body"}
    if "mailbox" in view:
        # The name stands for the id; a record that names its mailbox itself says it once.
        hidden |= {"mailbox_id"} | ({"mailbox"} if "name" in view or "new_name" in view else set())
    if view.get("body_guid") is not None and view.get("body_guid") == view.get("guid"):
        hidden.add("body_guid")  # a message's GUID is its body's blake3: shown once
    rest = " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in view.items() if k not in hidden)
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
        from wal import SeekReader

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
    Text shows each mail record's type by name (MessageAppended) and its
    mailbox by name, learnt from the records replayed (or, for a mailbox
    defined before --from, from NODE/store.sqlite beside NODE/log.wal).
    --json prints one JSON object per line with lsn, epoch, type (the
    number), hash (hex), type_name and mailbox when known, and the payload's
    fields (mailbox_id and the other ids as they are in the log).

    Exit status: 0 when every record of the range was printed, also when
    the range holds none (a note on stderr says why: the log ends before
    --from, or the cursor is past --to), so a script polling for new
    records sees "nothing yet" as success; 1 when damage stops the replay
    (the error names segment, offset and LSN); 2 when --to is below a
    --from LSN (an empty range is a mistake on the command line).

    \b
    Example:
        walctl replay node1/log.wal --from 1 --to 20
        walctl replay node1/log.wal --from indexer --json     # after cursor "indexer"
        walctl replay node1/log.wal --from 500 --follow --bodies
    """
    if start is not None and start.isdigit() and to_lsn is not None and to_lsn < int(start):
        raise click.UsageError(f"empty range: --to {to_lsn} is before --from {start}")
    stop = threading.Event()
    with wal_errors(log):
        require_log(log)
        first = resolve_start(log, start)
        if not follow and _nothing_to_replay(log, start, first, to_lsn):
            return
        reader = wal.LogReader(log)
        names = MailboxNames(log)
        bar = _progress_bar(log, first, to_lsn) if not follow else None  # stderr on a terminal, stdout elsewhere
        try:
            for rec in reader.records(first, to_lsn, follow=follow, stop=stop):
                if bar is not None and rec.lsn % 256 == 0:
                    bar[0].update(bar[1], completed=rec.lsn - first + 1)
                view = record_view(rec, bodies=bodies, names=names)
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
            names.close()
            if bar is not None:
                bar[0].stop()


def _nothing_to_replay(log: str, start: str | None, first: int, to_lsn: int | None) -> bool:
    """Whether the range is empty; if so, a note on stderr says why (exit status 0)."""
    from wal import SeekReader

    with SeekReader(log) as r:
        last = r.last()[0]
    cursor = start.removeprefix(_CURSOR_PREFIX) if start and not start.isdigit() else None
    if first > last:
        why = f"cursor {cursor} is there already" if cursor else f"before --from {first}"
        click.echo("nothing to replay: " + ("the log holds no records" if last == 0 else
                                            f"the log ends at LSN {last}, {why}"), err=True)
        return True
    if to_lsn is not None and to_lsn < first:
        why = f"cursor {cursor} is at LSN {first - 1}" if cursor else f"the log starts at LSN {first}"
        click.echo(f"nothing to replay: {why}, past --to {to_lsn}", err=True)
        return True
    return False
