"""Power loss at every crash point (FAULTS.md D8, ALICE / CrashMonkey style).

A workload runs on :class:`helpers.CrashRecorder`. For every recorded
operation we rebuild every tree a power loss right after it could leave
(only what was fsynced; each prefix of unforced directory operations; each
prefix of unsynced writes with the last one torn; a zero-filled hole) and
check that the log reopens cleanly and keeps every acknowledged record,
cursor and epoch (LOG-2, LOG-8, LOG-11, LOG-13 and the durability rule of
LOG-12: nothing is acknowledged before fdatasync).
"""

import os
import shutil
import threading
from dataclasses import dataclass, field

import pytest

import wal
from tests.support.helpers import CrashRecorder, SimulatedCrash, all_records, append_bytes, payload_for, seg_paths, read_bytes


@dataclass
class History:
    """What the workload was told, stamped with the recorder's op count."""

    created_at: int | None = None
    acks: list = field(default_factory=list)  # (op_count, Appended)
    cursor_sets: list = field(default_factory=list)  # (start, end, name, lsn)
    epochs: list = field(default_factory=list)  # (end, epoch)
    drops_started: list = field(default_factory=list)  # op counts
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, rec, appended):
        with self.lock:
            for a in appended:
                self.acks.append((rec.op_count, a))


def check_state(dest, hist, point, final_hashes):
    """Recover the log in ``dest`` and check it against what was acknowledged at ``point``."""
    path = os.path.join(dest, "x.wal")
    if not os.path.exists(path):
        assert hist.created_at is None or hist.created_at > point, "an acknowledged log creation was lost"
        return
    report = wal.verify(path)  # read-only, before recovery changes anything
    assert report.ok, report.error
    with wal.Log.open(path) as log:
        recs = list(log.read(log.first_lsn))
        lsns = [r.lsn for r in recs]
        assert lsns == list(range(log.first_lsn, log.last_lsn + 1))
        for r in recs:  # a prefix of the history the writer produced
            assert final_hashes[r.lsn] == r.hash, f"LSN {r.lsn} differs from what was written"
        acked = [a for at, a in hist.acks if at <= point]
        if acked:
            assert log.last_lsn >= max(a.lsn for a in acked), "an acknowledged record was lost"
        if not any(start < point for start in hist.drops_started):
            assert log.first_lsn == 1
        for name in {c[2] for c in hist.cursor_sets if c[0] < point}:
            done = [lsn for start, end, n, lsn in hist.cursor_sets if n == name and end <= point]
            tried = [lsn for start, end, n, lsn in hist.cursor_sets if n == name and start < point]
            try:
                value = log.cursors.get(name)
            except wal.CursorError:
                assert not done, f"cursor {name} was set and acknowledged but is gone"
                continue
            assert value in tried
            if done:
                assert value >= done[-1], f"cursor {name} went back from {done[-1]} to {value}"
        done_epochs = [e for end, e in hist.epochs if end <= point]
        if done_epochs:
            assert log.epoch >= max(done_epochs)
        nxt = log.append(1, b"after the crash")
        assert nxt.lsn == log.last_lsn
    assert wal.verify(path).ok


def explore(rec, hist, tmp_path, final_hashes, points=None, max_cuts=8):
    """Check every crash state at every crash point; returns how many."""
    n = 0
    points = range(rec.op_count + 1) if points is None else points
    for point in points:
        for i, state in enumerate(rec.crash_states(point, max_cuts=max_cuts)):
            dest = str(tmp_path / f"crash-{point}-{i}")
            state.materialise(dest)
            try:
                check_state(dest, hist, point, final_hashes)
            except BaseException as exc:
                raise AssertionError(f"crash state {state.description}: {exc!r}") from exc
            shutil.rmtree(dest)
            n += 1
    return n


@pytest.mark.heavy
def test_LOG_2_LOG_8_every_crash_point_of_a_workload_with_rotation_cursors_and_retention(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    rec = CrashRecorder(str(root))
    hist = History()
    log = wal.Log.create(str(root / "x.wal"), segment_max_bytes=400, fileops=rec)
    hist.created_at = rec.op_count

    def cursor(name, lsn):
        start = rec.op_count
        log.cursors.set(name, lsn)
        hist.cursor_sets.append((start, rec.op_count, name, lsn))

    sizes = [0, 10, 150, 300, 5, 500, 20, 20, 20, 90]
    for i, size in enumerate(sizes):
        if i % 3 == 2:
            hist.ack(rec, log.append_many([(2, payload_for(i, size)), (3, payload_for(-i, 7))]))
        else:
            hist.ack(rec, [log.append(1, payload_for(i, size))])
        if i == 3:
            cursor("replica-a", 4)
        if i == 5:
            log.set_epoch(3)
            hist.epochs.append((rec.op_count, 3))
            cursor("replica-a", 8)
            cursor("replica-b", 2)
        if i == 7:
            cursor("replica-b", 6)
            hist.drops_started.append(rec.op_count)
            dropped = log.drop_before(7)
            assert dropped
    log.close()
    final_hashes = {r.lsn: r.hash for r in wal.LogReader(str(root / "x.wal")).records(log.first_lsn)}
    final_hashes.update({a.lsn: a.hash for _, a in hist.acks})
    assert len(seg_paths(str(root / "x.wal"))) >= 3
    n = explore(rec, hist, tmp_path, final_hashes, max_cuts=24)
    assert n > rec.op_count * 2  # many states per point, not just "synced only"


@pytest.mark.heavy
def test_LOG_8_LOG_11_concurrent_appenders_at_every_crash_point(tmp_path):
    """Group commit: what any thread was told is durable survives every crash."""
    root = tmp_path / "root"
    root.mkdir()
    rec = CrashRecorder(str(root))
    hist = History()
    log = wal.Log.create(str(root / "x.wal"), segment_max_bytes=1500, fileops=rec)
    hist.created_at = rec.op_count

    def worker(t):
        for n in range(12):
            items = [(t, payload_for(t * 100 + n, 30 + n))] * (1 + n % 2)
            hist.ack(rec, log.append_many(items))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    final_hashes = {a.lsn: a.hash for _, a in hist.acks}
    assert len(final_hashes) == 4 * 18
    explore(rec, hist, tmp_path, final_hashes, max_cuts=4)


def test_LOG_8_a_crash_during_recovery_never_loses_the_torn_bytes(tmp_path):
    """Torn bytes are copied to torn/ (durably) before the segment is cut:
    at every crash point of the trim they are in one place or the other."""
    root = tmp_path / "root"
    root.mkdir()
    path = str(root / "x.wal")
    with wal.Log.create(path) as log:
        acks = [log.append(1, payload_for(i, 40)) for i in range(3)]
    tail = b"\x07torn write bytes" * 5
    append_bytes(seg_paths(path)[-1], tail)
    rec = CrashRecorder(str(root))
    with wal.Log.open(path, fileops=rec) as log:
        assert log.last_lsn == 3
    assert rec.op_count >= 6
    for point in range(rec.op_count + 1):
        for i, state in enumerate(rec.crash_states(point)):
            dest = str(tmp_path / f"c{point}-{i}")
            state.materialise(dest)
            p = os.path.join(dest, "x.wal")
            seg = read_bytes(seg_paths(p)[-1])
            torn_dir = os.path.join(p, "torn")
            copies = [read_bytes(os.path.join(torn_dir, f)) for f in os.listdir(torn_dir) if f.endswith(".torn")] \
                if os.path.isdir(torn_dir) else []
            assert seg.endswith(tail) or tail in copies, state.description
            with wal.Log.open(p) as log2:
                assert log2.last_hash == acks[-1].hash
            shutil.rmtree(dest)


def test_LOG_15_a_crash_during_repair_never_loses_the_cut_bytes(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    path = str(root / "x.wal")
    with wal.Log.create(path, segment_max_bytes=300) as log:
        for i in range(8):
            log.append(1, payload_for(i, 100))
    segs = seg_paths(path)
    victim = segs[1]
    originals = {os.path.basename(p): read_bytes(p) for p in segs}
    with open(victim, "r+b") as f:
        f.seek(200)
        f.write(b"\xff")
    damaged = read_bytes(victim)
    rec = CrashRecorder(str(root))
    report = wal.repair(path, fileops=rec)
    assert report.cut_segment == os.path.basename(victim)
    for point in range(rec.op_count + 1):
        for i, state in enumerate(rec.crash_states(point, max_cuts=3)):
            dest = str(tmp_path / f"r{point}-{i}")
            state.materialise(dest)
            p = os.path.join(dest, "x.wal")
            present = {os.path.basename(s): read_bytes(s) for s in seg_paths(p)}
            broken_dir = os.path.join(p, "broken")
            backups = {f: read_bytes(os.path.join(broken_dir, f)) for f in os.listdir(broken_dir)} \
                if os.path.isdir(broken_dir) else {}
            # every later segment is in the log or backed up whole
            for name, data in originals.items():
                if name > os.path.basename(victim):
                    assert present.get(name) == data or any(k.startswith(name) and v == data for k, v in backups.items()), state.description
            cut = present.get(os.path.basename(victim), b"")
            assert damaged.startswith(cut)
            if len(cut) < len(damaged):
                assert any(v == damaged[report.cut_offset:] for v in backups.values()), state.description
            shutil.rmtree(dest)


def test_LOG_12_simulated_power_loss_mid_batch_fails_the_log_and_recovers(tmp_path):
    """The recorder loses power between write and fdatasync of a batch: the
    appender is not acknowledged, and every crash state recovers."""
    root = tmp_path / "root"
    root.mkdir()
    rec = CrashRecorder(str(root))
    path = str(root / "x.wal")
    log = wal.Log.create(path, fileops=rec)
    acked = [log.append(1, b"a" * 50), log.append(1, b"b" * 50)]
    rec.crash_after(1)  # the write of the next batch happens, its fdatasync does not
    with pytest.raises(wal.LogFailedError) as ei:
        log.append(1, b"c" * 50)
    assert isinstance(ei.value.__cause__, SimulatedCrash)
    with pytest.raises(wal.LogFailedError):
        log.append(1, b"d")
    log.close()
    seen_lengths = set()
    for i, state in enumerate(rec.crash_states()):
        dest = str(tmp_path / f"s{i}")
        state.materialise(dest)
        p = os.path.join(dest, "x.wal")
        with wal.Log.open(p) as log2:
            assert log2.last_lsn >= 2 and log2.hash_at(2) == acked[1].hash
            seen_lengths.add(log2.last_lsn)
        assert [r.lsn for r in all_records(p)][:2] == [1, 2]
    assert seen_lengths == {2, 3}  # the unacknowledged record may or may not survive


class _ForgetfulSync(CrashRecorder):
    """A planted bug: fdatasync returns without making anything durable."""

    def fdatasync(self, fd):
        self._check()


class _ForgetfulDirSync(CrashRecorder):
    """A planted bug: directory fsync does nothing."""

    def fsync_dir(self, path):
        self._check()


@pytest.mark.parametrize("recorder", [_ForgetfulSync, _ForgetfulDirSync])
def test_the_crash_model_catches_a_planted_durability_bug(tmp_path, recorder):
    """Without this, a crash test that never fails would prove nothing."""
    root = tmp_path / "root"
    root.mkdir()
    rec = recorder(str(root))
    hist = History()
    log = wal.Log.create(str(root / "x.wal"), segment_max_bytes=200, fileops=rec)
    hist.created_at = rec.op_count
    for i in range(4):
        hist.ack(rec, [log.append(1, payload_for(i, 150))])
    log.close()
    final_hashes = {a.lsn: a.hash for _, a in hist.acks}
    with pytest.raises(AssertionError, match="crash state"):
        explore(rec, hist, tmp_path, final_hashes, max_cuts=2)
