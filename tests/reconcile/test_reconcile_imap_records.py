"""The reconciler and the IMAP front's records (MS-20..MS-22): a loser's APPEND of several messages,
COPY, MOVE, user and subscription changes after a hard failover (REC-15, REC-16, REC-17).

Real nodes on real files: a master and its replica copied from one base, the replica taken over
(hard failover), both write, then the survivor reconciles the old master's tail.
"""

from __future__ import annotations

import time

import pytest

from engine.node import rebuild_store
from engine.reconcile import apply_reconcile, diff
from engine.reconcile.planner import DictSurvivorView, plan
from engine.store.events import (MessagesCopied, MessagesMoved, SubscriptionChanged, UserDeleted, UserPasswordSet,
                                 body_guid)
from tests.support.forks import nodes_from_one, take_over

INBOX = "user/alice/INBOX"
ARCHIVE = "user/alice/Archive"


def body(n: int) -> bytes:
    return b"From: a@x.example\r\nSubject: message %d\r\n\r\nbody %d\r\n" % (n, n)


def setup(node) -> None:
    node.add_user("alice", "old-pw")
    node.add_user("bob", "bob-pw")
    node.create_mailbox(ARCHIVE)
    node.append_messages(INBOX, [(body(i), (), None) for i in (1, 2, 3)])


def guids(node, mailbox: str) -> list[bytes]:
    return [r.guid for r in node.imap_snapshot(mailbox)[1]]


def test_rec17_a_losers_copy_move_and_append_lose_no_message(tmp_path):
    """REC-17, REC-5, REC-12: after a hard failover the old master's COPY, MOVE and APPEND of several
    messages reach the survivor; the move's source stays (a move is not an expunge: at worst the
    message is in both mailboxes, never in neither); running the apply again plans nothing."""
    old, new = nodes_from_one(tmp_path, ["old", "new"], setup)
    try:
        take_over(new, 2)
        old.copy_messages(INBOX, [1], ARCHIVE)
        old.copy_messages(INBOX, [2], ARCHIVE, move=True)
        old.append_messages(INBOX, [(body(7), ("\\Seen",), None), (body(8), (), None)])
        new.append_messages(INBOX, [(body(9), (), None)])
        result = apply_reconcile(new, old.log.path, new.log.path)
        assert result.status == "done", result.results
        assert sorted(guids(new, ARCHIVE)) == sorted([body_guid(body(1)), body_guid(body(2))])
        inbox = guids(new, INBOX)
        for n in (1, 2, 3, 7, 8, 9):
            assert inbox.count(body_guid(body(n))) == 1, n
        flags = {r.guid: r.flags for r in new.imap_snapshot(INBOX)[1]}
        assert flags[body_guid(body(7))] == ("\\Seen",)
        again = apply_reconcile(new, old.log.path, new.log.path)
        assert again.plan.actions == []
        digest = new.digest()
    finally:
        old.close()
        new.close()
    assert rebuild_store(str(tmp_path / "new")) == digest


@pytest.mark.heavy
def test_rec15_rec16_users_and_subscriptions_follow_the_later_change(tmp_path):
    """REC-15: a loser's user change is re-applied unless the survivor changed that user later;
    REC-16: the same for each subscription. The survivor can then log in the loser's users."""
    old, new = nodes_from_one(tmp_path, ["old", "new"], setup)
    try:
        take_over(new, 2)
        old.set_password("alice", "new-pw")  # only the loser: applied
        old.add_user("carol", "carol-pw")  # only the loser: applied
        old.set_password("bob", "loser-bob")
        time.sleep(0.01)
        new.set_password("bob", "survivor-bob")  # later on the survivor: stands
        old.set_subscribed("alice", ARCHIVE, True)
        old.set_subscribed("alice", "user/alice/Lists", True)
        time.sleep(0.01)
        new.set_subscribed("alice", "user/alice/Lists", False)  # later on the survivor: stands
        result = apply_reconcile(new, old.log.path, new.log.path)
        assert result.status == "done", result.results
        assert new.verify_user("alice", "new-pw") and new.verify_user("carol", "carol-pw")
        assert new.verify_user("bob", "survivor-bob") and not new.verify_user("bob", "loser-bob")
        assert new.subscriptions("alice") == [ARCHIVE]
        rules = {d["rule"] for d in result.plan.decisions}
        assert {"REC-15", "REC-16"} <= rules
        assert apply_reconcile(new, old.log.path, new.log.path).plan.actions == []
    finally:
        old.close()
        new.close()


def test_rec15_a_losers_user_delete_is_applied_and_the_diff_never_shows_a_hash():
    """REC-15 (pure): the loser's delete of a user the survivor left alone is planned; the report shows
    that a hash was set, never the hash."""
    a = [(10, UserPasswordSet("dave", "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", 5)),
         (11, UserDeleted("erin", 6)), (12, SubscriptionChanged("dave", "user/dave/X", True, 7))]
    b = [(10, UserPasswordSet("dave", "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$b3RoZXI", 9))]
    d = diff(a, b)
    view = DictSurvivorView([], users={"erin": "$argon2id$x"})
    p = plan(d, "b", view)
    kinds = sorted((x.kind, x.detail.get("user")) for x in p.actions)
    assert kinds == [("delete_user", "erin"), ("set_subscription", "dave")]
    assert "aGFzaA" not in str(d.to_dict()) and "(a password hash)" in str(d.to_dict())


def test_rec17_a_copy_of_a_message_from_before_the_fork_finds_its_body_in_the_shared_prefix(tmp_path):
    """REC-17: the body of a pre-fork message the loser copied comes from the survivor's store, or,
    when the survivor expunged it, from the shared prefix of its own log."""
    old, new = nodes_from_one(tmp_path, ["old", "new"], setup)
    try:
        take_over(new, 2)
        old.copy_messages(INBOX, [3], ARCHIVE)
        new.expunge_present(INBOX, [3])  # the survivor's store no longer holds the body
        new.list_mailboxes()  # once the store applied it
        assert new.store.body_by_guid(body_guid(body(3))) is None
        copies = [r for r in old.log.read(1) if r.type in (MessagesCopied.TYPE, MessagesMoved.TYPE)]
        assert len(copies) == 1
        result = apply_reconcile(new, old.log.path, new.log.path)
        assert result.status == "done", result.results
        assert guids(new, ARCHIVE) == [body_guid(body(3))]
        assert new.imap_bodies(ARCHIVE, [r.uid for r in new.imap_snapshot(ARCHIVE)[1]]).popitem()[1] == body(3)
    finally:
        old.close()
        new.close()
