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
    """Without --target the bench starts a master and a replica node (walctl serve/follow --imap)."""
    result = invoke("--messages", "30", "--stores", "12", "--replica-stores", "8", "--rounds", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["messages"] == 30 and report["stores"] == 12 and report["rounds"] == 1
    assert len(report["commit"]) >= 7 and isinstance(report["dirty"], bool) and report["date"]
    assert report["machine"]["cpus"] >= 1 and "imaplib" in report["client"]
    (mailwal,) = report["targets"]
    assert mailwal["name"] == "mailwal" and mailwal["label"].startswith("walctl serve --imap (fsynced log")
    assert mailwal["replica"] and mailwal["reference"] is False
    assert set(mailwal["rows"]) == set(ROWS) and mailwal["notes"] == {}
    assert all(v > 0 for k, v in mailwal["rows"].items() if not k.startswith("replica_"))
    assert all(v >= 0 for k, v in mailwal["rows"].items() if k.startswith("replica_"))
    assert all(len(mailwal["rounds"][k]) == 1 for k in ROWS)
    assert mailwal["details"]["replica_lag"]["stores"] == 8
    assert "vs_best_peer" not in mailwal  # nobody to compare with
    assert "QRESYNC" in mailwal["capabilities"] and mailwal["mailbox"].startswith("bench-imap-")


def test_targets_replica_ratios_table_and_markdown(other_server):
    """Two targets (both the in-memory server on a thread, as two peers would be) and the reference."""
    where = f"127.0.0.1:{other_server.port}"
    common = ["--target", f"peer={where}", "--replica", f"peer={where}", "--target", f"twin={where}",
              "--user", USER, "--password", PASSWORD, "--messages", "16", "--stores", "8", "--replica-stores", "6"]
    result = invoke("--own", "memory", *common, "--rounds", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [t["name"] for t in report["targets"]] == ["mailwal-memory", "peer", "twin"]
    memory, peer, twin = report["targets"]
    assert memory["label"] == "in-memory backend, no log, no fsync" and memory["reference"] is True
    assert peer["reference"] is False and peer["replica"] == where and twin["replica"] is None
    assert set(peer["rows"]) == set(ROWS)  # the replica rows too (the "replica" here is the master itself)
    assert set(twin["rows"]) == set(memory["rows"]) == set(ROWS) - {"replica_all", "replica_lag_p99"}
    assert peer["details"]["replica_lag"]["stores"] == 2 * 6 and peer["details"]["replica_lag"]["polls"] > 0
    assert len(peer["rounds"]["select"]) == 2 and len(peer["rounds"]["replica_all"]) == 2
    assert peer["mailbox"] != twin["mailbox"]

    def speed(t, key):
        return t["rows"][key] if ROWS[key][2] else 1 / t["rows"][key]

    for key in twin["rows"]:  # peer and twin: each one's speed over the other's; the reference is nobody's peer
        assert peer["vs_best_peer"][key] == pytest.approx(speed(peer, key) / speed(twin, key))
        assert twin["vs_best_peer"][key] == pytest.approx(speed(twin, key) / speed(peer, key))
        best = max(speed(peer, key), speed(twin, key))
        assert memory["vs_best_peer"][key] == pytest.approx(speed(memory, key) / best)
    assert "replica_all" not in peer.get("vs_best_peer", {})  # nobody else has a replica
    # every bench mailbox was deleted afterwards
    c = imaplib.IMAP4("127.0.0.1", other_server.port)
    c.login(USER, PASSWORD)
    assert b"bench-imap" not in b" ".join(c.list()[1])
    c.logout()

    table = invoke("--own", "memory", *common, "--rounds", "1")
    assert table.exit_code == 0, table.output
    for what, unit, _ in ROWS.values():
        assert what in table.output
    assert "mailwal-memory: in-memory backend, no log, no fsync (a reference, never a peer)" in table.output
    assert "vs best peer" in table.output
    assert "commit " in table.output and "machine:" in table.output

    md = invoke("--own", "memory", *common, "--rounds", "1", "--markdown")
    assert md.exit_code == 0, md.output
    lines = md.output.splitlines()
    assert lines[0].startswith("**Measured:** commit ") and "machine:" in lines[0]
    rows = [x for x in lines if x.startswith("| ")]
    assert len(rows) == len(ROWS) + 1 and "| peer | vs best peer | twin | vs best peer |" in rows[0]


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
