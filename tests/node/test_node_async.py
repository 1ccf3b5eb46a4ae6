"""AsyncNode (engine/asyncnode.py): the anyio face over Node, and the examples of docs/embedding.md.

Faults are injected through the log's FileOps (tests/helpers.FaultyFileOps):
the only way to make a real fdatasync fail on demand without root.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import anyio
import pytest

from engine.node import AsyncNode
from engine.store.errors import StoreUnavailableError, UnknownMailboxError
from engine.node import Node
from tests.support.helpers import FaultyFileOps
from tests.support.lmtp import ROOT

pytestmark = pytest.mark.anyio


async def test_concurrent_deliveries_share_fsyncs_and_are_durable_on_return(tmp_path):
    async with await AsyncNode.init(str(tmp_path / "n")) as node:
        await node.create_mailbox("user/a/INBOX")
        before = node.node.log.fsync_count
        receipts = []

        async def one(i):
            r = await node.deliver("user/a/INBOX", b"Subject: %d\r\n\r\nx\r\n" % i)
            assert node.node.log.last_lsn >= r.lsn  # durable when the await returns
            receipts.append(r)

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        assert sorted(r.uid for r in receipts) == list(range(1, 201))
        assert node.node.log.fsync_count - before < 200  # group commit: fewer fsyncs than deliveries
        msgs = await node.list_messages("user/a/INBOX")
        assert {m.guid for m in msgs} == {r.guid for r in receipts}


async def test_busy_state_lock_falls_back_to_a_worker_thread(tmp_path):
    async with await AsyncNode.init(str(tmp_path / "n")) as node:
        await node.create_mailbox("user/a/INBOX")
        held, release = threading.Event(), threading.Event()

        def hold():
            with node.node._state_lock:
                held.set()
                release.wait(10)

        t = threading.Thread(target=hold)
        t.start()
        held.wait(10)
        async with anyio.create_task_group() as tg:
            result = {}

            async def deliver():
                result["r"] = await node.deliver("user/a/INBOX", b"blocked\r\n")

            tg.start_soon(deliver)
            await anyio.sleep(0.05)
            assert "r" not in result  # waiting in a worker thread, the event loop is free
            release.set()
        t.join()
        assert result["r"].uid == 1


async def test_request_errors_and_per_target_results(tmp_path):
    async with await AsyncNode.init(str(tmp_path / "n")) as node:
        with pytest.raises(UnknownMailboxError):
            await node.deliver("user/nobody/INBOX", b"x\r\n")
        results = await node.deliver_many([("user/a/INBOX", ()), ("bad//name", ())], b"y\r\n", create=True)
        assert results[0].uid == 1 and isinstance(results[1], Exception)
        again = await node.deliver("user/a/INBOX", b"y\r\n")
        assert again.duplicate and again.uid == 1


async def test_a_failed_fsync_fails_every_waiting_delivery_and_later_ones(tmp_path):
    async with await AsyncNode.init(str(tmp_path / "n")) as node:
        await node.create_mailbox("user/a/INBOX")
        node.node.log._ops = FaultyFileOps(fail_fdatasync_at=1)
        outcomes = []

        async def one(i):
            try:
                await node.deliver("user/a/INBOX", b"m%d\r\n" % i)
                outcomes.append("ok")
            except StoreUnavailableError:
                outcomes.append("unavailable")

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
        assert outcomes == ["unavailable"] * 20
        with pytest.raises(StoreUnavailableError):
            await node.deliver("user/a/INBOX", b"later\r\n")
    # Reopened: the written-but-unsynced batch may or may not have survived
    # (it was never acknowledged). The MTA's retries then store each message
    # exactly once: a survivor answers as a duplicate.
    with Node.open(str(tmp_path / "n")) as n:
        for i in range(20):
            n.deliver("user/a/INBOX", b"m%d\r\n" % i)
        guids = [m.guid for m in n.list_messages("user/a/INBOX")]
        assert len(guids) == len(set(guids)) == 20


def test_duplicate_of_an_in_flight_delivery_waits_for_its_fsync(tmp_path):
    """LMTP-12"""
    with Node.init(str(tmp_path / "n")) as n:
        n.create_mailbox("user/a/INBOX")
        first = n.plan_deliveries([("user/a/INBOX", ())], b"same\r\n")
        second = n.plan_deliveries([("user/a/INBOX", ())], b"same\r\n")
        assert second.results[0].duplicate and second.results[0].uid == first.results[0].uid
        assert second.sync_lsn >= first.results[0].lsn > n.log.last_lsn  # not durable yet: must sync first
        n.wait_durable(second.sync_lsn)
        assert n.log.last_lsn >= first.results[0].lsn


def test_plan_deliveries_without_blocking_gives_up_on_a_busy_lock(tmp_path):
    with Node.init(str(tmp_path / "n")) as n:
        n.create_mailbox("user/a/INBOX")
        with n._state_lock:
            got = []
            t = threading.Thread(target=lambda: got.append(
                n.plan_deliveries([("user/a/INBOX", ())], b"x\r\n", blocking=False)))
            t.start()
            t.join()
        assert got == [None]


# -- the examples of docs/embedding.md run as documented ------------------------------------


def _embedding_examples() -> list[str]:
    text = open(os.path.join(ROOT, "docs", "embedding.md"), encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_docs_have_blocking_and_async_examples():
    examples = _embedding_examples()
    assert len(examples) >= 2
    assert any("Node.init" in e for e in examples) and any("AsyncNode" in e for e in examples)


@pytest.mark.parametrize("index", range(len(_embedding_examples())))
def test_docs_embedding_example_runs(index, tmp_path):
    code = _embedding_examples()[index]
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.strip()
