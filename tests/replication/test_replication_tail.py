"""The master's shared tail buffer and AppendBatch's frames on the wire (REP-11, REP-20).

Unit tests of :class:`engine.replication.tail.TailBuffer` and of the LOG-4
frames an AppendBatch travels as, then live tests on 127.0.0.1 with real logs:
every record is read from disk once for all caught-up replicas, a replica
behind the buffer reads from disk and joins it, and a record that does not
chain onto the replica's log is refused loudly and appended never.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from functools import partial

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import replication as P
from engine.replication import messages
from engine.errors import LocalProtocolError, RemoteProtocolError
from engine.replication import AppendBatch
from engine.replication.receiver import ReplicaSettings, run_replica
from engine.replication.tail import TailBuffer, batch_cost
from engine.replication.sender import ReplicationHub, serve_replication
from tests.support.replication import SessionPair, chain, history
from wal import Log, LogReader
from wal.format import FRAME_HEADER_SIZE, decode_frame_header

SECRET = b"tail-replication-test-secret-42"
SERVER = dict(secret=SECRET, heartbeat_interval_s=0.1, idle_timeout_s=3.0, handshake_timeout_s=3.0)
REPLICA = dict(settings=ReplicaSettings(idle_timeout_s=3.0, handshake_timeout_s=3.0, connect_timeout_s=3.0,
                                        backoff_initial_s=0.02, backoff_max_s=0.3))


def batches(n_batches: int, per: int, size: int = 10) -> list[AppendBatch]:
    recs = chain(1, [bytes([i % 251]) * size for i in range(n_batches * per)])
    return [AppendBatch(tuple(recs[i * per : (i + 1) * per])) for i in range(n_batches)]


# -- AppendBatch frames (REP-11) --------------------------------------------------------


def test_append_batch_travels_as_log_frames():
    """REP-11: the body is {"frames": LOG-4 frames}, batch_back counted from the batch's first LSN."""
    recs = history(5, first_lsn=1)[2:]
    msg = AppendBatch(tuple(recs))
    frames = msg.frames()
    off = 0
    for r in recs:
        fh = decode_frame_header(frames, off)
        assert fh is not None
        assert (fh.lsn, fh.epoch, fh.type, fh.hash, fh.batch_back, fh.flags) == (r.lsn, r.epoch, r.type, r.hash,
                                                                                 r.lsn - recs[0].lsn, 0)
        assert frames[off + FRAME_HEADER_SIZE : off + fh.frame_size] == r.payload
        off += fh.frame_size
    assert off == len(frames)
    wire = P.encode_message(msg)
    decoded = P.decode_body(wire[4], wire[5:])
    assert decoded == msg and decoded.payload_bytes == msg.payload_bytes
    assert P.encode_message(decoded) == wire


def test_a_batch_is_encoded_once_whoever_it_goes_to():
    """REP-20: the master sends one batch object to every replica; its frame is computed once."""
    msg = AppendBatch(tuple(history(3)))
    first = P.encode_message(msg)
    assert P.encode_message(msg) is first
    pairs = [SessionPair(), SessionPair()]
    for pair in pairs:
        pair.stream_from([])
    sent = [pair.master.send(msg) for pair in pairs]
    assert sent[0] == sent[1] == first or sent[0].endswith(first)
    for pair, data in zip(pairs, sent):
        pair.replica.receive_data(data)
        assert pair.replica.next_event() == msg


def test_since_and_until_split_a_batch():
    msg = AppendBatch(tuple(history(6)))
    assert [r.lsn for r in msg.since(4).records] == [4, 5, 6]
    assert [r.lsn for r in msg.until(2).records] == [1, 2]
    assert msg.since(4).payload_bytes == sum(len(r.payload) for r in msg.records[3:])
    for bad in (1, 7):
        with pytest.raises(LocalProtocolError):
            msg.since(bad)
    for bad in (0, 6):
        with pytest.raises(LocalProtocolError):
            msg.until(bad)


def test_a_frame_with_a_bad_payload_length_is_refused():
    """REP-11: a header whose payload does not fit the string closes the connection."""
    msg = AppendBatch(tuple(history(2)))
    frames = bytearray(msg.frames())
    with pytest.raises(RemoteProtocolError, match="does not fit"):
        P.decode_body(13, messages._frames_envelope(len(frames) - 1) + bytes(frames[:-1]))
    with pytest.raises(RemoteProtocolError, match="at least one record"):
        P.decode_body(13, messages._frames_envelope(0))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=20), st.integers(1, 10**9))
def test_frames_round_trip(payloads, first_lsn):
    recs = chain(first_lsn, payloads)
    msg = AppendBatch(tuple(recs))
    wire = P.encode_message(msg)
    assert P.decode_body(wire[4], wire[5:]) == msg


# -- TailBuffer ----------------------------------------------------------------------------


def test_take_reads_from_the_asked_lsn():
    tail = TailBuffer(1 << 20)
    assert tail.take(1, 1 << 20) is None  # empty: read from disk
    bs = batches(4, 5)
    tail.extend(bs)
    assert (tail.start_lsn, tail.end_lsn, len(tail)) == (1, 20, 4)
    got = tail.take(1, 1 << 20)
    assert got == bs and got[0] is bs[0]  # the shared objects themselves (encoded once)
    got = tail.take(8, 1 << 20)
    assert [r.lsn for b in got for r in b.records] == list(range(8, 21))
    assert tail.take(21, 1 << 20) == []  # past the end: wait for more
    got = tail.take(6, 10)  # the payload bound stops after the first batch
    assert [r.lsn for b in got for r in b.records] == list(range(6, 11))


def test_extend_refuses_a_gap():
    tail = TailBuffer(1 << 20)
    bs = batches(3, 2)
    tail.extend([bs[0]])
    with pytest.raises(ValueError, match="starts at LSN 5"):
        tail.extend([bs[2]])
    assert tail.end_lsn == 2


def test_the_buffer_stays_within_its_bound_and_keeps_the_newest():
    bs = batches(50, 4, size=100)
    one = batch_cost(bs[0])
    tail = TailBuffer(10 * one)
    for b in bs:
        tail.extend([b])
        assert tail.cost <= 10 * one
        assert tail.end_lsn == b.last_lsn
    assert len(tail) == 10 and tail.start_lsn == bs[40].first_lsn and tail.evicted_batches == 40
    assert tail.take(1, 1 << 20) is None  # evicted: from disk
    big = TailBuffer(1)
    big.extend(bs[:3])
    assert len(big) == 1 and big.end_lsn == bs[2].last_lsn  # the newest batch stays, even over the bound


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=30), st.integers(1, 4000), st.data())
def test_take_never_skips_or_repeats(sizes, bound, data):
    recs = chain(1, [b"p%d" % i for i in range(sum(sizes))])
    tail = TailBuffer(bound)
    i = 0
    for n in sizes:
        tail.extend([AppendBatch(tuple(recs[i : i + n]))])
        i += n
    assert tail.cost <= bound or len(tail) == 1
    lsn = data.draw(st.integers(1, len(recs) + 1))
    got = tail.take(lsn, data.draw(st.integers(1, 100)))
    if lsn < tail.start_lsn:
        assert got is None
    elif lsn > tail.end_lsn:
        assert got == []
    else:
        lsns = [r.lsn for b in got for r in b.records]
        assert lsns == list(range(lsn, lsn + len(lsns))) and lsns


# -- live (real sockets, real logs) ---------------------------------------------------


def assert_identical(master: Log, path) -> None:
    want = [(r.lsn, r.hash, r.payload) for r in master.read(1)]
    reader = LogReader(str(path))
    got = [(r.lsn, r.hash, r.payload) for r in reader.records(1)]
    assert got == want


@pytest.mark.anyio
async def test_caught_up_replicas_share_one_read_of_each_record(tmp_path):
    """REP-20: once caught up, two replicas are fed from one read of each record."""
    master = Log.create(str(tmp_path / "m.wal"))
    try:
        for i in range(20):
            master.append(1, b"before %d" % i)
        hub = ReplicationHub(master)
        paths = [tmp_path / "r1.wal", tmp_path / "r2.wal"]
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                host, port = await tg.start(partial(serve_replication, master, hub, **SERVER))
                links = [await tg.start(partial(run_replica, str(p), host, port, SECRET, f"r{i}", **REPLICA))
                         for i, p in enumerate(paths, 1)]
                for link in links:
                    await link.wait_durable(20)
                reads_before, records_before = hub.tail_reads, hub.tail_records
                disk_before = hub.disk_batches
                for i in range(200):  # one record per fsync: 200 small batches
                    await anyio.to_thread.run_sync(master.append, 2, os.urandom(50))
                    if i % 20 == 0:
                        for link in links:
                            await link.wait_durable(master.last_lsn)
                for link in links:
                    await link.wait_durable(master.last_lsn)
                tg.cancel_scope.cancel()
        for p in paths:
            assert_identical(master, p)
        # Each of the 200 new records was read from the log once, for both replicas.
        assert hub.tail_records - records_before == 200
        assert hub.disk_batches == disk_before
        assert hub.tail_reads - reads_before <= 200
    finally:
        master.close()


@pytest.mark.anyio
async def test_a_replica_behind_the_buffer_reads_from_disk_then_joins_it(tmp_path):
    """REP-20: a small buffer; a late replica catches up from disk and then from the buffer."""
    master = Log.create(str(tmp_path / "m.wal"), segment_max_bytes=64 * 1024)
    try:
        hub = ReplicationHub(master, tail_max_bytes=8 * 1024)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                host, port = await tg.start(partial(serve_replication, master, hub, **SERVER))
                early = await tg.start(partial(run_replica, str(tmp_path / "r1.wal"), host, port, SECRET, "r1",
                                               **REPLICA))
                for i in range(300):
                    await anyio.to_thread.run_sync(master.append_many, [(1, os.urandom(400))] * 3)
                await early.wait_durable(master.last_lsn)
                assert hub.tail.cost <= 8 * 1024 or len(hub.tail) == 1
                disk_before = hub.disk_batches
                late = await tg.start(partial(run_replica, str(tmp_path / "r2.wal"), host, port, SECRET, "r2",
                                              **REPLICA))
                for i in range(30):
                    await anyio.to_thread.run_sync(master.append, 1, os.urandom(100))
                for link in (early, late):
                    await link.wait_durable(master.last_lsn)
                tg.cancel_scope.cancel()
        assert hub.disk_batches > disk_before  # the late one started from disk
        assert hub.tail.evicted_batches > 0
        for name in ("r1.wal", "r2.wal"):
            assert_identical(master, tmp_path / name)
    finally:
        master.close()


@pytest.mark.anyio
async def test_a_record_that_does_not_chain_is_refused_loudly(tmp_path, caplog):
    """REP-11 / INV-NoGapNoDuplicate: the session does not check hashes, the replica's
    append does: nothing is appended, an error names the LSNs, and once the master
    sends the right bytes the replica catches up."""
    master = Log.create(str(tmp_path / "m.wal"))
    try:
        for i in range(10):
            master.append(1, b"good %d" % i)
        hub = ReplicationHub(master)
        real_fill = hub._fill_tail
        real_read = None
        faulty = {"on": True}

        def corrupt(recs):
            return [dataclasses.replace(r, payload=b"evil") if r.lsn == 15 and faulty["on"] else r for r in recs]

        def fill(lsn, prev_hash, poll_s):  # fault injection: flip LSN 15's payload on its way out
            got = real_fill(lsn, prev_hash, poll_s)
            if not got:
                return got
            return P.batch_records(corrupt([r for b in got for r in b.records]))

        hub._fill_tail = fill
        path = tmp_path / "r.wal"
        caplog.set_level(logging.ERROR, logger="mailwal.replication")
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                host, port = await tg.start(partial(serve_replication, master, hub, **SERVER))
                import engine.replication.sender as sender_mod

                real_read = sender_mod._Server._read_batch

                def read_batch(self, first, last):
                    return corrupt(real_read(self, first, last))

                sender_mod._Server._read_batch = read_batch
                try:
                    link = await tg.start(partial(run_replica, str(path), host, port, SECRET, "r", **REPLICA))
                    await link.wait_durable(10)
                    for i in range(10):
                        await anyio.to_thread.run_sync(master.append, 1, b"more %d" % i)
                    while not any("do not extend this log" in r.getMessage() for r in caplog.records):
                        await anyio.sleep(0.02)
                    assert 10 <= link.log.last_lsn < 15  # records before the bad one at most, nothing from it on
                    faulty["on"] = False
                    hub.tail.clear()
                    await link.wait_durable(20)
                finally:
                    sender_mod._Server._read_batch = real_read
                tg.cancel_scope.cancel()
        msg = next(r.getMessage() for r in caplog.records if "do not extend this log" in r.getMessage())
        assert "15" in msg
        assert_identical(master, path)
    finally:
        master.close()
