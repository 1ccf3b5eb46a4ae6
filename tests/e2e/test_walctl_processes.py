"""walctl as a real process: ``replay --follow`` until Ctrl-C, ``python -m tools``, progress on a terminal."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time

import pytest

import wal
from tests.support import ROOT
from tests.support.helpers import assert_no_traceback, make_log
from wal import codec


@pytest.fixture
def log(tmp_path):
    return make_log(tmp_path / "node.wal")


def _walctl_process(*args, **kw):
    class Walctl(subprocess.Popen):
        """``communicate()`` fails the test when walctl printed a traceback."""

        def communicate(self, *a, **k):
            out, err = super().communicate(*a, **k)
            assert_no_traceback(err or "", args)
            return out, err

    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    return Walctl([sys.executable, "-m", "tools", *map(str, args)], cwd=ROOT, env=env,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_replay_follow_prints_new_records_until_ctrl_c(log):
    proc = _walctl_process("replay", log, "--from", "40", "--follow", "--json")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        with wal.Log.open(log, segment_max_bytes=2048) as lg:
            for i in range(41, 44):
                lg.append(7, codec.dumps({"uid": i}))
        deadline = 200  # x 0.05 s: wait for the follower to print LSN 43
        while deadline and not any('"lsn": 43' in ln for ln in lines):
            time.sleep(0.05)
            deadline -= 1
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    assert rc == 0, proc.stderr.read()
    assert [json.loads(ln)["lsn"] for ln in lines] == [40, 41, 42, 43]


def test_python_dash_m_tools_runs_walctl(log):
    proc = _walctl_process("verify", log, "--json")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["records"] == 40


def test_verify_draws_progress_only_on_a_terminal(log):
    """With stderr on a pseudo-terminal the progress bar runs (and is transient);
    stdout still carries the plain report."""
    master, slave = pty.openpty()
    try:
        env = dict(os.environ, PYTHONPATH=ROOT, COLUMNS="100")
        proc = subprocess.run([sys.executable, "-m", "tools", "verify", log], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=slave, text=True, timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    assert "valid" in proc.stdout and "\x1b" not in proc.stdout
