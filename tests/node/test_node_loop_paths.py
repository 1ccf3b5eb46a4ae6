"""The event-loop paths of AsyncNode and the IMAP front's node adapter: no worker thread per call.

A flag change planned in the loop is answered only once its record is durable (MS-2, IMAP-10),
and a failed fdatasync refuses it; ``AsyncNode.applied`` waits in the loop for the store;
``Node.imap_changes``/``imap_rows`` with ``now_after`` never wait (ReadNotNow instead) and the
adapter then reads the waiting way, with the same answer. Faults are injected through the log's
FileOps (a disk that holds fdatasync until released, or fails it).
"""

from __future__ import annotations

import threading

import anyio
import pytest

import wal
from engine.imap.backend import Unavailable
from engine.imap.node_backend import INLINE_ROWS, NodeBackend
from engine.node import AsyncNode
from engine.store.errors import ReadNotNow, StoreUnavailableError
from tests.support.helpers import FaultyFileOps

pytestmark = pytest.mark.anyio

INBOX = "user/a/INBOX"


class HeldFileOps(wal.FileOps):
    """Real file operations; ``fdatasync`` waits until ``release`` is set (a slow disk)."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def fdatasync(self, fd: int) -> None:
        self.entered.set()
        assert self.release.wait(30)
        super().fdatasync(fd)


async def _node_with_messages(tmp_path, n: int = 3) -> AsyncNode:
    node = await AsyncNode.init(str(tmp_path / "n"))
    await node.create_mailbox(INBOX)
    for i in range(n):
        await node.deliver(INBOX, b"Subject: %d\r\n\r\nbody\r\n" % i)
    return node


async def _until(predicate) -> None:
    with anyio.fail_after(30):
        while not predicate():
            await anyio.sleep(0.005)


async def test_a_flag_change_planned_in_the_loop_is_answered_only_once_durable(tmp_path):
    """MS-2, IMAP-10: planned and enqueued in the loop at once; the await ends after the fdatasync."""
    async with await _node_with_messages(tmp_path) as node:
        log = node.node.log
        held = log._ops = HeldFileOps()
        done = {}

        async def store():
            done["receipt"] = await node.change_flags(INBOX, [1, 2], "add", ["\\Seen"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(store)
            await anyio.to_thread.run_sync(held.entered.wait, 30)
            assert "receipt" not in done
            assert log._next_lsn - 1 > log.last_lsn  # enqueued by the loop, not durable yet
            held.release.set()
        receipt = done["receipt"]
        assert receipt.uids == (1, 2) and 0 < receipt.lsn <= log.last_lsn


async def test_a_failed_fdatasync_refuses_the_flag_change_and_the_store_answers_no(tmp_path):
    """IMAP-11: nothing acknowledged: StoreUnavailableError, NO [UNAVAILABLE] from the adapter."""
    async with await _node_with_messages(tmp_path) as node:
        node.node.log._ops = FaultyFileOps(fail_fdatasync_at=1)
        with pytest.raises(StoreUnavailableError):
            await node.change_flags(INBOX, [1], "add", ["\\Seen"])
        with pytest.raises(Unavailable):
            await NodeBackend(node).store(INBOX, [2], "add", frozenset({"\\Seen"}))


async def test_applied_waits_in_the_loop_for_the_store(tmp_path):
    async with await _node_with_messages(tmp_path) as node:
        n = node.node
        assert await node.applied(n.log.last_lsn)
        n._apply_lock.acquire()  # the applier waits: a durable record the store has not applied
        try:
            receipt = await node.change_flags(INBOX, [3], "add", ["\\Flagged"])
            assert n.applied_lsn < receipt.lsn
            with pytest.raises(ReadNotNow):
                n.imap_rows(INBOX, [3], now_after=receipt.lsn)
            assert not await node.applied(receipt.lsn, timeout=0.05)  # gives up: the caller reads in a thread
            waiting = {}

            async def wait():
                waiting["ok"] = await node.applied(receipt.lsn)

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await anyio.sleep(0.05)
                assert "ok" not in waiting
                n._apply_lock.release()  # the applier applies; its notice wakes the loop
                await _until(lambda: "ok" in waiting)
        finally:
            if n._apply_lock._is_owned():
                n._apply_lock.release()
        assert waiting["ok"] is True
        _, rows = n.imap_rows(INBOX, [3], now_after=receipt.lsn)
        assert "\\Flagged" in rows[0].flags


async def test_reads_that_would_wait_say_so_and_the_adapter_reads_in_a_thread(tmp_path):
    """A busy reader or more than INLINE_ROWS changes: ReadNotNow; the adapter's answer is the same."""
    async with await _node_with_messages(tmp_path, INLINE_ROWS + 2) as node:
        n = node.node
        lsn = n.log.last_lsn
        assert await node.applied(lsn)
        with pytest.raises(ReadNotNow):
            n.imap_changes(INBOX, 0, now_after=lsn, max_rows=INLINE_ROWS)
        info, rows, _ = n.imap_changes(INBOX, 0, now_after=lsn, max_rows=INLINE_ROWS + 2)
        assert [r.uid for r in rows] == list(range(1, INLINE_ROWS + 3))
        backend = NodeBackend(node)
        changes = await backend.changes(INBOX, 0)  # too many for the loop: read in a worker thread
        assert [m.uid for m in changes.changed] == [r.uid for r in rows]
        assert changes.highestmodseq == info.highestmodseq
        with n.store._read_lock:  # another thread's read holds the reader
            with pytest.raises(ReadNotNow):
                n.imap_changes(INBOX, info.highestmodseq - 1, now_after=lsn, max_rows=INLINE_ROWS)
            got = {}

            async def read():
                got["changes"] = await backend.changes(INBOX, info.highestmodseq - 1)

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await anyio.sleep(0.05)
                assert "changes" not in got  # waiting in a worker thread, not in the loop
                await anyio.to_thread.run_sync(n.store._read_lock.release)
                await _until(lambda: "changes" in got)
                await anyio.to_thread.run_sync(n.store._read_lock.acquire)
        assert [m.uid for m in got["changes"].changed] == [INLINE_ROWS + 2]
