"""REC-5: a reconcile copies a message that is only in the loser's tail; if the MTA's
retry of that same message reaches the survivor while the apply runs (after
the executor built its GUID index for the mailbox, before the copy), the
mailbox ends with one copy: the copy is checked again under the node's write
lock.
"""

import logging
import shutil

import pytest

from engine.cluster import Cluster, ClusterConfig
from engine.node import Node
from engine.reconcile import apply_reconcile
from engine.store.errors import UnknownUidError
from tests.cluster.test_cluster_tails import cluster_on, tail_args

MAILBOX = "user/u/INBOX"


def test_an_mta_retry_during_the_apply_is_not_copied_twice(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    a = Node.init(str(tmp_path / "a"), name="a")
    for i in range(3):
        a.deliver(MAILBOX, b"Subject: s%d\r\n\r\nshared\r\n" % i, create=True)
    a.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a, b = Node.open(str(tmp_path / "a")), Node.open(str(tmp_path / "b"))
    tail = [b"Subject: t%d\r\n\r\nonly in the old master's tail\r\n" % i for i in range(3)]
    for body in tail:
        b.deliver(MAILBOX, body)  # acknowledged by the old master, which then died
    b.close()
    retried = []

    def on_action(i, act, result):
        if not retried:  # the MTA retries the last one on the new master mid-apply
            retried.append(a.deliver(MAILBOX, tail[2]))

    try:
        apply_reconcile(a, a.log.path, str(tmp_path / "b" / "log.wal"), on_action=on_action)
        guids = [m.guid for m in a.list_messages(MAILBOX)]
        assert len(guids) == len(set(guids)) == 6
    finally:
        a.close()


def test_a_collided_message_delivered_moments_ago_still_moves_to_a_fresh_uid(tmp_path):
    """REC-6 with the recheck: the survivor's own colliding delivery is recent, yet it is the one
    being moved, so it must be delivered again at a fresh UID (not taken for an MTA retry)."""
    a = Node.init(str(tmp_path / "a"), name="a")
    a.deliver(MAILBOX, b"Subject: shared\r\n\r\nbefore the fork\r\n", create=True)
    a.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a, b = Node.open(str(tmp_path / "a")), Node.open(str(tmp_path / "b"))
    survivor_body = b"Subject: new master\r\n\r\nafter the failover\r\n"
    loser_body = b"Subject: old master\r\n\r\nacknowledged before the crash\r\n"
    assert a.deliver(MAILBOX, survivor_body).uid == b.deliver(MAILBOX, loser_body).uid == 2
    b.close()
    try:
        result = apply_reconcile(a, a.log.path, str(tmp_path / "b" / "log.wal"))
        done = [act.kind for act, r in zip(result.plan.actions, result.results) if r["status"] == "done"]
        assert done == ["copy_message", "redeliver"]
        rows = {m.guid: m.uid for m in a.list_messages(MAILBOX)}
        assert len(rows) == 3 and len(a.list_messages(MAILBOX)) == 3
        from engine.store.events import body_guid

        assert rows[body_guid(survivor_body).hex()] > 2 and rows[body_guid(loser_body).hex()] > 2
    finally:
        a.close()


def test_flags_the_loser_set_before_expunging_apply_when_the_expunge_does_not(tmp_path):
    """REC-8 with REC-10: the loser flagged a message from before the fork, then expunged
    it. Without --apply-destructive the message stays on the survivor, with the loser's
    flag; with it, the message goes."""
    for destructive in (False, True):
        base = tmp_path / str(destructive)
        a = Node.init(str(base / "a"), name="a")
        a.deliver(MAILBOX, b"Subject: prefix\r\n\r\nfrom before the fork\r\n", create=True)
        a.close()
        shutil.copytree(base / "a", base / "b")
        a, b = Node.open(str(base / "a")), Node.open(str(base / "b"))
        a.deliver(MAILBOX, b"Subject: a\r\n\r\nafter the fork on a\r\n")
        b.deliver(MAILBOX, b"Subject: b\r\n\r\nafter the fork on b\r\n")
        b.store_flags(MAILBOX, [1], "add", ["\\Seen"])
        b.expunge(MAILBOX, [1])
        b.close()
        try:
            result = apply_reconcile(a, a.log.path, str(base / "b" / "log.wal"), destructive=destructive)
            assert result.counts()["failed"] == 0
            kept = {m.uid: m.flags for m in a.list_messages(MAILBOX)}
            if destructive:
                assert 1 not in kept
            else:
                assert kept[1] == ("\\Seen",)
            again = apply_reconcile(a, a.log.path, str(base / "b" / "log.wal"), destructive=destructive)
            assert again.plan.actions == []
        finally:
            a.close()


# REC-6: a flag change a client made on a collided UID while the apply ran is on the message at
# its fresh UID. The move is one record (MS-16) planned under the node's write lock with the flags
# the old UID has then, so a change made before it is moved with the message and one after it is
# refused (the UID is gone, as an IMAP client sees after a MOVE).
def test_a_flag_change_on_a_collided_uid_during_the_apply_is_kept(tmp_path, monkeypatch):
    a = Node.init(str(tmp_path / "a"), name="a")
    for i in range(3):
        a.deliver(MAILBOX, b"Subject: shared %d\r\n\r\nboth\r\n" % i, create=True)
    fork = a.log.last_lsn
    a.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a, b = Node.open(str(tmp_path / "a")), Node.open(str(tmp_path / "b"))
    try:
        collided = a.deliver(MAILBOX, b"Subject: survivor\r\n\r\nonly on a\r\n")
        b.deliver(MAILBOX, b"Subject: loser\r\n\r\nonly on b\r\n")  # same UID: a REC-6 collision
        args = {"log_id": str(b.log.log_id), "first_lsn": fork + 1, "prev_hash": b.log.hash_at(fork),
                "records": [[r.lsn, r.epoch, r.type, r.payload, r.hash] for r in b.log.read(fork + 1)]}
        real_fetch = Node.fetch

        def client_flags_meanwhile(self, mailbox, uid):
            # the apply has read the old UID's row; an IMAP client flags it, acknowledged, before the move
            self.store_flags(mailbox, [collided.uid], "add", ["\\Answered"])
            return real_fetch(self, mailbox, uid)

        monkeypatch.setattr(Node, "fetch", client_flags_meanwhile)
        c = Cluster(ClusterConfig(name="a"))
        c.node = a
        c._reconcile_tail(**args)
        monkeypatch.setattr(Node, "fetch", real_fetch)
        mine = [m for m in a.list_messages(MAILBOX) if m.guid == collided.guid]
        assert len(mine) == 1 and mine[0].uid != collided.uid
        assert "\\Answered" in mine[0].flags, mine[0]
        with pytest.raises(UnknownUidError):  # after the move, the old UID is refused
            a.store_flags(MAILBOX, [collided.uid], "add", ["\\Seen"])
    finally:
        a.close()
        b.close()


def _renumbered_on_the_survivor(tmp_path):
    """Node a (the survivor) with a message M delivered after fork0 and before fork1; x
    forked from a at fork0 and gave M's UID to another message; b forked from a at fork1.
    Returns (a, x, b, fork0, fork1, M)."""
    a = Node.init(str(tmp_path / "a"), name="a")
    for i in range(5):
        a.deliver(MAILBOX, b"Subject: shared %d\r\n\r\nall\r\n" % i, create=True)
    fork0 = a.log.last_lsn
    a.close()
    shutil.copytree(tmp_path / "a", tmp_path / "x")  # x: an older master's branch
    a, x = Node.open(str(tmp_path / "a")), Node.open(str(tmp_path / "x"))
    x.deliver(MAILBOX, b"Subject: old branch\r\n\r\nonly on x\r\n")
    moved = a.deliver(MAILBOX, b"Subject: survivor\r\n\r\nsame UID as x's\r\n")
    fork1 = a.log.last_lsn
    a.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # b: the master that then loses its place
    a, b = Node.open(str(tmp_path / "a")), Node.open(str(tmp_path / "b"))
    return a, x, b, fork0, fork1, moved


# REC-14: the loser flagged a message from before its fork that the survivor meanwhile moved to
# a fresh UID (REC-6, while reconciling another, older tail). The old UID is gone on the
# survivor; the change follows the message to its fresh UID.
def test_a_flag_change_on_a_message_the_survivor_renumbered_is_kept(tmp_path):
    a, x, b, fork0, fork1, moved = _renumbered_on_the_survivor(tmp_path)
    try:
        b.store_flags(MAILBOX, [moved.uid], "add", ["$Torture"])  # acknowledged on b
        others = {m.uid for m in a.list_messages(MAILBOX)} - {moved.uid}
        c = cluster_on(a)
        c._reconcile_tail(**tail_args(x, fork0))  # REC-6: the survivor's message moves to a fresh UID
        now = [m for m in a.list_messages(MAILBOX) if m.guid == moved.guid]
        assert len(now) == 1 and now[0].uid != moved.uid
        c._reconcile_tail(**tail_args(b, fork1))  # b's tail: the flag change on the old UID
        after = {m.uid: m for m in a.list_messages(MAILBOX)}
        mine = [m for m in after.values() if m.guid == moved.guid]
        assert [m.uid for m in mine] == [now[0].uid] and "$Torture" in mine[0].flags, mine
        assert [m.uid for m in after.values() if "$Torture" in m.flags] == [now[0].uid]  # no other message
        assert others <= set(after)
        b.close()
        again = apply_reconcile(a, a.log.path, str(tmp_path / "b" / "log.wal"))
        assert again.plan.actions == []  # REC-12
        assert [d for d in again.plan.decisions if d.get("moved_to") == now[0].uid and d["uid"] == moved.uid]
    finally:
        for n in (a, x, b):
            n.close()


# REC-14, the other half: a message a client expunged on the survivor (no REC-6 move) keeps the
# rule it had: the loser's flag change on it is dropped, reported, and lands on no other message.
def test_a_flag_change_on_a_message_a_client_expunged_on_the_survivor_is_dropped(tmp_path):
    a, x, b, fork0, fork1, moved = _renumbered_on_the_survivor(tmp_path)
    x.close()
    try:
        b.store_flags(MAILBOX, [moved.uid], "add", ["$Torture"])
        b.close()
        a.expunge(MAILBOX, [moved.uid])  # a client's expunge on the survivor
        result = apply_reconcile(a, a.log.path, str(tmp_path / "b" / "log.wal"))
        assert result.plan.actions == []
        assert [d for d in result.plan.decisions
                if d["rule"] == "REC-14" and d.get("uid") == moved.uid and "dropped" in d["decision"]]
        assert not [m for m in a.list_messages(MAILBOX) if "$Torture" in m.flags or m.guid == moved.guid]
    finally:
        for n in (a, x, b):
            n.close()
