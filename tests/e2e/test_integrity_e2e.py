"""Integrity with real processes (MS-11, MS-13): check/repair, quarantine under load, resync, scrub."""

import json
import sqlite3
import time

import pytest

from tests.support.cluster import Cluster, Mailer, walctl


@pytest.fixture
def pair(tmp_path):
    c = Cluster(tmp_path, names=("a", "b"))
    c["a"].start("serve")
    c["b"].start("follow")
    yield c
    c.stop()


def _mailbox_digests(node):
    return node.control("digest")["mailboxes"]


def test_check_finds_a_store_edited_behind_its_back_and_repairs_it(pair):
    a, b = pair["a"], pair["b"]
    mailer = Mailer(pair, users=3)
    mailer.deliver(15)
    pair.wait_converged(["a", "b"])
    args = ["check", "--master", f"127.0.0.1:{a.listen}", "--replica", f"127.0.0.1:{b.listen}",
            "--secret-file", pair.secret, "--json"]
    p = walctl(*args, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["ok"] is True
    with sqlite3.connect(f"{b.path}/store.sqlite") as db:  # an edit nobody logged
        mid = db.execute("SELECT mailbox_id FROM mailboxes WHERE name='user/u1/INBOX'").fetchone()[0]
        db.execute("UPDATE messages SET flags='\\Flagged' WHERE mailbox_id=? AND uid=2", (mid,))
    p = walctl(*args, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert [m["mailbox"] for m in report["mismatched"]] == ["user/u1/INBOX"]
    assert report["mismatched"][0]["flag_differences"] == [2]
    p = walctl(*args, "--repair", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    p = walctl(*args, check=False)
    assert p.returncode == 0 and json.loads(p.stdout)["ok"], p.stdout
    mailer.deliver(3)
    pair.wait_converged(["a", "b"])
    assert _mailbox_digests(a) == _mailbox_digests(b)


def test_failing_mailbox_quarantined_under_load_others_stay_current(pair):
    a, b = pair["a"], pair["b"]
    mailer = Mailer(pair, users=4, threads=2)
    mailer.deliver(8)
    pair.wait_converged(["a", "b"])
    with sqlite3.connect(f"{b.path}/store.sqlite") as db:  # a stray row where the next UID of u2 goes
        mid, uidnext = db.execute("SELECT mailbox_id, uidnext FROM mailboxes WHERE name='user/u2/INBOX'").fetchone()
        db.execute("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?)", (mid, uidnext, b"\0" * 32, "", 0, 0, 0, 1, 1))
    mailer.start()
    deadline = time.time() + 30
    rows = []
    while time.time() < deadline:
        rows = json.loads(walctl("quarantine", b.path, "list", "--json").stdout)
        if rows and rows[0]["state"] == "quarantined":
            break
        time.sleep(0.3)
    mailer.stop()
    assert [r["name"] for r in rows] == ["user/u2/INBOX"], rows
    assert rows[0]["state"] == "quarantined" and rows[0]["attempts"] >= 3  # retried with backoff first
    pair.wait_converged(["a", "b"])  # replication and application went on
    md, rd = _mailbox_digests(a), _mailbox_digests(b)
    assert all(md[m] == rd[m] for m in md if m != "user/u2/INBOX")
    assert md["user/u2/INBOX"] != rd["user/u2/INBOX"]
    show = json.loads(walctl("quarantine", b.path, "show", "user/u2/INBOX", "--json").stdout)
    assert "IntegrityError" in show["reason"] and show["held_records"] > 0
    p = walctl("quarantine", b.path, "resync", "user/u2/INBOX", "--json", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(walctl("quarantine", b.path, "list", "--json").stdout) == []
    assert _mailbox_digests(a) == _mailbox_digests(b)
    st = json.loads(walctl("status", b.path, "--json").stdout)
    assert st["quarantined"] == 0


def test_scrub_finds_a_deleted_body_and_repairs_from_the_master(pair):
    a, b = pair["a"], pair["b"]
    Mailer(pair, users=2).deliver(6)
    pair.wait_converged(["a", "b"])
    assert walctl("scrub", b.path, "--json").returncode == 0
    with sqlite3.connect(f"{b.path}/store.sqlite") as db:
        db.execute("DELETE FROM bodies WHERE guid=(SELECT guid FROM messages LIMIT 1)")
    p = walctl("scrub", b.path, "--json", check=False)
    assert p.returncode == 1
    damaged = json.loads(p.stdout)["mailboxes"]
    assert len(damaged) == 1 and "missing body" in list(damaged.values())[0][0]
    p = walctl("scrub", b.path, "--repair", "--json", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert walctl("scrub", b.path, "--json").returncode == 0
