"""Export a node's mailboxes as Maildir, and import Maildir trees (MS-14, MS-15).

Export reads the store only, through a read-only SQLite connection in one
read transaction: a consistent copy as of the store's applied LSN, which
works while ``walctl serve`` holds the log. Import writes through the
node's import operations (``Node.create_mailbox(uidvalidity=...)``,
``Node.import_messages``), so every message keeps its UID, every mailbox its
UIDVALIDITY and UIDNEXT, and replicas get the same records as for any
other write.

Name mapping (``prefix``)
-------------------------
With a prefix (``user/bob/``), the tree is one user's Maildir++ root:
``PREFIX + "INBOX"`` is the root, ``PREFIX + "A/B"`` is ``.A.B``. Without
one, the directory holds one tree per user: ``DIR/<user>/`` for the
mailboxes ``user/<user>/...`` (MS-3's convention), as a Dovecot
``mail_location = maildir:/srv/mail/%n`` lays them out.

Durability
----------
An export is a copy: each file is fsynced before its rename and each
directory after its entries changed, and a folder's ``dovecot-uidlist`` is
written last, so a finished export survives a crash and an interrupted one
is recognisable (a folder without its uidlist). An import acknowledges
nothing by itself: each batch of messages is durable in the log when
``import_messages`` returns; an interrupted import is finished by running it
again with ``resume=True``.
"""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass, field

import blake3

from .events import SYSTEM_FLAGS, validate_mailbox_name
from .errors import (
    BadMailboxNameError,
    MailboxExistsError,
    MessageTooLargeError,
    UidOrderError,
    UnknownMailboxError,
)
from .maildir import (
    ExportTargetError,
    Folder,
    FolderWriter,
    MaildirError,
    MaildirFormatError,
    MaildirLayoutError,
    check_export_target,
    folder_dirname,
    is_maildir,
    keyword_letters,
    list_folders,
    read_folder,
)
from .decisions import UIDNEXT_PLACEHOLDER, ImportedMessage

__all__ = [
    "StoreReader", "ExportedFolder", "ExportReport", "ImportedFolder", "ImportReport",
    "normalize_prefix", "export_store", "plan_import", "import_maildir", "PLACEHOLDER_GUID",
]

PLACEHOLDER_GUID = blake3.blake3(UIDNEXT_PLACEHOLDER).hexdigest()
IMPORT_BATCH_BYTES = 16 * 1024 * 1024  # one fsync per batch of at most this many body bytes...
IMPORT_BATCH_MESSAGES = 1000  # ...or this many messages
_USER_MAILBOX = re.compile(r"^user/([^/]+)/(.+)$")


def normalize_prefix(prefix: str | None = None, user: str | None = None) -> str | None:
    """The mailbox-name prefix for ``--mailbox-prefix`` / ``--user`` (None: one tree per user)."""
    if user is not None:
        if not user or "/" in user:
            raise BadMailboxNameError(f"user name {user!r} must be non-empty and contain no '/'")
        return f"user/{user}/"
    if prefix is None:
        return None
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


# -- reading a store ------------------------------------------------------------------


class StoreReader:
    """A node's store opened read-only (works while another process writes it).

    Use as a context manager: everything read inside is one SQLite read
    transaction, so mailboxes, messages and bodies are one consistent
    state, that of ``applied_lsn``.
    """

    def __init__(self, store_path: str):
        if not os.path.isfile(store_path):
            raise MaildirError(f"{store_path} does not exist: not a node's store")
        uri = "file:" + os.path.abspath(store_path) + "?mode=ro"
        self.conn = sqlite3.connect(uri, uri=True, isolation_level=None)

    def __enter__(self) -> "StoreReader":
        self.conn.execute("BEGIN")
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.conn.execute("COMMIT")
        finally:
            self.conn.close()

    @property
    def applied_lsn(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key='applied_lsn'").fetchone()
        return int(row[0]) if row else 0

    def mailboxes(self) -> list[tuple[str, str, int, int]]:
        """``(mailbox_id, name, uidvalidity, uidnext)`` by name."""
        return self.conn.execute(
            "SELECT mailbox_id, name, uidvalidity, uidnext FROM mailboxes ORDER BY name").fetchall()

    def quarantined(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self.conn.execute("SELECT name, state FROM quarantine").fetchall()}

    def flag_sets(self, mailbox_id: str) -> list[tuple[str, ...]]:
        return [tuple(r[0].split()) for r in self.conn.execute(
            "SELECT DISTINCT flags FROM messages WHERE mailbox_id=?", (mailbox_id,)).fetchall()]

    def messages(self, mailbox_id: str):
        """Yields ``(uid, flags, internaldate_ms, body)`` by UID (one body in memory at a time)."""
        cur = self.conn.execute(
            "SELECT m.uid, m.flags, m.internaldate_ms, b.data FROM messages m JOIN bodies b ON b.guid = m.guid "
            "WHERE m.mailbox_id=? ORDER BY m.uid", (mailbox_id,))
        for uid, flags, idate, body in cur:
            yield uid, tuple(flags.split()) if flags else (), idate, bytes(body)


# -- export ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedFolder:
    mailbox: str
    path: str
    uidvalidity: int
    uidnext: int
    messages: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ExportReport:
    applied_lsn: int
    folders: list[ExportedFolder] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"applied_lsn": self.applied_lsn, "folders": [f.to_dict() for f in self.folders],
                "warnings": list(self.warnings)}


def _export_path(name: str, dest: str, prefix: str | None) -> tuple[str, bool]:
    """(folder directory, whether it is a subfolder) of mailbox ``name``."""
    if prefix is None:
        m = _USER_MAILBOX.match(name)
        if m is None:
            raise MaildirLayoutError(
                f"mailbox {name!r} is not a user's (user/NAME/...): export it with --mailbox-prefix"
            )
        if m.group(1).startswith("."):
            raise MaildirLayoutError(f"user directory {m.group(1)!r} of {name!r} would be hidden (it starts with "
                                     f"'.'): export that user with --user")
        root, relative = os.path.join(dest, m.group(1)), m.group(2)
    else:
        if not name.startswith(prefix) or name == prefix:
            raise MaildirLayoutError(f"mailbox {name!r} is not below the prefix {prefix!r}")
        root, relative = dest, name[len(prefix):]
    d = folder_dirname(relative)
    return (os.path.join(root, d) if d else root), bool(d)


def export_store(store_path: str, dest: str, *, mailboxes: list[str] | None = None,
                 prefix: str | None = None) -> ExportReport:
    """Write mailboxes of the store at ``store_path`` as Maildir under ``dest``.

    ``mailboxes`` selects by name (default: all, or all below ``prefix``).
    Every target is checked before anything is written: a mailbox that does
    not exist (UnknownMailboxError), a name with no Maildir++ form or more
    than 26 keywords in one mailbox (MaildirLayoutError), a target folder
    holding mail already (ExportTargetError).
    """
    with StoreReader(store_path) as reader:
        report = ExportReport(reader.applied_lsn)
        rows = {r[1]: r for r in reader.mailboxes()}
        if mailboxes:
            missing = [n for n in mailboxes if n not in rows]
            if missing:
                raise UnknownMailboxError(f"no mailbox named {', '.join(map(repr, missing))}")
            names = list(dict.fromkeys(mailboxes))
        elif prefix is not None:
            names = [n for n in rows if n.startswith(prefix) and n != prefix]
        else:
            names = list(rows)
        plan = []
        for name in names:
            path, sub = _export_path(name, dest, prefix)
            mailbox_id = rows[name][0]
            keywords = {f for fs in reader.flag_sets(mailbox_id) for f in fs if f not in SYSTEM_FLAGS}
            try:
                letters = keyword_letters(keywords)
            except MaildirLayoutError as exc:
                raise MaildirLayoutError(f"mailbox {name!r}: {exc}") from None
            check_export_target(path)
            plan.append((name, path, sub, letters))
        quarantined = reader.quarantined()
        for name, path, sub, letters in plan:
            mailbox_id, _, uidvalidity, uidnext = rows[name]
            if name in quarantined:
                report.warnings.append(f"mailbox {name!r} is {quarantined[name]}: its copy may lag the log")
            writer = FolderWriter(path, subfolder=sub, keywords=letters)
            n = 0
            for uid, flags, idate, body in reader.messages(mailbox_id):
                writer.add(uid, body, flags, idate)
                n += 1
            writer.finish(uidvalidity, uidnext, mailbox_id)
            report.folders.append(ExportedFolder(name, path, uidvalidity, uidnext, n))
    return report


# -- import ---------------------------------------------------------------------------


@dataclass
class ImportedFolder:
    mailbox: str
    path: str
    uidvalidity: int | None
    uidnext: int
    uid_source: str
    imported: int = 0
    skipped: int = 0  # already there (resume)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ImportReport:
    folders: list[ImportedFolder] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"folders": [f.to_dict() for f in self.folders], "warnings": list(self.warnings)}


def _user_trees(root: str) -> list[tuple[str, str]]:
    if is_maildir(root):
        raise MaildirError(f"{root} is one user's Maildir (it has cur/ or new/): say whose with --user NAME "
                           f"or --mailbox-prefix PREFIX")
    out = []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry.startswith(".") or not os.path.isdir(path):
            continue
        out.append((f"user/{entry}/", path))
    return out


def plan_import(root: str, *, prefix: str | None = None,
                max_message_bytes: int = 0) -> tuple[list[tuple[str, Folder]], list[str]]:
    """Read a Maildir tree and decide what to import: ``([(mailbox, Folder)], warnings)``.

    Reads no bodies but checks everything it can first: names (MS-3),
    uidlists, keyword files, sizes (``,S=`` and ``max_message_bytes``).
    Raises MaildirError subclasses, BadMailboxNameError, MessageTooLargeError.
    """
    if not os.path.isdir(root):
        raise MaildirError(f"{root} is not a directory")
    trees = [(prefix, root)] if prefix is not None else _user_trees(root)
    plan: list[tuple[str, Folder]] = []
    warnings: list[str] = []
    seen: dict[str, str] = {}
    for pfx, tree in trees:
        folders = list_folders(tree)
        if not folders:
            warnings.append(f"{tree}: no mailbox (no cur/ or new/ here or in a .Folder): skipped")
        for relative, path in folders:
            name = pfx + relative
            try:
                validate_mailbox_name(name)
            except BadMailboxNameError as exc:
                raise BadMailboxNameError(f"{path}: {exc}") from None
            if name in seen:
                raise MaildirLayoutError(f"{path} and {seen[name]} are both mailbox {name!r}")
            seen[name] = path
            folder = read_folder(path)
            if max_message_bytes:
                for m in folder.messages:
                    if m.size > max_message_bytes:
                        raise MessageTooLargeError(
                            f"{m.path}: {m.size} bytes exceed the node's limit of {max_message_bytes}: "
                            f"raise max_message_bytes in node.json or leave the message out")
            warnings += folder.warnings
            plan.append((name, folder))
    return plan, warnings


def _read_body(m) -> bytes:
    with open(m.path, "rb") as f:
        body = f.read()
    if len(body) != m.size:
        raise MaildirFormatError(m.path, f"the file changed during the import ({m.size} -> {len(body)} bytes)")
    return body


def import_maildir(node, root: str, *, prefix: str | None = None, fresh_uidvalidity: bool = False,
                   resume: bool = False, batch_bytes: int = IMPORT_BATCH_BYTES,
                   batch_messages: int = IMPORT_BATCH_MESSAGES) -> ImportReport:
    """Import the Maildir tree at ``root`` into ``node`` (a writable Node).

    Keeps UIDs, UIDVALIDITY (unless ``fresh_uidvalidity``) and UIDNEXT;
    flags from file names and ``dovecot-keywords``; INTERNALDATE from mtime.
    Everything is planned and checked before the first write. A mailbox
    that exists already is refused (MailboxExistsError) unless ``resume``:
    then messages below its UIDNEXT must be there with the same bytes
    (they are skipped) and the rest is imported. Each batch is durable when
    it returns. Raises the errors of :func:`plan_import` and of the node's
    import operations (UidOrderError, UidValidityReuseError, ...).
    """
    plan, warnings = plan_import(root, prefix=prefix, max_message_bytes=node.config.max_message_bytes)
    report = ImportReport(warnings=warnings)
    existing = {mb.name: mb for mb in node.list_mailboxes()}
    for name, folder in plan:
        mb = existing.get(name)
        if mb is None:
            continue
        if not resume:
            raise MailboxExistsError(f"mailbox {name!r} exists already: nothing was imported "
                                     f"(use --resume to finish an interrupted import)")
        if not fresh_uidvalidity and folder.uidvalidity is not None and mb.uidvalidity != folder.uidvalidity:
            raise MailboxExistsError(f"mailbox {name!r} exists with UIDVALIDITY {mb.uidvalidity}, but "
                                     f"{folder.path} has {folder.uidvalidity}: it is not an earlier run of this "
                                     f"import")
    for name, folder in plan:
        rec = ImportedFolder(name, folder.path, folder.uidvalidity, folder.uidnext, folder.uid_source)
        report.folders.append(rec)
        if name not in existing:
            keep = None if fresh_uidvalidity else folder.uidvalidity
            node.create_mailbox(name, uidvalidity=keep)
            have: dict[int, str] = {}
        else:
            have = {m.uid: m.guid for m in node.list_messages(name)}
        info = {mb.name: mb for mb in node.list_mailboxes()}[name]
        rec.uidvalidity = info.uidvalidity
        start = expected = info.uidnext  # the mailbox's UIDNEXT before this run, and as the batches go
        batch: list[ImportedMessage] = []
        size = 0
        for m in folder.messages:
            if m.uid < start:
                guid = have.get(m.uid)
                if guid is None or guid != blake3.blake3(_read_body(m)).hexdigest():
                    raise UidOrderError(
                        f"{m.path}: UID {m.uid} is below UIDNEXT {start} of {name!r}, but the mailbox "
                        f"{'holds other bytes under it' if guid else 'does not hold it'}: it was delivered to or "
                        f"expunged from since the interrupted import; import this folder into another mailbox")
                rec.skipped += 1
                continue
            body = _read_body(m)
            batch.append(ImportedMessage(m.uid, body, m.flags, m.internaldate_ms))
            size += len(body)
            if len(batch) >= batch_messages or size >= batch_bytes:
                node.import_messages(name, batch)
                rec.imported += len(batch)
                expected = batch[-1].uid + 1
                batch, size = [], 0
        if batch:
            expected = batch[-1].uid + 1
        if folder.uidnext < expected:
            report.warnings.append(f"mailbox {name!r} has UIDNEXT {expected}, above {folder.uidnext} of {folder.path}")
        node.import_messages(name, batch, uidnext=folder.uidnext if folder.uidnext > expected else None)
        rec.imported += len(batch)
        if have and folder.uidnext == start:
            _expunge_placeholder(node, name, folder.uidnext - 1)
    return report


def _expunge_placeholder(node, name: str, uid: int) -> None:
    """A placeholder a torn batch left (its expunge lost) is expunged when resuming (MS-14)."""
    stale = [m.uid for m in node.list_messages(name) if m.uid == uid and m.guid == PLACEHOLDER_GUID]
    if stale:
        node.expunge(name, stale)
