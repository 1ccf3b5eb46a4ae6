"""REC-6: a message the survivor holds at several UIDs that all collide keeps one UID.

The survivor holds one message at two UIDs (a move written as a redelivery
whose expunge of the old UID never came, the node having lost its place), and
a later tail collides with both. Each collided UID finds the other one holding
the message, yet neither is a UID outside the collision: the plan moves a GUID
that no UID outside the collided ones holds (once, from its greatest UID), and
the apply never lets a REC-6 expunge take a message's last UID.
"""

from collections import Counter
from unittest.mock import patch

import pytest

from engine.node import Node
from engine.reconcile import Action, ReconcileError, apply_reconcile
from engine.reconcile.apply import _Executor
from engine.store.errors import UnknownUidError
from tests.support.forks import follow, nodes_from_one, take_over, two_record_redeliver

MAILBOX = "user/u/INBOX"


def _deliver_base(node: Node) -> None:
    node.deliver(MAILBOX, b"Subject: base\r\n\r\nbefore every fork\r\n", create=True)


def _guid_counts(node: Node) -> Counter:
    return Counter(m.guid for m in node.list_messages(MAILBOX))


def test_a_moved_message_whose_old_uid_stayed_survives_a_tail_colliding_with_both(tmp_path, monkeypatch):
    n0, n1, n2 = nodes_from_one(tmp_path, ["n0", "n1", "n2"], _deliver_base)
    try:
        g = n0.deliver(MAILBOX, b"Subject: g\r\n\r\nacknowledged on n0\r\n")  # UID 2
        take_over(n2, 2)
        y = n2.deliver(MAILBOX, b"Subject: y\r\n\r\nacknowledged on n2\r\n")  # UID 2 as well
        take_over(n0, 3)
        t2 = follow(n2, n0)

        # The first apply's REC-6 move written as a redelivery and a later expunge (the shape a
        # log may hold, fork_support.two_record_redeliver), stopped before the expunge.
        with monkeypatch.context() as m:
            m.setattr(_Executor, "_do_redeliver", two_record_redeliver)
            first = apply_reconcile(n0, n0.log.path, t2)
        assert first.status == "done"
        uids_of_g = sorted(m.uid for m in n0.list_messages(MAILBOX) if m.guid == g.guid)
        assert len(uids_of_g) == 2 and uids_of_g[0] == g.uid  # g at its old UID and at a fresh one

        take_over(n1, 4)  # n1 took mail at the same UIDs meanwhile
        theirs = [n1.deliver(MAILBOX, f"Subject: n1-{i}\r\n\r\nacknowledged on n1\r\n".encode())
                  for i in range(4)]
        assert {r.uid for r in theirs} >= set(uids_of_g)  # n1's deliveries collide with both UIDs of g
        take_over(n0, 5)
        t1 = follow(n1, n0)
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
    n0, n1 = nodes_from_one(tmp_path, ["n0", "n1"], _deliver_base, dedup_window_s=0)
    try:
        body = b"Subject: twice\r\n\r\nthe same bytes, delivered twice\r\n"
        r1, r2 = n0.deliver(MAILBOX, body), n0.deliver(MAILBOX, body)
        assert r1.guid == r2.guid and r1.uid != r2.uid
        take_over(n1, 2)
        theirs = [n1.deliver(MAILBOX, f"Subject: n1-{i}\r\n\r\non n1\r\n".encode()) for i in range(2)]
        assert {r.uid for r in theirs} == {r1.uid, r2.uid}
        take_over(n0, 3)
        t1 = follow(n1, n0)
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
    (n0,) = nodes_from_one(tmp_path, ["n0"], _deliver_base, dedup_window_s=0)
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


# REC-6 with MS-16: a move is one record, so an apply interrupted after a move leaves every
# message at exactly one UID, and a client's expunge or flag change made after the move (at the
# fresh UID) is the message's: the expunged message does not come back, the flag change stays.
def _interrupted_move(tmp_path):
    n0, n1 = nodes_from_one(tmp_path, ["n0", "n1"], _deliver_base)
    n0.deliver(MAILBOX, b"Subject: m2\r\n\r\non n0's first branch\r\n")
    take_over(n1, 2)
    t0 = follow(n0, n1)  # n0's tail: m2 at UID 2
    take_over(n0, 3)
    follow(n1, n0)
    m3 = n0.deliver(MAILBOX, b"Subject: m3\r\n\r\nacknowledged on n0\r\n")  # UID 2 again: collides
    real_run = _Executor.run

    def stop_after_the_move(self, act):
        result = real_run(self, act)
        if act.kind == "redeliver":
            raise ReconcileError("injected: the node lost its place right after the move")
        return result

    with patch.object(_Executor, "run", stop_after_the_move):
        assert apply_reconcile(n0, n0.log.path, t0).status == "failed"
    return n0, n1, t0, m3


def test_an_interrupted_move_leaves_the_message_at_one_uid_and_a_client_expunge_stands(tmp_path):
    n0, n1, t0, m3 = _interrupted_move(tmp_path)
    try:
        [fresh] = [m.uid for m in n0.list_messages(MAILBOX) if m.guid == m3.guid]  # one UID, not two
        assert fresh > m3.uid
        with pytest.raises(UnknownUidError):  # the client's old UID is gone, as after an IMAP MOVE
            n0.expunge(MAILBOX, [m3.uid])
        n0.expunge(MAILBOX, [fresh])  # the client expunges m3 where it now is
        assert apply_reconcile(n0, n0.log.path, t0).status == "done"
        assert _guid_counts(n0)[m3.guid] == 0  # the expunge stands: m3 does not come back
    finally:
        n0.close()
        n1.close()


def test_a_flag_change_after_an_interrupted_move_is_kept(tmp_path):
    n0, n1, t0, m3 = _interrupted_move(tmp_path)
    try:
        with pytest.raises(UnknownUidError):
            n0.store_flags(MAILBOX, [m3.uid], "add", ["\\Seen"])
        [fresh] = [m.uid for m in n0.list_messages(MAILBOX) if m.guid == m3.guid]
        n0.store_flags(MAILBOX, [fresh], "add", ["\\Flagged"])
        assert apply_reconcile(n0, n0.log.path, t0).status == "done"
        [m] = [m for m in n0.list_messages(MAILBOX) if m.guid == m3.guid]
        assert m.uid == fresh and m.flags == ("\\Flagged",)
    finally:
        n0.close()
        n1.close()


def test_a_destructive_apply_of_a_tail_holding_a_move_keeps_the_message(tmp_path):
    # REC-10 with MS-16: the loser's tail moved a message from before the fork (its node had
    # reconciled a collision); --apply-destructive applies the loser's expunges, and the move's
    # removal of the old UID is not one: the survivor holds the message only at that UID, and
    # it is not copied back either, so expunging it there would lose it.
    n0, n1, n2 = nodes_from_one(tmp_path, ["n0", "n1", "n2"], _deliver_base)
    try:
        g = n0.deliver(MAILBOX, b"Subject: g\r\n\r\nacknowledged on n0\r\n")  # UID 2
        follow(n1, n0)  # n1 holds g
        take_over(n2, 2)
        y = n2.deliver(MAILBOX, b"Subject: y\r\n\r\nacknowledged on n2\r\n")  # UID 2 as well
        t2 = follow(n2, n0)
        assert apply_reconcile(n0, n0.log.path, t2).status == "done"  # n0 moves g to a fresh UID
        take_over(n1, 3)
        t0 = follow(n0, n1)  # n0's tail: y's copy and g's move
        assert apply_reconcile(n1, n1.log.path, t0, destructive=True).status == "done"
        counts = _guid_counts(n1)
        assert counts[g.guid] == 1 and counts[y.guid] == 1, counts
        assert apply_reconcile(n1, n1.log.path, t0, destructive=True, dry_run=True).plan.actions == []
    finally:
        for n in (n0, n1, n2):
            n.close()
