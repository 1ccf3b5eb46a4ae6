"""Sticky failure (LOG-12): a failed write or fdatasync fails the log for good.

In process with an injecting FileOps, and from outside with ``strace``
syscall injection (FAULTS.md D4) and a real full tmpfs (D1, root only).
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

import wal
from tests.support.helpers import (
    FaultyFileOps,
    all_records,
    child_command,
    payload_for,
    read_json_lines,
    seg_paths,
    read_text,
)
from tests.support import ROOT

CREATE_SYNCS = 2  # Log.create: the first segment's header and the EPOCH file


class GatedEIO(FaultyFileOps):
    """The failing fdatasync waits at a gate first, so others can pile up."""

    def __init__(self, fail_at):
        super().__init__(fail_fdatasync_at=fail_at)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def fdatasync(self, fd):
        if len(self.fdatasync_calls) + 1 == self.fail_fdatasync_at:
            self.entered.set()
            assert self.gate.wait(10)
        super().fdatasync(fd)


def test_LOG_12_fdatasync_eio_fails_the_waiting_appenders_and_is_never_retried(tmp_path):
    path = str(tmp_path / "x.wal")
    ops = GatedEIO(fail_at=CREATE_SYNCS + 3)
    log = wal.Log.create(path, fileops=ops)
    acked = [log.append(1, b"one"), log.append(1, b"two")]
    results = {}

    def appender(name):
        try:
            results[name] = log.append(1, name.encode())
        except wal.WalError as exc:
            results[name] = exc

    leader = threading.Thread(target=appender, args=("leader",))
    leader.start()
    assert ops.entered.wait(10)
    followers = [threading.Thread(target=appender, args=(f"f{i}",)) for i in range(3)]
    for t in followers:
        t.start()
    deadline = time.monotonic() + 10
    while len(log._pending) < 3 and time.monotonic() < deadline:  # followers queued behind the sync
        time.sleep(0.001)
    ops.gate.set()
    for t in [leader] + followers:
        t.join(10)
    assert set(results) == {"leader", "f0", "f1", "f2"}
    assert all(isinstance(r, wal.LogFailedError) for r in results.values()), results
    assert isinstance(results["leader"].__cause__, OSError) and results["leader"].__cause__.errno == errno.EIO
    assert "LSNs 3..3" in str(results["leader"])
    assert log.failed is not None and log.last_lsn == 2
    calls = len(ops.fdatasync_calls)
    with pytest.raises(wal.LogFailedError):
        log.append(1, b"later")
    with pytest.raises(wal.LogFailedError):
        log.append_many([(1, b"x"), (1, b"y")])
    with pytest.raises(wal.LogFailedError):
        log.enqueue([(1, b"z")])
    log.close()
    assert len(ops.fdatasync_calls) == calls == CREATE_SYNCS + 3  # never called again
    with wal.Log.open(path) as again:  # reopening recovers from what is on disk
        assert again.last_lsn >= 2 and again.hash_at(2) == acked[1].hash
        again.append(1, b"after reopen")
    assert wal.verify(path).ok


@pytest.mark.parametrize("short", [0, 1, 63, 64, 70])
def test_LOG_12_enospc_mid_write_fails_the_log_and_reopen_trims_the_partial_batch(tmp_path, short):
    path = str(tmp_path / "x.wal")
    ops = FaultyFileOps(fail_write_at=CREATE_SYNCS + 3, short_write=short)
    log = wal.Log.create(path, fileops=ops)
    acked = [log.append(1, payload_for(i, 20)) for i in range(2)]
    with pytest.raises(wal.LogFailedError) as ei:
        log.append_many([(1, payload_for(9, 20)), (1, payload_for(10, 20))])
    assert ei.value.__cause__.errno == errno.ENOSPC
    syncs = len(ops.fdatasync_calls)
    with pytest.raises(wal.LogFailedError):
        log.append(1, b"x")
    log.close()
    assert len(ops.fdatasync_calls) == syncs
    with wal.Log.open(path) as again:
        assert again.last_lsn == 2 and again.last_hash == acked[-1].hash
        assert bool(again.torn_tails) == (short > 0)
    assert [r.hash for r in all_records(path)] == [a.hash for a in acked]


def test_LOG_12_enospc_while_creating_the_next_segment(tmp_path):
    path = str(tmp_path / "x.wal")
    ops = FaultyFileOps(fail_write_at=CREATE_SYNCS + 2, short_write=10)  # the new segment's header
    log = wal.Log.create(path, segment_max_bytes=100, fileops=ops)
    a = log.append(1, bytes(100))
    with pytest.raises(wal.LogFailedError):
        log.append(1, b"needs a new segment")
    log.close()
    assert any(n.endswith(".tmp") for n in os.listdir(path))  # the half-made segment
    with wal.Log.open(path) as again:
        assert again.last_lsn == 1 and again.last_hash == a.hash
        again.append(1, b"ok now")
    assert not any(n.endswith(".tmp") for n in os.listdir(path))
    assert [r.lsn for r in all_records(path)] == [1, 2]


def test_LOG_12_a_failed_cursor_write_keeps_the_old_value(tmp_path):
    path = str(tmp_path / "x.wal")
    ops = FaultyFileOps()
    with wal.Log.create(path, fileops=ops) as log:
        log.append(1, b"x")
        log.cursors.set("c", 1)
        ops.fail_fdatasync_at = len(ops.fdatasync_calls) + 1
        with pytest.raises(OSError):
            log.cursors.set("c", 1)
        assert log.cursors.get("c") == 1
        assert log.failed is None  # a cursor is not the log


# -- the same from outside: strace fault injection ---------------------------------


def _strace_available():
    return shutil.which("strace") is not None and subprocess.run(
        ["strace", "-f", "-o", "/dev/null", "-e", "trace=fdatasync", "true"], capture_output=True
    ).returncode == 0


def _appenders_under_strace(tmp_path, path: str, strace_args: list[str]) -> tuple[dict, list, list[str]]:
    """Three threads append 40 records each to ``path`` in a child run under strace with
    ``strace_args``, and go on appending after their first error. Checks that the log
    failed once for all (every thread told LogFailedError, and again on its next append);
    returns the acknowledged {LSN: hash hex}, the errors and the strace output lines."""
    trace = str(tmp_path / "trace.txt")
    args = {"path": path, "threads": 3, "per_thread": 40, "size": 64, "after_error": True}
    proc = subprocess.run(["strace", "-f", "-qq", "-o", trace, *strace_args, *child_command(args)],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    events = read_json_lines(proc.stdout)
    acks = {e["ack"]: e["hash"] for e in events if "ack" in e}
    errors = [e for e in events if "error" in e]
    assert events[-1] == {"done": True, "failed": True}
    assert len(errors) == 3 and {e["error"] for e in errors} == {"LogFailedError"}
    assert [e["after_error"] for e in events if "after_error" in e] == ["LogFailedError"] * 3
    return acks, errors, read_text(trace).splitlines()


@pytest.mark.skipif(not _strace_available(), reason="needs strace (Debian package 'strace') able to trace children")
@pytest.mark.parametrize("when", [3, 6])
def test_LOG_12_strace_injected_fdatasync_eio(tmp_path, when):
    """strace makes the Nth fdatasync of a thread fail with EIO (the real call
    is skipped); the child reports what it was told."""
    path = str(tmp_path / "x.wal")
    acks, errors, lines = _appenders_under_strace(
        tmp_path, path, ["-e", "trace=fdatasync", "-e", f"inject=fdatasync:error=EIO:when={when}"])
    m = [re.search(r"LSNs (\d+)\.\.(\d+)", e["message"]) for e in errors]
    first_failed = min(int(x.group(1)) for x in m if x)
    assert all(lsn < first_failed for lsn in acks), "a record of the failed batch was acknowledged"

    injected = [i for i, line in enumerate(lines) if "INJECTED" in line]
    assert len(injected) == 1, lines[-10:]
    later_calls = [line for line in lines[injected[0] + 1:] if "fdatasync(" in line and "resumed" not in line]
    assert later_calls == [], "fdatasync was called again after it failed"

    with wal.Log.open(path) as log:
        assert log.last_lsn >= max(acks, default=0)
        got = {r.lsn: r.hash.hex() for r in log.read(1)}
    assert all(got[lsn] == h for lsn, h in acks.items())


@pytest.mark.skipif(not _strace_available(), reason="needs strace (Debian package 'strace') able to trace children")
def test_LOG_12_strace_injected_write_eio_on_the_segment(tmp_path):
    """A ``write`` of a batch to the segment fails with EIO (strace, only on
    that file: the child's own stdout is untouched): the batch and every later
    append fail, no fdatasync follows on that file, and the log reopens with
    every acknowledged record."""
    path = str(tmp_path / "x.wal")
    segment = os.path.join(path, "00000000000000000001.seg")  # the first segment's name (LOG-2)
    acks, errors, lines = _appenders_under_strace(
        tmp_path, path, ["-P", segment, "-e", "trace=write,fdatasync", "-e", "inject=write:error=EIO:when=4"])
    assert all("Input/output error" in e["message"] for e in errors)  # the cause is named
    injected = [i for i, line in enumerate(lines) if "INJECTED" in line]
    assert len(injected) == 1 and "write(" in lines[injected[0]], lines[-10:]
    later = [line for line in lines[injected[0] + 1:] if ("fdatasync(" in line or "write(" in line)
             and "resumed" not in line]
    assert later == [], "the failed segment was written or synced again"
    with wal.Log.open(path) as log:
        assert log.last_lsn == max(acks)  # nothing of the failed batch reached the file
        got = {r.lsn: r.hash.hex() for r in log.read(1)}
    assert all(got[lsn] == h for lsn, h in acks.items())


# -- a real full disk: tmpfs in a private mount namespace ---------------------------


ENOSPC_CHILD = r"""
import errno, json, os, sys
sys.path[:0] = [ROOT]
import wal
d = sys.argv[1]
out = {}
with open(os.path.join(d, "ballast"), "wb") as f:
    f.write(b"b" * 64 * 1024)
path = os.path.join(d, "x.wal")
log = wal.Log.create(path, segment_max_bytes=1 << 20)
acks = {}
try:
    for i in range(10000):
        a = log.append(1, bytes([i % 256]) * 4000)
        acks[a.lsn] = a.hash.hex()
except wal.LogFailedError as exc:
    out["error"] = type(exc).__name__
    out["cause_errno"] = getattr(exc.__cause__, "errno", None)
try:
    log.append(1, b"x")
    out["after"] = "accepted"
except wal.WalError as exc:
    out["after"] = type(exc).__name__
log.close()
try:
    wal.Log.open(path).close()
    out["reopen_full"] = "ok"
except OSError as exc:
    out["reopen_full"] = errno.errorcode.get(exc.errno, str(exc.errno))
os.unlink(os.path.join(d, "ballast"))
with wal.Log.open(path) as log:
    recs = {r.lsn: r.hash.hex() for r in log.read(1)}
    out["all_acked_intact"] = all(recs.get(k) == v for k, v in acks.items())
    out["acked"] = len(acks)
    out["torn"] = len(log.torn_tails)
    out["append_after_free"] = log.append(1, b"room again").lsn
out["verify_ok"] = wal.verify(path).ok
print(json.dumps(out))
"""


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1) to mount a tmpfs")
def test_LOG_12_real_enospc_on_a_full_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = ENOSPC_CHILD.replace("ROOT", repr(ROOT))
    script = tmp_path / "child.py"
    script.write_text(code)
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
           f"mount -t tmpfs -o size=512k tmpfs {mnt} && exec {sys.executable} {script} {mnt}"]
    proc = subprocess.run(cmd, capture_output=True, timeout=120)
    if proc.returncode != 0 and b"mount" in proc.stderr and b"permission" in proc.stderr.lower():
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.decode()}")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert out["error"] == "LogFailedError" and out["cause_errno"] == errno.ENOSPC
    assert out["after"] == "LogFailedError"
    assert out["reopen_full"] in ("ok", "ENOSPC")  # trimming needs room for the torn/ copy
    assert out["all_acked_intact"] and out["acked"] > 50
    assert out["append_after_free"] > out["acked"]  # the failed batch may survive whole, never acked
    assert out["verify_ok"]


@pytest.mark.parametrize("fail_at", [CREATE_SYNCS + n for n in (1, 2, 3, 5, 8, 13)])
def test_LOG_12_eio_under_many_concurrent_appenders(tmp_path, fail_at):
    """Whichever batch fails, and whoever was syncing it (an appender or the
    flusher), no appender hangs, nothing at or after the failed batch is
    acknowledged, and fdatasync is never called again."""
    path = str(tmp_path / "x.wal")
    ops = FaultyFileOps(fail_fdatasync_at=fail_at)
    log = wal.Log.create(path, segment_max_bytes=2000, fileops=ops)
    acks, errors, lock = [], [], threading.Lock()

    def worker(t):
        for n in range(40):
            try:
                got = log.append_many([(t, payload_for(t * 100 + n, 40))] * (1 + n % 3))
            except (wal.LogFailedError, wal.LogClosedError) as exc:
                with lock:
                    errors.append(exc)
                return
            with lock:
                acks.extend(got)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "an appender hangs after the failure"
    assert log.failed is not None and len(errors) == 8
    failed = re.search(r"LSNs (\d+)\.\.(\d+)", str(log.failed))
    first_failed = int(failed.group(1))
    assert all(a.lsn < first_failed for a in acks)
    assert log.last_lsn == first_failed - 1
    calls = len(ops.fdatasync_calls)
    assert calls == fail_at
    log.close()
    assert len(ops.fdatasync_calls) == calls
    with wal.Log.open(path) as again:
        got = {r.lsn: r.hash for r in again.read(1)}
    assert all(got[a.lsn] == a.hash for a in acks)
