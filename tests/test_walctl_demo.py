"""The demo script runs end to end and leaves a valid log with the cursor it set."""

import os

import wal
from tools import demo


def test_demo_runs_and_leaves_a_valid_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs(os.path.join(demo.DEMO_DIR, demo.LOG_NAME, "stale-from-an-earlier-run"))
    assert demo.main() == 0
    out = capsys.readouterr().out
    assert "valid" in out and "$ walctl replay" in out
    log = os.path.join(tmp_path, demo.DEMO_DIR, demo.LOG_NAME)
    report = wal.verify(log)
    total = demo.THREADS * demo.RECORDS_PER_THREAD
    assert report.ok and report.records == total and report.segments > 1
    assert wal.CursorStore(log, wal.OS_FILEOPS).list() == {"indexer": total - 2}
    assert not os.path.exists(os.path.join(log, "stale-from-an-earlier-run"))
