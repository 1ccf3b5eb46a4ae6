"""AsyncNode: the anyio face of :class:`engine.node.Node`.

Every call that can block (planning under the state lock, waiting for the
log's fdatasync, SQLite reads) runs in a worker thread through
``anyio.to_thread.run_sync`` with one :class:`anyio.CapacityLimiter` per
node. The limiter must be wide (default 256): a delivery holds its thread
while it waits for the group commit, and the log can only put N deliveries
into one fdatasync if N threads are waiting at once. A limiter of 1 would
make every delivery pay its own fsync.

Deliveries take a faster path on the asyncio backend: the decision and
the enqueue (``Node.plan_deliveries``, tens of microseconds, never blocking:
it gives up if the state lock is busy and falls back to a worker thread) run
in the event loop, and the log's ``notify_durable`` callback, called once
per fsync batch by the thread that synced it, resolves every delivery the
batch made durable with one ``call_soon_threadsafe``. No thread hand-off per
delivery; ``walctl bench lmtp`` measured the hand-offs as the largest cost
of a delivery. The acknowledgement rule is unchanged: a delivery returns
only after its record (and the original of a duplicate) is durable.

Flag changes (``change_flags``) take the same path: planned in the loop
when the state lock is free, acknowledged once a log batch made them durable.
And ``applied(lsn)`` waits in the loop for the store to apply a record
(:class:`AppliedFutures`: the applier makes one ``call_soon_threadsafe``
per applied batch while someone waits), so a read-your-writes read that is
small can then run in the loop without a thread (``Node.imap_changes`` with
``now_after``).

Cancellation: a delivery already handed to a thread runs to completion (the
thread cannot be interrupted); anyio then drops the result. The record may
still be durable: that is the "stored but not acknowledged" case the LMTP
client's retry and the store's de-duplication (MS-6) cover.

Example::

    async with await AsyncNode.open("node1") as node:
        receipt = await node.deliver("user/bob/INBOX", b"Subject: hi\\r\\n\\r\\nhello\\r\\n", create=True)
"""

from __future__ import annotations

import asyncio
import collections
import functools
import heapq
import itertools
from typing import Any, Callable, Iterable

import anyio

from wal import Log

from ..store.errors import StoreUnavailableError
from .core import AppendReceipt, CopyReceipt, FlagsReceipt, Node, Receipt
from ..store.database import MailboxInfo, MessageInfo

__all__ = ["AsyncNode", "DurableFutures", "AppliedFutures", "DEFAULT_THREADS"]

DEFAULT_THREADS = 256


class DurableFutures:
    """Futures for log records enqueued in one asyncio event loop, resolved per log batch.

    ``wait(lsn)`` (call it in the loop) returns a future that completes once
    record ``lsn`` is durable, or fails with StoreUnavailableError when the
    log failed or closed first. Each record registers the same callback with ``Log.notify_durable``;
    the log calls it once per batch, from the thread that synced the batch,
    and the callback makes one ``call_soon_threadsafe`` into the loop, which
    resolves every waiting future the batch made durable. No thread waits
    on behalf of the loop, and the loop is woken once per fsync, not once
    per delivery. LSNs are planned in the loop in order, so the waiting
    futures are sorted by LSN.
    """

    def __init__(self, log: Log, loop: asyncio.AbstractEventLoop):
        self.log = log
        self.loop = loop
        self.waiting: collections.deque = collections.deque()  # (lsn, future), ascending LSN
        self._on_durable = self._from_log  # one bound method: the log calls it once per batch

    def wait(self, lsn: int) -> asyncio.Future:
        fut = self.loop.create_future()
        if self.log.last_lsn >= lsn:  # durable already (say, a duplicate of a synced delivery)
            fut.set_result(None)
            return fut
        self.waiting.append((lsn, fut))
        self.log.notify_durable(lsn, self._on_durable)
        return fut

    def _from_log(self, durable_lsn: int, error: BaseException | None) -> None:
        # In the syncing thread (or this loop's, when already settled): hand over to the loop.
        try:
            self.loop.call_soon_threadsafe(self._resolve, durable_lsn, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _resolve(self, durable_lsn: int, error: BaseException | None) -> None:
        waiting = self.waiting
        while waiting and waiting[0][0] <= durable_lsn:
            _, fut = waiting.popleft()
            if not fut.done():
                fut.set_result(None)
        if error is not None:  # the log failed or closed: nothing after durable_lsn will be
            while waiting:
                _, fut = waiting.popleft()
                if not fut.done():
                    exc = StoreUnavailableError(str(error))
                    exc.__cause__ = error
                    fut.set_exception(exc)


class AppliedFutures:
    """Futures, in one asyncio event loop, for "the store applied record ``lsn``".

    ``wait(lsn)`` (call it in the loop) returns a future that completes with True once the
    node's applied LSN reached ``lsn``, or with False when the applier stopped or the node
    closed first (the caller then reads the slow way, which raises the node's error). The
    node calls :meth:`_from_applier` after every applied batch, on its applier thread; while a
    future waits, that makes one ``call_soon_threadsafe`` (one at a time) and the loop resolves
    every future the store caught up with. A future is added before the applied LSN is read
    again, and the applier moves the LSN before it looks for futures, so none is missed.
    """

    def __init__(self, node: Node, loop: asyncio.AbstractEventLoop):
        self.node = node
        self.loop = loop
        self.waiting: list = []  # heap of (lsn, tie-breaker, future)
        self._ties = itertools.count()
        self._queued = False
        self._remove = node.add_applied_listener(self._from_applier)

    def wait(self, lsn: int) -> asyncio.Future:
        fut = self.loop.create_future()
        heapq.heappush(self.waiting, (lsn, next(self._ties), fut))
        self._resolve()
        return fut

    def close(self) -> None:
        self._remove()
        self._resolve(closing=True)

    def _from_applier(self) -> None:
        if self.waiting and not self._queued:
            self._queued = True
            try:
                self.loop.call_soon_threadsafe(self._resolve)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _resolve(self, closing: bool = False) -> None:
        self._queued = False
        applied = self.node.applied_lsn
        stopped = closing or self.node.applier_error is not None
        waiting = self.waiting
        while waiting and (waiting[0][0] <= applied or stopped):
            lsn, _, fut = heapq.heappop(waiting)
            if not fut.done():
                fut.set_result(lsn <= applied)


class AsyncNode:
    """Async wrapper over one open :class:`Node` (which it owns: ``aclose`` closes it)."""

    def __init__(self, node: Node, *, threads: int = DEFAULT_THREADS, fast_path: bool = True):
        self.node = node
        self.limiter = anyio.CapacityLimiter(threads)
        self.fast_path = fast_path
        self._durability: DurableFutures | None = None
        self._applied: AppliedFutures | None = None

    # -- lifecycle ---------------------------------------------------------------

    @classmethod
    async def open(cls, path: str, *, threads: int = DEFAULT_THREADS, **kwargs) -> "AsyncNode":
        """Open a node directory (log recovery and store catch-up run in a thread)."""
        node = await anyio.to_thread.run_sync(functools.partial(Node.open, path, **kwargs))
        return cls(node, threads=threads)

    @classmethod
    async def init(cls, path: str, *, threads: int = DEFAULT_THREADS, **kwargs) -> "AsyncNode":
        node = await anyio.to_thread.run_sync(functools.partial(Node.init, path, **kwargs))
        return cls(node, threads=threads)

    async def aclose(self) -> None:
        """Close the node. Shielded: a cancelled caller still closes it cleanly."""
        with anyio.CancelScope(shield=True):
            self._durability = None
            if self._applied is not None:
                self._applied.close()
                self._applied = None
            await anyio.to_thread.run_sync(self.node.close)

    async def __aenter__(self) -> "AsyncNode":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _run(self, fn: Callable, *args, **kwargs) -> Any:
        if kwargs:
            fn = functools.partial(fn, **kwargs)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # -- non-blocking views ----------------------------------------------------------

    @property
    def role(self) -> str:
        return self.node.role

    @property
    def name(self) -> str:
        return self.node.config.name

    def mailbox_exists(self, name: str) -> bool:
        """Whether the master's decision state has ``name`` (a dict lookup; never blocks)."""
        return name in self.node.state.by_name

    # -- the asyncio fast path: no thread per call ---------------------------------------

    def _loop(self) -> asyncio.AbstractEventLoop | None:
        """The running asyncio loop when the fast path may be taken (None: use worker threads)."""
        if not self.fast_path:
            return None
        try:
            return asyncio.get_running_loop()
        except RuntimeError:  # not on asyncio (say, trio)
            return None

    async def _durable(self, loop: asyncio.AbstractEventLoop, lsn: int) -> None:
        d = self._durability
        if d is None or d.loop is not loop:
            d = self._durability = DurableFutures(self.node.log, loop)
        await d.wait(lsn)

    async def applied(self, lsn: int, timeout: float = 10.0) -> bool:
        """Wait in the loop until the store applied ``lsn``; True then. False at once when this
        is not an asyncio loop, and when the applier stopped, the node closed or ``timeout``
        seconds passed first: the caller then reads the blocking way (in a thread), which waits
        or raises as the node says."""
        node = self.node
        if node.applied_lsn >= lsn:
            return True
        loop = self._loop()
        if loop is None:
            return False
        a = self._applied
        if a is None or a.loop is not loop:
            if a is not None:
                a.close()
            a = self._applied = AppliedFutures(node, loop)
        with anyio.move_on_after(timeout):
            return await a.wait(lsn)
        return False

    # -- writes (each returns once durable) --------------------------------------------

    async def deliver(self, mailbox: str, body: bytes, *, flags: Iterable[str] = (), internaldate: float | None = None,
                      create: bool = False) -> Receipt:
        (result,) = await self.deliver_many([(mailbox, tuple(flags))], body, internaldate=internaldate, create=create)
        if isinstance(result, Exception):
            raise result
        return result

    async def deliver_many(self, targets: list[tuple[str, tuple[str, ...]]], body: bytes, *,
                           internaldate: float | None = None, create: bool = False) -> list[Receipt | Exception]:
        """One body to several mailboxes, one shared fsync; returns once durable (see Node.deliver_many)."""
        loop = self._loop()
        if loop is not None:
            planned = self.node.plan_deliveries(targets, body, internaldate=internaldate, create=create,
                                                blocking=False)
            if planned is not None:
                await self._durable(loop, planned.sync_lsn)
                return planned.results
        return await self._run(self.node.deliver_many, targets, body, internaldate=internaldate, create=create)

    async def create_mailbox(self, name: str, *, special_use=()) -> int:
        return await self._run(self.node.create_mailbox, name, special_use=tuple(special_use))

    async def rename_mailbox(self, old: str, new: str, *, children: bool = False) -> int:
        return await self._run(self.node.rename_mailbox, old, new, children=children)

    async def delete_mailbox(self, name: str, *, recursive: bool = False) -> int:
        return await self._run(self.node.delete_mailbox, name, recursive=recursive)

    async def store_flags(self, mailbox: str, uids: Iterable[int], op: str, flags: Iterable[str]) -> int:
        return await self._run(self.node.store_flags, mailbox, list(uids), op, list(flags))

    async def expunge(self, mailbox: str, uids: Iterable[int]) -> int:
        return await self._run(self.node.expunge, mailbox, list(uids))

    async def checkpoint(self) -> int:
        return await self._run(self.node.checkpoint)

    # -- IMAP writes, users, subscriptions (each returns once durable; see Node) ----------------

    async def append_messages(self, mailbox: str, messages) -> AppendReceipt:
        return await self._run(self.node.append_messages, mailbox, list(messages))

    async def copy_messages(self, source: str, uids: Iterable[int], target: str, *, move: bool = False) -> CopyReceipt:
        return await self._run(self.node.copy_messages, source, list(uids), target, move=move)

    async def change_flags(self, mailbox: str, uids: Iterable[int], op: str, flags: Iterable[str], *,
                           unchanged_since: int | None = None) -> FlagsReceipt:
        """IMAP STORE (see Node.change_flags); returns once durable. Planned in the loop when the
        state lock is free (and ``unchanged_since`` needs no wait for the store), else in a thread."""
        loop = self._loop()
        if loop is not None:
            receipt = self.node.plan_change_flags(mailbox, uids, op, flags, unchanged_since=unchanged_since,
                                                  blocking=False)
            if receipt is not None:
                if receipt.lsn:
                    await self._durable(loop, receipt.lsn)
                return receipt
        return await self._run(self.node.change_flags, mailbox, list(uids), op, list(flags),
                               unchanged_since=unchanged_since)

    async def expunge_present(self, mailbox: str, uids: Iterable[int]) -> tuple[tuple[int, ...], int]:
        return await self._run(self.node.expunge_present, mailbox, list(uids))

    async def add_user(self, name: str, password: str | None = None, *, password_hash: str | None = None) -> int:
        return await self._run(self.node.add_user, name, password, password_hash=password_hash)

    async def set_password(self, name: str, password: str | None = None, *, password_hash: str | None = None) -> int:
        return await self._run(self.node.set_password, name, password, password_hash=password_hash)

    async def delete_user(self, name: str) -> int:
        return await self._run(self.node.delete_user, name)

    async def list_users(self) -> list[str]:
        return await self._run(self.node.list_users)

    async def verify_user(self, name: str, password: str) -> bool:
        """Hash verification runs in a worker thread, never on the event loop."""
        return await self._run(self.node.verify_user, name, password)

    async def set_subscribed(self, user: str, mailbox: str, subscribed: bool) -> int:
        return await self._run(self.node.set_subscribed, user, mailbox, subscribed)

    async def subscriptions(self, user: str) -> list[str]:
        return await self._run(self.node.subscriptions, user)

    def add_change_listener(self, callback) -> Callable[[], None]:
        """See :meth:`Node.add_change_listener` (the callback runs on the applier's thread)."""
        return self.node.add_change_listener(callback)

    # -- reads --------------------------------------------------------------------

    async def list_mailboxes(self) -> list[MailboxInfo]:
        return await self._run(self.node.list_mailboxes)

    async def list_messages(self, mailbox: str) -> list[MessageInfo]:
        return await self._run(self.node.list_messages, mailbox)

    async def fetch(self, mailbox: str, uid: int) -> bytes:
        return await self._run(self.node.fetch, mailbox, uid)

    async def digest(self) -> dict:
        return await self._run(self.node.digest)

    async def status(self) -> dict:
        return await self._run(self.node.status)

    async def run_sync(self, fn: Callable, *args, **kwargs) -> Any:
        """Run any other blocking Node call (``fn(*args)``) under this node's limiter."""
        return await self._run(fn, *args, **kwargs)
