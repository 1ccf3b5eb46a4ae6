"""CTL-9: a diverged tail whose fork point was cut aside later, inside a newer tail.

Found by ``walctl torture --seed 17``: node n1 cut a tail T1 after LSN 19348
(its master had moved on without it), followed that master, and later cut a
tail T2 after LSN 17310 that held T1's fork point (that master's branch was
abandoned too). No master held LSN 19348 of that history any more: the
master answered "fork point is unknown" for T1, ``walctl reconcile`` refused
it too, and T1's acknowledged deliveries stayed out of every mailbox.

Built here with real nodes: ``a`` writes the shared history up to ``f2``;
``n`` (master) writes its branch up to ``f1``, is copied to ``m1``, and takes
acknowledged deliveries and a flag change (T1); ``m1`` is promoted and takes
mail; ``n`` follows ``m1`` (cuts T1 after ``f1``); ``m2`` (a copy of ``a`` at
``f2``) is promoted and takes mail; ``n`` follows ``m2`` (cuts T2 after
``f2``, T2 holding ``f1``).
"""

import json
import os
import shutil

import anyio
import pytest

from engine.cluster import Cluster, ClusterConfig
from engine.cluster.failover import promote
from engine.node import DIVERGED_FILE, Node
from engine.reconcile import TailPlacementError, locate_tail_base, place_tail
from wal import Log
from wal import ForkUnknownError

MAILBOX = "user/u/INBOX"
FLAG = "\\Flagged"


def deliver(node: Node, label: str, n: int) -> list[str]:
    """``n`` acknowledged deliveries (durable on return); their GUIDs."""
    return [node.deliver(MAILBOX, b"Subject: %s %d\r\n\r\n%s\r\n" % (label.encode(), i, label.encode()),
                         create=True).guid for i in range(n)]


def follow(node: Node, master: Node, fork: int) -> str:
    """``node`` comes back as ``master``'s replica: its log diverged after ``fork``; the
    tail is cut aside (as Cluster._diverged does) and it receives the master's records."""
    node.set_role("replica")
    tail = node.cut_diverged(fork)
    node.log.append_records(list(master.log.read(fork + 1)))
    node.catch_up()
    return tail


def tail_dir_args(path: str) -> dict:
    """What a replica ships to the master's reconcile_tail (Cluster._reconcile_into_master)."""
    with Log.open(path) as t:
        first = t.first_lsn
        return {"log_id": str(t.log_id), "first_lsn": first, "prev_hash": t.hash_at(first - 1),
                "records": [[r.lsn, r.epoch, r.type, r.payload, r.hash] for r in t.read(first)]}


def cluster_on(node: Node) -> Cluster:
    c = Cluster(ClusterConfig(name=node.config.name))
    c.node = node
    return c


def listing(node: Node) -> dict[str, dict]:
    with open(os.path.join(node.path, DIVERGED_FILE)) as f:
        return {e["path"]: e for e in json.load(f)["tails"]}


def assert_each_once(node: Node, guids: list[str]) -> None:
    held = [m.guid for m in node.list_messages(MAILBOX)]
    missing = [g for g in guids if g not in held]
    twice = sorted({g for g in held if held.count(g) > 1})
    assert not missing and not twice, f"{len(missing)} acknowledged message(s) missing, {len(twice)} twice"


def flagged(node: Node, guid: str) -> bool:
    return any(FLAG in m.flags for m in node.list_messages(MAILBOX) if m.guid == guid)


@pytest.fixture
def stranded(tmp_path):
    """The seed 17 situation; yields a namespace of nodes, tails, fork points and GUIDs."""
    opened: list[Node] = []

    def open_(name: str) -> Node:
        node = Node.open(str(tmp_path / name))
        opened.append(node)
        return node

    a = Node.init(str(tmp_path / "a"), name="a")
    shared = deliver(a, "shared", 5)
    f2 = a.log.last_lsn
    a.close()
    shutil.copytree(tmp_path / "a", tmp_path / "n")
    shutil.copytree(tmp_path / "a", tmp_path / "m2")
    n = Node.open(str(tmp_path / "n"))
    n_branch = deliver(n, "n branch", 4)  # replicated to m1, later in T2 only
    f1 = n.log.last_lsn
    n.close()
    shutil.copytree(tmp_path / "n", tmp_path / "m1")
    n = open_("n")
    t1_only = deliver(n, "acked on n, T1", 3)  # the deliveries seed 17 lost
    flagged_guid = n_branch[1]
    uid = next(m.uid for m in n.list_messages(MAILBOX) if m.guid == flagged_guid)
    n.store_flags(MAILBOX, [uid], "add", [FLAG])  # an acknowledged flag change, in T1
    m1 = open_("m1")
    promote(m1, epoch=2)
    m1_only = deliver(m1, "m1", 4)  # collide with T1's UIDs
    seen_in_t2 = max(m.uid for m in m1.list_messages(MAILBOX))  # the greatest UID a client of T2's branch saw
    t1 = follow(n, m1, f1)
    m2 = open_("m2")
    promote(m2, epoch=3)
    m2_only = deliver(m2, "m2", 12)  # collide with T2's UIDs, and go past them
    t2 = follow(n, m2, f2)

    class S:
        pass

    s = S()
    s.n, s.m2, s.t1, s.t2, s.f1, s.f2 = n, m2, t1, t2, f1, f2
    s.flagged_guid = flagged_guid
    s.seen_in_t2 = seen_in_t2
    s.acked = shared + n_branch + t1_only + m1_only + m2_only
    yield s
    for node in opened:
        node.close()


def test_ctl9_the_older_tail_is_stranded_inside_the_newer_one(stranded):
    s = stranded
    assert listing(s.n)[s.t2]["fork_lsn"] == s.f2 < s.f1 == listing(s.n)[s.t1]["fork_lsn"]
    # The root cause: the master's history does not hold T1's fork point.
    with pytest.raises(ForkUnknownError):
        cluster_on(s.m2)._reconcile_tail(**tail_dir_args(s.t1))
    base = locate_tail_base(s.n.log.path, s.t1, [s.t2])
    assert (base.state, base.container, base.fork_lsn) == ("stranded", s.t2, s.f1)
    assert locate_tail_base(s.n.log.path, s.t2, [s.t1]).state == "history"


def test_ctl9_a_lagging_log_decides_at_the_first_record_of_the_later_tail(stranded, tmp_path):
    """The node's log ends before T1's fork point: its record right after T2's fork point
    decides (another record there: stranded); a log ending at T2's fork point cannot tell."""
    s = stranded
    for keep, state in ((s.f2 + 1, "stranded"), (s.f2, "unknown")):
        copy = tmp_path / f"log-{keep}.wal"
        shutil.copytree(s.n.log.path, copy, ignore=shutil.ignore_patterns("LOCK"))
        with Log.open(str(copy)) as log:
            log.truncate_after(keep, str(tmp_path / f"aside-{keep}.wal"))
        assert keep < s.f1
        assert locate_tail_base(str(copy), s.t1, [s.t2]).state == state


def test_ctl9_a_replica_merges_the_stranded_tail_and_the_master_takes_every_acked_operation(stranded):
    s = stranded
    abandoned = os.path.join(s.n.path, ".rebase-999999999-killed")  # a merge whose process died
    os.makedirs(os.path.join(abandoned, "node"))
    merged = place_tail(s.n.path, s.n.log.path, s.t1)
    [entry] = merged
    assert entry["fork_lsn"] == s.f2 and entry["merged_from"] == [s.t1, s.t2]
    tails = listing(s.n)
    assert tails[s.t1]["merged_into"] == tails[s.t2]["merged_into"] == entry["path"]
    assert tails[s.t1]["reconciled"] and tails[s.t2]["reconciled"] and not tails[entry["path"]]["reconciled"]
    assert os.path.isdir(s.t1) and os.path.isdir(s.t2)  # the inputs are kept as they were
    assert os.path.exists(entry["merge_report"])
    assert not [d for d in os.listdir(s.n.path) if d.startswith(".rebase-")]  # the scratch node is gone
    # The merged tail starts with T2's records, unchanged.
    with Log.open(entry["path"]) as m, Log.open(s.t2) as t2:
        assert [r.hash for r in m.read(s.f2 + 1, t2.last_lsn)] == [r.hash for r in t2.read(s.f2 + 1)]
    out = cluster_on(s.m2)._reconcile_tail(**tail_dir_args(entry["path"]))  # what the replica ships
    with open(out["report"]) as f:
        moved = [a["uid"] for a in json.load(f)["plan"]["actions"] if a["kind"] == "redeliver"]
    # REC-6 moves the master's messages only off UIDs clients of T2's branch saw: the UIDs the
    # merge gave (no client saw them) start at n's UIDNEXT, above the master's as n followed it.
    assert moved and max(moved) <= s.seen_in_t2
    assert_each_once(s.m2, s.acked)
    assert flagged(s.m2, s.flagged_guid)
    uids = [m.uid for m in s.m2.list_messages(MAILBOX)]
    assert len(uids) == len(set(uids))
    # Shipped again (a retry after a lost answer): nothing more (REC-12).
    before = s.m2.log.last_lsn
    cluster_on(s.m2)._reconcile_tail(**tail_dir_args(entry["path"]))
    assert s.m2.log.last_lsn == before
    assert place_tail(s.n.path, s.n.log.path, entry["path"]) == []  # on the history now


def test_ctl9_the_newer_tail_reconciled_first_then_the_stranded_one(stranded):
    """T2 was reconciled on its own before (auto-reconcile retries every tail): the merged
    tail holds it again, and reconciling it adds only T1's operations, once."""
    s = stranded
    cluster_on(s.m2)._reconcile_tail(**tail_dir_args(s.t2))
    s.n.mark_reconciled(s.t2)
    [entry] = place_tail(s.n.path, s.n.log.path, s.t1)
    assert "merged_into" not in listing(s.n)[s.t2]  # it was reconciled already
    cluster_on(s.m2)._reconcile_tail(**tail_dir_args(entry["path"]))
    assert_each_once(s.m2, s.acked)
    assert flagged(s.m2, s.flagged_guid)


def test_ctl9_a_node_that_became_master_reconciles_its_stranded_tail_into_itself(stranded):
    """Through Cluster._reconcile_pending_tail, as the auto-reconcile retry runs it: before
    the fix the tail stayed pending with 'fork point is unknown' for ever."""
    s = stranded
    s.n.set_role("master")  # m2 is gone; n is promoted
    promote(s.n, epoch=4)
    c = cluster_on(s.n)
    assert anyio.run(c._reconcile_pending_tail, s.t1) is True, c._tail_errors
    assert anyio.run(c._reconcile_pending_tail, s.t2) is True  # merged: nothing left to do
    assert [t for t in s.n.diverged_tails() if not t.get("reconciled")] == []
    assert any(e["kind"] == "tail-merged" for e in c.events)
    assert_each_once(s.n, s.acked)
    assert flagged(s.n, s.flagged_guid)


def test_ctl9_a_tail_whose_fork_point_is_nowhere_stays_listed_with_its_error(stranded):
    """The later tail holding T1's fork point is gone (removed by hand): T1 cannot be
    placed; it stays on disk and pending, and status says why and what to do."""
    s = stranded
    shutil.rmtree(s.t2)
    with pytest.raises(TailPlacementError, match="cannot be placed"):
        place_tail(s.n.path, s.n.log.path, s.t1)
    c = cluster_on(s.n)
    assert anyio.run(c._reconcile_pending_tail, s.t1) is False
    [t1] = [t for t in c.status()["diverged_tails"] if t["path"] == s.t1]
    assert "cannot be placed on the master's history" in t1["error"] and f"LSN {s.f1}" in t1["error"]
    assert os.path.isdir(s.t1) and not listing(s.n)[s.t1]["reconciled"]


def test_ctl9_a_tail_of_another_lineage_is_never_taken_as_the_container(stranded, tmp_path):
    """Same LSNs, other records: the hash at the fork point decides, never the LSN alone."""
    s = stranded
    other = Node.init(str(tmp_path / "other"), name="other", log_id=s.n.log.log_id)
    deliver(other, "elsewhere", s.f1 + 3)
    other.close()
    forged = str(tmp_path / "forged.wal")
    with Log.open(str(tmp_path / "other" / "log.wal")) as log:
        log.truncate_after(s.f2, forged)  # a tail of the same log id holding LSN f1, another record
    assert locate_tail_base(s.n.log.path, s.t1, [forged]).state == "nowhere"
    assert locate_tail_base(s.n.log.path, s.t1, [forged, s.t2]).container == s.t2


def test_ctl9_a_tail_stranded_two_levels_deep_is_merged_twice(tmp_path):
    """T1's fork point is in T2, whose fork point is in T3: two merges, then one reconcile."""
    opened: list[Node] = []
    a = Node.init(str(tmp_path / "a"), name="a")
    acked = deliver(a, "shared", 3)
    f3 = a.log.last_lsn
    a.close()
    for name in ("n", "m3"):
        shutil.copytree(tmp_path / "a", tmp_path / name)
    n = Node.open(str(tmp_path / "n"))
    opened.append(n)
    try:
        acked += deliver(n, "n level 3", 2)
        f2 = n.log.last_lsn
        n.close()
        shutil.copytree(tmp_path / "n", tmp_path / "m2")
        n = Node.open(str(tmp_path / "n"))
        opened[0] = n
        acked += deliver(n, "n level 2", 2)
        f1 = n.log.last_lsn
        n.close()
        shutil.copytree(tmp_path / "n", tmp_path / "m1")
        n = Node.open(str(tmp_path / "n"))
        opened[0] = n
        acked += deliver(n, "n level 1", 2)
        masters = {}
        for epoch, (name, fork) in enumerate((("m1", f1), ("m2", f2), ("m3", f3)), start=2):
            m = Node.open(str(tmp_path / name))
            opened.append(m)
            promote(m, epoch=epoch)
            acked += deliver(m, name, 3)
            masters[name] = follow(n, m, fork)
        t1, t2, t3 = masters["m1"], masters["m2"], masters["m3"]
        merged = place_tail(n.path, n.log.path, t1)
        assert [e["merged_from"][1] for e in merged] == [t2, t3]
        assert merged[-1]["fork_lsn"] == f3
        m3 = opened[-1]
        cluster_on(m3)._reconcile_tail(**tail_dir_args(merged[-1]["path"]))
        assert_each_once(m3, acked)
        assert [t["path"] for t in n.diverged_tails() if not t.get("reconciled")] == [merged[-1]["path"]]
    finally:
        for node in opened:
            node.close()


def test_ctl9_walctl_reconcile_merges_a_stranded_tail_before_applying_it(stranded):
    """`walctl reconcile MASTER/log.wal NODE/diverged/T1.wal`: without --apply the unknown
    fork point is explained; with --apply the tail is merged into T2 first, then applied."""
    from click.testing import CliRunner

    from tools.walctl import cli

    s = stranded
    s.n.close()
    s.m2.close()

    def run(*args):
        return CliRunner().invoke(cli, ["reconcile", *map(str, args)], catch_exceptions=False)

    r = run(s.m2.log.path, s.t1)
    assert r.exit_code == 2
    assert "fork point is unknown" in r.output and "cut aside later" in r.output and s.t2 in r.output
    r = run(s.m2.log.path, s.t1, "--apply", s.m2.path, "--dry-run")
    assert r.exit_code == 2 and "cut aside later" in r.output
    assert len(listing(s.n)) == 2  # a dry run writes nothing: no merge
    r = run(s.m2.log.path, s.t1, "--apply", s.m2.path, "--json")
    assert r.exit_code == 1, r.output
    doc = json.loads(r.output[r.output.index("{"):])
    [entry] = doc["merged_tails"]
    assert doc["apply"]["failed"] == 0 and doc["fork"]["lsn"] == s.f2
    tails = listing(s.n)
    assert tails[s.t1]["merged_into"] == entry["path"] and tails[entry["path"]]["reconciled"]
    m2 = Node.open(s.m2.path)
    try:
        assert_each_once(m2, s.acked)
        assert flagged(m2, s.flagged_guid)
    finally:
        m2.close()


def test_ctl9_a_merge_that_fails_changes_no_listing_and_is_made_again(stranded, monkeypatch):
    """Fault injection: the merge's REC-6 moves fail. Both tails stay pending as they
    were, no merged tail is listed, the failed merge's report is kept; the retry merges."""
    from engine.reconcile.apply import _Executor
    from engine.store.errors import ReadOnlyNodeError

    s = stranded
    before = listing(s.n)

    def refuse(self, *args, **kwargs):
        raise ReadOnlyNodeError("injected: the scratch node refuses the move")

    with monkeypatch.context() as m:
        m.setattr(_Executor, "_do_redeliver", refuse)
        with pytest.raises(TailPlacementError, match="did not complete") as failed:
            place_tail(s.n.path, s.n.log.path, s.t1)
    assert listing(s.n) == before
    report = str(failed.value).rsplit("see ", 1)[1]
    assert os.path.exists(report) and json.load(open(report))["apply"]["status"] == "failed"
    assert not [d for d in os.listdir(s.n.path) if d.startswith(".rebase-")]
    assert not [d for d in os.listdir(os.path.dirname(s.t1)) if "-merged-" in d and d.endswith(".wal")]
    [entry] = place_tail(s.n.path, s.n.log.path, s.t1)
    cluster_on(s.m2)._reconcile_tail(**tail_dir_args(entry["path"]))
    assert_each_once(s.m2, s.acked)
