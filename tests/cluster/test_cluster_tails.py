"""Diverged tails under faults: regressions for what `walctl torture` found.

* A tail whose apply failed on the master (every action refused: the master
  was handing over in a soft failover) was marked reconciled anyway, so the
  messages only the old master had were lost.
* Two tails forking at the same LSN (two replicas of a dead master) applied
  at the same time on the new master both redelivered the collided messages:
  duplicates.

The cases that need real node processes are in
``tests/e2e/test_cluster_tails_processes.py``.
"""

import json
import os
import shutil
import threading
import time

import anyio
import pytest

from engine.cluster import Cluster, ClusterConfig
from engine.node import DIVERGED_FILE, Node
from engine.reconcile import ReconcileError
from engine.store.errors import ReadOnlyNodeError

MAILBOX = "user/u/INBOX"


def forked_nodes(tmp_path, shared=10, ours=20, theirs=20):
    """Node a (survivor) and a copy b that forked from it after ``shared`` deliveries;
    both then deliver to the same mailbox, so their UIDs collide. Returns (a, b, fork LSN)."""
    a = Node.init(str(tmp_path / "a"), name="a")
    for i in range(shared):
        a.deliver(MAILBOX, b"Subject: shared %d\r\n\r\nboth sides\r\n" % i, create=True)
    fork = a.log.last_lsn
    a.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a, b = Node.open(str(tmp_path / "a")), Node.open(str(tmp_path / "b"))
    for i in range(ours):
        a.deliver(MAILBOX, b"Subject: survivor %d\r\n\r\nonly on a\r\n" % i)
    for i in range(theirs):
        b.deliver(MAILBOX, b"Subject: loser %d\r\n\r\nonly on b\r\n" % i)
    return a, b, fork


def tail_args(node: Node, fork: int) -> dict:
    return {"log_id": str(node.log.log_id), "first_lsn": fork + 1, "prev_hash": node.log.hash_at(fork),
            "records": [[r.lsn, r.epoch, r.type, r.payload, r.hash] for r in node.log.read(fork + 1)]}


def cluster_on(node: Node) -> Cluster:
    c = Cluster(ClusterConfig(name=node.config.name))
    c.node = node
    return c


def assert_each_once(node: Node, n: int) -> None:
    guids = [m.guid for m in node.list_messages(MAILBOX)]
    assert len(guids) == n and len(set(guids)) == n, (len(guids), len(set(guids)))


def test_a_failed_apply_is_not_reported_as_reconciled(tmp_path):
    a, b, fork = forked_nodes(tmp_path)
    try:
        args = tail_args(b, fork)
        c = cluster_on(a)
        a.pause_writes("soft failover to b in progress")
        with pytest.raises(ReconcileError, match="failed"):
            c._reconcile_tail(**args)
        a.resume_writes()
        out = c._reconcile_tail(**args)  # the replica's retry: now it applies
        assert os.path.exists(out["report"])
        assert_each_once(a, 10 + 20 + 20)
    finally:
        a.close()
        b.close()


def test_concurrent_applies_of_overlapping_tails_copy_each_message_once(tmp_path):
    a, b, fork = forked_nodes(tmp_path, ours=40, theirs=40)
    try:
        args = tail_args(b, fork)
        c = cluster_on(a)
        errors = []

        def ship():
            try:
                c._reconcile_tail(**args)
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=ship) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        assert_each_once(a, 10 + 40 + 40)
        uids = [m.uid for m in a.list_messages(MAILBOX)]
        assert len(uids) == len(set(uids))
    finally:
        a.close()
        b.close()


def test_a_cut_tail_goes_to_the_master_that_refused_the_log_not_the_next_peer_tried(tmp_path):
    """The master that refused a diverged log is where its tail is reconciled. The
    replica's link is reused at once by the next connection attempt, which may be to
    another peer (a replica); reading the link's master later sent the tail there
    (`make demo` failed with "reconcile into the master, not a replica")."""
    import anyio

    from engine.errors import DivergedError
    from engine.replication.receiver import ReplicaLink

    a, b, fork = forked_nodes(tmp_path)
    a.close()
    started = []

    class Recorder:  # stands in for the cluster's task group
        def start_soon(self, fn, *args):
            started.append(fn)

    c = Cluster(ClusterConfig(name="b", auto_reconcile=True))
    c.node = b
    c.link = ReplicaLink("b", "127.0.0.1:7001")  # the master that refused b's log
    c._tg = Recorder()
    try:
        anyio.run(c._diverged, DivergedError(fork, b.log.last_lsn))
        c.link.master = "127.0.0.1:7002"  # the next attempt goes to another peer
        [task] = started
        assert task.keywords["remote"] == "127.0.0.1:7001"
        assert [t["records"] for t in b.diverged_tails()] == [20]
    finally:
        b.close()


def test_a_tail_that_keeps_failing_does_not_hold_back_the_others(tmp_path, monkeypatch):
    """Found by walctl torture seed 17: a replica cut a tail after LSN 19348, then (its
    master's branch abandoned too) a tail after 17310 that holds the first one's fork
    point; the first tail could never be placed on the master's history again, and the
    retry loop stopped at it every round, so the second tail was never retried."""
    node = Node.init(str(tmp_path / "n"), name="n")
    try:
        tails = [str(tmp_path / "n" / "diverged" / name) for name in ("T-after-19348.wal", "T-after-17310.wal")]
        with open(os.path.join(node.path, DIVERGED_FILE), "w") as f:
            json.dump({"tails": [{"path": p, "reconciled": False} for p in tails]}, f)
        c = cluster_on(node)
        c.config.reconcile_retry_s = 0.01
        tried = []

        async def attempt(tail, **kwargs):  # fault injection: the first tail fails every time
            tried.append(tail)
            return tail != tails[0]

        monkeypatch.setattr(c, "_reconcile_pending_tail", attempt)

        async def main():
            with anyio.move_on_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(c._retry_tails)
                    while tails[1] not in tried:
                        await anyio.sleep(0.01)
                    tg.cancel_scope.cancel()

        anyio.run(main)
        assert tried[:2] == tails
    finally:
        node.close()


def test_a_tail_waiting_for_the_apply_lock_is_refused_if_the_node_stopped_being_master(tmp_path):
    """Seed 17: a shipped tail waited ~26 s for another tail's apply while a soft failover
    made the node a replica; the role is checked again once the lock is held."""
    a, b, fork = forked_nodes(tmp_path)
    try:
        c = cluster_on(a)
        outcome: list = []
        c._apply_lock.acquire()  # another tail's apply is running
        t = threading.Thread(target=lambda: outcome.append(_call(c._reconcile_tail, **tail_args(b, fork))))
        t.start()
        kept = os.path.join(a.path, "reconcile", "tails")
        deadline = time.monotonic() + 30
        while not (os.path.isdir(kept) and os.listdir(kept)) and time.monotonic() < deadline:
            time.sleep(0.01)  # the tail is written and kept before the lock is awaited
        a.set_role("replica")  # the soft failover
        c._apply_lock.release()
        t.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], ReadOnlyNodeError), outcome
        assert_each_once(a, 30)  # nothing of b's tail was applied
    finally:
        a.close()
        b.close()


def _call(fn, **kwargs):
    try:
        return fn(**kwargs)
    except Exception as exc:
        return exc
