"""``walctl`` commands that change a node's users and mail: user, flags, expunge, mailbox create|rename|delete.

Each works on a running node through its control channel (CTL-10), and on a
stopped node by opening it here; both run the same functions
(:mod:`engine.node.admin`), through the same log path as the IMAP front: one
record each, durable before walctl prints its result. A password is read
from a terminal prompt or, with ``--password-stdin``, from standard input;
it is hashed here (argon2id) and only the hash leaves this process.
"""

from __future__ import annotations

import json
import os
import sys

import click

from engine.node.admin import OPERATIONS, format_uids, parse_passwd_file, parse_uid_set

from .cliutil import CONTEXT_SETTINGS
from .cmd_node import _errors, _open_node, _require_node, json_flag, log_in_use, mailbox, node_argument

__all__ = ["ADMIN_COMMANDS", "on_node", "user", "flags", "expunge"]


def on_node(node: str, op: str, **args):
    """Perform the control operation ``op`` on NODE: through its control socket when it runs,
    else on the node opened here (its log lock keeps a node from starting meanwhile)."""
    from .cmd_cluster import _call, _running, _starting

    _require_node(node)
    if _running(node, None) or _starting(node):
        return _call(node, None, None, op, **args)
    if log_in_use(node):
        raise click.ClickException(f"node {node} is running but does not answer on "
                                   f"{os.path.join(node, 'control.sock')}: check its log, or stop it")
    with _open_node(node, writing=True) as n, _errors(node):
        return OPERATIONS[op](n, **args)


def _read_password(from_stdin: bool) -> str:
    """The new password: the first line of standard input with ``--password-stdin``, else a
    prompt (twice, not echoed) when standard input is a terminal."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt="Password again")
    else:
        raise click.ClickException("standard input is not a terminal, so no password can be prompted for: "
                                   "give it on standard input with --password-stdin")
    if not password:
        raise click.ClickException("the password is empty")
    return password


def _check_user(node: str, name: str) -> None:
    """Refuse a bad NODE or user name before asking for a password."""
    from engine.store.events import validate_user_name

    _require_node(node)
    with _errors(node):
        validate_user_name(name)


def _hash(password: str) -> str:
    from engine.store.passwords import hash_password

    return hash_password(password)


password_stdin = click.option("--password-stdin", is_flag=True,
                              help="Read the password from the first line of standard input (no prompt).")


@click.group(context_settings=CONTEXT_SETTINGS)
@node_argument
@click.pass_context
def user(ctx: click.Context, node: str) -> None:
    """Add, list, change or delete the users who log in over IMAP.

    Users and their password hashes are records in the log, so every
    replica can log them in after a failover. Works on a running node
    (through its control socket) and on a stopped one. A password is
    prompted for on a terminal, or read from standard input with
    --password-stdin; it never appears on the command line or in a log
    (only its argon2id hash is stored).

    \b
    Example:
        walctl user node1 add bob
        printf '%s\\n' "$PASSWORD" | walctl user node1 passwd bob --password-stdin
        walctl user node1 list --json
        walctl user node1 import --passwd-file /etc/dovecot/users
        walctl user node1 del bob
    """
    ctx.obj = node


@user.command(name="add", context_settings=CONTEXT_SETTINGS)
@click.argument("name")
@password_stdin
@click.pass_obj
def user_add(node: str, name: str, password_stdin: bool) -> None:
    """Add user NAME (and its mailbox user/NAME/INBOX)."""
    _check_user(node, name)
    result = on_node(node, "user_add", name=name, password_hash=_hash(_read_password(password_stdin)))
    click.echo(f"added user {result['user']} with user/{result['user']}/INBOX (LSN {result['lsn']})")


@user.command(name="passwd", context_settings=CONTEXT_SETTINGS)
@click.argument("name")
@password_stdin
@click.pass_obj
def user_passwd(node: str, name: str, password_stdin: bool) -> None:
    """Set a new password for user NAME (sessions already logged in stay)."""
    _check_user(node, name)
    result = on_node(node, "user_passwd", name=name, password_hash=_hash(_read_password(password_stdin)))
    click.echo(f"new password for {result['user']} (LSN {result['lsn']})")


@user.command(name="del", context_settings=CONTEXT_SETTINGS)
@click.argument("name")
@click.pass_obj
def user_del(node: str, name: str) -> None:
    """Delete user NAME: it can no longer log in; its subscriptions go, its mailboxes stay."""
    result = on_node(node, "user_delete", name=name)
    click.echo(f"deleted user {result['user']} (its mailboxes stay) (LSN {result['lsn']})")


@user.command(name="list", context_settings=CONTEXT_SETTINGS)
@json_flag
@click.pass_obj
def user_list(node: str, as_json: bool) -> None:
    """List the users and the scheme of each one's password hash."""
    rows = on_node(node, "user_list")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"{node} has no users", err=True)
    for row in rows:
        click.echo(f"{row['name']}  {row['scheme']}")


@user.command(name="import", context_settings=CONTEXT_SETTINGS)
@click.option("--passwd-file", "passwd_file", required=True, type=click.File("r", encoding="utf-8"),
              help="A Dovecot passwd-file: user:{SCHEME}hash:... per line (ARGON2ID, BLF-CRYPT, SHA512-CRYPT).")
@click.option("--replace", is_flag=True, help="Users that exist get the file's hash (default: refused).")
@click.option("--strip-domain", is_flag=True, help="Import user@domain as user (LMTP delivers by local part).")
@json_flag
@click.pass_obj
def user_import(node: str, passwd_file, replace: bool, strip_domain: bool, as_json: bool) -> None:
    """Import users with their password hashes from a Dovecot passwd-file.

    Each line is imported or refused on its own; one line per entry says
    which and why. Exit status 1 if any line was refused (the others are
    imported). A legacy hash (BLF-CRYPT, SHA512-CRYPT) is replaced by an
    argon2id hash at the user's first login on the master.
    """
    _require_node(node)
    entries = parse_passwd_file(passwd_file.read(), strip_domain=strip_domain)
    result = on_node(node, "user_import", entries=entries, replace=replace)
    rows = result["results"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            verdict = "imported" if row["imported"] else "refused"
            click.echo(f"line {row['line']}: {row['name'] or '?'}: {verdict}: {row['reason']}")
    refused = [row for row in rows if not row["imported"]]
    if refused:
        raise click.ClickException(f"{len(refused)} of {len(rows)} line(s) refused (lines "
                                   f"{', '.join(str(r['line']) for r in refused)}); the others were imported")


def _uid_ranges(value: str) -> list:
    try:
        return [list(r) for r in parse_uid_set(value)]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="UIDS") from None


@click.command(context_settings=CONTEXT_SETTINGS)
@node_argument
@click.argument("mailbox")
@click.argument("uids")
@click.argument("action", type=click.Choice(["add", "remove", "replace"]))
@click.argument("flag_list", metavar="FLAGS", nargs=-1)
@json_flag
def flags(node: str, mailbox: str, uids: str, action: str, flag_list: tuple[str, ...], as_json: bool) -> None:
    """Add, remove or replace FLAGS on the messages UIDS of MAILBOX.

    UIDS is an IMAP UID set: 4, 1:10, 7,9:*, * (the highest). Every UID
    named must exist (else nothing changes, exit 1). One durable record,
    as an IMAP STORE: IMAP sessions see the change at once. Works on a
    running node and on a stopped one. `replace` with no FLAGS clears them.

    \b
    Example:
        walctl flags node1 user/bob/INBOX 1:3 add '\\Seen' work
        walctl flags node1 user/bob/INBOX 7 replace
    """
    if action != "replace" and not flag_list:
        raise click.UsageError(f"give the flags to {action}")
    result = on_node(node, "flags", mailbox=mailbox, uids=_uid_ranges(uids), action=action, flags=list(flag_list))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    shown = " ".join(result["flags"]) or "(none)"
    verb = {"add": "added", "remove": "removed", "replace": "set flags to"}[action]
    click.echo(f"{verb} {shown} on UIDs {format_uids(result['uids']) or '(none left)'} of {mailbox} "
               f"(MODSEQ {result['modseq']}, LSN {result['lsn']})")


@click.command(context_settings=CONTEXT_SETTINGS)
@node_argument
@click.argument("mailbox")
@click.argument("uids")
@json_flag
def expunge(node: str, mailbox: str, uids: str, as_json: bool) -> None:
    """Remove the messages UIDS of MAILBOX for good (whatever their flags).

    UIDS is an IMAP UID set as for `walctl flags`; every UID named must
    exist (else nothing is removed, exit 1). One durable record, as an IMAP
    UID EXPUNGE. Works on a running node and on a stopped one.

    \b
    Example:
        walctl expunge node1 user/bob/INBOX 3,5:6
    """
    result = on_node(node, "expunge", mailbox=mailbox, uids=_uid_ranges(uids))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"expunged UIDs {format_uids(result['uids']) or '(none left)'} from {mailbox} (LSN {result['lsn']})")


# -- the mailbox group's writes (the group and its list are in tools/cmd_node.py) ------------------


@mailbox.command(name="create", context_settings=CONTEXT_SETTINGS)
@click.argument("name")
@click.pass_obj
def mailbox_create(node: str, name: str) -> None:
    """Create mailbox NAME (on a running node too)."""
    lsn = on_node(node, "mailbox_create", name=name)["lsn"]
    click.echo(f"created {name} (LSN {lsn})")


@mailbox.command(name="rename", context_settings=CONTEXT_SETTINGS)
@click.argument("old")
@click.argument("new")
@click.pass_obj
def mailbox_rename(node: str, old: str, new: str) -> None:
    """Rename mailbox OLD to NEW (UIDVALIDITY and UIDs stay; on a running node too)."""
    lsn = on_node(node, "mailbox_rename", old=old, new=new)["lsn"]
    click.echo(f"renamed {old} to {new} (LSN {lsn})")


@mailbox.command(name="delete", context_settings=CONTEXT_SETTINGS)
@click.argument("name")
@click.option("--recursive", is_flag=True, help="Also delete the mailboxes below NAME.")
@click.pass_obj
def mailbox_delete(node: str, name: str, recursive: bool) -> None:
    """Delete mailbox NAME and its messages (on a running node too)."""
    lsn = on_node(node, "mailbox_delete", name=name, recursive=recursive)["lsn"]
    click.echo(f"deleted {name} (LSN {lsn})")


ADMIN_COMMANDS = (user, flags, expunge)
