"""The writer lock helper (LOG-14): wal.LogLock refuses a second holder with LogLockedError.

Two real processes: a child holds the lock (as a Log or a bare LogLock); this
process is refused, told which process to stop, and gets the lock once the
child is killed. The CLI turns the error into one ``Error:`` line.
"""

import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

import wal
from tests.conftest import ROOT
from tools.walctl import cli

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
import wal
holder = {holder}
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def log_path(tmp_path):
    path = str(tmp_path / "x.wal")
    wal.Log.create(path).close()
    return path


def _hold(path: str, holder: str) -> subprocess.Popen:
    code = HOLD.format(root=ROOT, holder=holder.format(path=path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"locked"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


@pytest.mark.parametrize("holder", ["wal.Log.open({path!r})", "wal.LogLock({path!r}).acquire()"])
def test_LOG_14_a_second_holder_in_another_process_gets_LogLockedError_naming_the_holder(log_path, holder):
    proc = _hold(log_path, holder)
    try:
        assert wal.log_in_use(log_path)
        with pytest.raises(wal.LogLockedError) as refused:
            wal.LogLock(log_path).acquire()
        err = refused.value
        assert isinstance(err, wal.WalError) and err.path == log_path
        assert err.pid == proc.pid and "python" in err.command
        assert f"pid {proc.pid}" in str(err) and "stop that process before opening it for writing" in str(err)
        with pytest.raises(wal.LogLockedError, match="open for writing by another process"):
            wal.Log.open(log_path)
        with pytest.raises(wal.LogLockedError, match="before repairing it"):
            wal.repair(log_path)
    finally:
        _kill(proc)
    assert not wal.log_in_use(log_path)  # the kernel dropped the lock with the process
    with wal.LogLock(log_path) as lock:
        assert lock.held
    assert not lock.held


def test_LOG_14_walctl_repair_refused_by_a_writer_prints_one_error_line(log_path):
    proc = _hold(log_path, "wal.Log.open({path!r})")
    try:
        r = CliRunner().invoke(cli, ["repair", "--yes", log_path])
    finally:
        _kill(proc)
    assert r.exit_code == 1
    [line] = r.output.strip().splitlines()
    assert line.startswith(f"Error: log {log_path} is open for writing by another process (pid {proc.pid}: ")
    assert line.endswith("; stop that process before repairing it")


def test_LOG_14_a_second_holder_in_this_process_is_told_to_close_its_Log(log_path):
    with wal.Log.open(log_path):
        with pytest.raises(wal.LogLockedError, match=r"another Log in this process \(pid \d+\); close that Log"):
            wal.Log.open(log_path)
        with pytest.raises(wal.LogLockedError):
            with wal.LogLock(log_path, purpose="repairing it"):
                pass
    with wal.LogLock(log_path, purpose="repairing it") as lock:
        assert wal.repair(log_path, lock=lock).cut_segment is None  # a held lock is passed, not taken again
        with pytest.raises(wal.WalError, match="already held"):
            lock.acquire()


def test_repair_refuses_a_lock_it_does_not_hold(log_path, tmp_path):
    with pytest.raises(wal.WalError, match="does not hold"):
        wal.repair(log_path, lock=wal.LogLock(log_path))
    other = str(tmp_path / "other.wal")
    wal.Log.create(other).close()
    with wal.LogLock(other) as lock, pytest.raises(wal.WalError, match="does not hold"):
        wal.repair(log_path, lock=lock)


def test_log_in_use_creates_nothing(tmp_path):
    os.mkdir(tmp_path / "empty")
    assert not wal.log_in_use(str(tmp_path / "empty"))
    assert os.listdir(tmp_path / "empty") == []
    assert not wal.log_in_use(str(tmp_path / "missing"))
