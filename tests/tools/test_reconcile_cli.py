"""``walctl reconcile`` and ``walctl bench reconcile`` (REC-13): exit statuses, JSON fields, --apply."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

import wal
from engine.node import Node
from engine.store.events import body_guid
from tools.walctl import cli
from tests.support import ROOT
from tests.support import find_tests


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def nodes(tmp_path):
    """Two copies of one node (a, b), opened; returns (a_dir, b_dir, a_node, b_node)."""
    pa, pb = tmp_path / "a", tmp_path / "b"
    n = Node.init(str(pa), name="a")
    n.create_mailbox("INBOX")
    n.create_mailbox("Work")
    for i in range(3):
        n.deliver("INBOX", b"prefix %d" % i)
    n.close()
    shutil.copytree(pa, pb)
    a, b = Node.open(str(pa)), Node.open(str(pb))
    yield pa, pb, a, b
    a.close()
    b.close()


def test_rec13_identical_and_prefix_logs_exit_0(nodes):
    pa, pb, a, b = nodes
    a.close()
    b.close()
    r = run("reconcile", pa / "log.wal", pb / "log.wal", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["diverged"] is False and doc["fork"]["lsn"] == 5 and doc["mailboxes"] == []
    b2 = Node.open(str(pb))
    b2.deliver("INBOX", b"only b")
    b2.close()
    r = run("reconcile", pa / "log.wal", pb / "log.wal", "--json")
    assert r.exit_code == 0
    doc = json.loads(r.output)
    assert doc["prefix"] == "a" and doc["counts"]["only_in_b"] == 1
    r = run("reconcile", pa / "log.wal", pb / "log.wal")
    assert r.exit_code == 0 and "A is a prefix of the other" in r.output


def test_rec13_diverged_exit_1_and_json_fields(nodes):
    pa, pb, a, b = nodes
    a.deliver("INBOX", b"only a")
    b.deliver("INBOX", b"only b")
    b.rename_mailbox("Work", "Projects")
    a.close()
    b.close()
    r = run("reconcile", pa / "log.wal", pb / "log.wal", "--json")
    assert r.exit_code == 1, r.output
    doc = json.loads(r.output)
    assert set(doc["fork"]) == {"lsn", "epoch", "hash"}
    assert doc["fork"] == {"lsn": 5, "epoch": 1, "hash": wal.LogReader(str(pa / "log.wal")).hash_at(5).hex()}
    assert doc["diverged"] is True and doc["prefix"] is None
    assert {"only_in_a", "only_in_b", "both", "uid_collisions", "flag_conflicts", "mailboxes"} <= set(doc["counts"])
    inbox = next(m for m in doc["mailboxes"] if m["mailbox"] == "INBOX")
    assert [x["guid"] for x in inbox["only_in_a"]] == [body_guid(b"only a").hex()]
    assert [c["uid"] for c in inbox["uid_collisions"]] == [4]
    work = next(m for m in doc["mailboxes"] if m["existed_at_fork"] and m["b"]["renamed"])
    assert work["fork_name"] == "Work" and work["mailbox"] == "Projects"
    assert doc["read"]["fork_search"]["probes"] >= 2
    text = run("reconcile", pa / "log.wal", pb / "log.wal")
    assert text.exit_code == 1
    assert "fork point: LSN 5, epoch 1" in text.output and "UID collision: UID 4" in text.output
    assert "renamed in B: 'Work' -> 'Projects'" in text.output


def test_rec13_names_of_old_mailboxes(nodes):
    pa, pb, a, b = nodes
    a.deliver("INBOX", b"x")
    b.deliver("INBOX", b"y")
    a.close()
    b.close()
    named = json.loads(run("reconcile", pa / "log.wal", pb / "log.wal", "--json").output)
    assert named["mailboxes"][0]["mailbox"] == "INBOX" and named["names_from"] == "prefix-scan"
    bare = json.loads(run("reconcile", pa / "log.wal", pb / "log.wal", "--json", "--no-names").output)
    assert bare["mailboxes"][0]["mailbox"] == bare["mailboxes"][0]["a"]["mailbox_id"]
    assert bare["names_from"] == "ids"


def test_rec13_errors_exit_2(tmp_path, nodes):
    pa, pb, a, b = nodes
    a.close()
    b.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("reconcile", empty, pb / "log.wal")
    assert r.exit_code == 2 and "not a mailwal log" in r.output
    other = tmp_path / "other.wal"
    wal.Log.create(str(other)).close()
    r = run("reconcile", pa / "log.wal", other)
    assert r.exit_code == 2 and "different logs" in r.output
    assert run("reconcile", pa / "log.wal", tmp_path / "missing").exit_code == 2
    r = run("reconcile", pa / "log.wal", pb / "log.wal", "--apply-destructive")
    assert r.exit_code == 2 and "--apply" in r.output
    r = run("reconcile", pa / "log.wal", pb / "log.wal", "--strategy", "sideways")
    assert r.exit_code == 2


def test_rec13_apply_writes_a_report_and_is_idempotent(nodes):
    pa, pb, a, b = nodes
    a.deliver("INBOX", b"survivor 4")
    b.deliver("INBOX", b"loser 4")
    b.deliver("INBOX", b"loser 5", flags=["\\Seen"])
    a.close()
    b.close()
    dry = run("reconcile", pa / "log.wal", pb / "log.wal", "--apply", pa, "--dry-run", "--json")
    assert dry.exit_code == 1
    assert json.loads(dry.output)["apply"]["dry_run"] is True and not (pa / "reconcile").exists()
    r = run("reconcile", pa / "log.wal", pb / "log.wal", "--apply", pa, "--json")
    assert r.exit_code == 1, r.output  # still diverged logs: the exit status describes the logs
    doc = json.loads(r.output)
    assert doc["survivor"]["side"] == "a" and doc["apply"]["status"] == "done"
    assert doc["apply"]["done"] == len(doc["plan"]["actions"]) > 0
    assert os.path.exists(doc["report"]) and json.load(open(doc["report"]))["apply"]["status"] == "done"
    again = json.loads(run("reconcile", pa / "log.wal", pb / "log.wal", "--apply", pa, "--json").output)
    assert again["plan"]["actions"] == [] and again["apply"]["planned"] == 0
    text = run("reconcile", pa / "log.wal", pb / "log.wal", "--apply", pa)
    assert "planned: 0 action(s)" in text.output and "report:" in text.output
    n = Node.open(str(pa))
    try:
        guids = {x.guid for x in n.list_messages("INBOX")}
        assert {body_guid(b"loser 4").hex(), body_guid(b"loser 5").hex(), body_guid(b"survivor 4").hex()} <= guids
    finally:
        n.close()


def test_rec13_apply_to_a_node_that_is_not_the_survivor_exits_2(tmp_path, nodes):
    pa, pb, a, b = nodes
    a.deliver("INBOX", b"a")
    b.deliver("INBOX", b"b")
    a.close()
    b.close()
    Node.init(str(tmp_path / "c")).close()
    r = run("reconcile", pa / "log.wal", pb / "log.wal", "--apply", tmp_path / "c")
    assert r.exit_code == 2 and "not their survivor" in r.output


def test_bench_reconcile_small_run():
    r = run("bench", "reconcile", "--records", 3000, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["fork"] == {"expected": 2970, "found": 2970}
    assert {g["goal"]: g["met"] for g in doc["goals"]}["fork_found"]
    assert set(doc["phases"]) == {"baseline", "find_fork", "reconcile", "naive", "raw_all", "raw_tail"}
    ff, naive = doc["phases"]["find_fork"], doc["phases"]["naive"]
    assert ff["bytes_read"] < naive["rchar"] / 5  # the search reads a small part of what a full compare reads


def test_every_rec_rule_is_named_by_a_test_and_every_cited_rule_exists():
    """STYLE: every rule ID in specs/reconcile.md has a test that names it (test_recN_...)."""
    import re

    spec = open(os.path.join(ROOT, "specs", "reconcile.md"), encoding="utf-8").read()
    defined = {int(n) for n in re.findall(r"^## REC-(\d+)", spec, re.M)}
    assert defined == set(range(1, max(defined) + 1))
    names = " ".join(re.findall(r"def (test_\w+)", " ".join(
        open(path, encoding="utf-8").read() for path in find_tests("test_reconcile*.py", "test_epochs*.py"))))
    named = {int(n) for n in re.findall(r"rec(\d+)", names)} | {
        int(b) for a, b in re.findall(r"rec(\d+)_to_rec(\d+)", names)} | {
        n for a, b in re.findall(r"rec(\d+)_to_rec(\d+)", names) for n in range(int(a), int(b) + 1)}
    assert defined - named == set()
    cited = set()
    reconcile_package = [os.path.join("engine", "reconcile", f)
                         for f in os.listdir(os.path.join(ROOT, "engine", "reconcile")) if f.endswith(".py")]
    for rel in ("wal/history.py", "wal/fork.py", *reconcile_package, "engine/cluster/failover.py", "engine/store/events.py",
                "engine/store/decisions.py", "tools/cmd_reconcile.py"):
        cited |= {int(n) for n in re.findall(r"REC-(\d+)", open(os.path.join(ROOT, rel), encoding="utf-8").read())}
    assert cited <= defined
