"""The store's data model for the IMAP front: MS-18..MS-24 (specs/mail-store.md).

Real nodes on real files (fsync, SQLite): structures stored at delivery,
MODSEQs across a promotion, expunged UIDs and the cost of ``changes``,
users and subscriptions as records, and copies, moves and appends of several
messages as one record each. The event vectors of the new record types are
checked against cbor2 alone.
"""

from __future__ import annotations

import json
import os
import sqlite3

import bcrypt
import cbor2
import pytest

from engine.cluster.failover import promote
from engine.node import Node, rebuild_store
from engine.store import database
from engine.store.errors import BadPasswordHashError, UnknownUserError, UserExistsError
from engine.store.events import (EVENT_TYPES, EpochStarted, MessagesAppended, MessagesCopied, MessagesMoved,
                                 body_guid, decode_event, encode_event, modseq_floor)
from engine.store.passwords import check_hash, needs_upgrade, verify_password
from engine.store.structure import analyze
from tests.support import ROOT

INBOX = "user/alice/INBOX"
ARCHIVE = "user/alice/Archive"


def body(n: int) -> bytes:
    return b"From: a@x.example\r\nSubject: message %d\r\n\r\nbody %d\r\n" % (n, n)


@pytest.fixture
def node(tmp_path):
    n = Node.init(str(tmp_path / "n"))
    n.create_mailbox(INBOX)
    n.create_mailbox(ARCHIVE)
    yield n
    n.close()


def records(node: Node) -> list:
    return [decode_event(r.type, r.payload) for r in node.log.read(1)]


def _plain(v):
    if isinstance(v, dict) and set(v) == {"hex"}:
        return bytes.fromhex(v["hex"])
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def test_vectors_of_every_record_type_encode_and_decode():
    """MS-18..MS-22, MS-19, MS-20: specs/vectors/events.json holds each new record type; each payload is
    the canonical CBOR of its fields (computed with cbor2 alone) and round-trips through the events."""
    with open(os.path.join(ROOT, "specs", "vectors", "events.json")) as f:
        cases = json.load(f)["cases"]
    assert {c["type"] for c in cases} >= {1, 2, 10, 11, 12, 13, 14, 15}
    for case in cases:
        fields = {k: _plain(v) for k, v in case["fields"].items()}
        payload = bytes.fromhex(case["payload_hex"])
        assert cbor2.dumps(fields, canonical=True) == payload, case["name"]
        ev = decode_event(case["type"], payload)
        assert type(ev) is EVENT_TYPES[case["type"]]
        assert encode_event(ev) == (case["type"], payload), case["name"]


def test_ms24_structure_is_stored_once_per_body_at_delivery_and_filled_lazily_for_older_bodies(node):
    """MS-24"""
    node.deliver(INBOX, body(1))
    node.append_messages(ARCHIVE, [(body(1), (), None)])  # the same bytes: one body, one structure
    node.wait_applied(node.log.last_lsn)
    with sqlite3.connect(node.store.path) as db:
        rows = db.execute("SELECT data, refs, structure FROM bodies").fetchall()
    assert len(rows) == 1 and rows[0][1] == 2
    assert cbor2.loads(rows[0][2]) == analyze(body(1))
    info, imap_rows = node.imap_snapshot(INBOX)
    assert imap_rows[0].structure == rows[0][2]
    # a store written before structures were kept: the column is empty until first read
    with sqlite3.connect(node.store.path) as db:
        db.execute("UPDATE bodies SET structure=NULL")
    _, imap_rows = node.imap_snapshot(INBOX)
    assert imap_rows[0].structure is None
    filled = node.fill_structures([imap_rows[0].guid])
    assert cbor2.loads(filled[imap_rows[0].guid]) == analyze(body(1))
    assert node.imap_snapshot(INBOX)[1][0].structure == filled[imap_rows[0].guid]


def test_ms18_modseqs_of_a_later_epoch_exceed_every_earlier_one_across_a_promotion(tmp_path):
    """MS-18: a promotion's EpochStarted raises every mailbox's HIGHESTMODSEQ to (epoch - 1) << 32, in the
    decision state and the store, so a client's CHANGEDSINCE from the old master misses nothing; a rebuild
    from the log gives the same numbers."""
    n = Node.init(str(tmp_path / "n"))
    try:
        n.create_mailbox(INBOX)
        n.create_mailbox(ARCHIVE)
        for i in range(3):
            n.deliver(INBOX, body(i))
        old = n.imap_snapshot(INBOX)[0].highestmodseq
        assert old < 1 << 32
        p = promote(n)
        assert p.epoch == 2
        n.deliver(INBOX, body(9))
        info, rows = n.imap_snapshot(INBOX)
        assert rows[-1].modseq == modseq_floor(2) + 1 and info.highestmodseq == modseq_floor(2) + 1
        assert n.imap_snapshot(ARCHIVE)[0].highestmodseq == modseq_floor(2)  # untouched, raised all the same
        assert n.state.by_name[ARCHIVE].highestmodseq == modseq_floor(2)
        n.create_mailbox("user/alice/New")
        assert n.imap_snapshot("user/alice/New")[0].highestmodseq == modseq_floor(2)
        before = {m.name: m.highestmodseq for m in n.list_mailboxes()}
    finally:
        n.close()
    rebuild_store(str(tmp_path / "n"))
    n = Node.open(str(tmp_path / "n"))
    try:
        assert {m.name: m.highestmodseq for m in n.list_mailboxes()} == before
        assert n.state.modseq_floor == modseq_floor(2)
    finally:
        n.close()
    assert modseq_floor(1) == 0 and modseq_floor(3) > modseq_floor(2) + (1 << 31)


def test_ms18_a_replica_applying_epoch_started_raises_its_store_too(tmp_path, node):
    node.deliver(INBOX, body(1))
    lsn = node.append_event(EpochStarted(3, node.log.last_lsn, node.log.last_hash, "x"))
    node.wait_applied(lsn)
    assert all(m.highestmodseq >= modseq_floor(3) for m in node.list_mailboxes())


def test_ms23_expunged_uids_are_remembered_with_their_modseq(node):
    """MS-23: VANISHED comes from the expunged UIDs and their MODSEQ; moves within and across mailboxes count."""
    node.append_messages(INBOX, [(body(i), (), None) for i in range(5)])
    _, base = node.imap_changes(INBOX, 0)[0:2]
    start = node.imap_snapshot(INBOX)[0].highestmodseq
    node.expunge_present(INBOX, [2])
    node.copy_messages(INBOX, [4], ARCHIVE, move=True)
    info, changed, vanished = node.imap_changes(INBOX, start)
    assert vanished == [2, 4] and changed == []
    assert node.imap_changes(INBOX, start + 1)[2] == [4]
    assert node.imap_changes(INBOX, info.highestmodseq) == (info, [], [])


def test_ms23_what_is_remembered_is_bounded_and_older_questions_get_none(node, monkeypatch):
    monkeypatch.setattr(database, "EXPUNGED_KEEP", 3)
    monkeypatch.setattr(database, "EXPUNGED_PRUNE_AT", 6)
    node.append_messages(INBOX, [(body(i), (), None) for i in range(10)])
    start = node.imap_snapshot(INBOX)[0].highestmodseq
    for uid in range(1, 9):
        node.expunge_present(INBOX, [uid])
    info, _, vanished = node.imap_changes(INBOX, start)
    assert vanished is None  # the oldest expunges were forgotten
    with sqlite3.connect(node.store.path) as db:
        kept = db.execute("SELECT count(*) FROM expunged").fetchone()[0]
        since = db.execute("SELECT since_modseq FROM vanished").fetchone()[0]
    assert kept <= 6
    assert node.imap_changes(INBOX, since)[2] == sorted(u for u in range(1, 9) if u > 8 - kept)


def test_ms23_changes_cost_in_proportion_to_the_changes(node):
    """MS-23, MS-5: the statements of ``changes`` search the (mailbox, modseq) indexes; none scans a mailbox."""
    node.append_messages(INBOX, [(body(i), (), None) for i in range(20)])
    node.expunge_present(INBOX, [3])
    seen: set[str] = set()
    node.store._reader.set_trace_callback(seen.add)
    try:
        node.imap_changes(INBOX, 5)
    finally:
        node.store._reader.set_trace_callback(None)
    plans = {}
    with sqlite3.connect(node.store.path) as db:
        for q in seen:
            if "modseq>" in q:
                plans[q] = " / ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + q))
    assert len(plans) == 2, plans
    for q, plan in plans.items():
        assert "SCAN" not in plan, (q, plan)
        assert "messages_modseq" in plan or "expunged" in plan, (q, plan)


@pytest.mark.heavy
def test_ms21_users_are_records_with_hashes_only(node):
    """MS-21: add, verify, change, delete; the log holds a hash, never the password; a replica's store
    (a rebuild from the log) can log the user in."""
    node.add_user("alice", "secret-1")
    assert node.state.by_name.get(INBOX) is not None
    with pytest.raises(UserExistsError):
        node.add_user("alice", "x")
    assert node.verify_user("alice", "secret-1") and not node.verify_user("alice", "wrong")
    assert not node.verify_user("nobody", "secret-1")
    node.set_password("alice", "secret-2")
    assert node.verify_user("alice", "secret-2") and not node.verify_user("alice", "secret-1")
    raw = b"".join(r.payload for r in node.log.read(1))
    assert b"secret" not in raw
    node.add_user("bob", "b")
    node.delete_user("bob")
    assert node.list_users() == ["alice"]
    with pytest.raises(UnknownUserError):
        node.delete_user("bob")


def test_ms21_imported_dovecot_hashes_verify_by_scheme_and_are_upgraded_on_login(node):
    """MS-21: {BLF-CRYPT} and {SHA512-CRYPT} are stored as given, verified by scheme, and replaced by an
    argon2id hash at the first successful login on a master; an unknown scheme is refused on import."""
    from passlib.hash import sha512_crypt

    blf = "{BLF-CRYPT}" + bcrypt.hashpw(b"pw1", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$", 1)
    sha = "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash("pw2")
    node.add_user("u1", password_hash=blf)
    node.add_user("u2", password_hash=sha)
    node.wait_applied(node.log.last_lsn)
    assert node.store.user_hash("u1") == blf and needs_upgrade(blf) and needs_upgrade(sha)
    assert not node.verify_user("u1", "pw2")
    assert node.store.user_hash("u1") == blf  # a failed login changes nothing
    assert node.verify_user("u1", "pw1") and node.verify_user("u2", "pw2")
    node.wait_applied(node.log.last_lsn)
    for user, pw in (("u1", "pw1"), ("u2", "pw2")):
        stored = node.store.user_hash(user)
        assert stored.startswith("$argon2id$") and verify_password(stored, pw)
    with pytest.raises(BadPasswordHashError):
        node.add_user("u3", password_hash="{PLAIN}pw")
    with pytest.raises(BadPasswordHashError):
        check_hash("{SHA512-CRYPT}$5$notsha512")


def test_ms22_subscriptions_are_records_and_follow_renames(node):
    """MS-22, MS-19: a rename with children carries the mailboxes below and the subscriptions to all of them."""
    node.add_user("alice", "pw")
    node.set_subscribed("alice", ARCHIVE, True)
    node.set_subscribed("alice", "user/alice/Gone/x", True)  # a name that does not exist
    node.create_mailbox("user/alice/Archive/2024")
    node.set_subscribed("alice", "user/alice/Archive/2024", True)
    node.rename_mailbox(ARCHIVE, "user/alice/Old", children=True)
    assert node.subscriptions("alice") == ["user/alice/Gone/x", "user/alice/Old", "user/alice/Old/2024"]
    assert [n for n, _ in node.imap_mailboxes("user/alice/")] == [INBOX, "user/alice/Old", "user/alice/Old/2024"]
    node.set_subscribed("alice", "user/alice/Old", False)
    assert node.subscriptions("alice") == ["user/alice/Gone/x", "user/alice/Old/2024"]
    node.delete_user("alice")
    assert node.subscriptions("alice") == []


def test_ms20_append_copy_and_move_of_several_messages_are_one_record_each(node):
    """MS-20: one record per command, so a crash keeps all of it or none; UIDs, MODSEQs and UIDNEXT planned."""
    first = node.log.last_lsn
    a = node.append_messages(INBOX, [(body(i), ("\\Seen",) if i % 2 else (), None) for i in range(4)])
    c = node.copy_messages(INBOX, [1, 2, 3, 99], ARCHIVE)
    m = node.copy_messages(INBOX, [2, 4], ARCHIVE, move=True)
    kinds = [type(e) for e in records(node)[first:]]
    assert kinds == [MessagesAppended, MessagesCopied, MessagesMoved]
    assert a.uids == (1, 2, 3, 4) and c.source_uids == (1, 2, 3) and c.target_uids == (1, 2, 3)
    assert m.source_uids == (2, 4) and m.target_uids == (4, 5)
    _, inbox = node.imap_snapshot(INBOX)
    _, archive = node.imap_snapshot(ARCHIVE)
    assert [r.uid for r in inbox] == [1, 3] and [r.uid for r in archive] == [1, 2, 3, 4, 5]
    assert [r.flags for r in archive] == [(), ("\\Seen",), (), ("\\Seen",), ("\\Seen",)]
    assert [r.modseq for r in archive] == sorted(r.modseq for r in archive) and len({r.modseq for r in archive}) == 5
    assert node.state.by_name[ARCHIVE].uidnext == 6 and node.imap_snapshot(ARCHIVE)[0].uidnext == 6
    assert node.verify_store() == {}
    digest = node.digest()
    node.close()
    rebuild_store(node.path)
    again = Node.open(node.path)
    try:
        assert again.digest() == digest
    finally:
        again.close()


def test_ms10_a_move_whose_target_is_held_keeps_its_bodies_until_the_target_applies_it(node):
    """MS-10, MS-20: a move's source part applies while its target is held; the bodies it refers to are
    pinned, so releasing the target later finds them although the source gave up its rows."""
    node.append_messages(INBOX, [(body(1), (), None), (body(2), (), None)])
    node.wait_applied(node.log.last_lsn)
    archive_id = node.state.by_name[ARCHIVE].mailbox_id
    with node._apply_lock:
        node.store._hold(archive_id, node.log.last_lsn + 1, "error", "test hold", 0, state="quarantined")
    node.copy_messages(INBOX, [1, 2], ARCHIVE, move=True)
    node.wait_applied(node.log.last_lsn)
    assert node.imap_snapshot(INBOX)[1] == [] and node.imap_snapshot(ARCHIVE)[1] == []
    assert node.quarantine_retry(ARCHIVE)[0]
    assert [r.uid for r in node.imap_snapshot(ARCHIVE)[1]] == [1, 2]
    assert node.imap_bodies(ARCHIVE, [1, 2]) == {1: body(1), 2: body(2)}
    with sqlite3.connect(node.store.path) as db:
        assert db.execute("SELECT count(*) FROM pinned").fetchone()[0] == 0
        assert sorted(r[0] for r in db.execute("SELECT refs FROM bodies")) == [1, 1]


def test_ms5_no_statement_of_the_imap_operations_scans_messages_or_bodies(node):
    """MS-5, MS-23: the statements a node runs for the IMAP front's writes and reads (traced with
    their values bound) search keys and indexes; none reads all of messages, bodies or expunged."""
    node.add_user("alice", "pw")
    seen: set[str] = set()
    for conn in (node.store.conn, node.store._reader):
        conn.set_trace_callback(seen.add)
    try:
        node.append_messages(INBOX, [(body(i), (), None) for i in range(4)])
        node.deliver(INBOX, body(9))
        node.copy_messages(INBOX, [1, 2], ARCHIVE)
        node.copy_messages(INBOX, [3], ARCHIVE, move=True)
        node.change_flags(INBOX, [1, 2], "add", ["\\Seen"])
        node.change_flags(INBOX, [1, 2], "remove", ["\\Seen"], unchanged_since=10**9)
        node.expunge_present(INBOX, [4])
        node.set_subscribed("alice", ARCHIVE, True)
        node.rename_mailbox(ARCHIVE, "user/alice/Old", children=True)
        node.imap_snapshot(INBOX)
        node.imap_changes(INBOX, 1)
        node.imap_rows(INBOX, [1, 2])
        node.imap_status(INBOX)
        node.imap_bodies(INBOX, [1])
        node.imap_mailboxes("user/alice/")
        node.subscriptions("alice")
        node.verify_user("alice", "pw")
        node.fill_structures([body_guid(body(1))])
    finally:
        for conn in (node.store.conn, node.store._reader):
            conn.set_trace_callback(None)
    statements = [q for q in seen if q.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT"))
                  and any(t in q for t in ("messages", "bodies", "expunged"))]
    assert any("expunged" in q for q in statements) and any("INSERT INTO messages SELECT" in q for q in statements)
    scans = {}
    with sqlite3.connect(node.store.path) as db:
        for q in statements:
            plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + q)]
            full = [p for p in plan if p.split()[:1] == ["SCAN"]
                    and p.split()[1] in ("messages", "bodies", "expunged", "m", "b")]
            if full:
                scans[q] = plan
    assert scans == {}
