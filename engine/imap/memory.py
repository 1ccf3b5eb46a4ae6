"""An in-memory :class:`~engine.imap.backend.Backend`: the executor's test double and the pure model.

It keeps the whole contract of ``engine/imap/backend.py`` except persistence
(a write is "durable" when it returns): UIDVALIDITY per mailbox (never
reused for a name), UIDs that only grow, MODSEQ per message and HIGHESTMODSEQ
per mailbox, every expunged UID with the MODSEQ of its expunge (VANISHED),
subscriptions per user, change notification. Users have plain passwords
(this is a model, not the engine's user store).

Faults for tests: :meth:`MemoryBackend.fail_next` makes the next call of a
method raise a given error before it changes anything; :attr:`read_only_master`
turns the node into a replica whose writes raise :class:`ReadOnly`.

Each method runs without awaiting anything, so on one event loop every call
is atomic. No I/O, no clock (the internal date of an APPEND without one is
``clock()``, injected).
"""

from __future__ import annotations

import datetime as _dt
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .backend import (
    AlreadyExists,
    AppendResult,
    Cannot,
    Changes,
    CopyResult,
    MailboxEntry,
    MailboxStatus,
    MessageInfo,
    NewMessage,
    NoSuchMailbox,
    ReadOnly,
    Snapshot,
    StoreResult,
    TooBig,
)
from .names import USER_ROOT, check_user_name
from ..store.structure import analyze

__all__ = ["MemoryBackend"]

_EPOCH = _dt.datetime(2000, 1, 1, tzinfo=_dt.timezone.utc)


@dataclass
class _Message:
    info: MessageInfo
    data: bytes


@dataclass
class _Mailbox:
    uidvalidity: int
    uidnext: int = 1
    highestmodseq: int = 1
    messages: dict[int, _Message] = field(default_factory=dict)  # insertion order = UID order
    expunged: dict[int, int] = field(default_factory=dict)  # uid -> MODSEQ of its expunge
    special_use: tuple[str, ...] = ()
    changed: list[tuple[int, int]] = field(default_factory=list)  # (MODSEQ, UID) of every add/flag change

    def bump(self) -> int:
        self.highestmodseq += 1
        return self.highestmodseq


class MemoryBackend:
    """See the module docstring. ``max_message_bytes`` bounds APPEND (TooBig)."""

    def __init__(self, *, max_message_bytes: int = 64 * 1024 * 1024,
                 clock: Callable[[], _dt.datetime] = lambda: _EPOCH):
        self.max_message_bytes = max_message_bytes
        self.clock = clock
        self.read_only_master: str | None = None  # set: this node is a replica of that master
        self.users: dict[str, str] = {}
        self.mailboxes: dict[str, _Mailbox] = {}
        self.subscribed: dict[str, set[str]] = {}
        self._uidvalidity = 0
        self._watchers: list[Callable[[str], None]] = []
        self._faults: dict[str, BaseException] = {}
        self.calls: list[str] = []

    # -- setup and faults (tests, the model) ----------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        check_user_name(name)
        self.users[name] = password
        self.subscribed.setdefault(name, set())
        inbox = f"{USER_ROOT}{name}/INBOX"
        if inbox not in self.mailboxes:
            self._create(inbox, ())

    def deliver(self, mailbox: str, data: bytes, flags=(), internaldate: _dt.datetime | None = None) -> int:
        """A delivery from outside IMAP (LMTP, replication): returns the UID."""
        box = self._box(mailbox)
        uid = self._add(box, data, frozenset(flags), internaldate or self.clock())
        self._notify(mailbox)
        return uid

    def fail_next(self, method: str, error: BaseException) -> None:
        """The next call of ``method`` raises ``error`` and changes nothing."""
        self._faults[method] = error

    def _enter(self, method: str, write: bool = False) -> None:
        self.calls.append(method)
        fault = self._faults.pop(method, None)
        if fault is not None:
            raise fault
        if write and self.read_only_master is not None:
            raise self.read_only()

    # -- internals ------------------------------------------------------------------------

    def _box(self, name: str) -> _Mailbox:
        box = self.mailboxes.get(name)
        if box is None:
            raise NoSuchMailbox(f"no mailbox {name}")
        return box

    def _create(self, name: str, special_use) -> _Mailbox:
        self._uidvalidity += 1
        box = _Mailbox(self._uidvalidity, special_use=tuple(special_use))
        self.mailboxes[name] = box
        return box

    def _add(self, box: _Mailbox, data: bytes, flags: frozenset[str], date: _dt.datetime) -> int:
        uid = box.uidnext
        box.uidnext += 1
        info = MessageInfo(uid, flags, box.bump(), date, len(data), analyze(data))
        box.messages[uid] = _Message(info, data)
        box.changed.append((info.modseq, uid))
        return uid

    def _notify(self, name: str) -> None:
        for cb in list(self._watchers):
            cb(name)

    # -- the Backend protocol ---------------------------------------------------------------

    async def authenticate(self, username: str, password: str) -> str | None:
        self._enter("authenticate")
        name = username.lower()
        stored = self.users.get(name)
        return name if stored is not None and stored == password else None

    def read_only(self) -> ReadOnly | None:
        if self.read_only_master is None:
            return None
        return ReadOnly(self.read_only_master)

    async def list_mailboxes(self, prefix: str) -> list[MailboxEntry]:
        self._enter("list_mailboxes")
        return [MailboxEntry(n, b.special_use) for n, b in sorted(self.mailboxes.items()) if n.startswith(prefix)]

    async def subscriptions(self, user: str) -> frozenset[str]:
        self._enter("subscriptions")
        return frozenset(self.subscribed.get(user, ()))

    async def set_subscribed(self, user: str, name: str, subscribed: bool) -> None:
        self._enter("set_subscribed", write=True)
        subs = self.subscribed.setdefault(user, set())
        (subs.add if subscribed else subs.discard)(name)

    async def create(self, name: str, special_use: tuple[str, ...] = ()) -> None:
        self._enter("create", write=True)
        if name in self.mailboxes:
            raise AlreadyExists(f"mailbox {name} already exists")
        self._create(name, special_use)
        self._notify(name)

    async def delete(self, name: str) -> None:
        self._enter("delete", write=True)
        self._box(name)
        del self.mailboxes[name]
        self._notify(name)

    async def rename(self, old: str, new: str) -> None:
        self._enter("rename", write=True)
        self._box(old)
        if new in self.mailboxes:
            raise AlreadyExists(f"mailbox {new} already exists")
        if new.startswith(old + "/"):
            raise Cannot("a mailbox cannot be renamed into itself")
        moving = [n for n in self.mailboxes if n == old or n.startswith(old + "/")]
        for n in moving:
            target = new + n[len(old):]
            if target in self.mailboxes:
                raise AlreadyExists(f"mailbox {target} already exists")
        for n in moving:
            # a renamed mailbox keeps its messages, UIDs and UIDVALIDITY; the old name, if created
            # again, gets a new UIDVALIDITY (RFC 9051 6.3.6: UIDs are never reused under a name)
            self.mailboxes[new + n[len(old):]] = self.mailboxes.pop(n)
        for subs in self.subscribed.values():
            for n in list(subs):
                if n == old or n.startswith(old + "/"):
                    subs.discard(n)
                    subs.add(new + n[len(old):])
        self._notify(old)
        self._notify(new)

    async def status(self, name: str) -> MailboxStatus:
        self._enter("status")
        box = self._box(name)
        infos = [m.info for m in box.messages.values()]
        return MailboxStatus(len(infos), box.uidnext, box.uidvalidity,
                             sum("\\Seen" not in i.flags for i in infos),
                             sum("\\Deleted" in i.flags for i in infos), sum(i.size for i in infos),
                             box.highestmodseq)

    async def snapshot(self, name: str) -> Snapshot:
        self._enter("snapshot")
        box = self._box(name)
        return Snapshot(box.uidvalidity, box.uidnext, box.highestmodseq, [m.info for m in box.messages.values()])

    async def changes(self, name: str, since_modseq: int) -> Changes:
        self._enter("changes")
        box = self._box(name)
        start = bisect_right(box.changed, (since_modseq, 1 << 62))
        uids = sorted({u for _, u in box.changed[start:]})
        present = (box.messages.get(u) for u in uids)
        changed = [m.info for m in present if m is not None and m.info.modseq > since_modseq]
        vanished = sorted(u for u, ms in box.expunged.items() if ms > since_modseq)
        return Changes(box.uidvalidity, box.uidnext, box.highestmodseq, changed, vanished)

    async def fetch_bodies(self, name: str, uids: Sequence[int]) -> dict[int, bytes]:
        self._enter("fetch_bodies")
        box = self._box(name)
        return {u: box.messages[u].data for u in uids if u in box.messages}

    async def append(self, name: str, messages: Sequence[NewMessage]) -> AppendResult:
        self._enter("append", write=True)
        box = self._box(name)
        for m in messages:
            if len(m.data) > self.max_message_bytes:
                raise TooBig(f"message of {len(m.data)} octets is over the limit of {self.max_message_bytes}")
        uids = tuple(self._add(box, m.data, frozenset(m.flags), m.internaldate or self.clock()) for m in messages)
        self._notify(name)
        return AppendResult(box.uidvalidity, uids)

    async def store(self, name: str, uids: Sequence[int], mode: str, flags: frozenset[str],
                    unchanged_since: int | None = None) -> StoreResult:
        self._enter("store", write=True)
        box = self._box(name)
        changed, unchanged, modified = [], [], []
        for uid in uids:
            msg = box.messages.get(uid)
            if msg is None:
                continue
            info = msg.info
            if unchanged_since is not None and info.modseq > unchanged_since:
                modified.append(uid)
                continue
            new = (info.flags | flags if mode == "add" else info.flags - flags if mode == "remove" else flags)
            if new == info.flags:
                unchanged.append(info)
                continue
            msg.info = MessageInfo(uid, frozenset(new), box.bump(), info.internaldate, info.size, info.structure)
            box.changed.append((msg.info.modseq, uid))
            changed.append(msg.info)
        if changed:
            self._notify(name)
        return StoreResult(tuple(changed), tuple(unchanged), tuple(modified))

    async def copy(self, name: str, uids: Sequence[int], target: str) -> CopyResult:
        self._enter("copy", write=True)
        return self._copy(name, uids, target, move=False)

    async def move(self, name: str, uids: Sequence[int], target: str) -> CopyResult:
        self._enter("move", write=True)
        return self._copy(name, uids, target, move=True)

    def _copy(self, name: str, uids: Sequence[int], target: str, *, move: bool) -> CopyResult:
        box = self._box(name)
        dst = self._box(target)
        src, new = [], []
        for uid in uids:
            msg = box.messages.get(uid)
            if msg is None:
                continue
            src.append(uid)
            new.append(self._add(dst, msg.data, msg.info.flags, msg.info.internaldate))
        if move and src:
            modseq = box.bump()
            for uid in src:
                del box.messages[uid]
                box.expunged[uid] = modseq
            self._notify(name)
        if new:
            self._notify(target)
        return CopyResult(dst.uidvalidity, tuple(src), tuple(new))

    async def expunge(self, name: str, uids: Sequence[int]) -> tuple[int, ...]:
        self._enter("expunge", write=True)
        box = self._box(name)
        gone = tuple(u for u in uids if u in box.messages)
        if gone:
            modseq = box.bump()
            for uid in gone:
                del box.messages[uid]
                box.expunged[uid] = modseq
            self._notify(name)
        return gone

    def watch(self, callback: Callable[[str], None]) -> Callable[[], None]:
        self._watchers.append(callback)

        def stop() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)
        return stop
