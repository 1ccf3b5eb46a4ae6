"""``walctl export`` and ``walctl import``: mailboxes to and from Maildir trees.

Thin layers over :mod:`engine.store.maildir_migration` (the name mapping, durability and
error rules are documented there and in specs/mail-store.md, MS-14/MS-15).
``export`` works on a running node (it reads the store read-only, as of
its applied LSN); ``import`` writes, so the node must be stopped.
"""

from __future__ import annotations

import json
import os

import click

from engine.store.maildir_migration import export_store, import_maildir, normalize_prefix
from engine.node import STORE_FILE

from .cliutil import CONTEXT_SETTINGS
from .cmd_node import _errors, _open_node, _require_node, log_in_use

__all__ = ["export", "import_", "MAILDIR_COMMANDS"]

node_argument = click.argument("node", metavar="NODE", type=click.Path(file_okay=False))
maildir_option = click.option("--maildir", "maildir", required=True, type=click.Path(file_okay=False),
                              help="The Maildir tree to write (export) or read (import).")
user_option = click.option("--user", default=None, metavar="NAME",
                           help="DIR is the Maildir++ tree of user NAME (mailboxes user/NAME/...).")
prefix_option = click.option("--mailbox-prefix", "prefix", default=None, metavar="PREFIX",
                             help="DIR is one Maildir++ tree for the mailboxes below PREFIX (PREFIX/INBOX is its "
                                  "root); an empty PREFIX means the whole namespace.")
json_flag = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def _prefix(user: str | None, prefix: str | None) -> str | None:
    if user is not None and prefix is not None:
        raise click.UsageError("give --user or --mailbox-prefix, not both")
    with _errors():
        return normalize_prefix(prefix, user)


@click.command(context_settings=CONTEXT_SETTINGS)
@node_argument
@click.argument("mailboxes", nargs=-1, metavar="[MAILBOX]...")
@maildir_option
@user_option
@prefix_option
@json_flag
def export(node: str, mailboxes: tuple[str, ...], maildir: str, user: str | None, prefix: str | None,
           as_json: bool) -> None:
    """Write mailboxes of NODE as Maildir that Dovecot reads with their UIDs.

    Without --user or --mailbox-prefix, DIR gets one Maildir++ tree per user
    (DIR/bob for user/bob/...). Each folder gets cur/new/tmp, flags in the
    file names, dovecot-keywords and dovecot-uidlist (UIDVALIDITY, UIDNEXT,
    UIDs). Every file and directory is fsynced. Refuses target folders that
    hold mail already. Works on a running node: it then reads the store
    read-only, as of the LSN it has applied.

    \b
    Example:
        walctl export node1 --maildir /srv/export
        walctl export node1 user/bob/INBOX user/bob/Sent --maildir /home/bob/Maildir --user bob
    """
    pfx = _prefix(user, prefix)
    _require_node(node)
    if log_in_use(node):
        with _errors():
            report = export_store(os.path.join(node, STORE_FILE), maildir, mailboxes=list(mailboxes) or None,
                                  prefix=pfx)
        note = "node is running: read from its store, as of this applied LSN"
    else:
        with _open_node(node, writing=False) as n, _errors():
            report = export_store(n.store.path, maildir, mailboxes=list(mailboxes) or None, prefix=pfx)
        note = None
    if as_json:
        out = report.to_dict()
        if note:
            out["note"] = note
        click.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    for f in report.folders:
        click.echo(f"exported {f.mailbox} -> {f.path}: {f.messages} messages, "
                   f"UIDVALIDITY {f.uidvalidity}, UIDNEXT {f.uidnext}")
    click.echo(f"{len(report.folders)} mailboxes as of applied LSN {report.applied_lsn}" + (f" ({note})" if note else ""))


@click.command(name="import", context_settings=CONTEXT_SETTINGS)
@node_argument
@maildir_option
@user_option
@prefix_option
@click.option("--fresh-uidvalidity", is_flag=True,
              help="Give every mailbox a new UIDVALIDITY instead of dovecot-uidlist's (clients re-download).")
@click.option("--resume", is_flag=True,
              help="Finish an interrupted import: existing mailboxes must hold the same messages below their UIDNEXT.")
@json_flag
def import_(node: str, maildir: str, user: str | None, prefix: str | None, fresh_uidvalidity: bool, resume: bool,
            as_json: bool) -> None:
    """Bring a Maildir tree (as Dovecot lays it out) into NODE, keeping UIDs.

    UIDs, UIDVALIDITY and UIDNEXT come from dovecot-uidlist (without one,
    UIDs are 1, 2, ... in file-name order); flags from the file names and
    dovecot-keywords; INTERNALDATE from each file's mtime. With --user NAME,
    DIR is NAME's Maildir++ tree (DIR = user/NAME/INBOX, DIR/.Sent =
    user/NAME/Sent); without it, DIR holds one tree per user. Everything is
    checked before the first write; existing mailboxes are refused unless
    --resume. The node must be stopped.

    \b
    Example:
        walctl import node1 --maildir /home/bob/Maildir --user bob
        walctl import node1 --maildir /srv/export
    """
    pfx = _prefix(user, prefix)
    with _open_node(node, writing=True) as n, _errors():
        report = import_maildir(n, maildir, prefix=pfx, fresh_uidvalidity=fresh_uidvalidity, resume=resume)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        return
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    for f in report.folders:
        extra = f", {f.skipped} already there" if f.skipped else ""
        click.echo(f"imported {f.path} -> {f.mailbox}: {f.imported} messages{extra}, UIDVALIDITY {f.uidvalidity}, "
                   f"UIDNEXT {f.uidnext} (UIDs from {f.uid_source})")
    click.echo(f"{len(report.folders)} mailboxes imported")


MAILDIR_COMMANDS = (export, import_)
