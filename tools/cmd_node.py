"""``walctl`` commands for mail nodes: init, serve, deliver, digest, rebuild, mailbox, messages.

Each command is a thin layer over :mod:`engine.node` (and :mod:`engine.runner`
for ``serve``). A node's log is locked by whoever opens it: while ``walctl
serve`` runs, the commands that only read (``digest``, ``mailbox NODE
list``, ``messages``) read the store's SQLite file read-only instead and say
which LSN it has applied; ``deliver`` says to deliver over LMTP (or stop the
node) instead. The mailbox group's writes (create, rename, delete) live in
:mod:`tools.cmd_admin`, which reaches a running node through its control
channel.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
from typing import Iterator

import click

import wal
from engine.store.errors import MailStoreError
from engine.node import LOG_DIR, STORE_FILE, Node, rebuild_store
from engine.store import mailbox_digest, store_digest

from .cliutil import CONTEXT_SETTINGS, _describe, dump_json

__all__ = ["NODE_COMMANDS", "init", "deliver", "digest", "rebuild", "mailbox", "messages"]

node_argument = click.argument("node", metavar="NODE", type=click.Path(file_okay=False))
json_flag = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@contextlib.contextmanager
def _errors(node: str | None = None) -> Iterator[None]:
    """Typed engine and log errors become one 'Error: ...' line and exit status 1.

    ``node``: the node directory, so that a damaged log's advice names its log.
    """
    try:
        yield
    except MailStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    except wal.WalError as exc:
        raise click.ClickException(_describe(exc, os.path.join(node, LOG_DIR) if node else None)) from exc
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from exc


def _require_node(path: str) -> str:
    if not os.path.isfile(os.path.join(path, "node.json")):
        raise click.ClickException(f"{path} is not a mailwal node (no node.json); create it with `walctl init {path}`")
    return path


def log_in_use(path: str) -> bool:
    """Whether another process holds the node's log lock (``walctl serve`` runs)."""
    return wal.log_in_use(os.path.join(path, LOG_DIR))


@contextlib.contextmanager
def _open_node(path: str, *, writing: bool) -> Iterator[Node]:
    _require_node(path)
    if log_in_use(path):
        what = "deliver over LMTP, or stop `walctl serve` first" if writing else "stop `walctl serve` first"
        raise click.ClickException(f"node {path} is running (its log is locked by another process): {what}")
    with _errors(path):
        node = Node.open(path)
        try:
            yield node
        finally:
            node.close()


class ReadOnlyStore:
    """The store of a running node, read through SQLite in read-only mode (no log access)."""

    def __init__(self, path: str):
        uri = "file:" + os.path.abspath(os.path.join(path, STORE_FILE)) + "?mode=ro"
        self.conn = sqlite3.connect(uri, uri=True)

    def close(self) -> None:
        self.conn.close()

    def digest(self) -> dict:
        c = self.conn
        c.execute("BEGIN")
        try:
            row = c.execute("SELECT value FROM meta WHERE key='applied_lsn'").fetchone()
            rows = c.execute("SELECT name, uidvalidity, uidnext, msg_xor FROM mailboxes").fetchall()
        finally:
            c.execute("COMMIT")
        per = {r[0]: mailbox_digest(r[1], r[2], r[3]) for r in rows}
        return {"applied_lsn": int(row[0]) if row else 0, "mailboxes": per, "store": store_digest(per)}

    def mailboxes(self) -> list[dict]:
        rows = self.conn.execute(
            "SELECT name, uidvalidity, uidnext, highestmodseq, messages, msg_xor FROM mailboxes ORDER BY name"
        ).fetchall()
        return [{"name": r[0], "uidvalidity": r[1], "uidnext": r[2], "highestmodseq": r[3], "messages": r[4],
                 "digest": mailbox_digest(r[1], r[2], r[5])} for r in rows]

    def messages(self, name: str) -> list[dict]:
        row = self.conn.execute("SELECT mailbox_id FROM mailboxes WHERE name=?", (name,)).fetchone()
        if row is None:
            raise click.ClickException(f"no mailbox named {name!r}")
        rows = self.conn.execute(
            "SELECT uid, guid, flags, size, internaldate_ms, modseq FROM messages WHERE mailbox_id=? ORDER BY uid",
            (row[0],),
        ).fetchall()
        return [{"uid": r[0], "guid": r[1].hex(), "flags": r[2].split() if r[2] else [], "size": r[3],
                 "internaldate_ms": r[4], "modseq": r[5]} for r in rows]

    @property
    def applied_lsn(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key='applied_lsn'").fetchone()
        return int(row[0]) if row else 0


def _mailbox_dict(mb) -> dict:
    return {"name": mb.name, "uidvalidity": mb.uidvalidity, "uidnext": mb.uidnext,
            "highestmodseq": mb.highestmodseq, "messages": mb.messages, "digest": mb.digest}


def _message_dict(m) -> dict:
    return {"uid": m.uid, "guid": m.guid, "flags": list(m.flags), "size": m.size,
            "internaldate_ms": m.internaldate_ms, "modseq": m.modseq}


# -- commands -------------------------------------------------------------------------


@click.command(context_settings=CONTEXT_SETTINGS)
@node_argument
@click.option("--role", type=click.Choice(["master", "replica"]), default="master", show_default=True,
              help="A replica refuses deliveries (4xx) until promoted.")
@click.option("--name", default="", help="The node's name (default: the directory name).")
@click.option("--max-message-bytes", type=click.IntRange(min=1), default=None,
              help="Largest message the node stores (default 50 MiB).")
def init(node: str, role: str, name: str, max_message_bytes: int | None) -> None:
    """Create a node directory: its log, its store, node.json, a commented
    node.toml with every setting and its default, and a replication secret.

    \b
    Example:
        walctl init /var/lib/mailwal/node1
    """
    from engine.cluster.config import DEFAULT_TOML
    from engine.node import read_config
    from engine.replication import valid_replica_name
    from engine.replication.secret import create_secret

    if os.path.isfile(os.path.join(node, "node.json")):
        with _errors(node):
            existing = read_config(node)
        how = f"walctl serve {node}" if existing.role == "master" else f"walctl follow {node} --peer HOST:PORT ..."
        raise click.ClickException(f"{node} is already a node ({existing.role} {existing.name}); run it with "
                                   f"`{how}`, or init another directory")
    if name and not valid_replica_name(name):
        raise click.BadParameter(f"{name!r}: use 1-48 letters, digits, '.', '_' or '-'", param_hint="--name")
    kwargs = {"max_message_bytes": max_message_bytes} if max_message_bytes else {}
    with _errors(node):
        Node.init(node, role=role, name=name, **kwargs).close()
        toml = os.path.join(node, "node.toml")
        if not os.path.exists(toml):
            text = DEFAULT_TOML
            if name:  # the name given here is the node's setting, not only node.json's
                text = text.replace('\nname = ""\n', f'\nname = "{name}"\n', 1)
            with open(toml, "w") as f:
                f.write(text)
        secret = os.path.join(node, "replication.secret")
        if not os.path.exists(secret):
            create_secret(secret)
    click.echo(f"created {role} node {os.path.abspath(node)} (settings: {toml}; replication secret: {secret}, "
               f"which every node of the cluster needs: --secret-file {secret}, or a copy, mode 0600)")


@click.command(context_settings=CONTEXT_SETTINGS)
@node_argument
@click.argument("mailbox")
@click.option("--flags", default="", help="Flags to store with the message, comma- or space-separated (\\Seen,work).")
@click.option("--create", is_flag=True, help="Create MAILBOX first if it does not exist.")
@json_flag
def deliver(node: str, mailbox: str, flags: str, create: bool, as_json: bool) -> None:
    """Deliver the message on standard input to MAILBOX; prints the receipt.

    Returns once the delivery is durable. The same bytes delivered again to
    the same mailbox within the de-duplication window (24 h) are not stored
    twice: the receipt says duplicate.

    \b
    Example:
        walctl deliver node1 user/bob/INBOX --create < message.eml
    """
    body = sys.stdin.buffer.read()
    flag_list = [f for f in flags.replace(",", " ").split() if f]
    with _open_node(node, writing=True) as n, _errors(node):
        receipt = n.deliver(mailbox, body, flags=flag_list, create=create)
    if as_json:
        dump_json(receipt.to_dict())
    else:
        what = "duplicate of UID" if receipt.duplicate else "delivered UID"
        click.echo(f"{what} {receipt.uid} to {receipt.mailbox} (UIDVALIDITY {receipt.uidvalidity}) "
                   f"GUID {receipt.guid} LSN {receipt.lsn}")


def _print_digest(d: dict, as_json: bool, note: str | None = None) -> None:
    if as_json:
        out = dict(d)
        if note:
            out["note"] = note
        click.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    click.echo(f"applied LSN {d['applied_lsn']}" + (f" ({note})" if note else ""))
    for name in sorted(d["mailboxes"]):
        click.echo(f"  {d['mailboxes'][name]}  {name}")
    click.echo(f"store {d['store']}")


@click.command(context_settings=CONTEXT_SETTINGS)
@node_argument
@json_flag
def digest(node: str, as_json: bool) -> None:
    """Print the applied LSN, a digest per mailbox and one for the whole store.

    Two nodes with the same digests at the same LSN hold the same mail
    (UIDVALIDITY, UIDNEXT, UIDs, GUIDs, flags). Works on a running node: it
    then reads the store read-only, as of the LSN it has applied.

    \b
    Example:
        walctl digest node1 --json
    """
    _require_node(node)
    if log_in_use(node):
        ro = ReadOnlyStore(node)
        try:
            d = ro.digest()
        finally:
            ro.close()
        _print_digest(d, as_json, "node is running: read from its store, as of this applied LSN")
        return
    with _open_node(node, writing=False) as n, _errors(node):
        d = n.digest()
    _print_digest(d, as_json)


@click.command(context_settings=CONTEXT_SETTINGS)
@node_argument
@json_flag
def rebuild(node: str, as_json: bool) -> None:
    """Recreate the store from the log alone and print its digest.

    The old store files are deleted first; the log is the source of truth.
    Refuses a log that does not start at LSN 1 (a seeded replica).

    \b
    Example:
        walctl rebuild node1
    """
    _require_node(node)
    if log_in_use(node):
        raise click.ClickException(f"node {node} is running: stop `walctl serve` before rebuilding its store")
    from .cliutil import stderr_console

    console = stderr_console()  # a progress bar on a terminal, nothing in pipes
    with _errors(node):
        if console is None:
            d = rebuild_store(node)
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("rebuild: applying records"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=console, transient=True) as progress:
                task = progress.add_task("rebuild", total=None)
                d = rebuild_store(node, on_progress=lambda applied, last: progress.update(
                    task, completed=applied, total=last))
    _print_digest(d, as_json, "rebuilt from the log")


@click.group(context_settings=CONTEXT_SETTINGS)
@node_argument
@click.pass_context
def mailbox(ctx: click.Context, node: str) -> None:
    """List, create, rename or delete the mailboxes of NODE.

    \b
    Example:
        walctl mailbox node1 list
        walctl mailbox node1 create user/bob/INBOX
        walctl mailbox node1 rename user/bob/Old user/bob/Archive
        walctl mailbox node1 delete user/bob/Archive
    """
    ctx.obj = node


@mailbox.command(name="list", context_settings=CONTEXT_SETTINGS)
@json_flag
@click.pass_obj
def mailbox_list(node: str, as_json: bool) -> None:
    """List mailboxes: UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, messages, digest."""
    _require_node(node)
    if log_in_use(node):
        ro = ReadOnlyStore(node)
        try:
            rows = ro.mailboxes()
        finally:
            ro.close()
    else:
        with _open_node(node, writing=False) as n, _errors(node):
            rows = [_mailbox_dict(mb) for mb in n.list_mailboxes()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']}  uidvalidity={r['uidvalidity']} uidnext={r['uidnext']} "
                   f"highestmodseq={r['highestmodseq']} messages={r['messages']}")


#: How much of a body is read for its header (a header longer than this shows what fits).
HEADER_READ_BYTES = 64 * 1024


def add_headers(node: str, rows: list[dict]) -> None:
    """Set ``from`` and ``subject`` of each message row, parsed from its stored body.

    Reads the first :data:`HEADER_READ_BYTES` of each body from the node's
    store, read-only (so also while the node runs). Encoded words (RFC 2047)
    are decoded; a header that is missing or unreadable gives "".
    """
    import email.parser
    import email.policy

    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    uri = "file:" + os.path.abspath(os.path.join(node, STORE_FILE)) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        for r in rows:
            row = conn.execute("SELECT substr(data, 1, ?) FROM bodies WHERE guid=?",
                               (HEADER_READ_BYTES, bytes.fromhex(r["guid"]))).fetchone()
            head = bytes(row[0]) if row and row[0] is not None else b""
            end = head.find(b"\r\n\r\n")
            head = head[:end + 4] if end >= 0 else head
            try:
                msg = parser.parsebytes(head)
                r["from"], r["subject"] = (" ".join(str(msg.get(h, "") or "").split()) for h in ("from", "subject"))
            except Exception:  # a header the parser cannot read: shown as empty, never fatal
                r["from"], r["subject"] = "", ""
    finally:
        conn.close()


def _message_table(rows: list[dict]) -> list[str]:
    """Text lines: a header row, then one line per message (GUID shortened; --json has it whole)."""
    cols = [("UID", lambda r: str(r["uid"]), ">"), ("SIZE", lambda r: str(r["size"]), ">"),
            ("MODSEQ", lambda r: str(r["modseq"]), ">"), ("FLAGS", lambda r: " ".join(r["flags"]), "<"),
            ("GUID", lambda r: r["guid"][:12], "<"), ("FROM", lambda r: r["from"][:40], "<"),
            ("SUBJECT", lambda r: r["subject"], "<")]
    cells = [[get(r) for _, get, _ in cols] for r in rows]
    widths = [max([len(name)] + [len(c[i]) for c in cells]) for i, (name, _, _) in enumerate(cols)]

    def line(values: list[str]) -> str:
        return "  ".join(f"{v:{align}{w}}" for v, w, (_, _, align) in zip(values, widths, cols)).rstrip()

    return [line([name for name, _, _ in cols])] + [line(c) for c in cells]


@click.command(context_settings=CONTEXT_SETTINGS)
@node_argument
@click.argument("mailbox_name", metavar="MAILBOX")
@json_flag
def messages(node: str, mailbox_name: str, as_json: bool) -> None:
    """List the messages of MAILBOX: UID, size, MODSEQ, flags, GUID, sender, subject.

    Sender and subject are read from each stored message's header. --json
    prints every field: uid, guid, flags, size, internaldate_ms, modseq,
    from, subject.

    \b
    Example:
        walctl messages node1 user/bob/INBOX --json
    """
    _require_node(node)
    if log_in_use(node):
        ro = ReadOnlyStore(node)
        try:
            rows = ro.messages(mailbox_name)
        finally:
            ro.close()
    else:
        with _open_node(node, writing=False) as n, _errors(node):
            rows = [_message_dict(m) for m in n.list_messages(mailbox_name)]
    with _errors(node):
        add_headers(node, rows)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"{mailbox_name} holds no messages", err=True)
        return
    for line in _message_table(rows):
        click.echo(line)


NODE_COMMANDS = (init, deliver, digest, rebuild, mailbox, messages)  # serve/follow: tools/cmd_cluster.py
