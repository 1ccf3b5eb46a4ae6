"""Per-mailbox isolation, checkpoints, resync and the guard (MS-10..MS-13).

Replication is simulated by copying records from the master's log into the
replica's log with ``Log.append_records`` (exactly what the replication
receiver does), so these tests need no network.
"""

import sqlite3
import time

import pytest

from engine.store.errors import GuardRefusedError, ReadOnlyNodeError
from engine.node import Node


def ship(master: Node, replica: Node) -> None:
    """Copy every durable master record the replica lacks, then wait for apply."""
    records = list(master.log.read(replica.log.last_lsn + 1))
    if records:
        replica.log.append_records(records)
    assert replica.wait_applied(master.log.last_lsn, timeout=20)


@pytest.fixture
def pair(tmp_path):
    m = Node.init(tmp_path / "m", name="m")
    r = Node.init(tmp_path / "r", name="r", role="replica", log_id=m.log.log_id)
    yield m, r
    r.close()
    m.close()


def far_future():
    return int(time.time() * 1000) + 10**9


def deliver_some(m: Node, mailboxes, n, tag=""):
    for i in range(n):
        for mb in mailboxes:
            m.deliver(mb, f"Subject: {tag}{i} to {mb}\r\n\r\nbody {i}\r\n".encode(), create=True)


def digests(node: Node) -> dict:
    return node.digest()["mailboxes"]  # waits until the store applied every durable record


def test_replica_refuses_writes(pair):
    m, r = pair
    with pytest.raises(ReadOnlyNodeError):
        r.deliver("user/a/INBOX", b"x", create=True)


def test_replica_applies_and_digests_match(pair):
    m, r = pair
    deliver_some(m, ["user/a/INBOX", "user/b/INBOX"], 5)
    m.store_flags("user/a/INBOX", [1, 2], "add", ["\\Seen"])
    m.expunge("user/b/INBOX", [3])
    ship(m, r)
    assert m.digest() == r.digest()


def test_failing_mailbox_is_quarantined_and_others_continue(pair):
    """MS-10: a record that fails on the replica holds only its mailbox."""
    m, r = pair
    boxes = ["user/a/INBOX", "user/b/INBOX", "user/c/INBOX"]
    deliver_some(m, boxes, 3)
    ship(m, r)
    # Damage the replica's store behind its back: a stray row where UID 4 of b will go.
    b_id = r.store.mailbox("user/b/INBOX").mailbox_id
    with sqlite3.connect(r.store.path) as db:
        db.execute("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?)", (b_id, 4, b"\0" * 32, "", 0, 0, 0, 1, 1))
    deliver_some(m, boxes, 4, tag="more")
    ship(m, r)
    q = r.quarantined()
    assert [row["name"] for row in q] == ["user/b/INBOX"]
    assert q[0]["kind"] == "error" and q[0]["state"] == "retrying" and "IntegrityError" in q[0]["reason"]
    assert q[0]["held_records"] >= 3
    # every other mailbox is current
    md, rd = digests(m), digests(r)
    for mb in ("user/a/INBOX", "user/c/INBOX"):
        assert md[mb] == rd[mb]
    assert md["user/b/INBOX"] != rd["user/b/INBOX"]
    # automatic retries (forced due) fail until the state says quarantined
    for k in range(1, 4):  # each retry is due only after its backoff: step the clock past it
        r.retry_quarantined(now_ms=far_future() * k)
    q = r.quarantined()
    assert q[0]["state"] == "quarantined" and q[0]["attempts"] == 3
    # later records for the held mailbox stay held, others still apply
    deliver_some(m, boxes, 1, tag="late")
    ship(m, r)
    assert digests(m)["user/a/INBOX"] == digests(r)["user/a/INBOX"]
    # resync from the master's copy brings it back
    snap = m.mailbox_snapshot("user/b/INBOX")
    r.resync_mailbox(snap)
    assert r.quarantined() == []
    assert digests(m) == digests(r)


def quarantine_then_fix(m: Node, r: Node) -> None:
    """A stray row on the replica quarantines user/a/INBOX; then the admin removes it."""
    deliver_some(m, ["user/a/INBOX"], 2)
    ship(m, r)
    a_id = r.store.mailbox("user/a/INBOX").mailbox_id
    with sqlite3.connect(r.store.path) as db:
        db.execute("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?)", (a_id, 3, b"\0" * 32, "", 0, 0, 0, 1, 1))
    deliver_some(m, ["user/a/INBOX"], 2, tag="x")
    ship(m, r)
    assert r.quarantined()[0]["name"] == "user/a/INBOX"
    with sqlite3.connect(r.store.path) as db:  # the admin removes the stray row
        db.execute("DELETE FROM messages WHERE mailbox_id=? AND uid=3 AND lsn=1", (a_id,))


def test_retry_after_fix_releases(pair):
    m, r = pair
    quarantine_then_fix(m, r)
    ok, msg = r.quarantine_retry("user/a/INBOX")
    assert ok, msg
    assert r.quarantined() == []
    assert digests(m) == digests(r)


def test_poisoned_body_is_isolated(pair):
    """A record whose body does not match its GUID fails only its mailbox."""
    from engine.store.events import MessageAppended, encode_event

    m, r = pair
    deliver_some(m, ["user/a/INBOX", "user/b/INBOX"], 2)
    ship(m, r)
    b = m.state.by_name["user/b/INBOX"]
    bad = MessageAppended(b.mailbox_id, b.uidnext, b.highestmodseq + 1, b"\x01" * 32, b"not those bytes", (), 0, 0)
    m.log.append(*encode_event(bad))
    deliver_some(m, ["user/a/INBOX"], 2, tag="after")
    ship(m, r)
    names = [q["name"] for q in r.quarantined()]
    assert names == ["user/b/INBOX"]
    assert "does not match its GUID" in r.quarantined()[0]["reason"]
    assert digests(m)["user/a/INBOX"] == digests(r)["user/a/INBOX"]


def test_checkpoint_detects_flag_edited_behind_the_store(pair):
    """MS-11: a checkpoint recomputes digests and holds a damaged mailbox."""
    m, r = pair
    deliver_some(m, ["user/a/INBOX", "user/b/INBOX"], 3)
    ship(m, r)
    with sqlite3.connect(r.store.path) as db:
        db.execute("UPDATE messages SET flags='\\Deleted' WHERE uid=2")
    m.checkpoint()
    ship(m, r)
    q = {row["name"]: row for row in r.quarantined()}
    assert set(q) == {"user/a/INBOX", "user/b/INBOX"}
    assert all(row["kind"] == "digest" for row in q.values())
    assert len(r.store.mismatches) == 2
    for name in q:
        r.resync_mailbox(m.mailbox_snapshot(name))
    assert r.quarantined() == []
    assert digests(m) == digests(r)
    assert r.verify_store() == {}


def test_deleted_body_found_by_verify_and_repaired(pair):
    m, r = pair
    deliver_some(m, ["user/a/INBOX"], 3)
    ship(m, r)
    with sqlite3.connect(r.store.path) as db:
        db.execute("DELETE FROM bodies WHERE guid=(SELECT guid FROM messages WHERE uid=2)")
    problems = r.verify_store()
    assert list(problems) == ["user/a/INBOX"] and "missing body" in problems["user/a/INBOX"][0]
    r.resync_mailbox(m.mailbox_snapshot("user/a/INBOX"))
    assert r.verify_store() == {}
    assert r.fetch("user/a/INBOX", 2) == m.fetch("user/a/INBOX", 2)


def test_guard_holds_mass_deletion_until_release(pair):
    """MS-12: more than 10 mailbox deletions within the window are held."""
    m, r = pair
    boxes = [f"user/u{i}/INBOX" for i in range(14)]
    deliver_some(m, boxes, 1)
    ship(m, r)
    for mb in boxes[:13]:
        m.delete_mailbox(mb)
    ship(m, r)
    held = sorted(q["name"] for q in r.quarantined())
    assert held == sorted(boxes[10:13])
    assert all(q["kind"] == "guard" for q in r.quarantined())
    assert {mb.name for mb in r.list_mailboxes()} == set(boxes[10:])  # held ones still there
    for name in held:
        ok, msg = r.quarantine_release(name)
        assert ok, msg
    assert digests(m) == digests(r)


def test_guard_holds_mass_expunge_until_release(pair):
    m, r = pair
    deliver_some(m, ["user/a/INBOX"], 100)
    deliver_some(m, ["user/b/INBOX"], 10)
    ship(m, r)
    m.expunge("user/a/INBOX", range(1, 71))
    m.expunge("user/b/INBOX", range(1, 9))  # small mailbox: under the minimum, not held
    ship(m, r)
    assert [q["name"] for q in r.quarantined()] == ["user/a/INBOX"]
    assert len(r.list_messages("user/a/INBOX")) == 100
    ok, _ = r.quarantine_release("user/a/INBOX")
    assert ok
    assert len(r.list_messages("user/a/INBOX")) == 30
    assert digests(m) == digests(r)


def test_master_refuses_huge_recursive_delete(tmp_path):
    m = Node.init(tmp_path / "m", max_mailbox_deletes=5)
    try:
        for i in range(7):
            m.create_mailbox(f"shared/x/{i}")
        m.create_mailbox("shared/x")
        with pytest.raises(GuardRefusedError):
            m.delete_mailbox("shared/x", recursive=True)
        assert len(m.list_mailboxes()) == 8
        m.delete_mailbox("shared/x/0")
        assert len(m.list_mailboxes()) == 7
    finally:
        m.close()


@pytest.mark.parametrize("repair", ["retry", "release", "resync"])
def test_operator_repairs_wait_for_the_applier(pair, repair):
    """quarantine retry/release and resync share the store with the applier thread:
    each waits for the apply lock instead of running beside an apply batch."""
    import threading

    m, r = pair
    quarantine_then_fix(m, r)
    run = {"retry": lambda: r.quarantine_retry("user/a/INBOX"),
           "release": lambda: r.quarantine_release("user/a/INBOX"),
           "resync": lambda: r.resync_mailbox(m.mailbox_snapshot("user/a/INBOX"))}[repair]
    done = threading.Event()
    worker = threading.Thread(target=lambda: (run(), done.set()))
    with r._apply_lock:  # an apply pass in progress
        worker.start()
        assert not done.wait(0.3)
        assert r.quarantined()[0]["name"] == "user/a/INBOX"
    assert done.wait(30)
    worker.join()
    assert r.quarantined() == []
    assert digests(m) == digests(r)
