"""Plain tests of cases tests/reconcile/test_reconcile_multifork_model.py shrank to (several forks of one node).

* CTL-6: a node that cut a diverged tail after LSN n, was promoted, took mail
  and then has to follow another master whose fork with it is the same LSN n
  cuts its second tail under another name than the first, also when both
  cuts fall in the same second (the name carries a random id): the node
  follows its master and both tails stay listed.

Each test below says which rules its case holds the reconcile to.
"""

import shutil
import time
from types import SimpleNamespace

import pytest

from engine.cluster.failover import promote
from engine.node import Node
from engine.reconcile import apply_reconcile
from tests.support.forks import follow, nodes_from_one, take_over
from wal import find_fork

MAILBOX = "user/u/INBOX"


def test_a_second_tail_cut_at_the_same_fork_in_the_same_second_is_kept_beside_the_first(tmp_path, monkeypatch):
    # Fault injection: the node's clock reads one second for the whole test (a fast failover
    # flurry); only Node.cut_diverged's stamp reads it through engine.node's time module.
    frozen = time.gmtime()
    monkeypatch.setattr("engine.node.core.time", SimpleNamespace(**{k: getattr(time, k) for k in dir(time)
                                                               if not k.startswith("_")}))
    monkeypatch.setattr("engine.node.core.time.gmtime", lambda *args: frozen)
    a = Node.init(str(tmp_path / "a"), name="a")
    a.deliver(MAILBOX, b"Subject: shared\r\n\r\nbefore every fork\r\n", create=True)
    a.close()
    for name in ("b", "c"):
        shutil.copytree(tmp_path / "a", tmp_path / name)
    a, b, c = (Node.open(str(tmp_path / n)) for n in ("a", "b", "c"))
    try:
        a.deliver(MAILBOX, b"Subject: a1\r\n\r\nacknowledged on a\r\n")  # a's first branch
        b.set_role("master")
        promote(b, epoch=2)
        fork = find_fork(a.log.path, b.log.path).lsn
        a.set_role("replica")
        first = a.cut_diverged(fork)  # a follows b
        a.log.append_records(list(b.log.read(fork + 1)))
        a.catch_up()
        a.set_role("master")
        promote(a, epoch=3)  # b is gone; a is master again and takes mail
        a.deliver(MAILBOX, b"Subject: a2\r\n\r\nacknowledged on a again\r\n")
        c.set_role("master")
        promote(c, epoch=4)  # a split brain ends: a follows c, same fork LSN as before
        assert find_fork(a.log.path, c.log.path).lsn == fork
        a.set_role("replica")
        second = a.cut_diverged(fork)  # was: WalError "... already exists"
        assert second != first
        assert [t["path"] for t in a.diverged_tails()] == [first, second]
    finally:
        for n in (a, b, c):
            n.close()


# CTL-9 with REC-14 and REC-10: REC-14 drops the loser's flag change because the survivor's client
# expunged the message; then that survivor loses its place, its expunge is in its cut tail, and
# REC-10 does not apply a loser's expunge: the message lives on at the final survivor. The cut
# lists again the tails whose apply it took away (requeue_applied_tails), and reconciled into the
# new master the acknowledged flag change applies.
@pytest.mark.parametrize("t_a_first", [False, True])
def test_a_flag_change_dropped_for_an_expunge_that_is_later_undone_is_kept(tmp_path, t_a_first):
    from engine.cluster import Cluster, ClusterConfig
    from tests.cluster.test_cluster_stranded_tails import tail_dir_args

    n0 = Node.init(str(tmp_path / "n0"), name="n0")
    m1 = n0.deliver(MAILBOX, b"Subject: m1\r\n\r\nbefore every fork\r\n", create=True)
    n0.close()
    shutil.copytree(tmp_path / "n0", tmp_path / "n1")
    n0, n1 = Node.open(str(tmp_path / "n0")), Node.open(str(tmp_path / "n1"))
    n1.set_role("replica")

    try:
        n0.store_flags(MAILBOX, [m1.uid], "add", ["\\Seen"])  # acknowledged on n0
        take_over(n1, 2)  # n0 was cut off
        t_a = follow(n0, n1)  # T_A holds the \Seen change
        take_over(n0, 3)  # failover back to n0
        follow(n1, n0)
        n0.expunge(MAILBOX, [m1.uid])  # a client of n0 expunges m1
        c0 = Cluster(ClusterConfig(name="n0"))
        c0.node = n0
        c0._reconcile_locally(t_a)  # REC-14: the \Seen change is dropped (m1 expunged on the survivor)
        n0.mark_reconciled(t_a)
        take_over(n1, 4)  # n0 loses its place again
        t_b = follow(n0, n1)  # T_B holds n0's expunge
        pending = [t["path"] for t in n0.diverged_tails() if not t.get("reconciled")]
        assert pending == [t_a, t_b]  # T_A's apply was cut away with T_B: pending again
        c1 = Cluster(ClusterConfig(name="n1"))
        c1.node = n1
        for tail in ((t_a, t_b) if t_a_first else (t_b, t_a)):
            c1._reconcile_tail(**tail_dir_args(tail))  # T_B: REC-10, the loser's expunge is not applied
            n0.mark_reconciled(tail)
        [now] = [m for m in n1.list_messages(MAILBOX) if m.guid == m1.guid]  # m1 is back
        assert "\\Seen" in now.flags, now  # ... and so is the acknowledged change made on it
        for tail in (t_a, t_b):  # REC-12
            assert apply_reconcile(n1, n1.log.path, tail, dry_run=True).plan.actions == []
    finally:
        n0.close()
        n1.close()


# REC-8 (split brain, then two tails into one master): a conflict is ordered by the changed_ms
# of each side's last record, and a flag change a reconcile applies is logged at the applied
# change's changed_ms, not the apply's time. An older acknowledged change (\Seen added on n0 at
# t1), applied on n1 at t3, does not beat a newer acknowledged one (\Seen removed on n2 at t2,
# t1 < t2 < t3) when n2's tail is reconciled.
def test_an_older_change_applied_by_a_reconcile_does_not_beat_a_newer_acknowledged_one(tmp_path):
    from engine.cluster import Cluster, ClusterConfig
    from tests.cluster.test_cluster_stranded_tails import tail_dir_args

    n0 = Node.init(str(tmp_path / "n0"), name="n0")
    m1 = n0.deliver(MAILBOX, b"Subject: m1\r\n\r\nbefore every fork\r\n", create=True)
    n0.close()
    for name in ("n1", "n2"):
        shutil.copytree(tmp_path / "n0", tmp_path / name)
    n0, n1, n2 = (Node.open(str(tmp_path / n)) for n in ("n0", "n1", "n2"))

    def ms(node, lsn):
        from engine.store.events import decode_event

        rec = next(node.log.read(lsn, lsn))
        return decode_event(rec.type, rec.payload).changed_ms

    try:
        n1.set_role("replica")
        n2.set_role("replica")
        t1 = ms(n0, n0.store_flags(MAILBOX, [m1.uid], "add", ["\\Seen"]))  # acknowledged on n0
        take_over(n1, 2)
        t_a = follow(n0, n1)  # T_A: the \Seen addition
        follow(n2, n1)
        take_over(n2, 3)  # split brain: n1 and n2 both take operations
        time.sleep(0.005)
        t2 = ms(n2, n2.store_flags(MAILBOX, [m1.uid], "remove", ["\\Seen"]))  # acknowledged on n2, later
        assert t1 < t2
        c1 = Cluster(ClusterConfig(name="n1"))
        c1.node = n1
        time.sleep(0.005)
        c1._reconcile_tail(**tail_dir_args(t_a))  # \Seen set on n1 (only the loser touched it)
        t_c = follow(n2, n1)  # n2 loses: T_C holds the removal
        c1._reconcile_tail(**tail_dir_args(t_c))
        [now] = [m for m in n1.list_messages(MAILBOX) if m.guid == m1.guid]
        assert "\\Seen" not in now.flags, now  # the latest acknowledged change is a removal
    finally:
        for n in (n0, n1, n2):
            n.close()


# REC-8 without a split brain: the result does not depend on the order the tails are reconciled
# in. n0's tail T_A adds \Seen (t1); n1 took over, removed it (t2), lost its place to n0 again;
# T_A and n1's tail T_B are reconciled into n0, in both orders: the removal, the later change,
# stands. T_A's addition is logged at t1, not the apply's time; and with T_B first, its removal
# finds \Seen clear on n0 already and is logged all the same (a winning change is logged even
# when the flags match it already), so n0's log holds the change at t2 and T_A's older addition
# does not count as the latest.
@pytest.mark.parametrize("first", ["T_A", "T_B"])
def test_two_tails_reconciled_in_either_order_keep_the_latest_flag_change(tmp_path, first):
    from engine.cluster import Cluster, ClusterConfig
    from tests.cluster.test_cluster_stranded_tails import tail_dir_args

    n0 = Node.init(str(tmp_path / "n0"), name="n0")
    m1 = n0.deliver(MAILBOX, b"Subject: m1\r\n\r\nbefore every fork\r\n", create=True)
    n0.close()
    shutil.copytree(tmp_path / "n0", tmp_path / "n1")
    n0, n1 = Node.open(str(tmp_path / "n0")), Node.open(str(tmp_path / "n1"))

    try:
        n1.set_role("replica")
        n0.store_flags(MAILBOX, [m1.uid], "add", ["\\Seen"])  # t1, acknowledged on n0
        take_over(n1, 2)
        t_a = follow(n0, n1)
        time.sleep(0.005)
        n1.store_flags(MAILBOX, [m1.uid], "remove", ["\\Seen"])  # t2 > t1, acknowledged on n1
        take_over(n0, 3)
        t_b = follow(n1, n0)
        c0 = Cluster(ClusterConfig(name="n0"))
        c0.node = n0
        time.sleep(0.005)
        for tail in ((t_a, t_b) if first == "T_A" else (t_b, t_a)):
            if tail == t_a:
                c0._reconcile_locally(t_a)  # n0's own tail, n0 being master
            else:
                c0._reconcile_tail(**tail_dir_args(t_b))
        [now] = [m for m in n0.list_messages(MAILBOX) if m.guid == m1.guid]
        assert "\\Seen" not in now.flags, now
        for tail in (t_a, t_b):  # REC-12
            assert apply_reconcile(n0, n0.log.path, tail, dry_run=True).plan.actions == []
    finally:
        n0.close()
        n1.close()


# REC-14 with REC-8: n1 reconciled n0's tail and moved its own message B to a
# fresh UID (REC-6, flags copied); that branch was then cut aside (n1's tail T1), and on n0's
# history a client removed \Seen from B at its old UID. Reconciling T1 into n0 must not bring
# \Seen back: the redelivery in T1 only copied B's flags (REC-14: it counts as no operation),
# and the survivor's removal is the later change (REC-8).
def test_a_losers_rec6_redelivery_does_not_undo_a_later_flag_change_on_the_survivor(tmp_path):
    from engine.cluster import Cluster, ClusterConfig
    from tests.cluster.test_cluster_stranded_tails import tail_dir_args

    work = "user/u/Work"
    n0 = Node.init(str(tmp_path / "n0"), name="n0")
    n0.create_mailbox(work)
    n0.close()
    shutil.copytree(tmp_path / "n0", tmp_path / "n1")
    n0, n1 = Node.open(str(tmp_path / "n0")), Node.open(str(tmp_path / "n1"))

    try:
        n1.set_role("replica")
        n0.deliver(work, b"Subject: A\r\n\r\nacknowledged on n0\r\n")  # UID 1 on n0
        take_over(n1, 2)
        b = n1.deliver(work, b"Subject: B\r\n\r\nacknowledged on n1\r\n", flags=["\\Seen"])  # UID 1 on n1
        t0 = follow(n0, n1)  # n0 now holds B at UID 1
        c1 = Cluster(ClusterConfig(name="n1"))
        c1.node = n1
        c1._reconcile_tail(**tail_dir_args(t0))  # REC-6 on n1: A copied, B moved to a fresh UID
        take_over(n0, 3)  # n1's reconcile records never reached n0
        t1 = follow(n1, n0)
        time.sleep(0.005)
        n0.store_flags(work, [b.uid], "remove", ["\\Seen"])  # acknowledged on n0, the latest change
        c0 = Cluster(ClusterConfig(name="n0"))
        c0.node = n0
        c0._reconcile_tail(**tail_dir_args(t1))
        mine = [m for m in n0.list_messages(work) if m.guid == b.guid]
        assert len(mine) == 1 and "\\Seen" not in mine[0].flags, mine
        assert len(n0.list_messages(work)) == 2  # A (copied back) and B
    finally:
        n0.close()
        n1.close()


def _cluster(node):
    from engine.cluster import Cluster, ClusterConfig

    c = Cluster(ClusterConfig(name=node.config.name))
    c.node = node
    return c


def _three_nodes(tmp_path, setup):
    """n0 after ``setup(n0)``, and two copies of it (n1, n2) as its replicas."""
    return nodes_from_one(tmp_path, ["n0", "n1", "n2"], setup)


# REC-5 with REC-8 and REC-12: the loser's tail delivered X, moved it to a fresh UID (REC-6: a
# tail reconciled into the loser collided at X's UID), and a client then flagged X at its fresh
# UID. Reconciled into a survivor that never had X, a GUID the loser's tail delivered several
# times into one mailbox is one message: copied once, with the flags of the UID it lives on (the
# acknowledged \Seen included), its flag changes merged; a second apply plans nothing.
def test_a_message_the_loser_moved_and_then_flagged_is_copied_with_its_flags(tmp_path):
    from tests.cluster.test_cluster_stranded_tails import tail_dir_args

    n0, n1, n2 = _three_nodes(tmp_path, lambda n: n.create_mailbox(MAILBOX))
    try:
        take_over(n1, 2)  # split brain: n0 and n1 both take mail
        n1.deliver(MAILBOX, b"Subject: Y\r\n\r\nacknowledged on n1\r\n")  # UID 1 on n1
        x = n0.deliver(MAILBOX, b"Subject: X\r\n\r\nacknowledged on n0\r\n")  # UID 1 on n0
        t_y = follow(n1, n0)
        _cluster(n0)._reconcile_tail(**tail_dir_args(t_y))  # REC-6 on n0: X moves to a fresh UID
        [moved] = [m for m in n0.list_messages(MAILBOX) if m.guid == x.guid]
        assert moved.uid != x.uid
        time.sleep(0.005)
        n0.store_flags(MAILBOX, [moved.uid], "add", ["\\Seen"])  # acknowledged on n0
        take_over(n2, 3)  # n2 never saw X
        t_0 = follow(n0, n2)
        c2 = _cluster(n2)
        c2._reconcile_tail(**tail_dir_args(t_0))
        mine = [m for m in n2.list_messages(MAILBOX) if m.guid == x.guid]
        assert len(mine) == 1 and "\\Seen" in mine[0].flags, mine
        assert apply_reconcile(n2, n2.log.path, t_0, dry_run=True).plan.actions == []  # REC-12
    finally:
        for n in (n0, n1, n2):
            n.close()


# REC-5: M, from before the last fork, was moved to a fresh UID on n0 (REC-6 while reconciling
# n1's tail), and on n1's branch (which never saw the move) a client expunged M at its old UID.
# When n0's tail is reconciled into n1, its REC-6 redelivery of M is not a message delivered only
# on the loser: the survivor's client expunged that message (same GUID), and the expunge stands.
def test_a_losers_rec6_redelivery_of_a_message_the_survivors_client_expunged_is_not_copied_back(tmp_path):
    from tests.cluster.test_cluster_stranded_tails import tail_dir_args

    n0, n1, n2 = _three_nodes(tmp_path, lambda n: n.create_mailbox(MAILBOX))
    try:
        take_over(n1, 2)  # split brain
        y = n1.deliver(MAILBOX, b"Subject: Y\r\n\r\nacknowledged on n1\r\n")  # UID 1 on n1
        m = n0.deliver(MAILBOX, b"Subject: M\r\n\r\nacknowledged on n0\r\n")  # UID 1 on n0
        t_y = follow(n1, n0)  # n1 holds M at UID 1 now
        _cluster(n0)._reconcile_tail(**tail_dir_args(t_y))  # REC-6 on n0: M moves, UID 1 expunged
        take_over(n1, 3)  # n0's reconcile records never reached n1
        n1.expunge(MAILBOX, [m.uid])  # a client of n1 expunges M (acknowledged)
        t_0 = follow(n0, n1)  # holds Y's copy, M's redelivery and the expunge of UID 1
        _cluster(n1)._reconcile_tail(**tail_dir_args(t_0))
        held = [msg.guid for msg in n1.list_messages(MAILBOX)]
        assert m.guid not in held, "the survivor's client expunged M (REC-5): it must not come back"
        assert held.count(y.guid) == 1
        assert apply_reconcile(n1, n1.log.path, t_0, dry_run=True).plan.actions == []  # REC-12
    finally:
        for n in (n0, n1, n2):
            n.close()


# REC-5 with REC-8 and REC-12: the survivor's tail delivered one GUID twice into a mailbox (a copy
# from one tail, expunged by a REC-6 move, and the moved copy), and the apply logged the loser's
# winning \Seen on the UID holding it. The survivor's deliveries of one GUID into one mailbox are
# one message too, its operations merged: the next plan weighs the loser's change against the
# logged one (not the first delivery's, which has none) and plans nothing.
def test_the_survivors_operations_on_a_message_it_moved_count_for_a_loser_copy_of_it():
    from engine.reconcile import DictSurvivorView, MailboxView, MessageView, diff, plan
    from engine.store.events import FlagsChanged, MessageAppended, MessagesExpunged, body_guid

    box, g, t_deliver, t_seen = "3" * 32, body_guid(b"m2"), 1000, 2000

    def appended(uid, lsn):
        return lsn, MessageAppended(box, uid, lsn, g, b"m2", (), t_deliver, t_deliver)

    survivor = [appended(2, 11), (12, MessageAppended(box, 3, 12, body_guid(b"other"), b"other", (), 1500, 1500)),
                appended(6, 13), (14, MessagesExpunged(box, (2,), 14)),
                (15, FlagsChanged(box, (6,), "add", ("\\Seen",), 15, t_seen))]  # the apply's logged change
    loser = [appended(2, 11), (12, FlagsChanged(box, (2,), "add", ("\\Seen",), 12, t_seen))]  # a client's
    view = DictSurvivorView([MailboxView(box, "user/u/Work", 7, 7, {
        3: MessageView(3, body_guid(b"other"), frozenset()),
        6: MessageView(6, g, frozenset({"\\Seen"}), t_deliver, t_deliver)})])
    assert plan(diff(survivor, loser), "a", view).actions == []  # REC-12
