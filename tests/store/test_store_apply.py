"""The store applies a batch of records exactly as it would apply them one by one.

``Store.apply_records`` reads each mailbox row once per batch for the
deliveries and flag changes in it and writes it back once (MS-10), and bodies
live in a rowid table keyed by GUID (MS-5). These tests apply the same log in
batches of every size and compare the whole database with applying it one
record at a time: every table, not only the digests (which leave out
HIGHESTMODSEQ and the message count).
"""

import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.store.events import MessageAppended, encode_event
from engine.node import Node
from engine.store import Store
from tests.support.forks import deliver_again

BOXES = ["user/a/INBOX", "user/b/INBOX", "user/c/INBOX"]


def dump(store: Store) -> dict:
    """Every row the store keeps, but the quarantine's wall-clock columns."""
    with sqlite3.connect(store.path) as db:
        return {
            "meta": sorted(db.execute("SELECT key, value FROM meta").fetchall()),
            "mailboxes": sorted(db.execute("SELECT * FROM mailboxes").fetchall()),
            "messages": sorted(db.execute("SELECT * FROM messages").fetchall()),
            "bodies": sorted(db.execute("SELECT guid, data, refs FROM bodies").fetchall()),
            "tombstones": sorted(db.execute("SELECT * FROM tombstones").fetchall()),
            "quarantine": sorted(db.execute(
                "SELECT mailbox_id, name, kind, reason, first_lsn, attempts, state, held FROM quarantine").fetchall()),
        }


def apply_in_batches(path, records, cuts) -> Store:
    """A fresh store at ``path`` that applied ``records`` cut at the given indexes."""
    store = Store(str(path))
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(records))), len(records)]
    for lo, hi in zip(bounds, bounds[1:]):
        store.apply_records(records[lo:hi], now_ms=1)
    return store


def one_by_one(path, records) -> Store:
    return apply_in_batches(path, records, range(len(records)))


ops = st.lists(
    st.one_of(
        st.tuples(st.just("deliver"), st.sampled_from(BOXES), st.binary(max_size=5000)),
        st.tuples(st.just("flags"), st.sampled_from(BOXES), st.sampled_from(["add", "remove", "replace"]),
                  st.sampled_from([("\\Seen",), ("\\Flagged", "kw"), ()])),
        st.tuples(st.just("expunge"), st.sampled_from(BOXES)),
        st.tuples(st.just("redeliver"), st.sampled_from(BOXES), st.booleans()),
        st.tuples(st.just("rename"), st.sampled_from(BOXES)),
        st.tuples(st.just("delete"), st.sampled_from(BOXES)),
        st.tuples(st.just("checkpoint"),),
    ),
    min_size=1, max_size=40,
)


def run_ops(node: Node, script) -> None:
    """Carry out a script of operations on a master; refused ones are skipped."""
    for n, op in enumerate(script):
        kind, box = op[0], (op[1] if len(op) > 1 else None)
        live = box in node.state.by_name
        uids = sorted(node.state.by_name[box].uids) if live else []  # the decision state: the store lags
        if kind == "deliver":
            node.deliver(box, b"Subject: %d\r\n\r\n" % n + op[2], flags=("\\Seen",) if n % 3 == 0 else (),
                         create=True)
        elif kind == "flags" and uids:
            node.store_flags(box, uids[::2], op[2], op[3])
        elif kind == "expunge" and uids:
            node.expunge(box, uids[:1])
        elif kind == "redeliver" and uids:  # the same GUID at a fresh UID: a body with two refs, or a move (MS-16)
            deliver_again(node, box, uids[-1], move=op[2])
        elif kind == "rename" and live:
            node.rename_mailbox(box, f"{box}-old{n}")
        elif kind == "delete" and live:
            node.delete_mailbox(box)
        elif kind == "checkpoint":
            node.checkpoint()


@pytest.mark.heavy
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=ops, cuts=st.lists(st.integers(min_value=1, max_value=60), max_size=8))
def test_any_batching_gives_the_store_of_one_record_at_a_time(tmp_path_factory, script, cuts):
    d = tmp_path_factory.mktemp("batch")
    node = Node.init(d / "m")
    try:
        run_ops(node, script)
        records = list(node.log.read(1))
    finally:
        node.close()
    expected = one_by_one(d / "single.sqlite", records)
    batched = apply_in_batches(d / "batched.sqlite", records, cuts)
    whole = apply_in_batches(d / "whole.sqlite", records, [])
    try:
        assert dump(batched) == dump(expected)
        assert dump(whole) == dump(expected)
        assert whole.digest() == expected.digest()
    finally:
        for s in (expected, batched, whole):
            s.close()


def test_a_failing_record_mid_batch_holds_only_its_mailbox(tmp_path):
    """MS-10 with the batch's mailbox rows: a bad delivery between good ones to
    the same mailbox, in one batch, keeps the good one before it, holds the
    ones after it, and applies every other mailbox; the same as one by one."""
    node = Node.init(tmp_path / "m")
    try:
        for box in BOXES:
            node.deliver(box, b"first to " + box.encode(), create=True)
        node.deliver("user/a/INBOX", b"good, before the bad one")
        a = node.state.by_name["user/a/INBOX"]
        bad = MessageAppended(a.mailbox_id, a.uidnext, a.highestmodseq + 1, b"\x01" * 32, b"not those bytes", (), 0, 0)
        node.log.append(*encode_event(bad))
        first_bad = node.log.last_lsn
        node.deliver("user/b/INBOX", b"b goes on")
        node.store_flags("user/b/INBOX", [1], "add", ["\\Seen"])
        records = list(node.log.read(1))
    finally:
        node.close()
    # the good delivery, the bad one and everything after them, in one batch
    batched = apply_in_batches(tmp_path / "batched.sqlite", records, [first_bad - 2])
    expected = one_by_one(tmp_path / "single.sqlite", records)
    try:
        assert dump(batched) == dump(expected)
        q = batched.quarantined()
        assert [(r["name"], r["first_lsn"], r["kind"]) for r in q] == [("user/a/INBOX", first_bad, "error")]
        a_box = batched.mailbox("user/a/INBOX")
        assert a_box.messages == 2 and a_box.uidnext == 3  # the good delivery before the bad one is kept
        b_box = batched.mailbox("user/b/INBOX")
        assert b_box.messages == 2 and [m.flags for m in batched.messages(b_box.mailbox_id)][0] == ("\\Seen",)
    finally:
        batched.close()
        expected.close()


def test_a_store_with_the_old_bodies_table_keeps_working(tmp_path):
    """Stores made before bodies moved to a rowid table (GUID primary key,
    WITHOUT ROWID) are opened and applied to as they are, with the same result;
    their unused (mailbox, GUID) index is dropped."""
    node = Node.init(tmp_path / "m")
    try:
        run_ops(node, [("deliver", b, b"x" * 4096) for b in BOXES] + [("redeliver", "user/a/INBOX", False),
                                                                        ("expunge", "user/b/INBOX")])
        records = list(node.log.read(1))
    finally:
        node.close()
    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as db:
        db.execute("CREATE TABLE bodies (guid BLOB PRIMARY KEY, data BLOB NOT NULL, refs INTEGER NOT NULL) WITHOUT ROWID")
        db.execute(
            "CREATE TABLE messages (mailbox_id TEXT NOT NULL, uid INTEGER NOT NULL, guid BLOB NOT NULL, flags TEXT NOT "
            "NULL, size INTEGER NOT NULL, internaldate_ms INTEGER NOT NULL, delivered_ms INTEGER NOT NULL, modseq INTEGER "
            "NOT NULL, lsn INTEGER NOT NULL, PRIMARY KEY (mailbox_id, uid)) WITHOUT ROWID")
        db.execute("CREATE INDEX messages_guid ON messages (mailbox_id, guid)")
    old_store = apply_in_batches(old, records, [2])
    new_store = apply_in_batches(tmp_path / "new.sqlite", records, [2])
    try:
        with sqlite3.connect(old) as db:
            assert "WITHOUT ROWID" in db.execute("SELECT sql FROM sqlite_master WHERE name='bodies'").fetchone()[0]
            # the index no query used is dropped on open (it cost a random insert per message)
            assert db.execute("SELECT name FROM sqlite_master WHERE type='index' AND name='messages_guid'").fetchall() == []
        assert dump(old_store) == dump(new_store)
        assert old_store.verify_mailboxes() == {}
    finally:
        old_store.close()
        new_store.close()


def test_the_store_checkpoints_its_sqlite_wal_every_4096_pages(tmp_path):
    """MS-5: fewer, larger SQLite checkpoints (each fsyncs the WAL and the database)."""
    store = Store(str(tmp_path / "s.sqlite"))
    try:
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 4096
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()


def test_no_statement_the_store_runs_scans_a_whole_table_of_messages_or_bodies(tmp_path):
    """Every statement the store runs on ``messages`` or ``bodies`` finds its
    rows through a key or index (MS-5 keeps only the keys it needs): a full
    scan would cost time in proportion to the whole store on every delivery
    or read. The statements are the ones a node really runs (traced), over
    deliveries, copies and moves, flag changes, expunges, renames, deletes,
    checkpoints, reads, a scrub, a snapshot and a resync of a mailbox."""
    node = Node.init(tmp_path / "m")
    seen: set[str] = set()
    try:
        for conn in (node.store.conn, node.store._reader):
            conn.set_trace_callback(seen.add)
        run_ops(node, [("deliver", b, b"x" * 100) for b in BOXES * 3]
                + [("redeliver", "user/a/INBOX", False), ("redeliver", "user/a/INBOX", True),
                   ("flags", "user/b/INBOX", "add", ("\\Seen",)), ("expunge", "user/b/INBOX"),
                   ("checkpoint",), ("rename", "user/c/INBOX"), ("delete", "user/b/INBOX")])
        node.wait_applied(node.log.last_lsn)
        node.list_messages("user/a/INBOX")
        node.fetch("user/a/INBOX", 1)
        node.digest()
        node.verify_store()
        node.resync_mailbox(node.mailbox_snapshot("user/a/INBOX"))
        node.wait_applied(node.log.last_lsn)
        for conn in (node.store.conn, node.store._reader):
            conn.set_trace_callback(None)
        statements = sorted(q for q in seen if q.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT"))
                            and ("messages" in q or "bodies" in q))
        assert any("INSERT INTO bodies" in q for q in statements) and any("FROM messages" in q for q in statements)
        scans = {}
        with sqlite3.connect(node.store.path) as db:
            for q in statements:
                plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + q)]  # traced with values bound in
                # "SCAN t" reads all of t, and "SCAN t USING [COVERING] INDEX i" all of i: only SEARCH may touch them
                full = [p for p in plan if p.split()[:1] == ["SCAN"] and p.split()[1] in ("messages", "bodies", "m", "b")]
                if full:
                    scans[q] = plan
        assert scans == {}
    finally:
        node.close()
