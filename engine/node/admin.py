"""Operator requests on a node: users, mailboxes, flags and expunges (``walctl user|mailbox|flags|expunge``).

One definition serves both ways ``walctl`` reaches a node (CTL-10): a running
node's control handler calls :data:`OPERATIONS` in a worker thread, and
``walctl`` calls the same functions on a node it opened itself when the node
is stopped. Each write goes through the node's IMAP write path (one record,
durable on return: :meth:`Node.change_flags`, :meth:`Node.expunge_present`,
:meth:`Node.add_user` ...) and returns a JSON-able dict whose ``lsn`` is the
last record it wrote (0: nothing was written). Errors are the node's typed
mail-store errors (``RequestError`` for a request that cannot be done,
``ReadOnlyNodeError`` on a replica).

Passwords never reach this module: ``walctl`` hashes them (argon2id) before
anything leaves the process, so only hashes travel on the control channel and
only hashes are in the log (MS-21). A Dovecot passwd-file is read by
:func:`parse_passwd_file`; each entry is imported or refused on its own
(:func:`user_import`).
"""

from __future__ import annotations

from typing import Callable, Iterable

from ..store.errors import BadPasswordHashError, MailStoreError, RequestError, UnknownUidError
from ..store.events import validate_user_name
from ..store.passwords import check_hash, scheme_of

__all__ = ["OPERATIONS", "parse_uid_set", "format_uids", "parse_passwd_file", "dovecot_hash",
           "user_add", "user_passwd", "user_delete", "user_list", "user_import",
           "mailbox_create", "mailbox_rename", "mailbox_delete", "flags", "expunge"]

UidRanges = list[tuple[int | None, int | None]]  # (first, last) UIDs; None is "*", the mailbox's highest UID


# -- UID sets ------------------------------------------------------------------------------


def parse_uid_set(text: str) -> UidRanges:
    """``"1,4:6,9:*"`` -> ``[(1, 1), (4, 6), (9, None)]``: UIDs and ranges as IMAP writes them,
    ``*`` (None) standing for the mailbox's highest UID.

    Raises ValueError saying what is wrong (a UID is 1 to 2**32 - 1).
    """
    out: UidRanges = []
    for part in str(text).split(","):
        first, sep, last = part.strip().partition(":")
        try:
            lo = None if first == "*" else _uid(first)
            hi = (None if last == "*" else _uid(last)) if sep else lo
        except ValueError:
            raise ValueError(f"{text!r} is not a UID set (UIDs, ranges A:B and * separated by commas, "
                             f"e.g. 1,4:6,9:*)") from None
        out.append((lo, hi))
    return out


def _uid(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 2 ** 32:
        raise ValueError(text)
    return int(text)


def format_uids(uids: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1:3,7"`` (the IMAP form, sorted)."""
    parts: list[str] = []
    run: list[int] = []
    for uid in sorted(set(uids)) + [-1]:
        if run and uid == run[-1] + 1:
            run.append(uid)
            continue
        if run:
            parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}:{run[-1]}")
        run = [uid]
    return ",".join(parts)


def _resolve(node, mailbox: str, ranges: UidRanges) -> list[int]:
    """The UIDs of ``mailbox`` that ``ranges`` name (``*`` is its highest UID, and ``A:B`` is
    ``B:A``, as in IMAP). Every single UID named must exist and every range must hold one,
    else UnknownUidError: nothing is changed."""
    present = [m.uid for m in node.list_messages(mailbox)]
    top = present[-1] if present else 0
    chosen: set[int] = set()
    missing: list[str] = []
    for lo, hi in ranges:
        a, b = sorted((top if lo is None else lo, top if hi is None else hi))
        got = [u for u in present if a <= u <= b]
        if not got:
            shown = ["*" if x is None else str(x) for x in (lo, hi)]
            missing.append(shown[0] if lo == hi else ":".join(shown))
        chosen.update(got)
    if missing:
        raise UnknownUidError(f"{mailbox} has no message with UID {', '.join(missing)} (nothing was changed)")
    return sorted(chosen)


# -- mail ----------------------------------------------------------------------------------


def flags(node, mailbox: str, uids: UidRanges, action: str, flags: list[str]) -> dict:
    """Add, remove or replace ``flags`` on the messages ``uids`` names, in one record (IMAP STORE's path)."""
    chosen = _resolve(node, mailbox, _ranges(uids))
    receipt = node.change_flags(mailbox, chosen, action, list(flags))
    return {"mailbox": mailbox, "action": action, "flags": list(flags), "uids": list(receipt.uids),
            "modseq": receipt.modseq, "lsn": receipt.lsn}


def expunge(node, mailbox: str, uids: UidRanges) -> dict:
    """Expunge the messages ``uids`` names, in one record (IMAP UID EXPUNGE's path)."""
    chosen = _resolve(node, mailbox, _ranges(uids))
    gone, lsn = node.expunge_present(mailbox, chosen)
    return {"mailbox": mailbox, "uids": list(gone), "lsn": lsn}


def _ranges(uids) -> UidRanges:
    """UID ranges as they came over JSON (lists) -> tuples; a bad shape is a RequestError."""
    try:
        out = [(None if lo is None else int(lo), None if hi is None else int(hi)) for lo, hi in uids]
    except (TypeError, ValueError):
        raise RequestError(f"UIDs must be a list of [first, last or null] pairs, got {uids!r}") from None
    if not out:
        raise RequestError("no UIDs given")
    return out


def mailbox_create(node, name: str) -> dict:
    return {"mailbox": name, "lsn": node.create_mailbox(name)}


def mailbox_rename(node, old: str, new: str) -> dict:
    """Rename one mailbox (UIDVALIDITY and UIDs stay; the mailboxes below it keep their names)."""
    return {"mailbox": new, "old": old, "lsn": node.rename_mailbox(old, new)}


def mailbox_delete(node, name: str, recursive: bool = False) -> dict:
    return {"mailbox": name, "lsn": node.delete_mailbox(name, recursive=recursive)}


# -- users ---------------------------------------------------------------------------------


def user_add(node, name: str, password_hash: str) -> dict:
    """Add user ``name`` (and ``user/NAME/INBOX``) with a hash made by the client."""
    return {"user": name, "scheme": _scheme(password_hash), "lsn": node.add_user(name, password_hash=password_hash)}


def user_passwd(node, name: str, password_hash: str) -> dict:
    return {"user": name, "scheme": _scheme(password_hash), "lsn": node.set_password(name, password_hash=password_hash)}


def user_delete(node, name: str) -> dict:
    """The user can no longer log in; their subscriptions go; their mailboxes stay."""
    return {"user": name, "lsn": node.delete_user(name)}


def user_list(node) -> list[dict]:
    """``[{"name", "scheme"}]``: each user and the scheme of their stored hash (a legacy scheme is
    replaced by argon2id at the user's next login on the master)."""
    names = node.list_users()
    out = []
    for name in names:
        stored = node.store.user_hash(name)
        out.append({"name": name, "scheme": _scheme(stored) if stored else None})
    return out


def _scheme(stored: str) -> str:
    try:
        return scheme_of(stored)[0]
    except BadPasswordHashError:
        return "unknown"


def user_import(node, entries: list[dict], replace: bool = False) -> dict:
    """Import passwd-file entries one by one: ``{"line", "name", "hash"}`` or ``{"line", "error"}``
    (refused while parsing). A user that exists is refused unless ``replace`` (then it gets the
    file's hash). Returns ``{"results": [{"line", "name", "imported": bool, "reason"}], "lsn"}``."""
    known = set(node.list_users())
    results, lsn = [], 0
    for entry in entries:
        line, name = entry.get("line"), entry.get("name")
        if entry.get("error"):
            results.append({"line": line, "name": name, "imported": False, "reason": entry["error"]})
            continue
        try:
            if name in known and not replace:
                raise RequestError(f"user {name} exists (--replace gives it the file's hash)")
            if name in known:
                lsn = node.set_password(name, password_hash=entry["hash"])
                done = f"password replaced ({_scheme(entry['hash'])})"
            else:
                lsn = node.add_user(name, password_hash=entry["hash"])
                done = f"added ({_scheme(entry['hash'])})"
                known.add(name)
        except RequestError as exc:  # this line is refused; the others go on
            results.append({"line": line, "name": name, "imported": False, "reason": str(exc)})
            continue
        results.append({"line": line, "name": name, "imported": True, "reason": done})
    return {"results": results, "lsn": lsn}


#: Dovecot's CRYPT scheme (and a hash without a scheme) names its algorithm by the hash's own prefix.
_CRYPT_PREFIXES = (("$argon2id$", None), ("$6$", "SHA512-CRYPT"), ("$2a$", "BLF-CRYPT"), ("$2b$", "BLF-CRYPT"),
                   ("$2y$", "BLF-CRYPT"))


def dovecot_hash(field: str) -> str:
    """A passwd-file password field as this node stores it: ``{SCHEME}hash`` of a supported
    scheme, with ``{CRYPT}`` or no prefix read by the hash's own ``$id$``. Raises BadPasswordHashError."""
    rest = field
    if field.upper().startswith("{CRYPT}"):
        rest = field[len("{CRYPT}"):]
    elif field.startswith("{"):
        return check_hash(field)
    for prefix, scheme in _CRYPT_PREFIXES:
        if rest.startswith(prefix):
            return check_hash(rest if scheme is None else f"{{{scheme}}}{rest}")
    if not rest:
        raise BadPasswordHashError("the password field is empty")
    return check_hash(rest)


def parse_passwd_file(text: str, *, strip_domain: bool = False) -> list[dict]:
    """Entries of a Dovecot passwd-file (``user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra]``).

    Blank lines and ``#`` comments are skipped. Each other line gives
    ``{"line": n, "name", "hash"}``, or ``{"line": n, "name", "error"}`` saying why it cannot be
    imported (a user name mailwal does not take, a scheme it cannot verify, no password). User
    names are lower-cased (IMAP logins are matched that way); ``strip_domain`` imports
    ``bob@example.org`` as ``bob`` (the LMTP front delivers by the local part).
    """
    entries: list[dict] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, rest = line.partition(":")
        name = user.strip().lower()
        if strip_domain:
            name = name.partition("@")[0]
        entry: dict = {"line": number, "name": name}
        if not sep:
            entry["error"] = "not a passwd-file line (user:{SCHEME}hash:...)"
        else:
            try:
                validate_user_name(name)
                entry["hash"] = dovecot_hash(rest.split(":", 1)[0])
            except MailStoreError as exc:
                entry["error"] = str(exc) + (" (--strip-domain imports user@domain as user)"
                                             if "@" in name and not strip_domain else "")
        entries.append(entry)
    return entries


#: The control operations (specs/control.md, CTL-10) -> the function that performs them on a Node.
OPERATIONS: dict[str, Callable[..., object]] = {
    "user_add": user_add, "user_passwd": user_passwd, "user_delete": user_delete, "user_list": user_list,
    "user_import": user_import, "mailbox_create": mailbox_create, "mailbox_rename": mailbox_rename,
    "mailbox_delete": mailbox_delete, "flags": flags, "expunge": expunge,
}
