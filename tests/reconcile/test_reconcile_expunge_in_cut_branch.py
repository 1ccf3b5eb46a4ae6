"""A REC-6 collision resolved across two applies and a cut branch (engine.reconcile.planner).

A REC-6 move written in two steps (the survivor's message redelivered at a
fresh UID, then the collided UID expunged) can be cut in two by a failover:
the redelivered copies replicate to the next master while the expunge, done
by the retry on the old master, lands in a branch that is later cut as a
diverged tail. Reconciling that tail, the expunge is applied without
--apply-destructive (the REC-6 exception of REC-10): the survivor holds the
message at its fresh UID too, so the collided UID goes and the message is
left at one UID.
"""

import shutil

from engine.cluster import Cluster, ClusterConfig
from engine.node import Node
from engine.reconcile import apply_reconcile
from engine.reconcile.apply import _Executor
from tests.support.forks import two_record_redeliver
from tests.cluster.test_cluster_tails import forked_nodes, tail_args

MAILBOX = "user/u/INBOX"


def test_a_collision_expunge_in_a_cut_branch_is_not_lost(tmp_path, monkeypatch):
    a, b, fork = forked_nodes(tmp_path, ours=5, theirs=5)
    n = None
    try:
        c = Cluster(ClusterConfig(name="a"))
        c.node = a
        args = tail_args(b, fork)

        # 1st apply on a: copies done, and the REC-6 moves written as a redelivery and a later
        # expunge (fork_support.two_record_redeliver): redelivered, the old UIDs not expunged
        # yet (a soft failover made a read-only first)
        with monkeypatch.context() as m:
            m.setattr(_Executor, "_do_redeliver", two_record_redeliver)
            c._reconcile_tail(**args)
        guids = [m.guid for m in a.list_messages(MAILBOX)]
        assert len(guids) - len(set(guids)) == 5  # the five collided messages at two UIDs each
        f1 = a.log.last_lsn
        a.close()
        shutil.copytree(tmp_path / "a", tmp_path / "n")  # n: the next master, has everything up to f1
        a = Node.open(str(tmp_path / "a"))
        c.node = a
        c._reconcile_tail(**args)  # the retry on a: only the REC-6 expunges left; the tail is now reconciled
        assert a.log.last_lsn > f1
        n = Node.open(str(tmp_path / "n"))
        n.deliver(MAILBOX, b"Subject: on n\r\n\r\nafter the failover\r\n")  # a's expunges diverge
        tail = a.cut_diverged(f1)
        apply_reconcile(n, n.log.path, tail)  # a's diverged tail reconciled into n
        guids = [m.guid for m in n.list_messages(MAILBOX)]
        dups = {g for g in guids if guids.count(g) > 1}
        assert not dups, f"{len(dups)} message(s) twice on the survivor"
        assert len(set(guids)) == 10 + 5 + 5 + 1
    finally:
        a.close()
        b.close()
        if n is not None:
            n.close()
