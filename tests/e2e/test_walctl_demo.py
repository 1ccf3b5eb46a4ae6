"""``make demo`` (tools/demo.py) runs its whole cluster story with real processes and passes its own checks.

The demo starts three ``walctl serve``/``follow`` processes on free ports of
127.0.0.1 and delivers over LMTP; this test then looks at the node
directories it leaves behind, independently of the demo's own checks.
"""

from __future__ import annotations

import json
import os

from click.testing import CliRunner

from engine.node import Node
from tools import demo
from tools.cmd_node import log_in_use
from tools.walctl import cli


def _digest(path: str) -> dict:
    r = CliRunner().invoke(cli, ["digest", path, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_demo_runs_the_cluster_story_and_leaves_consistent_nodes(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    stale = tmp_path / demo.DEMO_DIR / "a" / "left-by-an-earlier-run"
    stale.mkdir(parents=True)

    assert demo.main() == 0

    out = capfd.readouterr().out
    # Each step narrated, with the figures it promises.
    for n in range(1, 7):
        assert f"=== {n}. " in out
    assert out.count("$ walctl status") >= 4 and "durable lag" in out  # the rich replica table, several times
    scene_2 = out.split("=== 2. ")[1].split("=== 3. ")[0]
    assert scene_2.count("$ walctl status") == 1  # one table per scene, the lag lines around it
    assert "DOWN, lag 100 records" in out  # c was killed while 100 messages went to a
    assert "writes were refused for" in out  # the soft failover's window
    assert "promoted: master in epoch 3" in out
    assert "applied:" in out and "0 failed; status done" in out  # the reconcile report
    assert "same digest on every node: yes" in out
    assert "every acknowledged message on c exactly once: yes" in out
    # alice's IMAP client: reads on the master, sees her flag on a replica, carries on through both failovers.
    assert "$ echo 'demo password' | walctl user demo-nodes/a add alice --password-stdin" in out
    assert "imap b: SELECT INBOX -> [READ-ONLY] (a replica); UID 1 shows \\Flagged" in out
    assert "imap b: UID STORE 1 +FLAGS (\\Seen) -> NO [UNAVAILABLE] this node is a read-only replica" in out
    assert "imap a: * BYE [REFERRAL imap://127.0.0.1:" in out
    assert "imap b: UID STORE 1 +FLAGS (\\Seen) -> OK (the same session" in out
    assert "imap c: UID STORE 1 +FLAGS (\\Answered) -> OK (the same session, writable now)" in out
    assert "imap c: NOOP, UID SEARCH ALL -> 4 more messages" in out  # alice's 4 of the 20 only b had
    assert "her client sees every message once and the flags she set on a, b and c: yes" in out
    assert "demo passed" in out and "make demo" in out

    root = tmp_path / demo.DEMO_DIR
    assert not stale.exists()
    nodes = {n: str(root / n) for n in demo.NAMES}
    # Stopped (SIGTERM at the end): nothing holds a log any more.
    assert not any(log_in_use(p) for p in nodes.values())
    roles = {n: json.loads((root / n / "node.json").read_text())["role"] for n in demo.NAMES}
    assert roles == {"a": "replica", "b": "replica", "c": "master"}
    # b's diverged tail was cut aside and marked reconciled; c kept the report and a copy of the tail.
    tails = json.loads((root / "b" / "diverged.json").read_text())["tails"]
    assert len(tails) == 1 and tails[0]["reconciled"] is True
    reports = sorted((root / "c" / "reconcile").glob("*.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["apply"]["failed"] == 0 and report["apply"]["done"] > 0
    assert report["counts"]["only_in_b"] == 20  # the 20 messages only b acknowledged
    # The same mail everywhere, read back by walctl after the processes stopped.
    digests = {n: _digest(p) for n, p in nodes.items()}
    assert len({(d["applied_lsn"], d["store"]) for d in digests.values()}) == 1
    assert sorted(digests["c"]["mailboxes"]) == sorted(f"user/{u}/INBOX" for u in demo.USERS)


def test_demo_refuses_to_wipe_a_node_that_still_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    node = Node.init(os.path.join(demo.DEMO_DIR, "b"))  # holds b's log lock, as a running walctl would
    try:
        assert demo.main() == 1
        assert "still runs" in capsys.readouterr().out
        assert os.path.isdir(os.path.join(demo.DEMO_DIR, "b", "log.wal"))
    finally:
        node.close()


def test_delivery_problems_names_missing_doubled_and_unknown_messages():
    acked = [("user/a/INBOX", "g1", "a"), ("user/a/INBOX", "g2", "a"), ("user/b/INBOX", "g3", "b")]
    sent = {"g1", "g2", "g3", "g4"}
    assert demo.delivery_problems(acked, {"user/a/INBOX": ["g1", "g2", "g4"], "user/b/INBOX": ["g3"]}, sent) == {}
    problems = demo.delivery_problems(acked, {"user/a/INBOX": ["g1", "g1", "gx"], "user/b/INBOX": []}, sent)
    assert problems == {"missing": [("user/a/INBOX", "g2"), ("user/b/INBOX", "g3")],
                        "twice": [("user/a/INBOX", "g1")], "never sent": ["gx"]}
    # A message acknowledged for one mailbox but stored in another is missing where it was acknowledged.
    assert demo.delivery_problems([("user/a/INBOX", "g1", "a")], {"user/b/INBOX": ["g1"]}, sent) == {
        "missing": [("user/a/INBOX", "g1")]}
