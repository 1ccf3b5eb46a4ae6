"""``walctl status NODE --watch SECONDS``: refreshes until Ctrl-C (exit 0) and outlives a node that stops.

Ctrl-C is simulated by the sleep between refreshes raising KeyboardInterrupt,
which is what SIGINT does to ``time.sleep`` in the real command.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import wal
from engine.node import Node
from tools import cmd_cluster
from tools.walctl import cli


@pytest.fixture
def node(tmp_path):
    path = str(tmp_path / "node1")
    n = Node.init(path, name="node1")
    n.deliver("user/bob/INBOX", b"Subject: hi\r\n\r\nhello\r\n", create=True)
    n.close()
    return path


def _ctrl_c_after(monkeypatch, refreshes: int) -> list[float]:
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) >= refreshes:
            raise KeyboardInterrupt

    monkeypatch.setattr(cmd_cluster.time, "sleep", sleep)
    return slept


def test_watch_refreshes_until_ctrl_c(node, monkeypatch):
    slept = _ctrl_c_after(monkeypatch, 3)
    r = CliRunner().invoke(cli, ["status", node, "--watch", "1"])
    assert r.exit_code == 0, r.output
    assert slept == [1.0, 1.0, 1.0]
    assert r.output.count("node node1 (master)") == 3  # shown at start and after each of the first two sleeps
    assert "last_lsn" in r.output


def test_watch_json_prints_one_document_per_refresh(node, monkeypatch):
    _ctrl_c_after(monkeypatch, 2)
    r = CliRunner().invoke(cli, ["status", node, "--watch", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    assert r.output.count('"node": "node1"') == 2 and r.output.count('"last_lsn": 2') == 2


def test_watch_keeps_going_when_a_refresh_fails(node, monkeypatch):
    _ctrl_c_after(monkeypatch, 3)
    real = cmd_cluster._offline_status
    calls = []

    def flaky(path):
        calls.append(path)
        if len(calls) == 2:
            raise wal.WalError("the node is being restarted")
        return real(path)

    monkeypatch.setattr(cmd_cluster, "_offline_status", flaky)
    r = CliRunner().invoke(cli, ["status", node, "--watch", "1"])
    assert r.exit_code == 0, r.output
    assert "the node is being restarted" in r.stderr
    assert r.stdout.count("node node1 (master)") == 2  # the first and third refresh


def test_watch_fails_at_once_on_a_missing_node(tmp_path, monkeypatch):
    slept = _ctrl_c_after(monkeypatch, 100)
    r = CliRunner().invoke(cli, ["status", str(tmp_path / "nope"), "--watch", "1"])
    assert r.exit_code != 0 and not slept


def test_watch_needs_a_positive_interval(node):
    r = CliRunner().invoke(cli, ["status", node, "--watch", "0"])
    assert r.exit_code == 2 and "--watch" in r.output
