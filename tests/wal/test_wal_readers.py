"""Readers: from any LSN through the sparse index (LOG-10); never a
non-durable or corrupt record (LOG-11); following a live log."""

import threading
import time

import pytest

import wal
import wal.reader
from wal.segment import INDEX_STRIDE

from tests.support.helpers import FaultyFileOps, all_records, flip_bit, frame_offsets, payload_for, seg_paths


@pytest.fixture(scope="module")
def big_log(tmp_path_factory):
    """~600 records in a few segments, each holding several index strides."""
    path = str(tmp_path_factory.mktemp("r") / "x.wal")
    with wal.Log.create(path, segment_max_bytes=40_000) as log:
        acks = []
        for i in range(0, 600, 3):
            acks += log.append_many([(i % 5, payload_for(i + k, (i * 7 + k) % 150)) for k in range(3)])
    return path, acks


def test_LOG_10_read_from_every_lsn_matches_the_full_read(big_log):
    path, acks = big_log
    full = all_records(path)
    assert [r.hash for r in full] == [a.hash for a in acks]
    assert len(seg_paths(path)) >= 3
    reader = wal.LogReader(path)
    for start in list(range(1, 601, 7)) + [599, 600]:
        got = list(reader.records(start))
        assert [r.lsn for r in got] == list(range(start, 601))
        assert got == full[start - 1:]
    assert [r.lsn for r in reader.records(100, 130)] == list(range(100, 131))
    assert list(reader.records(601)) == []


def test_readers_build_records_equal_to_checked_ones():
    """The readers' unchecked Record constructor gives the same value as Record(...)."""
    assert wal.reader._record(1, 2, 3, b"p", bytes(32)) == wal.Record(1, 2, 3, b"p", bytes(32))


def test_LOG_10_the_sparse_index_skips_payloads(big_log, monkeypatch):
    """Reading one record deep inside a segment hashes at most a stride of
    payloads: the index walk reads frame headers only."""
    path, _ = big_log
    hashed = []
    real = wal.format._blake3  # the reader's loop hashes each payload, then the chained record hash
    monkeypatch.setattr(wal.format, "_blake3", lambda data: hashed.append(len(data)) or real(data))
    reader = wal.LogReader(path)
    first, _ = reader.segments()[1]
    target = first + 3 * INDEX_STRIDE + 5
    (rec,) = reader.records(target, target)
    assert rec.lsn == target
    assert 0 < len(hashed) <= 2 * (INDEX_STRIDE + 1)


def test_LOG_10_hash_at(big_log):
    path, acks = big_log
    reader = wal.LogReader(path)
    assert reader.hash_at(0) == wal.ZERO_HASH
    for lsn in (1, 64, 65, 300, 600):
        assert reader.hash_at(lsn) == acks[lsn - 1].hash


def test_LOG_10_below_retention_is_lsn_not_available(tmp_path):
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path, segment_max_bytes=300) as log:
        for i in range(10):
            log.append(1, bytes(100))
        dropped = log.drop_before(6)
        assert dropped
        first = log.first_lsn
        assert 1 < first <= 6
        with pytest.raises(wal.LsnNotAvailableError) as ei:
            list(log.read(first - 1))
        assert (ei.value.lsn, ei.value.first, ei.value.last) == (first - 1, first, 10)
        assert [r.lsn for r in log.read(first)] == list(range(first, 11))
        assert log.hash_at(first - 1) == log.reader().hash_at(first - 1)  # from the segment header
    with pytest.raises(wal.LsnNotAvailableError):
        list(wal.LogReader(path).records(1))


class BlockingSync(FaultyFileOps):
    def __init__(self):
        super().__init__()
        self.block = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def fdatasync(self, fd):
        if self.block.is_set():
            self.entered.set()
            assert self.release.wait(10)
        super().fdatasync(fd)


def test_LOG_11_readers_of_the_log_never_see_a_record_before_it_is_durable(tmp_path):
    path = str(tmp_path / "x.wal")
    ops = BlockingSync()
    log = wal.Log.create(path, fileops=ops)
    log.append(1, b"durable")
    ops.block.set()
    t = threading.Thread(target=log.append, args=(1, b"written, not yet synced"))
    t.start()
    assert ops.entered.wait(10)
    seg = seg_paths(path)[-1]
    assert len(frame_offsets(seg)) == 2  # the bytes are in the file...
    assert [r.lsn for r in log.read(1)] == [1]  # ...but not visible through the log
    assert log.last_lsn == 1 and log.wait_for(2, timeout=0.01) is False
    ops.block.clear()
    ops.release.set()
    t.join(10)
    assert [r.lsn for r in log.read(1)] == [1, 2]
    log.close()


def test_LOG_11_a_reader_stops_at_corruption_with_the_records_before_it(tmp_path):
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path) as log:
        for i in range(6):
            log.append(1, payload_for(i, 20))
        seg = seg_paths(path)[-1]
        off, _, lsn = frame_offsets(seg)[3]
        flip_bit(seg, off + 70, 1)
        got = []
        with pytest.raises(wal.CorruptRecordError) as ei:
            for r in log.read(1):
                got.append(r.lsn)
        assert got == [1, 2, 3] and (ei.value.offset, ei.value.lsn) == (off, lsn)
        with pytest.raises(wal.CorruptRecordError):  # a durable record missing is loud too
            list(log.read(5))


def test_LOG_10_LOG_11_concurrent_readers_while_writers_append(tmp_path):
    path = str(tmp_path / "x.wal")
    log = wal.Log.create(path, segment_max_bytes=8000)
    acked = {}
    stop = threading.Event()
    problems = []

    def writer(t):
        for n in range(150):
            for a in log.append_many([(t, payload_for(t * 1000 + n, n % 90))] * (1 + n % 2)):
                acked[a.lsn] = a.hash

    def reader(k):
        while not stop.is_set():
            start = 1 + (k * 37) % max(1, log.last_lsn)
            prev = None
            for r in log.read(start):
                if prev is not None and r.lsn != prev + 1:
                    problems.append(("gap", prev, r.lsn))
                prev = r.lsn
                h = acked.get(r.lsn)
                if h is None:
                    # durable but its appender has not been told yet: allowed,
                    # it must be acknowledged soon after
                    continue
                if h != r.hash:
                    problems.append(("hash", r.lsn))

    writers = [threading.Thread(target=writer, args=(t,)) for t in range(2)]
    readers = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    log.close()
    assert problems == []
    assert [r.hash for r in all_records(path)] == [acked[k] for k in sorted(acked)]


def test_LOG_10_follow_sees_new_records_across_segments_and_stops(tmp_path):
    path = str(tmp_path / "x.wal")
    log = wal.Log.create(path, segment_max_bytes=2000)
    log.append(1, b"before")
    stop = threading.Event()
    seen = []
    done = threading.Event()

    def follower():
        for r in log.follow(1, stop, poll_interval_s=0.05):
            seen.append(r)
            if len(seen) == 201:
                done.set()

    t = threading.Thread(target=follower)
    t.start()
    acks = [log.append(2, payload_for(i, 50)) for i in range(200)]
    assert done.wait(20)
    stop.set()
    t.join(10)
    assert not t.is_alive()
    assert [r.lsn for r in seen] == list(range(1, 202))
    assert [r.hash for r in seen[1:]] == [a.hash for a in acks]
    assert len(seg_paths(path)) > 3
    log.close()


def test_LOG_10_follow_of_a_closed_log_raises_instead_of_spinning(tmp_path):
    log = wal.Log.create(str(tmp_path / "x.wal"))
    log.append(1, b"a")
    stop = threading.Event()
    result = []

    def follower():
        try:
            for r in log.follow(1, stop, poll_interval_s=0.05):
                result.append(r.lsn)
        except wal.WalError as exc:
            result.append(exc)

    t = threading.Thread(target=follower, daemon=True)  # a regression would spin forever
    t.start()
    while not result:
        time.sleep(0.01)
    log.close()
    t.join(5)
    assert not t.is_alive(), "the follower kept running after close"
    stop.set()
    assert result[0] == 1 and isinstance(result[1], wal.LogClosedError)


def test_LOG_10_an_unheld_reader_follows_a_log_another_writer_appends_to(tmp_path):
    path = str(tmp_path / "x.wal")
    log = wal.Log.create(path, segment_max_bytes=1000)
    stop = threading.Event()
    seen = []

    def follower():
        for r in wal.LogReader(path).records(1, follow=True, stop=stop, poll_interval_s=0.01):
            seen.append(r.lsn)
            if len(seen) == 40:
                stop.set()

    t = threading.Thread(target=follower)
    t.start()
    for i in range(40):
        log.append(1, payload_for(i, 60))
    t.join(20)
    assert seen == list(range(1, 41))
    log.close()


def test_LOG_10_an_empty_range_yields_nothing(big_log):
    path, _ = big_log
    reader = wal.LogReader(path)
    for start, end in [(1, 0), (5, 3), (65, 3), (129, 100), (65, 64), (600, 599)]:
        assert list(reader.records(start, end)) == [], (start, end)
    assert [r.lsn for r in reader.records(65, 65)] == [65]
    assert [r.lsn for r in reader.records(64, 65)] == [64, 65]


def test_LOG_11_an_unheld_follower_racing_a_rotation_sees_no_false_corruption(tmp_path):
    """The follower finishes a segment, then, before it lists the directory,
    the writer appends to that segment and rotates. The segment grew: the
    follower must read the rest, not call the gap corruption."""
    path = str(tmp_path / "x.wal")
    log = wal.Log.create(path, segment_max_bytes=300)
    log.append(1, bytes(10))

    class RacingReader(wal.LogReader):
        listings = 0

        def segments(self):
            RacingReader.listings += 1
            if RacingReader.listings == 2:  # right after the first pass over segment 1
                log.append(1, bytes(150))  # still fits in segment 1
                log.append(1, bytes(150))  # segment 1 is full now: rotates
                assert len(seg_paths(path)) == 2
            return super().segments()

    seen = []
    for r in RacingReader(path).records(1, follow=True, stop=threading.Event(), poll_interval_s=0.01):
        seen.append(r.lsn)
        if len(seen) == 3:
            break
    assert seen == [1, 2, 3]
    log.close()
