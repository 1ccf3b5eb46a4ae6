"""Diverged tails under faults, with real node processes: regressions for what `walctl torture` found.

* A tail whose first reconcile attempt failed (master killed or demoted
  meanwhile) was never tried again.
* A replica that lagged through two failovers and was then promoted reused
  an epoch of the branch it never saw; a soft failover from it to a node of
  that branch sent Promote at an epoch that node's log already had, and the
  node crashed (the cluster was left without a master).
"""

import json
import os
import time

import pytest

from engine.cluster.control import ControlError
from engine.node import DIVERGED_FILE
from tests.support.cluster import Cluster as ProcCluster
from tests.support.cluster import Mailer, assert_all_present_once


@pytest.fixture
def procs(tmp_path):
    c = ProcCluster(tmp_path, names=("a", "b"))
    yield c
    c.stop()


def test_a_pending_tail_is_reconciled_once_auto_reconcile_can_reach_the_master(procs):
    """A tail left unreconciled (here: auto-reconcile was off when it was cut) is
    retried by a node running with --auto-reconcile, without operator action."""
    a, b = procs["a"], procs["b"]
    a.start("serve", auto_reconcile=False)
    b.start("follow", auto_reconcile=False)
    mailer = Mailer(procs, threads=1, users=2)
    mailer.deliver(6)
    procs.wait_converged(["a", "b"])
    b.kill()
    mailer.deliver(4)  # only on a
    a.kill()
    b.start("follow", auto_reconcile=False)
    b.control("promote")
    mailer.deliver(3)  # only on b
    a.start("follow", auto_reconcile=False)
    procs.wait_converged(["a", "b"])
    assert [t["records"] for t in a.status()["diverged_tails"]] == [4]
    a.kill()
    a.start("follow", extra=["--quiet"], auto_reconcile=True)
    deadline = time.monotonic() + 60
    while a.status()["diverged_tails"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert a.status()["diverged_tails"] == []
    assert any(e["kind"] == "reconciled" for e in a.status()["events"])
    procs.wait_converged(["a", "b"])
    assert assert_all_present_once(b, mailer) == 13
    assert_all_present_once(a, mailer)


@pytest.fixture
def trio(tmp_path):
    c = ProcCluster(tmp_path, names=("a", "b", "c"))
    yield c
    c.stop()


def wait_streaming(node, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (node.status().get("connection") or {}).get("state") == "streaming":
            return
        time.sleep(0.2)
    raise AssertionError(f"{node.name} is not streaming: {node.status().get('connection')}")


def promote(node, timeout=60):
    """`walctl promote` as an operator runs it after killing the master: until the replica
    has seen its connection end (it refuses while its master is serving)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return node.control("promote")
        except ControlError as exc:
            if "reachable and serving" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def tails_cut(node) -> int:
    """How many diverged tails ``node`` has cut aside, reconciled or not (its diverged.json)."""
    try:
        with open(os.path.join(node.path, DIVERGED_FILE)) as f:
            return len(json.load(f)["tails"])
    except FileNotFoundError:
        return 0


def wait_tails_reconciled(nodes, cut_on, timeout=60):
    """Until ``cut_on`` has cut a diverged tail and no node has one left to reconcile
    (a restarted follower cuts its tail only once it has reached its master)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tails_cut(cut_on) and not any(n.status()["diverged_tails"] for n in nodes):
            return
        time.sleep(0.2)
    raise AssertionError({n.name: n.status()["diverged_tails"] for n in nodes})


def test_a_lagging_replica_promoted_later_never_reuses_an_epoch(trio):
    a, b, c = trio["a"], trio["b"], trio["c"]
    a.start("serve")
    b.start("follow")
    c.start("follow")
    mailer = Mailer(trio, threads=1, users=2)
    mailer.deliver(5)
    trio.wait_converged(["a", "b", "c"])
    c.kill()  # c stays in epoch 1
    a.kill()
    promote(b)  # epoch 2
    a.start("follow")
    wait_streaming(a)
    assert b.control("failover", to="a")["epoch"] == 3
    mailer.deliver(5)
    trio.wait_converged(["a", "b"])
    a.kill()  # master of epoch 3 gone; b (epoch 3) is left, c knows only epoch 1
    c.start("follow")
    promoted = promote(c)
    assert promoted["epoch"] > 3  # above every epoch another node has seen
    mailer.deliver(5)
    wait_streaming(b)  # b's epoch-2/3 records diverged: cut aside and reconciled into c
    result = c.control("failover", to="b")
    assert result["epoch"] > promoted["epoch"]
    assert b.status()["role"] == "master"
    a.start("follow")
    mailer.deliver(5)
    wait_tails_reconciled((a, b, c), cut_on=a)  # a's epoch-2/3 records: cut aside, all already on b
    trio.wait_converged(["a", "b", "c"])
    assert assert_all_present_once(b, mailer) == 20
    for n in (a, c):
        assert_all_present_once(n, mailer)
