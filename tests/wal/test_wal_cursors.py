"""Cursors and retention (LOG-13)."""

import os

import pytest

import wal
from wal import codec

from tests.support.helpers import seg_paths, read_bytes


@pytest.fixture
def log(tmp_path):
    log = wal.Log.create(str(tmp_path / "x.wal"), segment_max_bytes=300)
    for i in range(12):
        log.append(1, bytes(100))
    yield log
    log.close()


def test_LOG_13_cursors_are_durable_across_reopen(log):
    log.cursors.set("replica-a", 5)
    log.cursors.set("replica-b", 0)
    log.cursors.set("replica-a", 9)
    path = log.path
    log.close()
    with wal.Log.open(path) as again:
        assert again.cursors.list() == {"replica-a": 9, "replica-b": 0}
        assert again.cursors.minimum() == 0
    raw = read_bytes(os.path.join(path, "cursors", "replica-a.cursor"))
    value = codec.loads(raw)
    assert value["lsn"] == 9 and codec.dumps(value) == raw  # canonical CBOR (LOG-7)
    assert not [n for n in os.listdir(os.path.join(path, "cursors")) if n.endswith(".tmp")]


def test_LOG_13_cursors_refuse_to_go_backwards(log):
    log.cursors.set("c", 7)
    with pytest.raises(wal.CursorError, match="back"):
        log.cursors.set("c", 6)
    assert log.cursors.get("c") == 7
    log.cursors.set("c", 7)  # staying put is fine
    log.cursors.set("c", 2, allow_backwards=True)
    assert log.cursors.get("c") == 2


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "x" * 65, "sp ace", "../up"])
def test_LOG_13_invalid_cursor_names_are_refused(log, name):
    with pytest.raises(wal.CursorError, match="invalid cursor name"):
        log.cursors.set(name, 1)


def test_LOG_13_unknown_and_dropped_cursors(log):
    with pytest.raises(wal.CursorError, match="no cursor"):
        log.cursors.get("nope")
    with pytest.raises(wal.CursorError, match="no cursor"):
        log.cursors.drop("nope")
    with pytest.raises(wal.CursorError):
        log.cursors.set("neg", -1)
    log.cursors.set("gone", 3)
    log.cursors.drop("gone")
    assert log.cursors.list() == {} and log.cursors.minimum() is None


def test_LOG_13_drop_before_deletes_only_whole_segments_below_the_lsn(log):
    segs_before = seg_paths(log.path)
    dropped = log.drop_before(8)
    assert dropped
    assert log.first_lsn <= 8
    firsts = [int(os.path.basename(p)[:20]) for p in segs_before]
    for name in dropped:  # every record of a dropped segment is below 8
        i = firsts.index(int(name[:20]))
        assert firsts[i + 1] <= 8
    assert [r.lsn for r in log.read(8)] == list(range(8, 13))
    with pytest.raises(wal.LsnNotAvailableError):
        list(log.read(1))
    assert log.drop_before(8) == []  # nothing more to drop


def test_LOG_13_drop_before_respects_cursors(log):
    log.cursors.set("slow", 3)
    with pytest.raises(wal.RetentionError, match="LSN 4"):
        log.drop_before(9)
    assert log.first_lsn == 1
    log.drop_before(4)  # everything below 4 is consumed by every cursor
    assert log.first_lsn <= 4
    assert [r.lsn for r in log.read(4)][0] == 4
    log.cursors.set("slow", 10)
    log.drop_before(11)
    assert log.first_lsn <= 11


def test_LOG_13_drop_before_force_ignores_cursors(log):
    log.cursors.set("slow", 0)
    assert log.drop_before(9, force=True)
    assert log.first_lsn > 1


def test_LOG_13_the_active_segment_is_never_dropped(log):
    log.drop_before(10**6)
    assert len(seg_paths(log.path)) == 1
    assert log.first_lsn <= log.last_lsn + 1
    a = log.append(1, b"more")
    assert a.lsn == 13 and [r.lsn for r in log.read(log.first_lsn)][-1] == 13
    path = log.path
    log.close()
    with wal.Log.open(path) as again:
        assert again.last_lsn == 13 and again.last_hash == a.hash
