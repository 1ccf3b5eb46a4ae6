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
in the event loop, and one "durability" thread waits for the fsyncs of
everything enqueued so far and wakes all the deliveries it covers at once.
That replaces one thread hand-off per delivery with one per fsync batch;
``walctl bench lmtp`` measured the hand-offs as the largest cost of a
delivery. The acknowledgement rule is unchanged: a delivery returns only
after its record (and the original of a duplicate) is durable.

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
import functools
import queue
import threading
from typing import Any, Callable, Iterable

import anyio

from .node import Node, Receipt
from .store import MailboxInfo, MessageInfo

__all__ = ["AsyncNode", "DEFAULT_THREADS"]

DEFAULT_THREADS = 256


class _Durability:
    """One thread that waits for fsyncs on behalf of deliveries planned in an event loop."""

    def __init__(self, node: Node, loop: asyncio.AbstractEventLoop):
        self.node = node
        self.loop = loop
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="mailwal-durability", daemon=True)
        self.thread.start()

    def wait(self, lsn: int) -> asyncio.Future:
        fut = self.loop.create_future()
        self.queue.put((lsn, fut))
        return fut

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(30)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self.queue.get()
            if first is None:
                return
            items = [first]
            while True:  # everything queued meanwhile shares this wait (and the log's fsync)
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                items.append(item)
            error: BaseException | None = None
            try:
                self.node.wait_durable(max(lsn for lsn, _ in items))
            except BaseException as exc:  # handed to every waiter; the log is failed or closed
                error = exc
            try:
                self.loop.call_soon_threadsafe(_resolve, items, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return


def _resolve(items: list, error: BaseException | None) -> None:
    for _, fut in items:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


class AsyncNode:
    """Async wrapper over one open :class:`Node` (which it owns: ``aclose`` closes it)."""

    def __init__(self, node: Node, *, threads: int = DEFAULT_THREADS, fast_path: bool = True):
        self.node = node
        self.limiter = anyio.CapacityLimiter(threads)
        self.fast_path = fast_path
        self._durability: _Durability | None = None

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
            if self._durability is not None:
                await anyio.to_thread.run_sync(self._durability.stop)
                self._durability = None
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
        if self.fast_path:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on asyncio (say, trio): the thread path below
                loop = None
            if loop is not None:
                planned = self.node.plan_deliveries(targets, body, internaldate=internaldate, create=create,
                                                    blocking=False)
                if planned is not None:
                    d = self._durability
                    if d is None or d.loop is not loop:
                        if d is not None:
                            d.queue.put(None)  # the previous loop is gone; let its thread end
                        d = self._durability = _Durability(self.node, loop)
                    await d.wait(planned.sync_lsn)
                    return planned.results
        return await self._run(self.node.deliver_many, targets, body, internaldate=internaldate, create=create)

    async def create_mailbox(self, name: str) -> int:
        return await self._run(self.node.create_mailbox, name)

    async def rename_mailbox(self, old: str, new: str) -> int:
        return await self._run(self.node.rename_mailbox, old, new)

    async def delete_mailbox(self, name: str, *, recursive: bool = False) -> int:
        return await self._run(self.node.delete_mailbox, name, recursive=recursive)

    async def store_flags(self, mailbox: str, uids: Iterable[int], op: str, flags: Iterable[str]) -> int:
        return await self._run(self.node.store_flags, mailbox, list(uids), op, list(flags))

    async def expunge(self, mailbox: str, uids: Iterable[int]) -> int:
        return await self._run(self.node.expunge, mailbox, list(uids))

    async def checkpoint(self) -> int:
        return await self._run(self.node.checkpoint)

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
