"""Creating, opening and closing logs: atomic creation (LOG-2), the single
writer lock (LOG-14), epochs across reopen, closed logs."""

import os
import signal
import subprocess
import sys
import threading

import pytest

import wal
from wal.segment import list_segments

from tests.support.helpers import FaultyFileOps, ROOT, all_records, seg_paths


def test_LOG_2_create_makes_one_empty_segment_and_the_epoch_file(tmp_path):
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path, epoch=3) as log:
        assert (log.last_lsn, log.last_hash, log.epoch, log.first_lsn) == (0, wal.ZERO_HASH, 3, 1)
        assert list(log.read(1)) == []
    names = sorted(os.listdir(path))
    assert names == ["00000000000000000001.seg", "EPOCH", "LOCK"]
    assert os.path.getsize(os.path.join(path, names[0])) == 96
    assert [n for n in os.listdir(tmp_path) if n != "x.wal"] == []  # no temporary left behind


def test_LOG_2_create_refuses_an_existing_path(tmp_path):
    path = str(tmp_path / "x.wal")
    wal.Log.create(path).close()
    with pytest.raises(wal.WalError, match="already exists"):
        wal.Log.create(path)
    os.makedirs(str(tmp_path / "empty"))
    with pytest.raises(wal.WalError, match="already exists"):
        wal.Log.create(str(tmp_path / "empty"))


def test_LOG_2_open_refuses_what_is_not_a_log(tmp_path):
    with pytest.raises(wal.WalError, match="not a mailwal log"):
        wal.Log.open(str(tmp_path / "missing.wal"))
    os.makedirs(str(tmp_path / "empty.wal"))
    with pytest.raises(wal.WalError, match="not a mailwal log"):
        wal.Log.open(str(tmp_path / "empty.wal"))
    with wal.Log.open(str(tmp_path / "new.wal"), create=True) as log:
        assert log.last_lsn == 0


def test_LOG_2_a_failed_creation_leaves_no_log_at_the_path(tmp_path):
    path = str(tmp_path / "x.wal")
    ops = FaultyFileOps(fail_fdatasync_at=1)  # the first segment's header
    with pytest.raises(OSError):
        wal.Log.create(path, fileops=ops)
    assert not os.path.exists(path)
    with pytest.raises(wal.WalError, match="not a mailwal log"):
        wal.Log.open(path)


def test_LOG_2_an_unfinished_segment_creation_is_removed_on_open(tmp_path):
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path) as log:
        log.append(1, b"x")
    stray = os.path.join(path, ".00000000000000000002.seg.tmp")
    with open(stray, "wb") as f:
        f.write(b"MAILWAL\n half a header")
    with wal.Log.open(path) as log:
        assert log.last_lsn == 1
    assert not os.path.exists(stray)
    assert len(list_segments(path)) == 1


def test_LOG_2_create_removes_creations_abandoned_by_dead_processes_only(tmp_path):
    """A Log.create killed before its rename (say, a replica's first seeding stopped
    with SIGTERM) leaves .NAME.wal.creating-PID; the next create of that log removes
    it once PID is gone, and leaves a live process's directory alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f".log.wal.creating-{dead.pid}"
    abandoned.mkdir()
    (abandoned / "EPOCH").write_bytes(b"1")
    live = tmp_path / f".log.wal.creating-{os.getppid()}"
    live.mkdir()
    other_log = tmp_path / f".other.wal.creating-{dead.pid}"
    other_log.mkdir()
    with wal.Log.create(str(tmp_path / "log.wal")) as log:
        assert log.append(1, b"x").lsn == 1
    assert not abandoned.exists()
    assert live.exists() and other_log.exists()


def test_LOG_14_a_second_writer_in_the_same_process_is_refused(tmp_path):
    path = str(tmp_path / "x.wal")
    log = wal.Log.create(path)
    with pytest.raises(wal.WalError, match="open for writing by another"):
        wal.Log.open(path)
    assert list(wal.LogReader(path).records(1)) == []  # readers need no lock
    log.append(1, b"still mine")
    log.close()
    with wal.Log.open(path) as again:
        assert again.last_lsn == 1


HOLD = """
import sys, time
sys.path.insert(0, {root!r})
import wal
log = wal.Log.open({path!r})
print("locked", flush=True)
time.sleep(60)
"""


def test_LOG_14_a_writer_in_another_process_is_refused_until_it_dies(tmp_path):
    path = str(tmp_path / "x.wal")
    wal.Log.create(path).close()
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, path=path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(wal.WalError, match="another process"):
            wal.Log.open(path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    with wal.Log.open(path) as log:  # the kernel dropped the lock with the process
        log.append(1, b"mine now")


def test_LOG_14_concurrent_opens_admit_exactly_one_writer(tmp_path):
    path = str(tmp_path / "x.wal")
    wal.Log.create(path).close()
    results = []
    barrier = threading.Barrier(6)

    def opener():
        barrier.wait()
        try:
            results.append(wal.Log.open(path))
        except wal.WalError as exc:
            results.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logs = [r for r in results if isinstance(r, wal.Log)]
    assert len(logs) == 1 and len(results) == 6
    logs[0].close()


def test_closed_log_refuses_appends_with_log_closed_error(tmp_path):
    log = wal.Log.create(str(tmp_path / "x.wal"))
    log.append(1, b"x")
    log.close()
    log.close()  # idempotent
    with pytest.raises(wal.LogClosedError):
        log.append(1, b"y")
    with pytest.raises(wal.LogClosedError):
        log.set_epoch(5)


def test_epoch_survives_reopen_and_never_goes_back(tmp_path):
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path) as log:
        log.append(1, b"a")
        log.set_epoch(4)
        assert log.append(1, b"b").epoch == 4
        with pytest.raises(wal.WalError, match="below"):
            log.set_epoch(3)
    with wal.Log.open(path) as log:
        assert log.epoch == 4
        assert log.append(1, b"c").epoch == 4


def test_epoch_of_the_last_record_survives_a_crash_right_after_rotation(tmp_path):
    """A replica's epoch comes from the records it copies. A crash after the
    next segment was created but before its first batch was synced leaves
    the newest segment empty; the epoch must still come from the last record."""
    src = wal.Log.create(str(tmp_path / "src.wal"))
    src.set_epoch(4)
    src.append(1, bytes(100))
    src.append(1, b"second")
    recs = list(src.read(1))
    src.close()
    path = str(tmp_path / "replica.wal")
    ops = FaultyFileOps()
    replica = wal.Log.create(path, segment_max_bytes=100, fileops=ops)
    replica.append_records(recs[:1])
    assert replica.epoch == 4
    ops.fail_write_at = ops.write_calls + 2  # the new segment's header succeeds, the batch fails
    with pytest.raises(wal.LogFailedError):
        replica.append_records(recs[1:])
    replica.close()
    assert len(seg_paths(path)) == 2 and os.path.getsize(seg_paths(path)[-1]) == 96
    with wal.Log.open(path) as again:
        assert again.last_lsn == 1
        assert again.epoch == 4
    assert [r.epoch for r in all_records(path)] == [4]


def test_LOG_4_epochs_never_decrease_along_a_log(tmp_path):
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path) as log:
        log.append(1, b"a")
        assert log.append(1, b"b", epoch=5).epoch == 5
        assert log.epoch == 5
        assert log.append(1, b"c").epoch == 5  # not back to 1
        with pytest.raises(wal.WalError, match="never decrease"):
            log.append(1, b"d", epoch=4)
        assert log.last_lsn == 3 and log.failed is None
    assert [r.epoch for r in all_records(path)] == [1, 5, 5]
    with wal.Log.open(path) as log:
        assert log.epoch == 5


def test_wake_waiters_releases_a_thread_blocked_in_wait_for(tmp_path):
    """Node.close relies on it: the store applier blocks in wait_for between records."""
    with wal.Log.create(str(tmp_path / "log.wal")) as log:
        got = []
        waiter = threading.Thread(target=lambda: got.append(log.wait_for(1, timeout=600)))
        waiter.start()
        while not got and waiter.is_alive():
            log.wake_waiters()
            waiter.join(0.05)
        waiter.join(30)
        assert not waiter.is_alive() and got == [False]
