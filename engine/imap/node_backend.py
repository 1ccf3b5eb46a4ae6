"""The IMAP front over the engine: a :class:`~engine.imap.backend.Backend` on an :class:`~engine.node.AsyncNode`.

This is the adapter between the pure IMAP package and the node (IMAP-27: the
one module of the package besides ``server.py`` that reaches outside it).

* **Writes** go through the node's write path: each command is one log record
  (MS-20: an APPEND of several messages, a COPY or MOVE of N messages, a
  RENAME with its children), planned under the node's state lock in a worker
  thread and returned only once durable. Nothing here takes that lock or holds
  anything while awaiting: every blocking call (planning, fdatasync, SQLite,
  password hashing) runs in the node's worker threads.
* **Reads** (``snapshot``, ``changes``, ``status``, ``fetch_bodies``) read the
  store once it applied everything durable at the call (read-your-writes),
  in a worker thread. The small reads of every command (``changes``, and
  the rows a STORE changed) wait for the store in the event loop instead
  (``AsyncNode.applied``) and then run there when they cannot block: the
  store's reader is free and at most :data:`INLINE_ROWS` messages changed
  (``Node.imap_changes`` with ``now_after``); otherwise in a worker thread.
  A STORE is planned in the loop too when the node's state lock is free
  (``AsyncNode.change_flags``) and answered once its record is durable, so a
  STORE usually needs no worker thread at all. A message's stored structure (MS-24) is decoded only
  when FETCH or SEARCH first reads it; a body stored before structures were
  kept gets its structure computed and stored on first read. The last
  snapshots of the busiest mailboxes are kept (:data:`SNAPSHOT_CACHE`
  mailboxes): a SELECT of one of them reads only what changed since
  (``changes``, MS-23) and reuses the messages (and their decoded
  structures) of the one before; a renumbering, a new UIDVALIDITY, another
  mailbox under the name or expunges older than the store remembers load
  it whole again.
* **Errors**: the node's mail-store errors become the backend's typed errors
  (a replica's :class:`ReadOnly` names the master's address as the cluster
  knows it, through ``master_address``; a failed log or paused writes are
  :class:`Unavailable`).
* **Notification**: :meth:`NodeBackend.watch` rides on the node's change
  listener, called by the applier on masters and replicas alike.
"""

from __future__ import annotations

import datetime as _dt
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import cbor2

from ..node import AsyncNode
from ..store.errors import (
    BadFlagError,
    BadMailboxNameError,
    BadUserNameError,
    GuardRefusedError,
    MailboxExistsError,
    MailStoreError,
    MessageTooLargeError,
    ReadNotNow,
    ReadOnlyNodeError,
    RequestError,
    StoreUnavailableError,
    UnknownMailboxError,
)
from ..store.events import validate_user_name
from .backend import (
    AlreadyExists,
    AppendResult,
    BackendError,
    Cannot,
    Changes,
    CopyResult,
    LimitExceeded,
    MailboxEntry,
    MailboxStatus,
    MessageInfo,
    NewMessage,
    NoSuchMailbox,
    ReadOnly,
    Snapshot,
    StoreResult,
    TooBig,
    Unavailable,
)

__all__ = ["NodeBackend", "StoredStructure", "SNAPSHOT_CACHE", "INLINE_ROWS"]

_UTC = _dt.timezone.utc
SNAPSHOT_CACHE = 32  # mailboxes whose last snapshot is kept
INLINE_ROWS = 64  # a read in the event loop carries at most this many messages (a bounded, short read)
APPLIED_WAIT_S = 10.0  # an inline read waits this long for the store, then reads the blocking way


@dataclass
class _Kept:
    """A mailbox's last snapshot: its messages by UID, in UID order (new UIDs only grow)."""

    mailbox_id: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: dict[int, MessageInfo]


class StoredStructure(Mapping):
    """A message's stored structure (``engine/store/structure.py``), decoded from its CBOR on first use."""

    __slots__ = ("_blob", "_value")

    def __init__(self, blob: bytes):
        self._blob = blob
        self._value: dict | None = None

    def _decoded(self) -> dict:
        if self._value is None:
            self._value = cbor2.loads(self._blob)
        return self._value

    def __getitem__(self, key):
        return self._decoded()[key]

    def __iter__(self):
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())


def _info(row, structures: dict[bytes, bytes]) -> MessageInfo:
    blob = row.structure if row.structure is not None else structures[row.guid]
    return MessageInfo(row.uid, frozenset(row.flags), row.modseq,
                       _dt.datetime.fromtimestamp(row.internaldate_ms / 1000, _UTC), row.size, StoredStructure(blob))


class NodeBackend:
    """The mail store of one node as the IMAP executor sees it.

    Args:
        node: the open node (the backend does not own it).
        master_address: returns the master's address as the cluster knows it (or None),
            for the replica's ``NO [UNAVAILABLE]`` answers.
        replicated: ``await replicated(lsn)`` after each durable write, before it is answered:
            the cluster waits there for ``--sync-replicas`` K replicas (raising a
            TemporaryFailure, answered NO [UNAVAILABLE], when they do not confirm in time).
    """

    def __init__(self, node: AsyncNode, *, master_address: Callable[[], str | None] | None = None,
                 replicated: Callable[[int], Awaitable[None]] | None = None):
        self.node = node
        self.master_address = master_address or (lambda: None)
        self.replicated = replicated
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._kept_lock = threading.Lock()  # guards _kept and _locks
        self._locks: dict[str, threading.Lock] = {}  # one per mailbox name: one refresh at a time

    # -- errors ----------------------------------------------------------------------------

    def _error(self, exc: MailStoreError) -> BackendError:
        """The backend error for a refused request (IMAP-11, IMAP-13)."""
        text = str(exc)
        if isinstance(exc, ReadOnlyNodeError):
            if self.node.role != "master":
                return ReadOnly(self.master_address())
            return Unavailable(f"writes are paused: {text}; try again shortly")
        if isinstance(exc, StoreUnavailableError):
            return Unavailable(text)
        if isinstance(exc, UnknownMailboxError):
            return NoSuchMailbox(text)
        if isinstance(exc, MailboxExistsError):
            return AlreadyExists(text)
        if isinstance(exc, MessageTooLargeError):
            return TooBig(text)
        if isinstance(exc, GuardRefusedError):
            return LimitExceeded(text)
        if isinstance(exc, (BadMailboxNameError, BadFlagError, RequestError)):
            return Cannot(text)
        return Unavailable(text)

    async def _call(self, fn, *args, **kwargs):
        try:
            return await self.node.run_sync(fn, *args, **kwargs)
        except MailStoreError as exc:
            raise self._error(exc) from exc

    async def _read_fresh(self, now: Callable[[int], object], slow, *args):
        """A read of the store once it applied everything durable at the call (read-your-writes):
        ``now(lsn)`` in the event loop once the store applied ``lsn`` (it raises ReadNotNow when
        it would block), else ``slow(*args)`` in a worker thread."""
        lsn = self.node.node.log.last_lsn
        if await self.node.applied(lsn, timeout=APPLIED_WAIT_S):
            try:
                return now(lsn)
            except ReadNotNow:
                pass
            except MailStoreError as exc:
                raise self._error(exc) from exc
        return await self._call(slow, *args)

    async def _write(self, fn, *args, **kwargs):
        """A write: refused on a replica; its result once durable (and replicated, ``replicated``).
        ``fn`` returns ``(result, lsn)``; LSN 0 means nothing was logged."""
        self._write_refused()
        result, lsn = await self._call(fn, *args, **kwargs)
        if lsn and self.replicated is not None:
            try:
                await self.replicated(lsn)
            except MailStoreError as exc:
                raise self._error(exc) from exc
        return result

    def _write_refused(self) -> None:
        refusal = self.read_only()
        if refusal is not None:
            raise refusal

    # -- the Backend protocol -------------------------------------------------------------

    async def authenticate(self, username: str, password: str) -> str | None:
        name = username.lower()
        try:
            validate_user_name(name)
        except BadUserNameError:
            return None
        try:
            ok = await self.node.verify_user(name, password)
        except MailStoreError:
            return None
        return name if ok else None

    def read_only(self) -> ReadOnly | None:
        if self.node.role != "master":
            return ReadOnly(self.master_address())
        return None

    async def list_mailboxes(self, prefix: str) -> list[MailboxEntry]:
        rows = await self._call(self.node.node.imap_mailboxes, prefix)
        return [MailboxEntry(name, tuple(use.split())) for name, use in rows]

    async def subscriptions(self, user: str) -> frozenset[str]:
        return frozenset(await self._call(self.node.node.subscriptions, user))

    @staticmethod
    def _lsn_only(fn):
        def run(*args, **kwargs):
            return None, fn(*args, **kwargs)
        return run

    async def set_subscribed(self, user: str, name: str, subscribed: bool) -> None:
        await self._write(self._lsn_only(self.node.node.set_subscribed), user, name, subscribed)

    async def create(self, name: str, special_use: tuple[str, ...] = ()) -> None:
        await self._write(self._lsn_only(self.node.node.create_mailbox), name, special_use=tuple(special_use))

    async def delete(self, name: str) -> None:
        await self._write(self._lsn_only(self.node.node.delete_mailbox), name)

    async def rename(self, old: str, new: str) -> None:
        await self._write(self._lsn_only(self.node.node.rename_mailbox), old, new, children=True)

    async def status(self, name: str) -> MailboxStatus:
        st = await self._call(self.node.node.imap_status, name)
        return MailboxStatus(st["messages"], st["uidnext"], st["uidvalidity"], st["unseen"], st["deleted"],
                             st["size"], st["highestmodseq"])

    def _snapshot_sync(self, name: str) -> Snapshot:
        with self._kept_lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            with self._kept_lock:
                kept = self._kept.get(name)
            if kept is not None:
                info, rows, vanished = self.node.node.imap_changes(name, kept.highestmodseq)
                if (info.mailbox_id, info.uidvalidity) != (kept.mailbox_id, kept.uidvalidity) or vanished is None:
                    kept = None
                else:
                    structures = self._missing_structures(rows)
                    for uid in vanished:
                        kept.messages.pop(uid, None)
                    for row in rows:  # a changed UID keeps its place, a new one is the greatest yet
                        kept.messages[row.uid] = _info(row, structures)
                    kept.uidnext, kept.highestmodseq = info.uidnext, info.highestmodseq
            if kept is None:
                info, rows = self.node.node.imap_snapshot(name)
                structures = self._missing_structures(rows)
                kept = _Kept(info.mailbox_id, info.uidvalidity, info.uidnext, info.highestmodseq,
                             {r.uid: _info(r, structures) for r in rows})
            snapshot = Snapshot(kept.uidvalidity, kept.uidnext, kept.highestmodseq, list(kept.messages.values()))
            with self._kept_lock:
                self._kept[name] = kept
                self._kept.move_to_end(name)
                while len(self._kept) > SNAPSHOT_CACHE:
                    old, _ = self._kept.popitem(last=False)
                    self._locks.pop(old, None)
            return snapshot

    def _changes_sync(self, name: str, since_modseq: int) -> Changes:
        info, rows, vanished = self.node.node.imap_changes(name, since_modseq)
        structures = self._missing_structures(rows)
        return Changes(info.uidvalidity, info.uidnext, info.highestmodseq, [_info(r, structures) for r in rows],
                       vanished)

    def _missing_structures(self, rows) -> dict[bytes, bytes]:
        missing = [r.guid for r in rows if r.structure is None]
        return self.node.node.fill_structures(missing) if missing else {}

    async def snapshot(self, name: str) -> Snapshot:
        return await self._call(self._snapshot_sync, name)

    async def changes(self, name: str, since_modseq: int) -> Changes:
        def now(lsn: int) -> Changes:
            info, rows, vanished = self.node.node.imap_changes(name, since_modseq, now_after=lsn,
                                                               max_rows=INLINE_ROWS)
            return Changes(info.uidvalidity, info.uidnext, info.highestmodseq, self._infos_now(rows), vanished)
        return await self._read_fresh(now, self._changes_sync, name, since_modseq)

    @staticmethod
    def _infos_now(rows) -> list[MessageInfo]:
        """The rows' MessageInfo in the loop; ReadNotNow for a body whose structure must be
        computed and stored first (``fill_structures`` writes: a worker thread's job)."""
        if any(r.structure is None for r in rows):
            raise ReadNotNow("a stored structure is missing")
        return [_info(r, {}) for r in rows]

    async def fetch_bodies(self, name: str, uids: Sequence[int]) -> dict[int, bytes]:
        return await self._call(self.node.node.imap_bodies, name, list(uids))

    async def append(self, name: str, messages: Sequence[NewMessage]) -> AppendResult:
        planned = [(m.data, tuple(m.flags), m.internaldate.timestamp() if m.internaldate is not None else None)
                   for m in messages]

        def append():
            receipt = self.node.node.append_messages(name, planned)
            return AppendResult(receipt.uidvalidity, receipt.uids), receipt.lsn
        return await self._write(append)

    def _rows_sync(self, name: str, uids: tuple[int, ...]) -> list[MessageInfo]:
        _, rows = self.node.node.imap_rows(name, uids)
        structures = self._missing_structures(rows)
        return [_info(r, structures) for r in rows]

    async def store(self, name: str, uids: Sequence[int], mode: str, flags: frozenset[str],
                    unchanged_since: int | None = None) -> StoreResult:
        """One record (durable, and replicated as ``replicated`` asks, before this returns), then
        the changed messages as the store has them once it applied that record."""
        self._write_refused()
        try:
            receipt = await self.node.change_flags(name, list(uids), mode, sorted(flags),
                                                   unchanged_since=unchanged_since)
            if not receipt.uids:
                return StoreResult((), (), receipt.modified)
            if self.replicated is not None:
                await self.replicated(receipt.lsn)
        except MailStoreError as exc:
            raise self._error(exc) from exc

        def now(lsn: int) -> list[MessageInfo]:
            return self._infos_now(self.node.node.imap_rows(name, receipt.uids, now_after=lsn)[1])
        infos = await self._read_fresh(now, self._rows_sync, name, receipt.uids)
        changed = tuple(i for i in infos if i.modseq >= receipt.modseq)
        unchanged = tuple(i for i in infos if i.modseq < receipt.modseq)
        return StoreResult(changed, unchanged, receipt.modified)

    def _copy_sync(self, name: str, uids: list[int], target: str, move: bool):
        receipt = self.node.node.copy_messages(name, uids, target, move=move)
        return CopyResult(receipt.uidvalidity, receipt.source_uids, receipt.target_uids), receipt.lsn

    async def copy(self, name: str, uids: Sequence[int], target: str) -> CopyResult:
        return await self._write(self._copy_sync, name, list(uids), target, False)

    async def move(self, name: str, uids: Sequence[int], target: str) -> CopyResult:
        return await self._write(self._copy_sync, name, list(uids), target, True)

    async def expunge(self, name: str, uids: Sequence[int]) -> tuple[int, ...]:
        def expunge():
            gone, lsn = self.node.node.expunge_present(name, list(uids))
            return tuple(gone), lsn
        return await self._write(expunge)

    def watch(self, callback: Callable[[str], None]) -> Callable[[], None]:
        def changed(names: set[str]) -> None:
            for name in names:
                callback(name)
        return self.node.add_change_listener(changed)
