"""REC-6: a message the survivor holds at several UIDs that all collide keeps one UID.

Found by ``walctl torture --seed 73`` (17 acknowledged deliveries lost on every
node): an earlier apply on the survivor had redelivered its message at a fresh
UID and never expunged the old one (the node lost its place first), so the
survivor held the message at two UIDs. A later tail collided with both. The
plan looked, for each collided UID, for "another UID" holding the message,
found the other collided one each time, planned no redelivery and expunged
both. Now the plan redelivers a GUID that no UID outside the collided ones
holds (once, from its greatest UID), and the apply never lets a REC-6 expunge
take a message's last UID.
"""

import shutil
from collections import Counter

from engine.failover import promote
from engine.node import Node
from engine.reconcile_apply import ReconcileError, _Executor, apply_reconcile
from engine.reconciler import Action
from wal.epochs import find_fork

MAILBOX = "user/u/INBOX"


def _follow(node: Node, master: Node) -> str | None:
    """``node`` follows ``master``: cut what diverged, copy the master's records, apply them."""
    node.set_role("replica")
    fork = find_fork(node.log.path, master.log.path).lsn
    tail = node.cut_diverged(fork) if node.log.last_lsn > fork else None
    node.log.append_records(list(master.log.read(fork + 1)))
    node.catch_up()
    return tail


def _take_over(node: Node, epoch: int) -> None:
    node.set_role("master")
    promote(node, epoch=epoch)


def _nodes(tmp_path, names, **config):
    """Nodes that share one base message (UID 1); the first is master, the others replicas."""
    first = Node.init(str(tmp_path / names[0]), name=names[0], **config)
    first.deliver(MAILBOX, b"Subject: base\r\n\r\nbefore every fork\r\n", create=True)
    first.close()
    for name in names[1:]:
        shutil.copytree(tmp_path / names[0], tmp_path / name)
    nodes = [Node.open(str(tmp_path / n)) for n in names]
    for n in nodes[1:]:
        n.set_role("replica")
    return nodes


def _guid_counts(node: Node) -> Counter:
    return Counter(m.guid for m in node.list_messages(MAILBOX))


def test_a_moved_message_whose_old_uid_stayed_survives_a_tail_colliding_with_both(tmp_path, monkeypatch):
    n0, n1, n2 = _nodes(tmp_path, ["n0", "n1", "n2"])
    try:
        g = n0.deliver(MAILBOX, b"Subject: g\r\n\r\nacknowledged on n0\r\n")  # UID 2
        _take_over(n2, 2)
        y = n2.deliver(MAILBOX, b"Subject: y\r\n\r\nacknowledged on n2\r\n")  # UID 2 as well
        _take_over(n0, 3)
        t2 = _follow(n2, n0)

        # Fault injection: the first apply's REC-6 expunge fails (the node lost its place
        # between the redelivery and the expunge, in the torture run).
        def failing_expunge(self, act):
            raise ReconcileError("injected: the node lost its place before the expunge")

        with monkeypatch.context() as m:
            m.setattr(_Executor, "_do_expunge", failing_expunge)
            first = apply_reconcile(n0, n0.log.path, t2)
        assert first.status == "failed"
        uids_of_g = sorted(m.uid for m in n0.list_messages(MAILBOX) if m.guid == g.guid)
        assert len(uids_of_g) == 2 and uids_of_g[0] == g.uid  # g at its old UID and at a fresh one

        _take_over(n1, 4)  # n1 took mail at the same UIDs meanwhile
        theirs = [n1.deliver(MAILBOX, f"Subject: n1-{i}\r\n\r\nacknowledged on n1\r\n".encode())
                  for i in range(4)]
        assert {r.uid for r in theirs} >= set(uids_of_g)  # n1's deliveries collide with both UIDs of g
        _take_over(n0, 5)
        t1 = _follow(n1, n0)
        plan = apply_reconcile(n0, n0.log.path, t1, dry_run=True).plan
        moves = [a for a in plan.actions if a.kind == "redeliver" and a.detail["guid"] == g.guid]
        assert len(moves) == 1 and moves[0].detail["uid"] == uids_of_g[-1]  # once, from its greatest UID
        assert apply_reconcile(n0, n0.log.path, t1).status == "done"

        counts = _guid_counts(n0)
        assert counts[g.guid] == 1, counts  # was 0: both of g's UIDs expunged, no redelivery
        assert counts[y.guid] == 1
        assert all(counts[r.guid] == 1 for r in theirs)
        assert apply_reconcile(n0, n0.log.path, t1, dry_run=True).plan.actions == []  # REC-12
    finally:
        for n in (n0, n1, n2):
            n.close()


def test_the_same_bytes_at_two_collided_uids_keep_one_copy(tmp_path):
    # The dedup window at 0 lets the survivor store the same bytes twice (as after a 24 h window).
    n0, n1 = _nodes(tmp_path, ["n0", "n1"], dedup_window_s=0)
    try:
        body = b"Subject: twice\r\n\r\nthe same bytes, delivered twice\r\n"
        r1, r2 = n0.deliver(MAILBOX, body), n0.deliver(MAILBOX, body)
        assert r1.guid == r2.guid and r1.uid != r2.uid
        _take_over(n1, 2)
        theirs = [n1.deliver(MAILBOX, f"Subject: n1-{i}\r\n\r\non n1\r\n".encode()) for i in range(2)]
        assert {r.uid for r in theirs} == {r1.uid, r2.uid}
        _take_over(n0, 3)
        t1 = _follow(n1, n0)
        assert apply_reconcile(n0, n0.log.path, t1).status == "done"
        counts = _guid_counts(n0)
        assert counts[r1.guid] == 1, counts  # REC-5: one GUID is one message; never zero
        assert all(counts[r.guid] == 1 for r in theirs)
        assert not {r1.uid, r2.uid} & {m.uid for m in n0.list_messages(MAILBOX) if m.guid == r1.guid}
    finally:
        for n in (n0, n1):
            n.close()


def test_a_rec6_expunge_never_takes_a_messages_last_uid(tmp_path):
    # The apply's own check, whatever the plan: an expunge action naming every UID of a message
    # (an old plan, or one made before a concurrent change) keeps its greatest UID.
    (n0,) = _nodes(tmp_path, ["n0"], dedup_window_s=0)
    try:
        body = b"Subject: twice\r\n\r\nthe same bytes, delivered twice\r\n"
        r1, r2 = n0.deliver(MAILBOX, body), n0.deliver(MAILBOX, body)
        other = n0.deliver(MAILBOX, b"Subject: other\r\n\r\nanother message\r\n")
        ex = _Executor(n0, n0.log.path, "renumber")
        try:
            act = Action("expunge", "REC-6", n0.state.by_name[MAILBOX].mailbox_id, MAILBOX,
                         {"uids": [r1.uid, r2.uid], "guids": [r1.guid, r2.guid]}, "test")
            res = ex.run(act)
        finally:
            ex.close()
        assert res["status"] == "done" and res["uids"] == [r1.uid]
        left = {m.uid: m.guid for m in n0.list_messages(MAILBOX)}
        assert left.get(r2.uid) == r1.guid and left.get(other.uid) == other.guid
    finally:
        n0.close()
