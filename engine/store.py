"""The materialised mail store: a SQLite projection of the log (MS-5).

Invariants
----------
* The store is a pure function of the log: applying records in LSN order is
  deterministic, and each record is applied at most once because the store
  keeps ``applied_lsn`` in the same SQLite transaction as the changes.
* The store does not fsync per message (``synchronous=NORMAL``): the log is
  the durability point. After a crash the store may have lost its last
  transactions; opening it re-applies the log from ``applied_lsn + 1``.
* Bodies are content-addressed by GUID (blake3 of the bytes) in the same
  database, so a message row never exists without its body.
* Each mailbox keeps ``msg_xor``, the XOR of one hash per message over
  (UID, GUID, flags); its digest folds in UIDVALIDITY and UIDNEXT. XOR is
  order independent and supports removal, so digests are maintained
  incrementally and reading them is cheap (MS-7).
"""

from __future__ import annotations

import os
import sqlite3
import struct
import threading
from dataclasses import dataclass
from typing import Iterable

import blake3
import sqlite_utils

from wal import Record

from .events import (
    Checkpoint,
    EpochStarted,
    FlagsChanged,
    MailboxCreated,
    MailboxDeleted,
    MailboxRenamed,
    MessageAppended,
    MessagesExpunged,
    decode_event,
)

__all__ = ["Store", "MailboxInfo", "MessageInfo", "message_hash", "mailbox_digest", "store_digest"]

ZERO32 = bytes(32)


def message_hash(uid: int, guid: bytes, flags: Iterable[str]) -> bytes:
    return blake3.blake3(struct.pack("<I", uid) + guid + "\n".join(sorted(flags)).encode()).digest()


def xor32(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(32, "big")


def mailbox_digest(uidvalidity: int, uidnext: int, msg_xor: bytes) -> str:
    return blake3.blake3(struct.pack("<II", uidvalidity, uidnext) + msg_xor).hexdigest()


def store_digest(per_mailbox: dict[str, str]) -> str:
    h = blake3.blake3()
    for name in sorted(per_mailbox):
        h.update(name.encode() + b"\0" + bytes.fromhex(per_mailbox[name]))
    return h.hexdigest()


@dataclass(frozen=True)
class MailboxInfo:
    mailbox_id: str
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: int
    digest: str


@dataclass(frozen=True)
class MessageInfo:
    uid: int
    guid: str
    flags: tuple[str, ...]
    size: int
    internaldate_ms: int
    modseq: int


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS mailboxes (
    mailbox_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL, highestmodseq INTEGER NOT NULL, messages INTEGER NOT NULL,
    msg_xor BLOB NOT NULL, created_lsn INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    mailbox_id TEXT NOT NULL, uid INTEGER NOT NULL, guid BLOB NOT NULL, flags TEXT NOT NULL,
    size INTEGER NOT NULL, internaldate_ms INTEGER NOT NULL, delivered_ms INTEGER NOT NULL,
    modseq INTEGER NOT NULL, lsn INTEGER NOT NULL, PRIMARY KEY (mailbox_id, uid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bodies (guid BLOB PRIMARY KEY, data BLOB NOT NULL, refs INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tombstones (mailbox_id TEXT PRIMARY KEY, name TEXT NOT NULL, deleted_lsn INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS messages_guid ON messages (mailbox_id, guid);
"""


class Store:
    """The SQLite store of one node. One writer (the applier), many readers."""

    def __init__(self, path: str):
        self.path = path
        self.db = sqlite_utils.Database(sqlite3.connect(path, check_same_thread=False, isolation_level=None))
        self.conn = self.db.conn
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._reader.execute("PRAGMA query_only=ON")
        self._read_lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self.conn.close()
        with self._read_lock:
            self._reader.close()

    # -- meta ----------------------------------------------------------------

    def _meta(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else row[0]

    @property
    def applied_lsn(self) -> int:
        with self._lock:
            return int(self._meta("applied_lsn", 0))

    @property
    def log_id(self) -> str | None:
        with self._lock:
            return self._meta("log_id")

    def set_log_id(self, log_id: str) -> None:
        with self._lock:
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('log_id', ?)", (log_id,))

    # -- applying -------------------------------------------------------------

    def apply_records(self, records: list[Record]) -> int:
        """Apply records in one transaction; skips those at or below applied_lsn.

        Returns the new applied LSN. Raises ValueError if a record is not the
        next one (a gap) or cannot be decoded.
        """
        with self._lock:
            applied = int(self._meta("applied_lsn", 0))
            todo = [r for r in records if r.lsn > applied]
            if not todo:
                return applied
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                for r in todo:
                    if r.lsn != applied + 1:
                        raise ValueError(f"store is at LSN {applied}; cannot apply LSN {r.lsn} (gap)")
                    self._apply_event(r.lsn, decode_event(r.type, r.payload))
                    applied = r.lsn
                c.execute("INSERT OR REPLACE INTO meta VALUES ('applied_lsn', ?)", (applied,))
                c.execute("INSERT OR REPLACE INTO meta VALUES ('applied_hash', ?)", (todo[-1].hash,))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            return applied

    def _mb_row(self, mailbox_id: str):
        return self.conn.execute(
            "SELECT uidvalidity, uidnext, highestmodseq, messages, msg_xor FROM mailboxes WHERE mailbox_id=?",
            (mailbox_id,),
        ).fetchone()

    def _apply_event(self, lsn: int, ev) -> None:
        c = self.conn
        if isinstance(ev, MailboxCreated):
            c.execute(
                "INSERT INTO mailboxes VALUES (?,?,?,?,?,?,?,?)",
                (ev.mailbox_id, ev.name, ev.uidvalidity, 1, 0, 0, ZERO32, lsn),
            )
            c.execute(
                "INSERT INTO meta VALUES ('max_uidvalidity', ?) ON CONFLICT(key) DO UPDATE SET value=MAX(value, excluded.value)",
                (ev.uidvalidity,),
            )
        elif isinstance(ev, MailboxRenamed):
            c.execute("UPDATE mailboxes SET name=? WHERE mailbox_id=?", (ev.new_name, ev.mailbox_id))
        elif isinstance(ev, MailboxDeleted):
            for (guid,) in c.execute("SELECT guid FROM messages WHERE mailbox_id=?", (ev.mailbox_id,)).fetchall():
                self._unref(guid)
            c.execute("DELETE FROM messages WHERE mailbox_id=?", (ev.mailbox_id,))
            c.execute("DELETE FROM mailboxes WHERE mailbox_id=?", (ev.mailbox_id,))
            c.execute("INSERT OR REPLACE INTO tombstones VALUES (?,?,?)", (ev.mailbox_id, ev.name, lsn))
        elif isinstance(ev, MessageAppended):
            row = self._mb_row(ev.mailbox_id)
            if row is None:
                return  # mailbox deleted later in a replay; nothing to keep
            uidvalidity, uidnext, hms, count, mx = row
            c.execute(
                "INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?)",
                (ev.mailbox_id, ev.uid, ev.guid, " ".join(ev.flags), len(ev.body), ev.internaldate_ms,
                 ev.delivered_ms, ev.modseq, lsn),
            )
            c.execute(
                "INSERT INTO bodies VALUES (?,?,1) ON CONFLICT(guid) DO UPDATE SET refs=refs+1", (ev.guid, ev.body)
            )
            mx = xor32(mx, message_hash(ev.uid, ev.guid, ev.flags))
            c.execute(
                "UPDATE mailboxes SET uidnext=?, highestmodseq=?, messages=?, msg_xor=? WHERE mailbox_id=?",
                (max(uidnext, ev.uid + 1), max(hms, ev.modseq), count + 1, mx, ev.mailbox_id),
            )
        elif isinstance(ev, FlagsChanged):
            row = self._mb_row(ev.mailbox_id)
            if row is None:
                return
            _, _, hms, _, mx = row
            new = set(ev.flags)
            for uid in ev.uids:
                m = c.execute(
                    "SELECT guid, flags FROM messages WHERE mailbox_id=? AND uid=?", (ev.mailbox_id, uid)
                ).fetchone()
                if m is None:
                    continue
                guid, flags_s = m
                old = set(flags_s.split()) if flags_s else set()
                if ev.op == "add":
                    cur = old | new
                elif ev.op == "remove":
                    cur = old - new
                else:
                    cur = set(new)
                if cur == old:
                    continue
                mx = xor32(xor32(mx, message_hash(uid, guid, old)), message_hash(uid, guid, cur))
                c.execute(
                    "UPDATE messages SET flags=?, modseq=? WHERE mailbox_id=? AND uid=?",
                    (" ".join(sorted(cur)), ev.modseq, ev.mailbox_id, uid),
                )
            c.execute(
                "UPDATE mailboxes SET highestmodseq=?, msg_xor=? WHERE mailbox_id=?",
                (max(hms, ev.modseq), mx, ev.mailbox_id),
            )
        elif isinstance(ev, MessagesExpunged):
            row = self._mb_row(ev.mailbox_id)
            if row is None:
                return
            _, _, hms, count, mx = row
            for uid in ev.uids:
                m = c.execute(
                    "SELECT guid, flags FROM messages WHERE mailbox_id=? AND uid=?", (ev.mailbox_id, uid)
                ).fetchone()
                if m is None:
                    continue
                guid, flags_s = m
                mx = xor32(mx, message_hash(uid, guid, flags_s.split() if flags_s else ()))
                c.execute("DELETE FROM messages WHERE mailbox_id=? AND uid=?", (ev.mailbox_id, uid))
                self._unref(guid)
                count -= 1
            c.execute(
                "UPDATE mailboxes SET highestmodseq=?, messages=?, msg_xor=? WHERE mailbox_id=?",
                (max(hms, ev.modseq), count, mx, ev.mailbox_id),
            )
        elif isinstance(ev, (Checkpoint, EpochStarted)):
            pass
        else:  # pragma: no cover - decode_event only returns known types
            raise ValueError(f"cannot apply {type(ev).__name__}")

    def _unref(self, guid: bytes) -> None:
        self.conn.execute("UPDATE bodies SET refs=refs-1 WHERE guid=?", (guid,))
        self.conn.execute("DELETE FROM bodies WHERE guid=? AND refs<=0", (guid,))

    # -- reading ---------------------------------------------------------------

    def _read(self, sql: str, args=()):
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def mailboxes(self) -> list[MailboxInfo]:
        rows = self._read(
            "SELECT mailbox_id, name, uidvalidity, uidnext, highestmodseq, messages, msg_xor FROM mailboxes ORDER BY name"
        )
        return [MailboxInfo(r[0], r[1], r[2], r[3], r[4], r[5], mailbox_digest(r[2], r[3], r[6])) for r in rows]

    def mailbox(self, name: str) -> MailboxInfo | None:
        for mb in self.mailboxes():
            if mb.name == name:
                return mb
        return None

    def messages(self, mailbox_id: str) -> list[MessageInfo]:
        rows = self._read(
            "SELECT uid, guid, flags, size, internaldate_ms, modseq FROM messages WHERE mailbox_id=? ORDER BY uid",
            (mailbox_id,),
        )
        return [MessageInfo(r[0], r[1].hex(), tuple(r[2].split()) if r[2] else (), r[3], r[4], r[5]) for r in rows]

    def body(self, mailbox_id: str, uid: int) -> bytes | None:
        rows = self._read(
            "SELECT b.data FROM messages m JOIN bodies b ON b.guid = m.guid WHERE m.mailbox_id=? AND m.uid=?",
            (mailbox_id, uid),
        )
        return rows[0][0] if rows else None

    def recent_guids(self, mailbox_id: str, since_ms: int) -> list[tuple[bytes, int, int]]:
        return self._read(
            "SELECT guid, uid, delivered_ms FROM messages WHERE mailbox_id=? AND delivered_ms>=?",
            (mailbox_id, since_ms),
        )

    def uids(self, mailbox_id: str) -> list[int]:
        return [r[0] for r in self._read("SELECT uid FROM messages WHERE mailbox_id=?", (mailbox_id,))]

    def digest(self) -> dict:
        """``{"applied_lsn", "mailboxes": {name: digest}, "store": digest}`` (MS-7)."""
        with self._read_lock:
            self._reader.execute("BEGIN")
            try:
                applied = self._reader.execute("SELECT value FROM meta WHERE key='applied_lsn'").fetchone()
                rows = self._reader.execute(
                    "SELECT name, uidvalidity, uidnext, msg_xor FROM mailboxes"
                ).fetchall()
            finally:
                self._reader.execute("COMMIT")
        per = {r[0]: mailbox_digest(r[1], r[2], r[3]) for r in rows}
        return {"applied_lsn": int(applied[0]) if applied else 0, "mailboxes": per, "store": store_digest(per)}


def remove_store_files(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
