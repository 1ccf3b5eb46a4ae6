"""Replication through a fault-injecting proxy (tests/faultproxy.py, FAULTS.md N7).

Each test puts :class:`FaultProxy` between a replica and its master, breaks
the link in one way, restores it, and checks that the replica reconnected by
itself and ended identical to the master: no gaps, no duplicates (REP-11,
REP-19, INV-PrefixAgreement, INV-NoGapNoDuplicate).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import anyio
import pytest

from engine.replication.receiver import run_replica
from engine.replication.sender import ReplicationHub, serve_replication
from tools.torture.faultproxy import FaultProxy
from tests.replication.test_replication_live import REPLICA, SECRET, SERVER, append_from_threads, assert_identical
from wal import Log

pytestmark = pytest.mark.anyio


@pytest.fixture
def master(tmp_path):
    log = Log.create(str(tmp_path / "master.wal"))
    yield log
    log.close()


class Rig:
    """A master, a proxy in front of it, and one replica behind the proxy."""

    def __init__(self, tg, master: Log, path: str, server_kw: dict, replica_kw: dict):
        self.tg, self.master, self.path = tg, master, path
        self.server_kw, self.replica_kw = server_kw, replica_kw
        self.hub = ReplicationHub(master)

    async def start(self) -> "Rig":
        host, port = await self.tg.start(self._serve)
        self.proxy = FaultProxy(host, port)
        pport = await self.tg.start(self.proxy.serve)
        self.link = await self.tg.start(partial(run_replica, self.path, "127.0.0.1", pport, SECRET, "r1", **self.replica_kw))
        return self

    async def _serve(self, *, task_status):
        self.server_scope = anyio.CancelScope()
        with self.server_scope:
            await serve_replication(self.master, self.hub, task_status=task_status, **self.server_kw)

    async def caught_up(self) -> None:
        await self.link.wait_durable(self.master.last_lsn)
        await self.hub.wait_replicated(self.master.last_lsn, 1, 20)


async def _run(master, tmp_path, body, server_kw=SERVER, replica_kw=REPLICA):
    path = str(tmp_path / "r1.wal")
    with anyio.fail_after(40):
        async with anyio.create_task_group() as tg:
            rig = await Rig(tg, master, path, server_kw, replica_kw).start()
            await body(rig)
            await rig.caught_up()
            tg.cancel_scope.cancel()
    assert_identical(master, path)
    return rig


async def test_cut_mid_frame(tmp_path, master):
    """A FIN in the middle of a batch frame: the replica sees a torn frame,
    drops it (nothing of it is appended), reconnects and resumes."""
    async def body(rig):
        await append_from_threads(master, 1, 5, size=6000)
        await rig.caught_up()
        rig.proxy.cut_after(1500, reset=False)  # batches here are > 3000 bytes: 1500 is inside one
        await append_from_threads(master, 2, 20, size=6000)
        await rig.proxy.wait_connections(2)

    rig = await _run(master, tmp_path, body)
    assert rig.proxy.cuts == 1 and rig.link.connects == 2
    assert "middle of a frame" in rig.link.last_error


async def test_connection_reset_while_streaming(tmp_path, master):
    async def body(rig):
        async with anyio.create_task_group() as tg:
            tg.start_soon(append_from_threads, master, 3, 100)
            await rig.link.wait_durable(50)
            rig.proxy.cut_all(reset=True)
        await rig.proxy.wait_connections(2)

    rig = await _run(master, tmp_path, body)
    assert rig.link.connects >= 2 and master.last_lsn == 300


async def test_one_byte_writes(tmp_path, master):
    """Every frame, handshake included, arrives one byte at a time."""
    async def body(rig):
        rig.proxy.cut_all(reset=True)
        rig.proxy.set_mode("slice")
        await append_from_threads(master, 2, 40, size=20)
        await rig.proxy.wait_connections(2)

    await _run(master, tmp_path, body)


async def test_delayed_link(tmp_path, master):
    async def body(rig):
        rig.proxy.set_mode("delay", delay_s=0.02)
        await append_from_threads(master, 2, 50)

    await _run(master, tmp_path, body)


async def test_blackhole_then_restore(tmp_path, master):
    """A hung link is noticed by the idle timeout on both sides (REP-19)."""
    quick_server = dict(SERVER, heartbeat_interval_s=0.05, idle_timeout_s=0.5, handshake_timeout_s=0.5)
    quick_replica = dict(settings=replace(REPLICA["settings"], idle_timeout_s=0.5, handshake_timeout_s=0.5))

    async def body(rig):
        await append_from_threads(master, 1, 10)
        await rig.caught_up()
        rig.proxy.set_mode("blackhole")
        await append_from_threads(master, 2, 30)
        await rig.link.wait_state("backoff")  # the replica gave up on the silent link
        await rig.proxy.wait_connections(rig.proxy.accepted + 1)  # and is trying again
        rig.proxy.set_mode("pass")

    rig = await _run(master, tmp_path, body, quick_server, quick_replica)
    assert rig.link.connects >= 2
    assert "no message from the master" in rig.link.last_error


async def test_refused_connections_then_restore(tmp_path, master):
    async def body(rig):
        rig.proxy.set_mode("refuse")
        rig.proxy.cut_all(reset=True)
        seen = rig.proxy.accepted
        await append_from_threads(master, 1, 30)
        await rig.proxy.wait_connections(seen + 3)  # three refused attempts, with backoff
        assert not rig.link.connected
        rig.proxy.set_mode("pass")

    rig = await _run(master, tmp_path, body)
    assert rig.link.connects == 2


async def test_master_restart(tmp_path, master):
    """The master's server dies and comes back on another port; the replica follows."""
    async def body(rig):
        await append_from_threads(master, 1, 20)
        await rig.caught_up()
        rig.server_scope.cancel()  # the server stops: its connections end, cursors are flushed
        while rig.link.connected:
            await rig.link._changed.wait()
        assert master.cursors.get("replica.r1") == 20
        await append_from_threads(master, 2, 20)
        rig.hub = ReplicationHub(master)  # a restarted master reads the cursors back
        assert rig.hub.replica("r1").durable_lsn == 20
        host, port = await rig.tg.start(rig._serve)
        rig.proxy.retarget(host, port)

    rig = await _run(master, tmp_path, body)
    assert rig.link.connects >= 2


async def test_a_stalled_replica_does_not_hold_back_the_master_or_others(tmp_path, master):
    """REP-20: a replica that stops reading costs the master a bounded outbox, nothing more."""
    hub = ReplicationHub(master)
    slow_kw = dict(settings=replace(REPLICA["settings"], idle_timeout_s=30.0))
    with anyio.fail_after(40):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(partial(serve_replication, master, hub, **dict(SERVER, idle_timeout_s=30.0)))
            proxy = FaultProxy(host, port)
            pport = await tg.start(proxy.serve)
            stalled = await tg.start(partial(run_replica, str(tmp_path / "stalled.wal"), "127.0.0.1", pport, SECRET,
                                             "stalled", **slow_kw))
            fast = await tg.start(partial(run_replica, str(tmp_path / "fast.wal"), host, port, SECRET, "fast", **REPLICA))
            proxy.set_mode("blackhole")
            await append_from_threads(master, 4, 100, size=20_000)  # 8 MB the stalled replica never reads
            await fast.wait_durable(master.last_lsn)
            assert await hub.wait_replicated(master.last_lsn, 1, 20) == ["fast"]
            assert stalled.durable_lsn == 0 and stalled.connected
            while hub.replica("stalled").lag_bytes == 0:  # shipped into the void, never acked
                await hub.wait_changed()
            assert hub.replica("stalled").lag_seconds > 0 and hub.replica("stalled").connected
            assert hub.replica("fast").lag_records == 0 and hub.replica("stalled").lag_records == 400
            proxy.set_mode("pass")
            await stalled.wait_durable(master.last_lsn)
            tg.cancel_scope.cancel()
    assert_identical(master, tmp_path / "fast.wal")
    assert_identical(master, tmp_path / "stalled.wal")
