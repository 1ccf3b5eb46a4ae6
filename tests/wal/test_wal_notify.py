"""Log.notify_durable: a completion callback per batch instead of a parked thread.

The async face resolves every future of a batch from one callback; these tests
hold the log to the acknowledgement rule through that path: a callback says
"durable" only after the fdatasync covering the record returned, says
"failed"/"closed" otherwise, and is called once per batch however many
records registered it.
"""

import os
import threading

import pytest

import wal
from tests.support.helpers import FaultyFileOps, all_records

CREATE_SYNCS = 2  # Log.create: the first segment's header and the EPOCH file


class GatedSync(wal.FileOps):
    """fdatasync number ``hold_at`` waits at a gate, so records pile up behind it."""

    def __init__(self, hold_at: int):
        self.calls = 0
        self.hold_at = hold_at
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.synced_bytes = 0  # file size at the last fdatasync that returned

    def fdatasync(self, fd):
        self.calls += 1
        if self.calls == self.hold_at:
            self.entered.set()
            assert self.gate.wait(10)
        super().fdatasync(fd)
        self.synced_bytes = os.fstat(fd).st_size


def test_callback_runs_after_the_covering_fdatasync_and_once_per_batch(tmp_path):
    ops = GatedSync(hold_at=CREATE_SYNCS + 1)
    log = wal.Log.create(str(tmp_path / "x.wal"), fileops=ops)
    calls = []
    done = threading.Event()

    def on_durable(durable_lsn, error):
        # What the callback reports is already on disk and visible as durable.
        calls.append((durable_lsn, error, log.last_lsn, ops.synced_bytes))
        if durable_lsn >= 4:
            done.set()

    first = log.enqueue([(1, b"first")])[0]
    log.notify_durable(first.lsn, on_durable)  # nothing waits: this starts the sync itself
    assert ops.entered.wait(10)
    later = log.enqueue([(1, b"a"), (1, b"b"), (1, b"c")])  # pile up behind the held sync
    for a in later:
        log.notify_durable(a.lsn, on_durable)  # same callable, same batch: called once
    assert calls == []  # nothing acknowledged while the first sync is held
    ops.gate.set()
    assert done.wait(10)
    assert [(c[0], c[1]) for c in calls] == [(1, None), (4, None)]
    assert all(c[2] >= c[0] for c in calls)
    assert calls[-1][3] > 0
    log.close()
    assert [r.payload for r in all_records(str(tmp_path / "x.wal"))] == [b"first", b"a", b"b", b"c"]


def test_an_already_durable_lsn_is_reported_at_once_and_an_unknown_one_is_refused(tmp_path):
    with wal.Log.create(str(tmp_path / "x.wal")) as log:
        a = log.append(1, b"x")
        seen = []
        log.notify_durable(a.lsn, lambda lsn, err: seen.append((lsn, err)))
        assert seen == [(1, None)]
        with pytest.raises(wal.WalError, match="never enqueued"):
            log.notify_durable(a.lsn + 1, lambda lsn, err: None)


def test_LOG_12_a_failed_sync_reports_the_failure_and_acknowledges_nothing(tmp_path):
    ops = FaultyFileOps(fail_fdatasync_at=CREATE_SYNCS + 2)
    log = wal.Log.create(str(tmp_path / "x.wal"), fileops=ops)
    ok = log.append(1, b"durable")
    got = []
    done = threading.Event()

    def on_durable(durable_lsn, error):
        got.append((durable_lsn, error))
        done.set()

    a = log.enqueue([(1, b"lost")])[0]
    log.notify_durable(a.lsn, on_durable)
    assert done.wait(10)
    (durable_lsn, error), = got
    assert durable_lsn == ok.lsn < a.lsn
    assert isinstance(error, wal.LogFailedError) and error.__cause__.errno == 5
    later = []
    log.notify_durable(a.lsn, lambda lsn, err: later.append(err))  # the failure is sticky
    assert isinstance(later[0], wal.LogFailedError)
    log.close()


def test_closing_with_records_not_yet_synced_reports_closed(tmp_path):
    ops = GatedSync(hold_at=CREATE_SYNCS + 1)
    log = wal.Log.create(str(tmp_path / "x.wal"), fileops=ops)
    got = []
    first = log.enqueue([(1, b"in flight")])[0]
    log.notify_durable(first.lsn, lambda lsn, err: got.append(("first", lsn, err)))
    assert ops.entered.wait(10)
    second = log.enqueue([(1, b"behind it")])[0]
    log.notify_durable(second.lsn, lambda lsn, err: got.append(("second", lsn, err)))
    closer = threading.Thread(target=log.close)
    closer.start()
    ops.gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert ("first", 1, None) in got
    (_, lsn, err), = [g for g in got if g[0] == "second"]
    assert lsn == 1 and isinstance(err, wal.LogClosedError)


def test_a_raising_callback_does_not_break_the_log(tmp_path):
    with wal.Log.create(str(tmp_path / "x.wal")) as log:
        a = log.enqueue([(1, b"x")])[0]
        done = threading.Event()

        def bad(lsn, err):
            done.set()
            raise RuntimeError("callback bug")

        log.notify_durable(a.lsn, bad)
        assert done.wait(10)
        assert log.append(1, b"y").lsn == 2 and log.failed is None
