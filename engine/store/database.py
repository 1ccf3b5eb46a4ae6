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
import time
from dataclasses import dataclass
from typing import Iterable

import blake3
import cbor2
import sqlite_utils

from wal import Record

from .events import (
    Checkpoint,
    EpochStarted,
    FlagsChanged,
    MailboxCreated,
    MailboxDeleted,
    MailboxRenamed,
    MailboxRenumbered,
    MessageAppended,
    MessagesAppended,
    MessagesCopied,
    MessagesExpunged,
    MessagesMoved,
    SubscriptionChanged,
    UserDeleted,
    UserPasswordSet,
    decode_event,
    event_mailbox_id,
    event_mailbox_ids,
    modseq_floor,
    renumbered_uids,
)
from .errors import ReadNotNow
from .guard import Guard
from .structure import analyze

__all__ = ["Store", "MailboxInfo", "MessageInfo", "ImapRow", "message_hash", "mailbox_digest", "store_digest"]

ZERO32 = bytes(32)
RETRY_BACKOFF_MS = 1000  # first automatic retry of a failed mailbox; doubles per attempt
CHECKPOINT_RECOMPUTE = 64  # mailboxes recomputed from rows at each checkpoint (rotating)
# Applied against a mailbox row read once per batch and written back once (Store.apply_records).
_CACHED_BOX_TYPES = (MessageAppended, FlagsChanged, MessagesAppended)
_UNREAD = object()
# SQLite copies its WAL into the database (and fsyncs both) once the WAL holds
# this many pages; its default of 1000 cost the applier about a sixth of its CPU.
WAL_CHECKPOINT_PAGES = 4096
# MS-23: expunged UIDs a mailbox remembers with their MODSEQ (QRESYNC VANISHED). Past
# EXPUNGED_PRUNE_AT rows the oldest are dropped down to EXPUNGED_KEEP; a question from
# before what is kept gets vanished=None.
EXPUNGED_KEEP = 20_000
EXPUNGED_PRUNE_AT = 40_000


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
CREATE TABLE IF NOT EXISTS bodies (id INTEGER PRIMARY KEY, guid BLOB NOT NULL UNIQUE, data BLOB NOT NULL, refs INTEGER NOT NULL, structure BLOB);
CREATE TABLE IF NOT EXISTS tombstones (mailbox_id TEXT PRIMARY KEY, name TEXT NOT NULL, deleted_lsn INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    mailbox_id TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL,
    first_lsn INTEGER NOT NULL, since_ms INTEGER NOT NULL, attempts INTEGER NOT NULL,
    state TEXT NOT NULL, next_retry_ms INTEGER NOT NULL, held INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS messages_modseq ON messages (mailbox_id, modseq);
CREATE TABLE IF NOT EXISTS expunged (
    mailbox_id TEXT NOT NULL, modseq INTEGER NOT NULL, uid INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, modseq, uid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vanished (mailbox_id TEXT PRIMARY KEY, since_modseq INTEGER NOT NULL, kept INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL, changed_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS subscriptions (user TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (user, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pinned (mailbox_id TEXT NOT NULL, lsn INTEGER NOT NULL, guid BLOB NOT NULL);
"""

# MS-5: an IMAP view of one message row: what FETCH of metadata and SEARCH read (no body).
_IMAP_ROW_SQL = ("SELECT m.uid, m.flags, m.modseq, m.internaldate_ms, m.size, b.structure, m.guid "
                 "FROM messages m JOIN bodies b ON b.guid=m.guid WHERE m.mailbox_id=?")


@dataclass(frozen=True)
class ImapRow:
    """One message as the IMAP front reads it: metadata and the stored structure (CBOR, or None
    for a body stored before structures were kept: :meth:`Store.fill_structures`)."""

    uid: int
    flags: tuple[str, ...]
    modseq: int
    internaldate_ms: int
    size: int
    structure: bytes | None
    guid: bytes


class Store:
    """The SQLite store of one node. One writer (the applier), many readers."""

    # Every use of ``conn`` holds ``_lock`` and every use of ``_reader`` holds
    # ``_read_lock``: :meth:`reset` swaps both connections under both locks, so a
    # caller holding this object (reconcile apply, control operations, the LMTP
    # front, the applier) waits for a swap and then uses the new database.

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.RLock()
        self._read_lock = threading.Lock()
        self._guard: Guard | None = None
        self._connect()

    def _connect(self) -> None:
        self.db = sqlite_utils.Database(sqlite3.connect(self.path, check_same_thread=False, isolation_level=None))
        self.conn = self.db.conn
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        had_expunged = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='expunged'").fetchone() is not None
        self.conn.executescript(_SCHEMA)
        # Stores created before 2026-11-27 have an index no query uses; it cost
        # a fifth of each delivery's apply (a random insert per message).
        self.conn.execute("DROP INDEX IF EXISTS messages_guid")
        self._upgrade(had_expunged)
        self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._reader.execute("PRAGMA query_only=ON")
        self._scrub_cursor = 0
        self.mismatches: list[dict] = []  # checkpoint mismatches seen since open (for status/metrics)
        self._load_held()

    def _upgrade(self, had_expunged: bool) -> None:
        """Columns stores opened before they existed lack (added empty), and what an older store
        cannot know: the expunges before this open (VANISHED starts at its HIGHESTMODSEQ, MS-23)."""
        c = self.conn
        columns = {r[1] for r in c.execute("PRAGMA table_info(bodies)")}
        if "structure" not in columns:
            c.execute("ALTER TABLE bodies ADD COLUMN structure BLOB")
        columns = {r[1] for r in c.execute("PRAGMA table_info(mailboxes)")}
        if "special_use" not in columns:
            c.execute("ALTER TABLE mailboxes ADD COLUMN special_use TEXT NOT NULL DEFAULT ''")
        if not had_expunged:
            c.execute("INSERT OR IGNORE INTO vanished SELECT mailbox_id, highestmodseq, 0 FROM mailboxes")

    def close(self) -> None:
        with self._lock:
            self.conn.close()
        with self._read_lock:
            self._reader.close()

    def reset(self, remove_files=None) -> None:
        """Empty the store in place: close both connections, remove the database
        files, open a new empty database at the same path (a diverged tail's cut
        rebuilds the store this way, CTL-6).

        The object stays the same and the swap holds both locks, so nobody ever
        uses a closed connection: a call that comes during the swap waits, then
        runs on the new database. The caller rebuilds it (applied LSN 0) and sets
        the log id and the guard again. ``remove_files(path)`` removes the files
        (default :func:`remove_store_files`).
        """
        remove = remove_store_files if remove_files is None else remove_files
        with self._lock, self._read_lock:
            self.conn.close()
            self._reader.close()
            remove(self.path)
            self._connect()

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

    def apply_records(self, records: list[Record], *, replica: bool = False, now_ms: int | None = None,
                      changed: set[str] | None = None) -> int:
        """Apply records in one transaction; skips those at or below applied_lsn.

        Per-mailbox isolation (MS-10): each record is applied inside a
        savepoint. If it fails, only its mailbox is affected: the failure is
        recorded durably in ``quarantine`` (state ``retrying``), and that
        mailbox's later records are *held* (skipped here, kept in the log)
        until :meth:`reapply_mailbox` succeeds. Every other mailbox goes on.
        On a replica the guard (MS-12) can hold a mailbox the same way, and
        checkpoint records are compared with the local digests (MS-11).

        ``changed``, when given, receives the ids of the mailboxes the records
        changed, and the old names of mailboxes renamed or deleted
        (:meth:`mailbox_names` turns them into names).

        Returns the new applied LSN. Raises ValueError for a gap, or for a
        record that cannot be decoded (it names no mailbox to isolate).
        """
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            applied = int(self._meta("applied_lsn", 0))
            todo = [r for r in records if r.lsn > applied]
            if not todo:
                return applied
            for k, r in enumerate(todo):
                if r.lsn != applied + 1 + k:
                    raise ValueError(f"store is at LSN {applied + k}; cannot apply LSN {r.lsn} (gap)")
            events = [decode_event(r.type, r.payload) for r in todo]
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                boxes: dict[str, list | None] = {}
                for r, ev in zip(todo, events):
                    if type(ev) not in _CACHED_BOX_TYPES:
                        self._write_boxes(boxes)  # what follows reads or writes mailbox rows itself
                    self._apply_one(r, ev, replica, now_ms, boxes)
                self._write_boxes(boxes)
                if changed is not None:
                    for ev in events:
                        changed.update(event_mailbox_ids(ev))
                        if isinstance(ev, MailboxRenamed):
                            changed.add("name:" + ev.old_name)
                        elif isinstance(ev, MailboxDeleted):
                            changed.add("name:" + ev.name)
                c.execute("INSERT OR REPLACE INTO meta VALUES ('applied_lsn', ?)", (todo[-1].lsn,))
                c.execute("INSERT OR REPLACE INTO meta VALUES ('applied_hash', ?)", (todo[-1].hash,))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                self._load_held()
                raise
            return todo[-1].lsn

    def _apply_one(self, r: Record, ev, replica: bool, now_ms: int, boxes: dict[str, list | None]) -> None:
        """Apply one record in its own savepoint; a failure holds its mailbox (MS-10).

        Deliveries and flag changes change their mailbox's row in ``boxes``
        (see :meth:`_apply_message_event`) only once all their SQL succeeded,
        so a failed record leaves both the database and ``boxes`` as they were.
        """
        c = self.conn
        mid = event_mailbox_id(ev)
        mids = event_mailbox_ids(ev)
        only = None
        held = [m for m in mids if m in self._held]
        if held:
            # MS-10: the record waits for each held mailbox it changes; a copy held for its
            # target keeps the bodies it refers to (pinned) until that mailbox applies it.
            for m in held:
                c.execute("UPDATE quarantine SET held=held+1 WHERE mailbox_id=?", (m,))
            if isinstance(ev, MessagesCopied) and ev.mailbox_id in held:
                self._pin_bodies(ev.mailbox_id, r.lsn, ev.guids)
            rest = [m for m in mids if m not in self._held]
            if not rest:
                return
            only = rest[0]  # a move one of whose mailboxes is held: the other's part applies
        if replica and mid is not None and only is None and (reason := self._guard_check(ev)) is not None:
            self._hold_record(ev, mids, r.lsn, "guard", reason, now_ms, state="quarantined")
            return
        c.execute("SAVEPOINT rec")
        try:
            if isinstance(ev, Checkpoint):
                if replica:
                    self._compare_checkpoint(r.lsn, ev, now_ms)
            elif type(ev) in _CACHED_BOX_TYPES:
                self._apply_message_event(r.lsn, ev, boxes)
            else:
                self._apply_event(r.lsn, ev, only=only)
            c.execute("RELEASE rec")
        except (sqlite3.DatabaseError, ValueError, KeyError, TypeError) as exc:
            c.execute("ROLLBACK TO rec")
            c.execute("RELEASE rec")
            if mid is None:
                raise
            self._hold_record(ev, [only] if only else mids, r.lsn, "error", f"{type(exc).__name__}: {exc}", now_ms)

    # -- quarantine (MS-10) ------------------------------------------------------

    def _load_held(self) -> None:
        self._held = {r[0] for r in self.conn.execute("SELECT mailbox_id FROM quarantine").fetchall()}

    def _mailbox_name(self, mailbox_id: str) -> str:
        row = self.conn.execute("SELECT name FROM mailboxes WHERE mailbox_id=?", (mailbox_id,)).fetchone()
        if row is None:
            row = self.conn.execute("SELECT name FROM tombstones WHERE mailbox_id=?", (mailbox_id,)).fetchone()
        return row[0] if row else mailbox_id

    def _hold(self, mailbox_id: str, lsn: int, kind: str, reason: str, now_ms: int, state: str = "retrying") -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO quarantine VALUES (?,?,?,?,?,?,?,?,?,?)",
            (mailbox_id, self._mailbox_name(mailbox_id), kind, reason, lsn, now_ms, 1 if kind == "error" else 0,
             state, now_ms + RETRY_BACKOFF_MS, 1),
        )
        self._held.add(mailbox_id)

    def _hold_record(self, ev, mids, lsn: int, kind: str, reason: str, now_ms: int, state: str = "retrying") -> None:
        """Hold every mailbox in ``mids`` at record ``lsn`` (MS-10), pinning a copy's bodies when
        its target is among them."""
        if isinstance(ev, MessagesCopied) and ev.mailbox_id in mids:
            self._pin_bodies(ev.mailbox_id, lsn, ev.guids)
        for m in mids:
            self._hold(m, lsn, kind, reason, now_ms, state=state)

    def _pin_bodies(self, mailbox_id: str, lsn: int, guids) -> None:
        """Keep the bodies a held copy into ``mailbox_id`` refers to: one more reference each,
        given back by :meth:`_unpin_bodies` once the mailbox applied its held records."""
        for guid in guids:
            if self.conn.execute("UPDATE bodies SET refs=refs+1 WHERE guid=?", (guid,)).rowcount:
                self.conn.execute("INSERT INTO pinned VALUES (?,?,?)", (mailbox_id, lsn, guid))

    def _unpin_bodies(self, mailbox_id: str) -> None:
        for (guid,) in self.conn.execute("SELECT guid FROM pinned WHERE mailbox_id=?", (mailbox_id,)).fetchall():
            self._unref(guid)
        self.conn.execute("DELETE FROM pinned WHERE mailbox_id=?", (mailbox_id,))

    def quarantined(self) -> list[dict]:
        """Every held mailbox with kind, reason, first LSN, time, attempts, state."""
        rows = self._read(
            "SELECT mailbox_id, name, kind, reason, first_lsn, since_ms, attempts, state, next_retry_ms, held "
            "FROM quarantine ORDER BY name"
        )
        keys = ("mailbox_id", "name", "kind", "reason", "first_lsn", "since_ms", "attempts", "state",
                "next_retry_ms", "held_records")
        return [dict(zip(keys, r)) for r in rows]

    def retries_due(self, now_ms: int) -> list[str]:
        """Held mailboxes whose automatic retry is due (the applier asks before every pass: with
        none held, no query; the writer's connection, leaving the reader to the IMAP front)."""
        if not self._held:
            return []
        with self._lock:
            return [r[0] for r in self.conn.execute(
                "SELECT mailbox_id FROM quarantine WHERE state='retrying' AND next_retry_ms<=?", (now_ms,))]

    def reapply_mailbox(self, mailbox_id: str, records, *, bypass_guard: bool = False, now_ms: int | None = None,
                        max_attempts: int = 3) -> tuple[bool, str]:
        """Apply a held mailbox's records (from its first failed LSN up to the
        applied LSN) in one transaction; on success release the mailbox.

        ``records`` yields the log from the quarantine's ``first_lsn`` on.
        Returns (released, message). A failure counts an attempt; after
        ``max_attempts`` the state becomes ``quarantined`` (no more automatic
        retries: the admin decides).
        """
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            row = self.conn.execute(
                "SELECT first_lsn, attempts, kind FROM quarantine WHERE mailbox_id=?", (mailbox_id,)
            ).fetchone()
            if row is None:
                return True, "not quarantined"
            first_lsn, attempts, kind = row
            applied = int(self._meta("applied_lsn", 0))
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                n = 0
                for r in records:
                    if r.lsn > applied:
                        break
                    if r.lsn < first_lsn:
                        continue
                    ev = decode_event(r.type, r.payload)
                    if mailbox_id not in event_mailbox_ids(ev):
                        continue
                    if not bypass_guard and kind != "guard" and (reason := self._guard_check(ev)) is not None:
                        raise ValueError(reason)
                    self._apply_event(r.lsn, ev, only=mailbox_id)
                    n += 1
                self._unpin_bodies(mailbox_id)
                c.execute("DELETE FROM quarantine WHERE mailbox_id=?", (mailbox_id,))
                c.execute("COMMIT")
            except (sqlite3.DatabaseError, ValueError, KeyError, TypeError) as exc:
                c.execute("ROLLBACK")
                attempts += 1
                state = "quarantined" if attempts >= max_attempts else "retrying"
                backoff = RETRY_BACKOFF_MS * (2 ** (attempts - 1))
                c.execute(
                    "UPDATE quarantine SET attempts=?, state=?, next_retry_ms=?, reason=? WHERE mailbox_id=?",
                    (attempts, state, now_ms + backoff, f"{type(exc).__name__}: {exc}", mailbox_id),
                )
                return False, f"{type(exc).__name__}: {exc}"
            self._held.discard(mailbox_id)
            return True, f"applied {n} held record(s)"

    def quarantine_first_lsn(self, mailbox_id: str) -> int | None:
        row = self._read("SELECT first_lsn FROM quarantine WHERE mailbox_id=?", (mailbox_id,))
        return row[0][0] if row else None

    def set_guard(self, guard: Guard | None) -> None:
        self._guard = guard

    def _guard_check(self, ev) -> str | None:
        if self._guard is None:
            return None
        if isinstance(ev, MailboxDeleted):
            return self._guard.check_delete(ev.deleted_ms)
        if isinstance(ev, MessagesExpunged):
            row = self._mb_row(ev.mailbox_id)
            count = row[3] if row else 0
            return self._guard.check_expunge(ev.mailbox_id, ev.expunged_ms, len(ev.uids), count)
        return None

    # -- checkpoints and digests (MS-11) ----------------------------------------------

    def _compare_checkpoint(self, lsn: int, ev: Checkpoint, now_ms: int) -> None:
        """Hold every mailbox whose digest differs from the master's checkpoint.

        Incrementally kept digests are compared for all mailboxes; a rotating
        subset is also recomputed from the message rows, so damage done to
        the store behind its back is found within a few checkpoints.
        """
        local = {r[0]: mailbox_digest(r[1], r[2], r[3]) for r in self.conn.execute(
            "SELECT mailbox_id, uidvalidity, uidnext, msg_xor FROM mailboxes").fetchall()}
        ids = sorted(set(local) | set(ev.digests))
        if ids:
            k = self._scrub_cursor % len(ids)
            sample = set((ids + ids)[k:k + CHECKPOINT_RECOMPUTE])
            self._scrub_cursor += CHECKPOINT_RECOMPUTE
        else:
            sample = set()
        for mid in ids:
            if mid in self._held:
                continue
            theirs = ev.digests.get(mid)
            mine = self._recompute_digest(mid) if mid in sample else local.get(mid)
            if theirs is None:
                # MS-13: never delete what the master lacks; report it.
                self.mismatches.append({"mailbox_id": mid, "lsn": lsn, "reason": "mailbox missing on master"})
                continue
            if isinstance(theirs, bytes):
                theirs = theirs.hex()
            if mine != theirs:
                reason = "mailbox missing on replica" if mine is None else "checkpoint digest mismatch"
                self.mismatches.append({"mailbox_id": mid, "lsn": lsn, "reason": reason})
                self._hold(mid, lsn + 1, "digest", f"{reason} at LSN {lsn}", now_ms, state="quarantined")

    def _recompute_digest(self, mailbox_id: str) -> str | None:
        row = self.conn.execute(
            "SELECT uidvalidity, uidnext FROM mailboxes WHERE mailbox_id=?", (mailbox_id,)).fetchone()
        if row is None:
            return None
        mx = ZERO32
        for uid, guid, flags_s in self.conn.execute(
            "SELECT uid, guid, flags FROM messages WHERE mailbox_id=?", (mailbox_id,)
        ).fetchall():
            mx = xor32(mx, message_hash(uid, guid, flags_s.split() if flags_s else ()))
        return mailbox_digest(row[0], row[1], mx)

    def digests_by_id(self) -> dict[str, str]:
        with self._lock:
            return {r[0]: mailbox_digest(r[1], r[2], r[3]) for r in self.conn.execute(
                "SELECT mailbox_id, uidvalidity, uidnext, msg_xor FROM mailboxes").fetchall()}

    def verify_mailboxes(self) -> dict[str, list[str]]:
        """Recompute every mailbox digest from its rows and look for missing or
        damaged bodies. Returns mailbox name -> problems (empty when all good)."""
        out: dict[str, list[str]] = {}
        with self._lock:
            rows = self.conn.execute("SELECT mailbox_id, name, uidvalidity, uidnext, msg_xor FROM mailboxes").fetchall()
            for mid, name, uv, un, mx in rows:
                problems = []
                if self._recompute_digest(mid) != mailbox_digest(uv, un, mx):
                    problems.append("message rows do not match the mailbox digest (changed behind the store's back)")
                missing = self.conn.execute(
                    "SELECT m.uid FROM messages m LEFT JOIN bodies b ON b.guid=m.guid "
                    "WHERE m.mailbox_id=? AND b.guid IS NULL", (mid,)).fetchall()
                if missing:
                    problems.append(f"missing body for UID {', '.join(str(u[0]) for u in missing[:10])}")
                bad = [uid for uid, guid, data in self.conn.execute(
                    "SELECT m.uid, m.guid, b.data FROM messages m JOIN bodies b ON b.guid=m.guid WHERE m.mailbox_id=?",
                    (mid,)).fetchall() if blake3.blake3(data).digest() != guid]
                if bad:
                    problems.append(f"body does not match its GUID for UID {', '.join(map(str, bad[:10]))}")
                if problems:
                    out[name] = problems
        return out

    # -- mailbox resync (MS-13) ---------------------------------------------------

    def mailbox_snapshot(self, name: str) -> dict | None:
        """A consistent copy of one mailbox at the applied LSN (None if absent)."""
        with self._read_lock:
            r = self._reader
            r.execute("BEGIN")
            try:
                at = r.execute("SELECT value FROM meta WHERE key='applied_lsn'").fetchone()
                mb = r.execute(
                    "SELECT mailbox_id, name, uidvalidity, uidnext, highestmodseq, special_use FROM mailboxes "
                    "WHERE name=?", (name,)
                ).fetchone()
                if mb is None:
                    return None
                msgs = r.execute(
                    "SELECT m.uid, m.guid, m.flags, m.internaldate_ms, m.delivered_ms, m.modseq, m.lsn, b.data "
                    "FROM messages m JOIN bodies b ON b.guid=m.guid WHERE m.mailbox_id=? ORDER BY m.uid", (mb[0],)
                ).fetchall()
            finally:
                r.execute("COMMIT")
        return {
            "at_lsn": int(at[0]) if at else 0,
            "mailbox": {"mailbox_id": mb[0], "name": mb[1], "uidvalidity": mb[2], "uidnext": mb[3],
                        "highestmodseq": mb[4], "special_use": mb[5]},
            "messages": [{"uid": m[0], "guid": m[1], "flags": m[2], "internaldate_ms": m[3], "delivered_ms": m[4],
                          "modseq": m[5], "lsn": m[6], "body": m[7]} for m in msgs],
        }

    def replace_mailbox(self, snap: dict, later_records) -> int:
        """Replace one mailbox with ``snap`` (taken at ``snap['at_lsn']``), then
        apply this node's records for it after that LSN, and release it.

        ``later_records`` yields this node's log from ``at_lsn + 1``. The
        store must have applied at least ``at_lsn``. Returns records applied.
        """
        mb = snap["mailbox"]
        mid = mb["mailbox_id"]
        at = snap["at_lsn"]
        with self._lock:
            applied = int(self._meta("applied_lsn", 0))
            if applied < at:
                raise ValueError(f"store has applied LSN {applied}, snapshot is at {at}: wait and retry")
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                # Bodies the old rows held are freed only at the end: a later record of this
                # mailbox (a copy into it) may refer to one of them.
                unreferenced: set[bytes] = set()
                for (guid,) in c.execute("SELECT guid FROM messages WHERE mailbox_id=?", (mid,)).fetchall():
                    self._unref(guid, later=unreferenced)
                for (guid,) in c.execute("SELECT guid FROM pinned WHERE mailbox_id=?", (mid,)).fetchall():
                    self._unref(guid, later=unreferenced)
                c.execute("DELETE FROM pinned WHERE mailbox_id=?", (mid,))
                c.execute("DELETE FROM messages WHERE mailbox_id=?", (mid,))
                c.execute("DELETE FROM expunged WHERE mailbox_id=?", (mid,))
                c.execute("INSERT OR REPLACE INTO vanished VALUES (?,?,0)", (mid, mb["highestmodseq"]))
                c.execute("DELETE FROM mailboxes WHERE mailbox_id=?", (mid,))
                c.execute("DELETE FROM mailboxes WHERE name=?", (mb["name"],))
                mx = ZERO32
                for m in snap["messages"]:
                    flags = m["flags"].split() if m["flags"] else []
                    c.execute("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?)",
                              (mid, m["uid"], m["guid"], m["flags"], len(m["body"]), m["internaldate_ms"],
                               m["delivered_ms"], m["modseq"], m["lsn"]))
                    c.execute("INSERT INTO bodies (guid, data, refs) VALUES (?,?,1) ON CONFLICT(guid) DO UPDATE SET refs=refs+1",
                              (m["guid"], m["body"]))
                    mx = xor32(mx, message_hash(m["uid"], m["guid"], flags))
                c.execute("INSERT INTO mailboxes (mailbox_id, name, uidvalidity, uidnext, highestmodseq, messages, "
                          "msg_xor, created_lsn, special_use) VALUES (?,?,?,?,?,?,?,?,?)",
                          (mid, mb["name"], mb["uidvalidity"], mb["uidnext"], mb["highestmodseq"],
                           len(snap["messages"]), mx, at, mb.get("special_use", "")))
                n = 0
                for r in later_records:
                    if r.lsn <= at:
                        continue
                    if r.lsn > applied:
                        break
                    ev = decode_event(r.type, r.payload)
                    if mid in event_mailbox_ids(ev):
                        self._apply_event(r.lsn, ev, only=mid)
                        n += 1
                for guid in unreferenced:
                    c.execute("DELETE FROM bodies WHERE guid=? AND refs<=0", (guid,))
                c.execute("DELETE FROM quarantine WHERE mailbox_id=?", (mid,))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            self._held.discard(mid)
            return n

    def _mb_row(self, mailbox_id: str):
        return self.conn.execute(
            "SELECT uidvalidity, uidnext, highestmodseq, messages, msg_xor FROM mailboxes WHERE mailbox_id=?",
            (mailbox_id,),
        ).fetchone()

    def _apply_event(self, lsn: int, ev, only: str | None = None) -> None:
        """Apply one record; ``only`` (a mailbox id) applies just that mailbox's part of a move
        (MS-10: the other mailbox is held, or applied it already)."""
        c = self.conn
        if isinstance(ev, MailboxCreated):
            c.execute(
                "INSERT INTO mailboxes (mailbox_id, name, uidvalidity, uidnext, highestmodseq, messages, msg_xor, "
                "created_lsn, special_use) VALUES (?,?,?,?,?,?,?,?,?)",
                (ev.mailbox_id, ev.name, ev.uidvalidity, 1, self._modseq_floor(), 0, ZERO32, lsn,
                 " ".join(ev.special_use)),
            )
            c.execute(
                "INSERT INTO meta VALUES ('max_uidvalidity', ?) ON CONFLICT(key) DO UPDATE SET value=MAX(value, excluded.value)",
                (ev.uidvalidity,),
            )
        elif isinstance(ev, MailboxRenamed):
            row = c.execute("SELECT name FROM mailboxes WHERE mailbox_id=?", (ev.mailbox_id,)).fetchone()
            if row is None:
                return
            old = row[0]
            if ev.children:  # MS-19: the mailboxes below move along (the name index finds them)
                for child_id, child in c.execute("SELECT mailbox_id, name FROM mailboxes WHERE name>? AND name<?",
                                                 (old + "/", old + "0")).fetchall():
                    c.execute("UPDATE mailboxes SET name=? WHERE mailbox_id=?",
                              (ev.new_name + child[len(old):], child_id))
            c.execute("UPDATE mailboxes SET name=? WHERE mailbox_id=?", (ev.new_name, ev.mailbox_id))
            # MS-22: subscriptions follow the mailbox (and, with children, its children)
            c.execute("UPDATE subscriptions SET name=? WHERE name=?", (ev.new_name, old))
            if ev.children:
                c.execute("UPDATE subscriptions SET name=?||substr(name, ?) WHERE name>? AND name<?",
                          (ev.new_name, len(old) + 1, old + "/", old + "0"))
        elif isinstance(ev, MailboxDeleted):
            for (guid,) in c.execute("SELECT guid FROM messages WHERE mailbox_id=?", (ev.mailbox_id,)).fetchall():
                self._unref(guid)
            c.execute("DELETE FROM messages WHERE mailbox_id=?", (ev.mailbox_id,))
            c.execute("DELETE FROM mailboxes WHERE mailbox_id=?", (ev.mailbox_id,))
            c.execute("DELETE FROM expunged WHERE mailbox_id=?", (ev.mailbox_id,))
            c.execute("DELETE FROM vanished WHERE mailbox_id=?", (ev.mailbox_id,))
            self._unpin_bodies(ev.mailbox_id)
            c.execute("INSERT OR REPLACE INTO tombstones VALUES (?,?,?)", (ev.mailbox_id, ev.name, lsn))
        elif isinstance(ev, (MessageAppended, FlagsChanged, MessagesAppended)):
            boxes: dict[str, list | None] = {}
            self._apply_message_event(lsn, ev, boxes)
            self._write_boxes(boxes)
        elif isinstance(ev, MessagesCopied):  # and MessagesMoved (MS-20)
            if only in (None, ev.mailbox_id):
                self._apply_copy(lsn, ev)
            if isinstance(ev, MessagesMoved) and only in (None, ev.source_mailbox_id):
                self._apply_move_source(ev)
        elif isinstance(ev, MessagesExpunged):
            row = self._mb_row(ev.mailbox_id)
            if row is None:
                return
            _, _, hms, count, mx = row
            before = count
            for uid in ev.uids:
                mx, count = self._remove_message(ev.mailbox_id, uid, mx, count, ev.modseq)
            self._note_expunged(ev.mailbox_id, before - count)
            c.execute(
                "UPDATE mailboxes SET highestmodseq=?, messages=?, msg_xor=? WHERE mailbox_id=?",
                (max(hms, ev.modseq), count, mx, ev.mailbox_id),
            )
        elif isinstance(ev, MailboxRenumbered):
            row = self._mb_row(ev.mailbox_id)
            if row is None:
                return
            hms = row[2]
            rows = c.execute("SELECT uid, guid, flags FROM messages WHERE mailbox_id=?", (ev.mailbox_id,)).fetchall()
            mapping = renumbered_uids(ev, [r[0] for r in rows])
            # Two passes through negative UIDs, so no (mailbox, UID) key is taken twice mid-way.
            for old, new in mapping.items():
                c.execute("UPDATE messages SET uid=? WHERE mailbox_id=? AND uid=?", (-new, ev.mailbox_id, old))
            c.execute("UPDATE messages SET uid=-uid WHERE mailbox_id=? AND uid<0", (ev.mailbox_id,))
            mx = ZERO32
            for uid, guid, flags_s in rows:
                mx = xor32(mx, message_hash(mapping[uid], guid, flags_s.split() if flags_s else ()))
            uidnext = max([ev.uidnext] + [u + 1 for u in mapping.values()])
            c.execute(
                "UPDATE mailboxes SET uidvalidity=?, uidnext=?, highestmodseq=?, msg_xor=? WHERE mailbox_id=?",
                (ev.uidvalidity, uidnext, max(hms, ev.modseq), mx, ev.mailbox_id),
            )
            # MS-23: the expunged UIDs of the old UIDVALIDITY mean nothing in the new one
            c.execute("DELETE FROM expunged WHERE mailbox_id=?", (ev.mailbox_id,))
            c.execute("INSERT OR REPLACE INTO vanished VALUES (?,?,0)", (ev.mailbox_id, max(hms, ev.modseq)))
            c.execute(
                "INSERT INTO meta VALUES ('max_uidvalidity', ?) ON CONFLICT(key) DO UPDATE SET value=MAX(value, excluded.value)",
                (ev.uidvalidity,),
            )
        elif isinstance(ev, EpochStarted):
            floor = modseq_floor(ev.epoch)
            if floor > self._modseq_floor():  # MS-18
                c.execute("INSERT OR REPLACE INTO meta VALUES ('modseq_floor', ?)", (floor,))
                c.execute("UPDATE mailboxes SET highestmodseq=? WHERE highestmodseq<?", (floor, floor))
        elif isinstance(ev, UserPasswordSet):
            c.execute("INSERT OR REPLACE INTO users VALUES (?,?,?)", (ev.name, ev.password_hash, ev.changed_ms))
        elif isinstance(ev, UserDeleted):
            c.execute("DELETE FROM users WHERE name=?", (ev.name,))
            c.execute("DELETE FROM subscriptions WHERE user=?", (ev.name,))
        elif isinstance(ev, SubscriptionChanged):
            if ev.subscribed:
                c.execute("INSERT OR IGNORE INTO subscriptions VALUES (?,?)", (ev.user, ev.mailbox))
            else:
                c.execute("DELETE FROM subscriptions WHERE user=? AND name=?", (ev.user, ev.mailbox))
        elif isinstance(ev, Checkpoint):
            pass
        else:  # pragma: no cover - decode_event only returns known types
            raise ValueError(f"cannot apply {type(ev).__name__}")

    def _apply_message_event(self, lsn: int, ev, boxes: dict[str, list | None]) -> None:
        """Apply a ``MessageAppended`` or ``FlagsChanged`` to the message rows.

        The mailbox's row is read into ``boxes`` (mailbox id -> ``[uidvalidity,
        uidnext, highestmodseq, messages, msg_xor]``, or None for a mailbox
        that is gone) and changed there, after every statement succeeded;
        :meth:`_write_boxes` writes it back.
        """
        c = self.conn
        mid = ev.mailbox_id
        box = boxes.get(mid, _UNREAD)
        if box is _UNREAD:
            row = self._mb_row(mid)
            box = boxes[mid] = None if row is None else list(row)
        if box is None:
            return  # mailbox deleted later in a replay; nothing to keep
        if isinstance(ev, MessagesAppended):
            # MS-20: every message or none; the cached row changes only once all of them applied
            trial: dict[str, list | None] = {mid: list(box)}
            for one in ev.messages():
                self._apply_message_event(lsn, one, trial)
            boxes[mid] = trial[mid]
            return
        if isinstance(ev, MessageAppended):
            if blake3.blake3(ev.body).digest() != ev.guid:
                raise ValueError(f"body of UID {ev.uid} does not match its GUID {ev.guid.hex()[:16]}...")
            c.execute(
                "INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?)",
                (mid, ev.uid, ev.guid, " ".join(ev.flags), len(ev.body), ev.internaldate_ms,
                 ev.delivered_ms, ev.modseq, lsn),
            )
            self._add_body(ev.guid, ev.body)
            mx, count = xor32(box[4], message_hash(ev.uid, ev.guid, ev.flags)), box[3] + 1
            if ev.replaces:  # a move (MS-16): the message leaves its old UID in this record
                mx, gone = self._remove_message(mid, ev.replaces, mx, count, ev.modseq)
                self._note_expunged(mid, count - gone)
                count = gone
            box[1], box[3], box[4] = max(box[1], ev.uid + 1), count, mx
        else:
            mx = box[4]
            new = set(ev.flags)
            for uid in ev.uids:
                m = self._guid_and_flags(mid, uid)
                if m is None:
                    continue
                guid, old = m
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
                    (" ".join(sorted(cur)), ev.modseq, mid, uid),
                )
            box[4] = mx
        box[2] = max(box[2], ev.modseq)

    def _write_boxes(self, boxes: dict[str, list | None]) -> None:
        """Write the mailbox rows :meth:`_apply_message_event` changed, and forget them."""
        for mid, box in boxes.items():
            if box is not None:
                self.conn.execute(
                    "UPDATE mailboxes SET uidnext=?, highestmodseq=?, messages=?, msg_xor=? WHERE mailbox_id=?",
                    (box[1], box[2], box[3], box[4], mid),
                )
        boxes.clear()

    def _add_body(self, guid: bytes, body: bytes) -> None:
        """One more reference to a body, stored with its IMAP structure (MS-24) when it is new."""
        c = self.conn
        if not c.execute("UPDATE bodies SET refs=refs+1 WHERE guid=?", (guid,)).rowcount:
            c.execute("INSERT INTO bodies (guid, data, refs, structure) VALUES (?,?,1,?)",
                      (guid, body, cbor2.dumps(analyze(body))))

    def _apply_copy(self, lsn: int, ev: MessagesCopied) -> None:
        """MS-20: the copies of a MessagesCopied or MessagesMoved into the target mailbox, at their
        new UIDs, with the record's flags, each holding one more reference to its body."""
        c = self.conn
        row = self._mb_row(ev.mailbox_id)
        if row is None:
            return  # the target was deleted later in a replay
        uidvalidity, uidnext, hms, count, mx = row
        for i, ((_, uid), guid, flags) in enumerate(zip(ev.uids, ev.guids, ev.flags)):
            modseq = ev.modseq + i
            got = c.execute(
                "INSERT INTO messages SELECT ?, ?, guid, ?, length(data), ?, ?, ?, ? FROM bodies WHERE guid=?",
                (ev.mailbox_id, uid, " ".join(flags), ev.internaldate_ms[i], ev.copied_ms, modseq, lsn, guid))
            if not got.rowcount:
                raise ValueError(f"the store holds no body of GUID {guid.hex()[:16]}... copied to UID {uid}")
            c.execute("UPDATE bodies SET refs=refs+1 WHERE guid=?", (guid,))
            mx, count = xor32(mx, message_hash(uid, guid, flags)), count + 1
        c.execute("UPDATE mailboxes SET uidnext=?, highestmodseq=?, messages=?, msg_xor=? WHERE mailbox_id=?",
                  (max(uidnext, ev.uids[-1][1] + 1), max(hms, ev.modseq + len(ev.uids) - 1), count, mx,
                   ev.mailbox_id))

    def _apply_move_source(self, ev: MessagesMoved) -> None:
        """MS-20: a move's source UIDs leave their mailbox (expunged at ``source_modseq``)."""
        row = self._mb_row(ev.source_mailbox_id)
        if row is None:
            return
        _, _, hms, count, mx = row
        before = count
        for uid, guid in zip(ev.source_uids, ev.guids):
            held = self._guid_and_flags(ev.source_mailbox_id, uid)
            if held is not None and held[0] != guid:
                raise ValueError(f"UID {uid} holds GUID {bytes(held[0]).hex()[:16]}..., the move names "
                                 f"{guid.hex()[:16]}...")
            mx, count = self._remove_message(ev.source_mailbox_id, uid, mx, count, ev.source_modseq)
        self._note_expunged(ev.source_mailbox_id, before - count)
        self.conn.execute("UPDATE mailboxes SET highestmodseq=?, messages=?, msg_xor=? WHERE mailbox_id=?",
                          (max(hms, ev.source_modseq), count, mx, ev.source_mailbox_id))

    def _note_expunged(self, mailbox_id: str, removed: int) -> None:
        """MS-23: count the ``removed`` UIDs :meth:`_remove_message` remembered, and forget the
        oldest past the bound (amortised: a prune halves what is kept)."""
        if removed <= 0:
            return
        c = self.conn
        c.execute("INSERT INTO vanished VALUES (?, 0, 0) ON CONFLICT(mailbox_id) DO NOTHING", (mailbox_id,))
        kept = c.execute("SELECT kept FROM vanished WHERE mailbox_id=?", (mailbox_id,)).fetchone()[0] + removed
        if kept > EXPUNGED_PRUNE_AT:
            cut = c.execute("SELECT modseq FROM expunged WHERE mailbox_id=? ORDER BY modseq DESC LIMIT 1 OFFSET ?",
                            (mailbox_id, EXPUNGED_KEEP)).fetchone()[0]
            c.execute("DELETE FROM expunged WHERE mailbox_id=? AND modseq<=?", (mailbox_id, cut))
            kept = c.execute("SELECT count(*) FROM expunged WHERE mailbox_id=?", (mailbox_id,)).fetchone()[0]
            c.execute("UPDATE vanished SET since_modseq=?, kept=? WHERE mailbox_id=?", (cut, kept, mailbox_id))
        else:
            c.execute("UPDATE vanished SET kept=? WHERE mailbox_id=?", (kept, mailbox_id))

    def _modseq_floor(self) -> int:
        return int(self._meta("modseq_floor", 0))

    def _guid_and_flags(self, mailbox_id: str, uid: int) -> tuple[bytes, set[str]] | None:
        """The GUID and flags of one message row (writer connection), or None."""
        m = self.conn.execute("SELECT guid, flags FROM messages WHERE mailbox_id=? AND uid=?",
                              (mailbox_id, uid)).fetchone()
        return None if m is None else (m[0], set(m[1].split()) if m[1] else set())

    def _remove_message(self, mailbox_id: str, uid: int, mx: bytes, count: int, modseq: int) -> tuple[bytes, int]:
        """Delete one message row if present, remembering its UID as expunged at ``modseq``
        (MS-23; the caller then calls :meth:`_note_expunged`); the mailbox's digest XOR and count after it."""
        m = self._guid_and_flags(mailbox_id, uid)
        if m is None:
            return mx, count
        guid, flags = m
        self.conn.execute("DELETE FROM messages WHERE mailbox_id=? AND uid=?", (mailbox_id, uid))
        self.conn.execute("INSERT OR IGNORE INTO expunged VALUES (?,?,?)", (mailbox_id, modseq, uid))
        self._unref(guid)
        return xor32(mx, message_hash(uid, guid, flags)), count - 1

    def _unref(self, guid: bytes, later: set | None = None) -> None:
        """One reference less to a body; the body goes with its last one (or, with ``later``, is
        added there for the caller to delete once nothing in its transaction can refer to it)."""
        self.conn.execute("UPDATE bodies SET refs=refs-1 WHERE guid=?", (guid,))
        if later is not None:
            later.add(guid)
        else:
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

    def body_by_guid(self, guid: bytes) -> bytes | None:
        """The bytes of a body the store holds, by GUID (any mailbox)."""
        rows = self._read("SELECT data FROM bodies WHERE guid=?", (guid,))
        return rows[0][0] if rows else None

    def recent_guids(self, mailbox_id: str, since_ms: int) -> list[tuple[bytes, int, int]]:
        return self._read(
            "SELECT guid, uid, delivered_ms FROM messages WHERE mailbox_id=? AND delivered_ms>=?",
            (mailbox_id, since_ms),
        )

    _ROW_SQL = "SELECT uid, guid, flags, internaldate_ms, delivered_ms FROM messages WHERE mailbox_id=?"

    @staticmethod
    def _row(r) -> tuple[int, bytes, tuple[str, ...], int, int]:
        return r[0], bytes(r[1]), tuple(r[2].split()) if r[2] else (), r[3], r[4]

    def message_rows(self, mailbox_id: str) -> list[tuple[int, bytes, tuple[str, ...], int, int]]:
        """``(uid, guid, flags, internaldate_ms, delivered_ms)`` of every message, by UID (no bodies)."""
        return [self._row(r) for r in self._read(self._ROW_SQL + " ORDER BY uid", (mailbox_id,))]

    def message_row(self, mailbox_id: str, uid: int) -> tuple[int, bytes, tuple[str, ...], int, int] | None:
        """One message as :meth:`message_rows` gives it, or None."""
        rows = self._read(self._ROW_SQL + " AND uid=?", (mailbox_id, uid))
        return self._row(rows[0]) if rows else None

    # -- reading for the IMAP front and the node's IMAP writes --------------------------------

    @property
    def modseq_floor(self) -> int:
        """MS-18: the least HIGHESTMODSEQ of every mailbox (raised by each EpochStarted applied)."""
        with self._lock:
            return self._modseq_floor()

    def mailbox_names(self, changed: set[str]) -> set[str]:
        """Names for what :meth:`apply_records` put in ``changed``: each mailbox id's current name
        (a deleted mailbox's last name), and the old names as they are. On the writer's
        connection: the applier asks after every batch, and the reader is the IMAP front's."""
        names = {x[5:] for x in changed if x.startswith("name:")}
        ids = [x for x in changed if not x.startswith("name:")]
        with self._lock:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                names.update(r[0] for r in self.conn.execute(
                    f"SELECT name FROM mailboxes WHERE mailbox_id IN ({marks})", chunk))
                names.update(r[0] for r in self.conn.execute(
                    f"SELECT name FROM tombstones WHERE mailbox_id IN ({marks})", chunk))
        return names

    def user_names(self) -> list[str]:
        return [r[0] for r in self._read("SELECT name FROM users ORDER BY name")]

    def user_hash(self, name: str) -> str | None:
        rows = self._read("SELECT password_hash FROM users WHERE name=?", (name,))
        return rows[0][0] if rows else None

    def subscriptions(self, user: str) -> list[str]:
        return [r[0] for r in self._read("SELECT name FROM subscriptions WHERE user=? ORDER BY name", (user,))]

    def source_messages(self, mailbox_id: str, uids: list[int]) -> list[tuple[int, bytes, tuple[str, ...], int]]:
        """``(uid, guid, flags, internaldate_ms)`` of the listed messages the mailbox holds (a copy's sources)."""
        out = []
        for uid in uids:
            rows = self._read("SELECT guid, flags, internaldate_ms FROM messages WHERE mailbox_id=? AND uid=?",
                              (mailbox_id, uid))
            if rows:
                out.append((uid, bytes(rows[0][0]), tuple(rows[0][1].split()) if rows[0][1] else (), rows[0][2]))
        return out

    def message_modseqs(self, mailbox_id: str, uids: list[int]) -> list[tuple[int, int]]:
        out = []
        for uid in uids:
            rows = self._read("SELECT modseq FROM messages WHERE mailbox_id=? AND uid=?", (mailbox_id, uid))
            if rows:
                out.append((uid, rows[0][0]))
        return out

    def mailboxes_with_prefix(self, prefix: str) -> list[tuple[str, str]]:
        """``(name, special_use)`` of every mailbox whose name starts with ``prefix`` (the name index's range)."""
        if not prefix:
            return self._read("SELECT name, special_use FROM mailboxes ORDER BY name")
        return self._read("SELECT name, special_use FROM mailboxes WHERE name>=? AND name<? ORDER BY name",
                          (prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)))

    _MAILBOX_SQL = ("SELECT mailbox_id, name, uidvalidity, uidnext, highestmodseq, messages, msg_xor FROM mailboxes "
                    "WHERE name=?")

    @staticmethod
    def _imap_row(r) -> ImapRow:
        return ImapRow(r[0], tuple(r[1].split()) if r[1] else (), r[2], r[3], r[4], r[5], bytes(r[6]))

    def _in_read_transaction(self, fn, wait: bool = True):
        """``fn(reader)`` in one read transaction; ``wait=False`` raises ReadNotNow instead of
        waiting for another thread's read to end."""
        if not self._read_lock.acquire(wait):
            raise ReadNotNow("the store's reader is busy")
        try:
            r = self._reader
            r.execute("BEGIN")
            try:
                return fn(r)
            finally:
                r.execute("COMMIT")
        finally:
            self._read_lock.release()

    def imap_snapshot(self, name: str) -> tuple[MailboxInfo, list[ImapRow]] | None:
        """A mailbox and all its messages by UID, in one read transaction (None: no such mailbox)."""
        def read(r):
            mb = r.execute(self._MAILBOX_SQL, (name,)).fetchone()
            if mb is None:
                return None
            rows = r.execute(_IMAP_ROW_SQL + " ORDER BY m.uid", (mb[0],)).fetchall()
            return self._mailbox_info(mb), [self._imap_row(x) for x in rows]
        return self._in_read_transaction(read)

    def imap_changes(self, name: str, since_modseq: int, *, wait: bool = True, max_rows: int | None = None
                     ) -> tuple[MailboxInfo, list[ImapRow], list[int] | None] | None:
        """What changed in a mailbox above MODSEQ ``since_modseq``, at a cost in proportion to the
        changes (the ``(mailbox, modseq)`` indexes of messages and expunged): the messages whose
        MODSEQ is above it, by UID, and the UIDs expunged above it, or None for the latter when
        the mailbox no longer remembers that far back (MS-23). None: no such mailbox.
        ``wait=False``: ReadNotNow rather than wait for the reader; ``max_rows``: ReadNotNow when
        more messages changed (a read bounded in time, for a caller that must not block)."""
        def read(r):
            mb = r.execute(self._MAILBOX_SQL, (name,)).fetchone()
            if mb is None:
                return None
            info = self._mailbox_info(mb)
            if since_modseq >= info.highestmodseq:
                return info, [], []
            # the (mailbox, modseq) index, named: without it SQLite walks the whole mailbox by UID
            cursor = r.execute(_IMAP_ROW_SQL.replace("messages m", "messages m INDEXED BY messages_modseq")
                               + " AND m.modseq>?", (mb[0], since_modseq))
            if max_rows is None:
                rows = sorted(cursor.fetchall())
            else:
                rows = sorted(cursor.fetchmany(max_rows + 1))
                if len(rows) > max_rows:
                    raise ReadNotNow(f"more than {max_rows} messages changed")
            kept = r.execute("SELECT since_modseq FROM vanished WHERE mailbox_id=?", (mb[0],)).fetchone()
            if kept is not None and since_modseq < kept[0]:
                vanished = None
            else:
                vanished = sorted(u for (u,) in r.execute(
                    "SELECT uid FROM expunged WHERE mailbox_id=? AND modseq>?", (mb[0], since_modseq)))
            return info, [self._imap_row(x) for x in rows], vanished
        return self._in_read_transaction(read, wait)

    def imap_rows(self, name: str, uids: list[int], *, wait: bool = True) -> tuple[MailboxInfo, list[ImapRow]] | None:
        """A mailbox and the listed messages it holds, by UID, in one read transaction
        (``wait=False``: ReadNotNow rather than wait for the reader)."""
        def read(r):
            mb = r.execute(self._MAILBOX_SQL, (name,)).fetchone()
            if mb is None:
                return None
            rows = []
            for uid in sorted(set(uids)):
                row = r.execute(_IMAP_ROW_SQL + " AND m.uid=?", (mb[0], uid)).fetchone()
                if row is not None:
                    rows.append(self._imap_row(row))
            return self._mailbox_info(mb), rows
        return self._in_read_transaction(read, wait)

    def imap_status(self, name: str) -> dict | None:
        """STATUS of a mailbox: messages, uidnext, uidvalidity, unseen, deleted, size, highestmodseq."""
        def read(r):
            mb = r.execute(self._MAILBOX_SQL, (name,)).fetchone()
            if mb is None:
                return None
            unseen = deleted = size = 0
            for flags, n in r.execute("SELECT flags, size FROM messages WHERE mailbox_id=?", (mb[0],)):
                words = flags.split()
                unseen += "\\Seen" not in words
                deleted += "\\Deleted" in words
                size += n
            return {"messages": mb[5], "uidnext": mb[3], "uidvalidity": mb[2], "unseen": unseen, "deleted": deleted,
                    "size": size, "highestmodseq": mb[4]}
        return self._in_read_transaction(read)

    def imap_bodies(self, name: str, uids: list[int]) -> dict[int, bytes] | None:
        """The bytes of each listed message the mailbox still holds (None: no such mailbox)."""
        def read(r):
            mb = r.execute("SELECT mailbox_id FROM mailboxes WHERE name=?", (name,)).fetchone()
            if mb is None:
                return None
            out = {}
            for uid in uids:
                row = r.execute("SELECT b.data FROM messages m JOIN bodies b ON b.guid=m.guid "
                                "WHERE m.mailbox_id=? AND m.uid=?", (mb[0], uid)).fetchone()
                if row is not None:
                    out[uid] = row[0]
            return out
        return self._in_read_transaction(read)

    def fill_structures(self, guids: list[bytes]) -> dict[bytes, bytes]:
        """MS-24: the stored structure of each body of ``guids`` that has none (a store written
        before structures were kept, or a resync's copy), computed now and stored; GUID -> CBOR."""
        out: dict[bytes, bytes] = {}
        with self._lock:
            for guid in guids:
                row = self.conn.execute("SELECT data, structure FROM bodies WHERE guid=?", (guid,)).fetchone()
                if row is None:
                    continue
                if row[1] is None:
                    blob = cbor2.dumps(analyze(row[0]))
                    self.conn.execute("UPDATE bodies SET structure=? WHERE guid=? AND structure IS NULL", (blob, guid))
                    out[guid] = blob
                else:
                    out[guid] = row[1]
        return out

    @staticmethod
    def _mailbox_info(r) -> MailboxInfo:
        return MailboxInfo(r[0], r[1], r[2], r[3], r[4], r[5], mailbox_digest(r[2], r[3], r[6]))

    def tombstones(self) -> dict[str, str]:
        """Deleted mailboxes: id -> the name it had when deleted."""
        return {r[0]: r[1] for r in self._read("SELECT mailbox_id, name FROM tombstones")}

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
