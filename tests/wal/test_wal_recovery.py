"""Recovery on open: torn tails are trimmed, anything else is loud (LOG-8, LOG-9).

Table-driven in the etcd style; each case is named after the rule it checks.
"""

import os
import shutil

import pytest

import wal
from wal.format import FRAME_HEADER_SIZE, SEGMENT_HEADER_SIZE, encode_frame, payload_hash, record_hash

from tests.support.helpers import all_records, append_bytes, flip_bit, frame_offsets, payload_for, seg_paths, truncate_file, read_bytes, write_bytes


def make_log(path, sizes, *, batches=None, segment_max_bytes=1 << 20):
    """A log whose records have the given payload sizes; ``batches`` groups
    them into append_many calls (default: one record per batch)."""
    batches = batches or [1] * len(sizes)
    assert sum(batches) == len(sizes)
    acks = []
    with wal.Log.create(path, segment_max_bytes=segment_max_bytes) as log:
        i = 0
        for b in batches:
            acks += log.append_many([(1 + (i + k) % 3, payload_for(i + k, sizes[i + k])) for k in range(b)])
            i += b
    return acks


def torn_files(path):
    d = os.path.join(path, "torn")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


@pytest.fixture
def base(tmp_path):
    path = str(tmp_path / "base.wal")
    acks = make_log(path, [30, 0, 45])
    return path, acks


@pytest.mark.heavy
def test_LOG_8_truncating_the_final_record_at_every_byte_recovers_the_previous_one(base, tmp_path):
    path, acks = base
    seg = seg_paths(path)[-1]
    original = read_bytes(seg)
    off, size, lsn = frame_offsets(seg)[-1]
    assert lsn == 3 and off + size == len(original)
    for cut in range(off, off + size):
        work = str(tmp_path / f"cut{cut}.wal")
        shutil.copytree(path, work)
        truncate_file(seg_paths(work)[-1], cut)
        with wal.Log.open(work) as log:
            assert log.last_lsn == 2 and log.last_hash == acks[1].hash
            if cut > off:
                assert [t.offset for t in log.torn_tails] == [off]
            again = log.append(9, b"after")
            assert again.lsn == 3
        names = torn_files(work)
        if cut == off:
            assert names == []  # the file ended on a record boundary: nothing torn
        else:
            assert len(names) == 1
            assert read_bytes(os.path.join(work, "torn", names[0])) == original[off:cut]
        assert [r.lsn for r in all_records(work)] == [1, 2, 3]
        shutil.rmtree(work)


def test_LOG_9_every_single_bit_flip_in_a_non_final_record_is_corruption(tmp_path):
    path = str(tmp_path / "x.wal")
    make_log(path, [8, 5, 12, 3])
    seg = seg_paths(path)[-1]
    name = os.path.basename(seg)
    frames = frame_offsets(seg)
    for off, size, lsn in frames[:-1]:
        for byte in range(off, off + size):
            for bit in range(8):
                flip_bit(seg, byte, bit)
                try:
                    with pytest.raises(wal.CorruptRecordError) as ei:
                        wal.Log.open(path)
                    e = ei.value
                    assert (e.segment, e.offset, e.lsn) == (name, off, lsn), (byte, bit, str(e))
                    assert name in str(e) and str(off) in str(e) and f"LSN {lsn}" in str(e)
                finally:
                    flip_bit(seg, byte, bit)
    with wal.Log.open(path) as log:  # all flips undone: the log is whole again
        assert log.last_lsn == 4


def test_LOG_9_bit_flip_in_a_non_final_batch_is_corruption(tmp_path):
    path = str(tmp_path / "x.wal")
    make_log(path, [10] * 6, batches=[3, 3])
    seg = seg_paths(path)[-1]
    off, size, lsn = frame_offsets(seg)[0]
    for byte in (off, off + 30, off + 40, off + size - 1):
        flip_bit(seg, byte, 0)
        with pytest.raises(wal.CorruptRecordError) as ei:
            wal.Log.open(path)
        assert (ei.value.offset, ei.value.lsn) == (off, 1)
        flip_bit(seg, byte, 0)


def test_LOG_8_damage_inside_the_final_batch_cannot_be_told_from_a_torn_write(tmp_path):
    """The documented drawback: the final batch may legally be partly on disk,
    so damage inside it is trimmed (and kept in torn/) like a torn write."""
    path = str(tmp_path / "x.wal")
    acks = make_log(path, [10] * 6, batches=[3, 3])
    seg = seg_paths(path)[-1]
    off, _, lsn = frame_offsets(seg)[3]
    assert lsn == 4
    flip_bit(seg, off + 70, 3)  # payload of the first record of the final batch
    with wal.Log.open(path) as log:
        assert log.last_lsn == 3 and log.last_hash == acks[2].hash
        assert log.torn_tails[0].offset == off
    assert len(torn_files(path)) == 1


@pytest.mark.parametrize(
    "name, tail",
    [
        ("garbage", b"\x5a\xa5garbage that is not a frame" * 7),
        ("zero-filled", bytes(4096)),
        ("one zero byte", b"\0"),
        ("short header", b"\x01" * (FRAME_HEADER_SIZE - 1)),
    ],
)
def test_LOG_8_bytes_after_the_last_record_are_trimmed(base, name, tail):
    path, acks = base
    seg = seg_paths(path)[-1]
    size = os.path.getsize(seg)
    append_bytes(seg, tail)
    report = wal.verify(path)
    assert report.ok and report.torn_tail["offset"] == size and report.torn_tail["bytes"] == len(tail)
    with wal.Log.open(path) as log:
        assert log.last_lsn == 3
    assert os.path.getsize(seg) == size
    (torn,) = torn_files(path)
    assert read_bytes(os.path.join(path, "torn", torn)) == tail


def next_frame(acks, lsn_offset=1, *, batch_back=0, payload=b"late but whole", prev=None, lsn=None):
    lsn = lsn if lsn is not None else acks[-1].lsn + lsn_offset
    prev = prev if prev is not None else acks[-1].hash
    h = record_hash(prev, lsn, 1, 1, len(payload), payload_hash(payload))
    return encode_frame(lsn, 1, 1, payload, h, batch_back=batch_back), h


def test_LOG_8_a_complete_valid_frame_after_the_tail_is_kept(base):
    """A record written whole but never acknowledged (crash before the ack) is
    a valid record: recovery keeps it."""
    path, acks = base
    frame, h = next_frame(acks)
    append_bytes(seg_paths(path)[-1], frame)
    with wal.Log.open(path) as log:
        assert log.last_lsn == 4 and log.last_hash == h and log.torn_tails == []
    assert torn_files(path) == []


def test_LOG_8_a_torn_batch_whose_later_frames_survived_is_trimmed_whole(base):
    """Pages of one unsynced write may reach the disk in any order: a damaged
    first frame followed by intact frames of the same batch is a torn write."""
    path, acks = base
    f4, h4 = next_frame(acks, payload=b"four")
    f5, _ = next_frame(acks, lsn=5, prev=h4, batch_back=1, payload=b"five")
    damaged = bytes(20) + f4[20:]
    seg = seg_paths(path)[-1]
    size = os.path.getsize(seg)
    append_bytes(seg, damaged + f5)
    with wal.Log.open(path) as log:
        assert log.last_lsn == 3 and log.torn_tails[0].offset == size
        assert "same unsynced batch" in log.torn_tails[0].reason


def test_LOG_9_a_frame_of_a_later_batch_after_damage_proves_corruption(base):
    """A valid-looking frame whose batch started after the failing LSN means
    the failing record's batch was complete and synced: corruption."""
    path, acks = base
    f4, h4 = next_frame(acks, payload=b"four")
    f5, _ = next_frame(acks, lsn=5, prev=h4, batch_back=0, payload=b"five")
    seg = seg_paths(path)[-1]
    size = os.path.getsize(seg)
    append_bytes(seg, f4[:40] + b"X" + f4[41:] + f5)  # damage LSN 4's hash field
    with pytest.raises(wal.CorruptRecordError) as ei:
        wal.Log.open(path)
    assert (ei.value.offset, ei.value.lsn) == (size, 4)
    assert not os.path.exists(os.path.join(path, "torn"))


def test_LOG_9_frame_of_the_wrong_lsn_followed_by_a_later_batch_is_corruption(base):
    path, acks = base
    seg = seg_paths(path)[-1]
    off, _, _ = frame_offsets(seg)[1]
    wrong, _ = next_frame(acks, lsn=7, payload=b"")  # a whole frame claiming LSN 7
    data = bytearray(read_bytes(seg))
    data[off:off + FRAME_HEADER_SIZE] = wrong[:FRAME_HEADER_SIZE]  # record 2 has an empty payload too
    write_bytes(seg, bytes(data))
    with pytest.raises(wal.CorruptRecordError, match="LSN 7, expected 2") as ei:
        wal.Log.open(path)
    assert (ei.value.offset, ei.value.lsn) == (off, 2)


def test_LOG_9_damage_in_a_non_last_segment_is_corruption(tmp_path):
    path = str(tmp_path / "x.wal")
    make_log(path, [100] * 8, segment_max_bytes=400)
    segs = seg_paths(path)
    assert len(segs) >= 3
    first = segs[0]
    off, size, lsn = frame_offsets(first)[-1]  # the last record of a non-last segment
    flip_bit(first, off + size - 1, 5)
    with pytest.raises(wal.CorruptRecordError) as ei:
        list(wal.LogReader(path).records(1))
    assert (ei.value.segment, ei.value.offset, ei.value.lsn) == (os.path.basename(first), off, lsn)
    report = wal.verify(path)
    assert not report.ok and report.error == {
        "segment": os.path.basename(first), "offset": off, "lsn": lsn, "reason": "record hash mismatch"}
    flip_bit(first, off + size - 1, 5)
    truncate_file(first, off + 10)  # a non-last segment cut short is corruption too
    with pytest.raises(wal.CorruptRecordError) as ei:
        list(wal.LogReader(path).records(1))
    assert (ei.value.segment, ei.value.lsn) == (os.path.basename(first), lsn)
    assert not wal.verify(path).ok


def test_LOG_8_torn_first_record_of_a_new_segment(tmp_path):
    path = str(tmp_path / "x.wal")
    acks = make_log(path, [100] * 4, segment_max_bytes=200)
    last = seg_paths(path)[-1]
    off, size, lsn = frame_offsets(last)[0]
    assert off == SEGMENT_HEADER_SIZE
    truncate_file(last, off + size // 2)
    with wal.Log.open(path) as log:
        assert log.last_lsn == lsn - 1 and log.last_hash == acks[lsn - 2].hash
        assert log.append(1, b"x").lsn == lsn
    assert [r.lsn for r in all_records(path)] == list(range(1, lsn + 1))


def test_LOG_8_torn_tail_is_invisible_to_readers_of_an_unheld_log(base):
    path, acks = base
    append_bytes(seg_paths(path)[-1], b"\x01\x02\x03")
    assert [r.hash for r in all_records(path)] == [a.hash for a in acks]


def test_LOG_9_trimming_never_happens_for_corruption(tmp_path):
    """Opening a corrupt log changes no byte of it."""
    path = str(tmp_path / "x.wal")
    make_log(path, [10, 10, 10])
    seg = seg_paths(path)[-1]
    off, _, _ = frame_offsets(seg)[0]
    flip_bit(seg, off + 64, 0)
    before = read_bytes(seg)
    for _ in range(2):
        with pytest.raises(wal.CorruptRecordError):
            wal.Log.open(path)
    assert read_bytes(seg) == before


def _zero(path, start, end):
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(end - start))


@pytest.mark.parametrize("damage", ["zeroed span of two records", "two headers", "hash and next header", "zeroed 4 KiB sector"])
def test_LOG_9_damage_spanning_several_records_before_the_final_batch_is_corruption(tmp_path, damage):
    """Damage that wipes more than one frame header must not pass for a torn
    tail: acknowledged records of later batches follow it."""
    path = str(tmp_path / "x.wal")
    acks = make_log(path, [0] * 200 if "sector" in damage else [40] * 10)
    seg = seg_paths(path)[-1]
    fr = frame_offsets(seg)
    before = read_bytes(seg)
    if damage == "zeroed span of two records":
        _zero(seg, fr[4][0], fr[6][0])
    elif damage == "two headers":
        flip_bit(seg, fr[4][0] + 5, 0)
        flip_bit(seg, fr[5][0] + 5, 0)
    elif damage == "hash and next header":
        flip_bit(seg, fr[4][0] + 40, 0)
        flip_bit(seg, fr[5][0] + 5, 0)
    else:
        _zero(seg, 4096, 8192)
    bad = read_bytes(seg)
    first_bad = next(i for i, (a, b) in enumerate(zip(before, bad)) if a != b)
    off, _, lsn = [f for f in fr if f[0] <= first_bad][-1]
    assert lsn < acks[-1].lsn - 1
    with pytest.raises(wal.CorruptRecordError) as ei:
        wal.Log.open(path)
    assert (ei.value.offset, ei.value.lsn) == (off, lsn)
    assert read_bytes(seg) == bad  # nothing trimmed
    assert not wal.verify(path).ok


def test_LOG_9_open_fails_on_a_truncated_sealed_segment(tmp_path):
    """A sealed (non-last) segment that lost its end fails the open loudly, naming it."""
    from wal import CorruptRecordError, Log

    path = str(tmp_path / "t.wal")
    log = Log.create(path, segment_max_bytes=400)
    for i in range(20):
        log.append(1, b"r%03d" % i * 10)
    log.close()
    segs = sorted(p for p in os.listdir(path) if p.endswith(".seg"))
    first = os.path.join(path, segs[0])
    size = os.path.getsize(first)
    with open(first, "r+b") as f:
        f.truncate(size - 7)
    with pytest.raises(CorruptRecordError) as exc:
        Log.open(path)
    assert exc.value.segment == segs[0]
