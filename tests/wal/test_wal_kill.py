"""A real ``kill -9`` of a process appending from several threads (FAULTS.md P1).

The child reports every acknowledged (LSN, hash) through a pipe. After the
kill the parent reopens the log: every reported record is present and
intact (LOG-8: the kill may leave a torn tail, which is trimmed; LOG-11:
only durable records were reported). A kill does not lose the page cache,
so this checks torn records and restart logic; power loss is
test_wal_crash.py's job.
"""

import json
import shutil
import signal
import subprocess

import pytest

import wal
from tests.support.helpers import child_command, read_json_lines


def run_and_kill(path, kill_after_acks, *, threads=4, size=300, prefix=()):
    args = {"path": path, "threads": threads, "per_thread": 10**9, "size": size, "segment_max_bytes": 1 << 15}
    proc = subprocess.Popen(list(prefix) + child_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    acks = {}
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["ready"], ready
        while len(acks) < kill_after_acks:
            line = proc.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            if "ack" in event:
                acks[event["ack"]] = event["hash"]
        proc.send_signal(signal.SIGKILL)
        # Not communicate(): it reads the pipe directly and would skip what
        # readline() already buffered, leaving ``rest`` to start mid-line.
        rest = proc.stdout.read()
        err = proc.stderr.read()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for event in read_json_lines(rest):
        if "ack" in event:
            acks[event["ack"]] = event["hash"]
    return proc.returncode, acks, ready["last_lsn"], err


def check_all_present(path, acks):
    with wal.Log.open(path) as log:
        got = {r.lsn: r.hash.hex() for r in log.read(1)}
        assert log.last_lsn >= max(acks, default=0)
    missing = {lsn for lsn in acks if got.get(lsn) != acks[lsn]}
    assert not missing, f"acknowledged records lost or changed: {sorted(missing)[:10]}"
    assert wal.verify(path).ok
    return got


@pytest.mark.heavy
def test_LOG_8_LOG_11_kill_9_at_several_points_keeps_every_acknowledged_record(tmp_path):
    path = str(tmp_path / "x.wal")
    all_acks = {}
    for kill_after in (0, 1, 37, 400, 2500):
        rc, acks, start_lsn, err = run_and_kill(path, kill_after)
        assert rc == -signal.SIGKILL, err.decode()[-2000:]
        assert len(acks) >= kill_after
        assert all(lsn > start_lsn for lsn in acks)
        all_acks.update(acks)
        got = check_all_present(path, all_acks)
        assert len(got) >= len(all_acks)
    assert len(wal.LogReader(path).segments()) > 3  # the kills landed across rotations


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (Debian package 'strace')")
@pytest.mark.parametrize("when", [2, 9])
def test_LOG_11_kill_exactly_at_an_fdatasync_loses_nothing_acknowledged(tmp_path, when):
    """strace sends SIGKILL on a thread's Nth fdatasync, before the sync runs:
    the batch being synced was never acknowledged and may or may not survive."""
    path = str(tmp_path / "x.wal")
    wal.Log.create(path).close()
    prefix = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fdatasync", "-e",
              f"inject=fdatasync:signal=KILL:when={when}"]
    rc, acks, _, err = run_and_kill(path, 10**9, threads=3, size=100, prefix=prefix)
    assert rc == -signal.SIGKILL, err.decode()[-2000:]
    got = check_all_present(path, acks)
    assert len(got) >= len(acks)
