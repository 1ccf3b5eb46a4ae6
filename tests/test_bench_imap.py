"""``walctl bench imap`` runs end to end on a tiny mailbox (speed is never asserted, only that it measures)."""

from __future__ import annotations

import imaplib
import json
import socket

import pytest
from click.testing import CliRunner

from engine.imap.memory import MemoryBackend
from engine.imap.server import serve_in_thread
from tools.bench_imap import ROWS
from tools.walctl import cli

USER, PASSWORD = "bencher", "bench-pw"


@pytest.fixture
def other_server():
    """A second IMAP server (the in-memory backend on a thread) standing in for a peer such as Cyrus."""
    backend = MemoryBackend()
    backend.add_user(USER, PASSWORD)
    with serve_in_thread(backend, failed_login_delay_s=0, max_sessions_per_user=64) as srv:
        yield srv


def invoke(*args: str):
    return CliRunner().invoke(cli, ["bench", "imap", *args])


def test_own_node_alone_reports_every_row_and_the_stamp():
    """Without --target the bench starts a real node (fsynced log, SQLite store) serving IMAP."""
    result = invoke("--messages", "30", "--stores", "12", "--rounds", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["messages"] == 30 and report["stores"] == 12 and report["rounds"] == 1
    assert len(report["commit"]) >= 7 and isinstance(report["dirty"], bool) and report["date"]
    assert report["machine"]["cpus"] >= 1 and "imaplib" in report["client"]
    (mailwal,) = report["targets"]
    assert mailwal["name"] == "mailwal" and mailwal["label"] == "node: fsynced log, SQLite store"
    measured = set(ROWS) - {"replica_all", "replica_lag_p99"}
    assert set(mailwal["rows"]) == measured
    assert all(v > 0 for v in mailwal["rows"].values())
    assert all(len(mailwal["rounds"][k]) == 1 for k in measured)
    assert "replica_all" in mailwal["notes"]  # no replica given: said so, not measured
    assert "vs_best_peer" not in mailwal  # nobody to compare with
    assert "QRESYNC" in mailwal["capabilities"] and mailwal["mailbox"].startswith("bench-imap-")


def test_targets_replica_ratios_table_and_markdown(other_server):
    where = f"127.0.0.1:{other_server.port}"
    args = ["--own", "node", "--own", "memory", "--target", f"peer={where}", "--replica", f"peer={where}",
            "--user", USER, "--password", PASSWORD, "--messages", "24", "--stores", "16", "--replica-stores", "10",
            "--rounds", "2"]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    node, memory, peer = report["targets"]
    assert [t["name"] for t in report["targets"]] == ["mailwal", "mailwal-memory", "peer"]
    assert memory["label"] == "in-memory backend, no log, no fsync" and memory["reference"] is True
    assert node["reference"] is False and peer["reference"] is False and peer["replica"] == where
    assert set(peer["rows"]) == set(ROWS)  # the replica rows too (the "replica" here is the master itself)
    assert peer["details"]["replica_lag"]["stores"] == 2 * 10 and peer["details"]["replica_lag"]["polls"] > 0
    assert len(peer["rounds"]["select"]) == 2 and len(peer["rounds"]["replica_all"]) == 2

    def speed(t, key):
        return t["rows"][key] if ROWS[key][2] else 1 / t["rows"][key]

    for key in node["rows"]:  # node and peer: each one's speed over the other's; the reference is no peer
        assert node["vs_best_peer"][key] == pytest.approx(speed(node, key) / speed(peer, key))
        assert peer["vs_best_peer"][key] == pytest.approx(speed(peer, key) / speed(node, key))
        best = max(speed(node, key), speed(peer, key))
        assert memory["vs_best_peer"][key] == pytest.approx(speed(memory, key) / best)
    # every bench mailbox was deleted afterwards
    c = imaplib.IMAP4("127.0.0.1", other_server.port)
    c.login(USER, PASSWORD)
    assert b"bench-imap" not in b" ".join(c.list()[1])
    c.logout()

    table = invoke(*args[:-1], "1")
    assert table.exit_code == 0, table.output
    for what, unit, _ in ROWS.values():
        assert what in table.output
    assert ("mailwal: node: fsynced log, SQLite store; mailwal-memory: in-memory backend, no log, no fsync "
            "(a reference, never a peer)") in table.output and "vs best peer" in table.output
    assert "commit " in table.output and "machine:" in table.output

    md = invoke(*args[:-1], "1", "--markdown")
    assert md.exit_code == 0, md.output
    lines = md.output.splitlines()
    assert lines[0].startswith("**Measured:** commit ") and "machine:" in lines[0]
    rows = [x for x in lines if x.startswith("| ")]
    assert len(rows) == len(ROWS) + 1 and "| peer | vs best peer |" in rows[0]


def test_errors_are_one_line_and_exit_statuses_tell_the_truth(other_server):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = invoke("--target", f"x=127.0.0.1:{closed}", "--user", USER, "--password", PASSWORD, "--messages", "5")
    assert down.exit_code == 1 and down.output.startswith("Error: x: cannot connect to 127.0.0.1:")
    assert "Traceback" not in down.output and down.output.count("\n") == 1
    wrong = invoke("--target", f"p=127.0.0.1:{other_server.port}", "--user", USER, "--password", "nope",
                   "--messages", "5")
    assert wrong.exit_code == 1 and wrong.output.startswith(f"Error: p: login as {USER} refused")
    assert invoke("--target", "127.0.0.1:143", "--user", "u", "--password", "p").exit_code == 2
    assert invoke("--target", "a=127.0.0.1:1", "--target", "a=127.0.0.1:2", "--user", "u",
                  "--password", "p").exit_code == 2
    assert invoke("--target", "a=127.0.0.1:1").exit_code == 2  # no --user/--password
    assert invoke("--replica", "b=127.0.0.1:1").exit_code == 2  # a replica of no target
