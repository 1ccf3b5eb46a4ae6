"""LOG-16: cutting a diverged tail moves it into a standalone log, never deletes it."""

import os

import pytest

from wal import Log, WalError, verify
from wal.fork import find_fork
from wal.history import start_epoch


def fill(log, n, tag=b""):
    for i in range(n):
        log.append(1, tag + b"record %d" % i)


@pytest.mark.parametrize("cut", [0, 1, 7, 20, 29])
def test_LOG_16_truncate_after_moves_tail_aside_across_segments(tmp_path, cut):
    log = Log.create(str(tmp_path / "a.wal"), segment_max_bytes=400)
    fill(log, 30)
    before = list(log.read(1))
    aside = str(tmp_path / "a.tail.wal")
    moved = log.truncate_after(cut, aside)
    assert moved == 30 - cut
    assert log.last_lsn == cut
    assert log.last_hash == (before[cut - 1].hash if cut else bytes(32))
    # the log goes on from the cut, and verifies
    fill(log, 3, b"new ")
    log.close()
    rep = verify(str(tmp_path / "a.wal"))
    assert rep.ok and rep.last_lsn == cut + 3
    # the tail is intact, as its own log chained onto the fork
    rep = verify(aside)
    assert rep.ok and rep.first_lsn == cut + 1 and rep.last_lsn == 30
    with Log.open(aside) as tail:
        assert [r.hash for r in tail.read(cut + 1)] == [r.hash for r in before[cut:]]
    assert find_fork(str(tmp_path / "a.wal"), aside).lsn == cut


def test_truncate_refuses_below_retention(tmp_path):
    log = Log.create(str(tmp_path / "a.wal"), segment_max_bytes=300)
    fill(log, 20)
    log.drop_before(15, force=True)
    with pytest.raises(WalError):
        log.truncate_after(log.first_lsn - 2, str(tmp_path / "t.wal"))
    assert not os.path.exists(tmp_path / "t.wal")
    log.close()


def test_truncate_drops_later_epoch_entries(tmp_path):
    from wal.history import read_history_file

    log = Log.create(str(tmp_path / "a.wal"))
    fill(log, 5)
    start_epoch(log, 2)
    fill(log, 5)
    assert [e.epoch for e in read_history_file(log.path)][-1] == 2
    log.truncate_after(4, str(tmp_path / "t.wal"))
    assert all(e.first_lsn <= 4 for e in read_history_file(log.path))
    log.close()
