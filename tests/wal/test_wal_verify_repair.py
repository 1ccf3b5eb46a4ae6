"""verify() reports, repair() cuts at the damage and keeps the bytes (LOG-15)."""

import os
import uuid

import pytest

import wal
from wal.segment import read_segment_header

from tests.support.helpers import all_records, append_bytes, flip_bit, frame_offsets, payload_for, seg_paths, read_bytes


def snapshot(path):
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            if f != "LOCK":
                p = os.path.join(dirpath, f)
                out[os.path.relpath(p, path)] = read_bytes(p)
    return out


@pytest.fixture
def log_path(tmp_path):
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path, segment_max_bytes=500, log_id=uuid.UUID(int=7)) as log:
        acks = [log.append(1 + i % 2, payload_for(i, 60 + i)) for i in range(20)]
    return path, acks


def test_LOG_15_verify_a_good_log(log_path):
    path, acks = log_path
    seen = []
    report = wal.verify(path, on_bytes=seen.append)
    assert report.ok and report.error is None and report.torn_tail is None
    assert report.log_id == str(uuid.UUID(int=7))
    assert (report.records, report.first_lsn, report.last_lsn) == (20, 1, 20)
    assert report.last_hash == acks[-1].hash.hex()
    assert report.segments == len(seg_paths(path)) > 2
    assert report.bytes == sum(os.path.getsize(p) for p in seg_paths(path))
    assert sum(seen) == report.bytes - 96 * report.segments
    assert set(report.to_dict()) >= {"ok", "error", "torn_tail", "last_lsn", "last_hash"}


def test_LOG_15_verify_reports_a_torn_tail_and_changes_nothing(log_path):
    path, _ = log_path
    last = seg_paths(path)[-1]
    size = os.path.getsize(last)
    append_bytes(last, b"\x01torn")
    before = snapshot(path)
    report = wal.verify(path)
    assert report.ok and report.last_lsn == 20
    assert report.torn_tail["segment"] == os.path.basename(last)
    assert (report.torn_tail["offset"], report.torn_tail["bytes"]) == (size, 5)
    assert snapshot(path) == before


def test_LOG_15_verify_reports_corruption_with_segment_offset_lsn(log_path):
    path, _ = log_path
    seg = seg_paths(path)[1]
    off, _, lsn = frame_offsets(seg)[1]
    flip_bit(seg, off + 100, 2)
    before = snapshot(path)
    report = wal.verify(path)
    assert not report.ok
    assert report.error == {"segment": os.path.basename(seg), "offset": off, "lsn": lsn, "reason": "record hash mismatch"}
    assert report.last_lsn == lsn - 1  # everything before the damage verified
    assert snapshot(path) == before


def test_LOG_15_verify_refuses_what_is_not_a_log(tmp_path):
    with pytest.raises(wal.WalError, match="not a mailwal log"):
        wal.verify(str(tmp_path))


def test_LOG_15_repair_leaves_a_good_or_torn_log_alone(log_path):
    path, _ = log_path
    before = snapshot(path)
    rep = wal.repair(path)
    assert rep.cut_segment is None and rep.backups == [] and rep.last_lsn == 20
    assert snapshot(path) == before


def test_LOG_15_repair_cuts_at_the_damage_and_backs_up_every_byte(log_path):
    path, acks = log_path
    segs = seg_paths(path)
    seg = segs[1]
    off, _, lsn = frame_offsets(seg)[1]
    flip_bit(seg, off + 70, 0)
    damaged = read_bytes(seg)
    later = {os.path.basename(p): read_bytes(p) for p in segs[2:]}
    rep = wal.repair(path)
    assert (rep.cut_segment, rep.cut_offset, rep.first_lost_lsn, rep.last_lsn) == (os.path.basename(seg), off, lsn, lsn - 1)
    assert read_bytes(seg) == damaged[:off]
    assert seg_paths(path) == segs[:2]
    backups = {os.path.basename(b): read_bytes(b) for b in rep.backups}
    assert all(os.path.dirname(b) == os.path.join(path, "broken") for b in rep.backups)
    assert damaged[off:] in backups.values()
    for name, data in later.items():
        assert any(k.startswith(name) and v == data for k, v in backups.items())
    assert wal.verify(path).ok
    with wal.Log.open(path) as log:
        assert log.last_lsn == lsn - 1 and log.last_hash == acks[lsn - 2].hash
        assert log.append(1, b"refetched").lsn == lsn
    assert [r.lsn for r in all_records(path)] == list(range(1, lsn + 1))


def test_LOG_15_repair_removes_a_later_segment_with_a_damaged_header(log_path):
    path, _ = log_path
    segs = seg_paths(path)
    victim = segs[2]
    first = read_segment_header(victim).first_lsn
    flip_bit(victim, 50, 0)  # prev_hash: the header check fails
    data = read_bytes(victim)
    rep = wal.repair(path)
    assert (rep.cut_segment, rep.cut_offset, rep.last_lsn) == (os.path.basename(victim), 0, first - 1)
    assert seg_paths(path) == segs[:2]
    assert any(read_bytes(b) == data for b in rep.backups)
    with wal.Log.open(path) as log:
        assert log.last_lsn == first - 1


def test_LOG_15_repair_refuses_a_damaged_first_header(log_path):
    path, _ = log_path
    flip_bit(seg_paths(path)[0], 3, 0)
    before = snapshot(path)
    with pytest.raises(wal.WalError, match="first segment"):
        wal.repair(path)
    assert {k: v for k, v in snapshot(path).items() if not k.startswith("broken")} == before


def test_LOG_14_LOG_15_repair_refuses_while_a_writer_holds_the_log(log_path):
    path, _ = log_path
    seg = seg_paths(path)[1]
    off, _, _ = frame_offsets(seg)[0]
    flip_bit(seg, off + 70, 0)
    before = snapshot(path)
    with wal.Log.open(path):  # the damage is in a non-last segment: the log opens
        with pytest.raises(wal.WalError, match="open for writing"):
            wal.repair(path)
    assert snapshot(path) == before
    assert wal.repair(path).cut_segment == os.path.basename(seg)  # once the writer is gone
