"""Epochs, epoch history and the fork point (specs/reconcile.md REC-1..REC-3)."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wal
from wal.errors import EpochHistoryError, ForeignLogError, ForkUnknownError
from wal.fork import find_fork, search_fork
from wal.history import (
    EPOCHS_FILE,
    EpochEntry,
    read_history,
    read_history_file,
    start_epoch,
    sync_history,
    write_history,
)
from wal.seek import SeekReader

SMALL_SEGMENTS = 64 * 1024


def payload(rng: random.Random, tag: str, i: int) -> bytes:
    size = rng.choice([0, 3, 40, 200, 1500, 9000])
    head = f"{tag}:{i}:".encode()
    return (head + bytes(rng.getrandbits(8) for _ in range(min(size, 64)))).ljust(size, b"\x00")


def append_n(log: wal.Log, n: int, tag: str, rng: random.Random, batch: int = 7) -> None:
    items = [(4, payload(rng, tag, i)) for i in range(n)]
    for k in range(0, len(items), batch):
        log.append_many(items[k:k + batch])


def brute_fork(a: str, b: str) -> int:
    """The fork point by reading both logs from the start (the definition, REC-1)."""
    fork = 0
    for x, y in zip(wal.LogReader(a).records(1), wal.LogReader(b).records(1)):
        if x.hash != y.hash:
            break
        fork = x.lsn
    return fork


def fork_pair(tmp_path, shared: int, seg: int = SMALL_SEGMENTS, seed: int = 1):
    rng = random.Random(seed)
    a, b = str(tmp_path / "a.wal"), str(tmp_path / "b.wal")
    log = wal.Log.create(a, segment_max_bytes=seg)
    append_n(log, shared, "shared", rng)
    log.close()
    shutil.copytree(a, b)
    return a, b, rng


def open_log(path: str, seg: int = SMALL_SEGMENTS) -> wal.Log:
    return wal.Log.open(path, segment_max_bytes=seg)


# ---------------------------------------------------------------------------
# REC-2: the history


def test_rec2_start_epoch_writes_epoch_and_history(tmp_path):
    a, _, rng = fork_pair(tmp_path, 10)
    with open_log(a) as log:
        entry = start_epoch(log, 3)
        assert entry == EpochEntry(3, 11, log.last_hash)
        assert log.epoch == 3
        appended = log.append(4, b"first of epoch 3")
        assert appended.epoch == 3 and appended.lsn == 11
    assert open(os.path.join(a, "EPOCH")).read().strip() == "3"
    assert read_history_file(a) == [EpochEntry(1, 1, wal.ZERO_HASH), entry]
    assert read_history(a) == [EpochEntry(1, 1, wal.ZERO_HASH), entry]


def test_rec2_start_epoch_refuses_a_lower_or_equal_epoch(tmp_path):
    a, _, _ = fork_pair(tmp_path, 3)
    with open_log(a) as log:
        start_epoch(log, 2)
        for bad in (1, 2):
            with pytest.raises(wal.WalError, match="must exceed"):
                start_epoch(log, bad)


def test_rec2_crash_between_epoch_and_epochs_is_inferred(tmp_path):
    a, _, rng = fork_pair(tmp_path, 5)
    with open_log(a) as log:
        h = log.last_hash
        log.set_epoch(4)  # EPOCH written, EPOCHS not: the crash window
    assert read_history(a)[-1] == EpochEntry(4, 6, h)
    with open_log(a) as log:
        assert log.epoch == 4
        log.append(4, b"x")
    assert read_history(a)[-1] == EpochEntry(4, 6, h)


def test_rec2_replica_history_is_completed_from_records(tmp_path):
    """A replica copies records of new epochs; its history finds their first LSNs by bisection."""
    a, b, rng = fork_pair(tmp_path, 40)
    with open_log(a) as master:
        for epoch, n in ((2, 13), (3, 1), (5, 29)):
            start_epoch(master, epoch)
            append_n(master, n, f"e{epoch}", rng)
        want = read_history(a)
        records = list(master.read(41))
    with open_log(b) as replica:
        replica.append_records(records)
        assert read_history_file(b) == []
        got = read_history(b)
        assert got == want
        assert [e.epoch for e in got] == [1, 2, 3, 5]
        assert sync_history(replica) == want
    assert read_history_file(b) == want


def test_rec2_damaged_history_file_is_loud(tmp_path):
    a, _, _ = fork_pair(tmp_path, 3)
    with open(os.path.join(a, EPOCHS_FILE), "w") as f:
        f.write("{not json")
    with pytest.raises(EpochHistoryError, match="EPOCHS"):
        read_history(a)
    with open(os.path.join(a, EPOCHS_FILE), "w") as f:
        json.dump({"format": 1, "epochs": [[2, 5, "00" * 32], [1, 9, "00" * 32]]}, f)
    with pytest.raises(EpochHistoryError, match="increase"):
        read_history(a)
    with pytest.raises(EpochHistoryError):
        write_history(a, [EpochEntry(2, 5, bytes(32)), EpochEntry(2, 6, bytes(32))])


# ---------------------------------------------------------------------------
# REC-1: the fork point


def test_rec1_identical_logs_fork_at_their_end(tmp_path):
    a, b, _ = fork_pair(tmp_path, 50)
    s = search_fork(a, b)
    assert s.fork.lsn == 50 and not s.diverged
    assert s.fork.hash == wal.LogReader(a).hash_at(50)
    assert s.fork.epoch == 1


def test_rec1_prefix_is_not_diverged(tmp_path):
    a, b, rng = fork_pair(tmp_path, 30)
    with open_log(b) as log:
        append_n(log, 17, "more", rng)
    s = search_fork(a, b)
    assert (s.fork.lsn, s.last_a, s.last_b, s.diverged) == (30, 30, 47, False)


def test_rec1_empty_log_is_a_prefix_of_any_log(tmp_path):
    a = str(tmp_path / "a.wal")
    wal.Log.create(a).close()
    b = str(tmp_path / "b.wal")
    shutil.copytree(a, b)
    with open_log(b) as log:
        log.append(4, b"x")
    s = search_fork(a, b)
    assert (s.fork.lsn, s.fork.epoch, s.fork.hash, s.diverged) == (0, 0, wal.ZERO_HASH, False)


def test_rec1_diverged_in_one_epoch(tmp_path):
    a, b, rng = fork_pair(tmp_path, 200)
    with open_log(a) as la, open_log(b) as lb:
        append_n(la, 11, "A", rng)
        append_n(lb, 5, "B", rng)
    s = search_fork(a, b)
    assert s.fork.lsn == 200 == brute_fork(a, b)
    assert s.diverged
    assert find_fork(a, b) == s.fork


def test_rec1_same_payloads_in_different_epochs_differ(tmp_path):
    """LOG-5: the epoch is inside the hash, so identical payloads fork anyway."""
    a, b, _ = fork_pair(tmp_path, 20)
    with open_log(a) as la, open_log(b) as lb:
        start_epoch(lb, 2)
        for log in (la, lb):
            log.append_many([(4, b"same"), (4, b"same too")])
    assert find_fork(a, b).lsn == 20


def test_rec1_foreign_logs_are_refused(tmp_path):
    a, b = str(tmp_path / "a.wal"), str(tmp_path / "b.wal")
    for p in (a, b):
        with wal.Log.create(p) as log:
            log.append(4, b"same bytes")
    with pytest.raises(ForeignLogError, match="different logs"):
        find_fork(a, b)


def test_rec1_fork_below_retention_is_unknown(tmp_path):
    a, b, rng = fork_pair(tmp_path, 300, seg=4096)
    with open_log(a, 4096) as la, open_log(b, 4096) as lb:
        append_n(la, 100, "A", rng)
        append_n(lb, 100, "B", rng)
        assert la.segment_count() > 3
        la.drop_before(390, force=True)
        lb.drop_before(390, force=True)
    assert SeekReader(a).first_lsn() > 300
    with pytest.raises(ForkUnknownError, match="retention"):
        find_fork(a, b)


def test_rec1_fork_above_retention_is_found(tmp_path):
    a, b, rng = fork_pair(tmp_path, 300, seg=4096)
    with open_log(a, 4096) as la, open_log(b, 4096) as lb:
        la.drop_before(250, force=True)
        append_n(la, 30, "A", rng)
        append_n(lb, 30, "B", rng)
    assert SeekReader(a).first_lsn() > 1
    assert find_fork(a, b).lsn == 300


# ---------------------------------------------------------------------------
# REC-3: several epochs, and what the search reads


def test_rec3_failover_fork_is_an_epoch_boundary(tmp_path):
    """Old master A keeps 991..1000 of epoch 1; promoted B starts epoch 2 at 991."""
    a, b, rng = fork_pair(tmp_path, 990, seg=1 << 20)
    with open_log(a, 1 << 20) as la, open_log(b, 1 << 20) as lb:
        append_n(la, 10, "lost", rng)
        start_epoch(lb, 2)
        append_n(lb, 210, "new master", rng)
    s = search_fork(a, b)
    assert s.fork.lsn == 990 == brute_fork(a, b)
    assert s.fork.epoch == 1
    assert [n for n, _ in s.steps] == [0, 1000, 990, 991]  # REC-3: the history answers in a few probes


def test_rec3_double_failover_a_b_a(tmp_path):
    """A (epoch 1) -> B promoted (epoch 2) -> A promoted again (epoch 3) from B's history."""
    a, b, rng = fork_pair(tmp_path, 100)
    with open_log(a) as la, open_log(b) as lb:
        append_n(la, 7, "A lost in epoch 1", rng)
        start_epoch(lb, 2)
        append_n(lb, 60, "B epoch 2", rng)
    # A is repaired to B's history (its lost tail is kept aside), then replicates B.
    a2 = str(tmp_path / "a2.wal")
    shutil.copytree(b, a2)
    with open_log(b) as lb:
        append_n(lb, 9, "B unreplicated", rng)
    with open_log(a2) as la2:
        start_epoch(la2, 3)
        append_n(la2, 44, "A epoch 3", rng)
    s = search_fork(a2, b)
    assert s.fork.lsn == 160 == brute_fork(a2, b)
    assert s.fork.epoch == 2
    assert [e.epoch for e in s.history_a] == [1, 2, 3]
    assert [e.epoch for e in s.history_b] == [1, 2]
    # and the original A against both
    assert find_fork(a, b).lsn == 100 == brute_fork(a, b)
    assert find_fork(a, a2).lsn == 100 == brute_fork(a, a2)


def test_rec3_sibling_epochs(tmp_path):
    """Split brain: B and C both promoted to epoch 2 from different points."""
    a, b, rng = fork_pair(tmp_path, 80)
    c = str(tmp_path / "c.wal")
    with open_log(b) as lb:
        append_n(lb, 5, "replicated to C only partly", rng)
    shutil.copytree(b, c)
    with open_log(b) as lb, open_log(c) as lc:
        append_n(lb, 3, "only B", rng)
        start_epoch(lb, 2)
        append_n(lb, 20, "B epoch 2", rng)
        start_epoch(lc, 2)
        append_n(lc, 31, "C epoch 2", rng)
    s = search_fork(b, c)
    assert s.fork.lsn == 85 == brute_fork(b, c)
    assert s.history_b[-1].first_lsn == 86 and s.history_a[-1].first_lsn == 89


@pytest.mark.heavy
def test_rec3_fork_search_reads_few_records(tmp_path):
    """Tens of thousands of records diverging at the end: the search reads O(log n) of them."""
    a, b = str(tmp_path / "a.wal"), str(tmp_path / "b.wal")
    with wal.Log.create(a) as log:
        items = [(4, b"shared record %08d " % i + b"." * 80) for i in range(40_000)]
        for k in range(0, len(items), 4000):
            log.append_many(items[k:k + 4000])
    shutil.copytree(a, b)
    with wal.Log.open(a) as la, wal.Log.open(b) as lb:
        la.append_many([(4, b"A %d" % i) for i in range(150)])
        lb.append_many([(4, b"B %d" % i) for i in range(90)])
    size = sum(os.path.getsize(os.path.join(a, n)) for n in os.listdir(a) if n.endswith(".seg"))

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar"))

    before = rchar()
    ra, rb = SeekReader(a), SeekReader(b)
    s = search_fork(a, b, reader_a=ra, reader_b=rb)
    read_through_syscalls = rchar() - before
    assert s.fork.lsn == 40_000
    assert s.probes <= 40
    assert ra.records_read + rb.records_read <= 600  # frames touched, headers included
    assert s.bytes_read == ra.bytes_read + rb.bytes_read < 0.01 * 2 * size
    assert read_through_syscalls < 0.01 * 2 * size  # nothing else read behind the reader's back


MIB = 1 << 20
LARGE_SEGMENTS = 8 * MIB  # 7 records of 1 MiB each


def large_fork_pair(tmp_path, shared: int = 24, tail_a: int = 4, tail_b: int = 3):
    """Two logs of 1 MiB records sharing ``shared`` of them; B diverges in epoch 2 (a failover)."""
    a, b = str(tmp_path / "a.wal"), str(tmp_path / "b.wal")
    with wal.Log.create(a, segment_max_bytes=LARGE_SEGMENTS) as log:
        for i in range(shared):
            log.append(4, (b"shared %d " % i).ljust(MIB, b"s"))
    shutil.copytree(a, b)
    with open_log(a, LARGE_SEGMENTS) as la, open_log(b, LARGE_SEGMENTS) as lb:
        start_epoch(lb, 2)
        for i in range(tail_a):
            la.append(4, (b"A %d " % i).ljust(MIB, b"a"))
        for i in range(tail_b):
            lb.append(4, (b"B %d " % i).ljust(MIB, b"b"))
    return a, b


def test_rec3_fork_search_reads_headers_only_whatever_the_message_sizes(tmp_path):
    """Comparing record hashes needs frame headers only (LOG-4): with 1 MiB records the
    probes read a few headers per probe, and each log's end costs its last record."""
    a, b = large_fork_pair(tmp_path)
    from wal.format import FRAME_HEADER_SIZE

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar"))

    before = rchar()
    ra, rb = SeekReader(a), SeekReader(b)
    s = search_fork(a, b, reader_a=ra, reader_b=rb)
    read_through_syscalls = rchar() - before
    assert s.fork.lsn == 24 == brute_fork(a, b)
    assert (s.last_a, s.last_b) == (28, 27)
    assert s.bytes_read == ra.bytes_read + rb.bytes_read == s.end_bytes_read + s.probe_bytes_read
    # A lookup walks the headers of at most one segment's records (7 here): no payload byte.
    assert s.probe_bytes_read <= 8 * s.probes * FRAME_HEADER_SIZE
    # Each end: the last record whole (only its hash tells it from a torn write, LOG-8),
    # plus the look for a frame near the end and the last segment's headers.
    assert s.end_bytes_read <= 2 * (MIB + 64 * 1024)
    assert read_through_syscalls < s.bytes_read + 64 * 1024  # nothing read behind the readers' backs


def test_rec3_fork_search_stops_at_a_bad_frame_header_with_its_place(tmp_path):
    """A header on the probes' way that fails its check is damage: the search
    stops with segment, offset and LSN (LOG-9), and does not step over it."""
    a, b = large_fork_pair(tmp_path)
    with SeekReader(a) as r:
        seg, off, fh = r.locate(22)  # in the segment of the fork (LSNs 22-28)
        assert fh.lsn == 22
    with open(os.path.join(a, seg), "r+b") as f:
        f.seek(off + 4)  # the LSN field: the head CRC no longer matches
        f.write(b"\xff")
    with pytest.raises(wal.CorruptRecordError) as info:
        search_fork(a, b)
    assert (info.value.segment, info.value.offset, info.value.lsn) == (seg, off, 22)
    assert "frame header" in info.value.reason


def test_rec3_the_end_of_a_log_of_large_records_is_its_last_verified_record(tmp_path):
    """LOG-8: a last record whose payload does not hash (a torn write) is not the end;
    one cut short is not either."""
    a, _ = large_fork_pair(tmp_path, shared=10, tail_a=0, tail_b=0)
    last_seg = sorted(n for n in os.listdir(a) if n.endswith(".seg"))[-1]
    path = os.path.join(a, last_seg)
    with SeekReader(a) as r:
        assert r.last()[0] == 10
        hash_9 = r.hash_at(9)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 4096)
        f.write(bytes(4096))  # the last page of record 10 never reached the disk
    with SeekReader(a) as r:
        assert r.last()[:2] == (9, hash_9)
        with pytest.raises(wal.LsnNotAvailableError):
            r.hash_at(10)
    with open(path, "r+b") as f:
        f.truncate(size - MIB // 2)
    with SeekReader(a) as r:
        assert r.last()[:2] == (9, hash_9)


def test_rec3_history_entries_need_not_be_trusted(tmp_path):
    """A wrong EPOCHS entry costs probes, never a wrong answer."""
    a, b, rng = fork_pair(tmp_path, 120)
    with open_log(a) as la, open_log(b) as lb:
        append_n(la, 10, "A", rng)
        append_n(lb, 10, "B", rng)
    write_history(b, [EpochEntry(1, 1, wal.ZERO_HASH), EpochEntry(7, 60, bytes(32))])
    assert find_fork(a, b).lsn == 120 == brute_fork(a, b)


# ---------------------------------------------------------------------------
# the SeekReader (REC-3)


def test_rec3_seek_reader_agrees_with_log_reader(tmp_path):
    a, _, rng = fork_pair(tmp_path, 700, seg=32 * 1024)
    recs = list(wal.LogReader(a).records(1))
    r = SeekReader(a)
    assert r.last()[:2] == (700, recs[-1].hash)
    for lsn in rng.sample(range(1, 701), 120) + [1, 700]:
        assert r.hash_at(lsn) == recs[lsn - 1].hash
        assert r.record(lsn) == recs[lsn - 1]
    assert list(r.records(333)) == recs[332:]
    assert r.hash_at(0) == wal.ZERO_HASH
    with pytest.raises(wal.LsnNotAvailableError):
        r.locate(701)


def test_rec3_seek_reader_with_big_records(tmp_path):
    a = str(tmp_path / "a.wal")
    rng = random.Random(5)
    sizes = [rng.choice([10, 100, 250_000, 1_200_000]) for _ in range(60)]
    with wal.Log.create(a, segment_max_bytes=4 << 20) as log:
        for i, size in enumerate(sizes):
            log.append(4, (b"%d:" % i).ljust(size, b"z"))
    recs = list(wal.LogReader(a).records(1))
    r = SeekReader(a)
    for lsn in range(1, 61):
        assert r.hash_at(lsn) == recs[lsn - 1].hash
    assert r.last()[0] == 60


def test_rec3_seek_reader_ignores_a_torn_tail_and_reports_damage(tmp_path):
    a, _, _ = fork_pair(tmp_path, 50)
    last_seg = sorted(n for n in os.listdir(a) if n.endswith(".seg"))[-1]
    with open(os.path.join(a, last_seg), "ab") as f:
        f.write(b"\x07" * 30)  # a torn final write
    r = SeekReader(a)
    assert r.last()[0] == 50
    assert len(list(r.records(40))) == 11
    # flip a byte in the payload of a record before the end: corruption, loud
    rec_seg, off, fh = SeekReader(a).locate(45)
    with open(os.path.join(a, rec_seg), "r+b") as f:
        f.seek(off + 64)
        byte = f.read(1)
        f.seek(off + 64)
        f.write(bytes([byte[0] ^ 0xFF]) if byte else b"\x01")
    with pytest.raises(wal.CorruptRecordError):
        list(SeekReader(a).records(40))


# ---------------------------------------------------------------------------
# property: random histories, random fork points


@pytest.mark.heavy
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shared=st.integers(0, 400),
    tail_a=st.integers(0, 60),
    tail_b=st.integers(0, 60),
    seg=st.sampled_from([2048, 16 * 1024, 1 << 20]),
    epochs_a=st.lists(st.integers(0, 60), max_size=3),
    epochs_b=st.lists(st.integers(0, 60), max_size=3),
    seed=st.integers(0, 10_000),
)
def test_rec1_rec3_fork_point_matches_the_definition(tmp_path_factory, shared, tail_a, tail_b, seg, epochs_a,
                                                     epochs_b, seed):
    tmp = tmp_path_factory.mktemp("fork")
    a, b, rng = fork_pair(tmp, shared, seg=seg, seed=seed)
    for path, tail, marks, tag in ((a, tail_a, epochs_a, "A"), (b, tail_b, epochs_b, "B")):
        with open_log(path, seg) as log:
            done = 0
            epoch = log.epoch
            for mark in sorted(m for m in marks if m <= tail):
                append_n(log, mark - done, tag, rng)
                done = mark
                epoch += 1
                start_epoch(log, epoch)
            append_n(log, tail - done, tag, rng)
    s = search_fork(a, b)
    want = brute_fork(a, b)
    assert s.fork.lsn == want
    assert s.fork.hash == wal.LogReader(a).hash_at(want)
    assert s.diverged == (want < min(s.last_a, s.last_b))


# ---------------------------------------------------------------------------
# promote(): a promotion's first record is EpochStarted (REC-2)


def _node(tmp_path, name="n"):
    from engine.node import Node

    return Node.init(str(tmp_path / name))


def test_rec2_promote_writes_epoch_started_as_first_record(tmp_path):
    from engine.store.events import EpochStarted, decode_event
    from engine.cluster.failover import promote

    node = _node(tmp_path)
    try:
        node.create_mailbox("INBOX")
        node.deliver("INBOX", b"before")
        before_lsn, before_hash = node.log.last_lsn, node.log.last_hash
        p = promote(node)
        assert (p.epoch, p.first_lsn, p.fork_lsn, p.fork_hash) == (2, before_lsn + 1, before_lsn, before_hash)
        rec = next(node.log.read(p.first_lsn, p.first_lsn))
        ev = decode_event(rec.type, rec.payload)
        assert isinstance(ev, EpochStarted) and rec.epoch == 2
        assert (ev.epoch, ev.fork_lsn, ev.fork_hash, ev.node) == (2, before_lsn, before_hash, node.config.name)
        assert read_history(node.log.path)[-1] == EpochEntry(2, p.first_lsn, before_hash)
        r = node.deliver("INBOX", b"after")
        assert next(node.log.read(r.lsn, r.lsn)).epoch == 2
        assert promote(node).epoch == 3
    finally:
        node.close()


def test_rec2_promote_finishes_an_unfinished_promotion(tmp_path):
    from engine.cluster.failover import promote

    node = _node(tmp_path)
    try:
        node.create_mailbox("INBOX")
        start_epoch(node.log, 2)  # crash before the EpochStarted record
        p = promote(node, epoch=2)
        assert (p.epoch, p.first_lsn) == (2, 2)
        from engine.errors import EngineError

        with pytest.raises(EngineError, match="not above"):
            promote(node, epoch=2)
    finally:
        node.close()


def test_rec2_promote_detects_a_record_slipping_in(tmp_path, monkeypatch):
    import engine.cluster.failover as failover

    node = _node(tmp_path)
    try:
        node.create_mailbox("INBOX")
        real = failover.start_epoch

        def racing(log, epoch):
            entry = real(log, epoch)
            from engine.store.events import Checkpoint, encode_event

            log.append(*encode_event(Checkpoint()))  # someone else's record, appended concurrently
            return entry

        monkeypatch.setattr(failover, "start_epoch", racing)
        with pytest.raises(failover.PromotionRaceError, match="repaired"):
            failover.promote(node)
        hist = read_history(node.log.path)
        assert hist[-1].epoch == 2 and hist[-1].first_lsn == 2  # the racing record is the epoch's first
        assert hist[-1].prev_hash == SeekReader(node.log.path).hash_at(1)
    finally:
        node.close()
