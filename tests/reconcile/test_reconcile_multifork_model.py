"""Hypothesis: histories with several forks, their tails reconciled in generated orders.

tests/reconcile/test_reconcile_model.py forks once. This model covers where several
forks meet: tails of several forks reconciled into one master in different
orders, a message from before a fork moved by one reconcile (REC-6) and
flagged in another tail (REC-14), a master that took tails and then lost its
place itself, tails stranded inside later tails (CTL-9).

The world here is a few real node directories (engine.node.Node), driven
the way the cluster drives them, without processes:

* ``copy``: a replica is made of a node (its directory copied, tails and
  reports left out, as a seeded replica has none); it lags from then on;
* ``promote``: a replica becomes a master at an epoch above every epoch
  given out (engine.cluster.failover.promote); the old master may still be a master
  too (split brain: each takes acknowledged operations);
* ``deliver`` / ``flags`` / ``expunge``: a client's acknowledged operation on
  a master (durable on return);
* ``follow``: a node becomes a master's replica: the fork point is found
  (wal.fork.find_fork), a diverged tail is cut aside (Node.cut_diverged,
  pending in NODE/diverged.json) and the master's records are appended;
* ``reconcile``: one pending tail is shipped the way Cluster does it: merged
  first while stranded (engine.reconcile.placement.place_tail via
  Cluster._place_tail, CTL-9), then applied on the master the node follows
  (Cluster._reconcile_tail), or locally if the node is a master itself
  (Cluster._reconcile_locally); then marked reconciled;
* ``reconcile-interrupted``: the same, but the apply stops after its first
  0 to 3 actions (fault injection: the node lost its place mid-apply): the
  apply fails, the tail stays pending and is shipped
  again later, and clients go on using the survivor meanwhile.

At the end one master is the final survivor, every other node follows it,
and every pending tail is reconciled in a generated order. The checks are
the torture history checker's (tools/torture/history.py), stated by the REC rules:

* every acknowledged delivery is on the survivor exactly once (by GUID),
  unless a client expunged it on the survivor's own history (the expunge
  record is in the survivor's log): a loser's expunge is not applied without
  --apply-destructive (REC-10), an expunge on the winning side stands
  (REC-5); no message is there that nobody delivered;
* for each message and flag, the acknowledged operation with the greatest
  ``changed_ms`` decides (REC-8: the later change wins; a delivery sets its
  initial flags at its delivery time). Clients' operations here are at
  distinct milliseconds, so "later" has no ties;
  (REC-8 compares the changed_ms of records: since an applied change is
  logged at the applied change's changed_ms, that is the clients' order.)
* UIDs are unique per mailbox (REC-6);
* applying the same tail again plans nothing (REC-12).

No failure is excused: each case this model shrank to is also a plain test in
test_reconcile_multifork_regressions.py or an ``@example`` below.

Every step is logged with ``note`` so a failure can become a plain test.
"""

from __future__ import annotations

import json
import shutil
import time
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

from engine.cluster import Cluster, ClusterConfig
from engine.cluster.failover import promote
from engine.node import Node
from engine.reconcile import ReconcileError, TailPlacementError, apply_reconcile
from engine.reconcile.apply import _Executor
from engine.store.events import decode_event
from wal import Log
from wal import find_fork

BOXES = ["user/u/INBOX", "user/u/INBOX", "user/u/Work"]  # INBOX twice: more UID collisions
FLAGS = ["\\Seen", "\\Flagged", "$Work"]
FLAGSETS = [(), (), ("\\Seen",), ("\\Flagged",), ("\\Seen", "$Work")]
MAX_NODES = 4
SKIP_DIRS = shutil.ignore_patterns("diverged", "diverged.json", "reconcile", ".rebase-*", "mailwal-tail-*", "LOCK")


def now_ms() -> int:
    return int(time.time() * 1000)


def tail_dir_args(path: str) -> dict:
    """What a replica ships to the master's reconcile_tail (Cluster._reconcile_into_master)."""
    with Log.open(path) as t:
        first = t.first_lsn
        return {"log_id": str(t.log_id), "first_lsn": first, "prev_hash": t.hash_at(first - 1),
                "records": [[r.lsn, r.epoch, r.type, r.payload, r.hash] for r in t.read(first)]}


class World:
    """Real nodes plus what clients were told (the model)."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.nodes: dict[str, Node] = {}
        self.follows: dict[str, str | None] = {}
        self.epoch = 1
        self.bodies = 0
        self.last_ms = 0
        # guid (hex) -> mailbox; acknowledged deliveries
        self.delivered: dict[str, str] = {}
        # (guid, flag) -> [(changed_ms, value, what)]: acknowledged operations on it
        self.flag_ops: dict[tuple[str, str], list[tuple[int, bool, str]]] = {}
        # guid -> [(node, lsn, hash)]: acknowledged client expunges
        self.expunges: dict[str, list[tuple[str, int, bytes]]] = {}
        self.stats = {"tails cut": 0, "tails merged (CTL-9)": 0, "tails reconciled": 0, "REC-6 moves": 0,
                      "REC-14 decisions": 0, "reconciled into a master that later lost its place": 0,
                      "tails requeued (their apply cut away)": 0, "applies interrupted": 0}
        self.applied_on: set[str] = set()

    # -- helpers -------------------------------------------------------------------------------

    def masters(self) -> list[str]:
        return [n for n in sorted(self.nodes) if self.nodes[n].role == "master"]

    def tick(self) -> None:
        """Wait for a millisecond no client operation and no apply has used (REC-8 'later')."""
        while now_ms() <= self.last_ms:
            time.sleep(0.0005)

    def event(self, node: Node, lsn: int):
        rec = next(node.log.read(lsn, lsn))
        return decode_event(rec.type, rec.payload)

    def messages(self, node: Node, box: str):
        node.catch_up()
        return node.list_messages(box) if box in {m.name for m in node.list_mailboxes()} else []

    # -- setup ---------------------------------------------------------------------------------

    def start(self, prefix: list[int]) -> None:
        n = Node.init(str(self.tmp / "n0"), name="n0")
        self.nodes["n0"], self.follows["n0"] = n, None
        for box in ("user/u/INBOX", "user/u/Work"):
            n.create_mailbox(box)
        for fl in prefix:
            self.deliver("n0", fl % len(BOXES), fl)

    # -- client operations (acknowledged: durable on return) ------------------------------------

    def deliver(self, name: str, x: int, y: int) -> None:
        node, box = self.nodes[name], BOXES[x % len(BOXES)]
        self.bodies += 1
        body = b"Subject: m%d\r\n\r\ndelivered on %s\r\n" % (self.bodies, name.encode())
        self.tick()
        r = node.deliver(box, body, flags=FLAGSETS[y % len(FLAGSETS)])
        assert not r.duplicate
        ev = self.event(node, r.lsn)
        self.last_ms = ev.delivered_ms
        self.delivered[r.guid] = box
        for f in ev.flags:  # REC-8: a delivery sets its initial flags at its delivery time
            self.flag_ops.setdefault((r.guid, f), []).append((ev.delivered_ms, True, f"deliver on {name}"))
        note(f"{name}: deliver m{self.bodies} to {box} uid {r.uid} flags {list(ev.flags)} ({r.guid[:8]})")

    def flags(self, name: str, x: int, y: int, z: int) -> None:
        node, box = self.nodes[name], BOXES[x % len(BOXES)]
        msgs = self.messages(node, box)
        if not msgs:
            return
        m = msgs[y % len(msgs)]
        op, flag = ("add", "remove")[z % 2], FLAGS[(z // 2) % len(FLAGS)]
        self.tick()
        lsn = node.store_flags(box, [m.uid], op, [flag])
        ms = self.event(node, lsn).changed_ms
        self.last_ms = ms
        self.flag_ops.setdefault((m.guid, flag), []).append((ms, op == "add", f"{op} on {name} lsn {lsn}"))
        note(f"{name}: {op} {flag} on {box} uid {m.uid} ({m.guid[:8]}) at lsn {lsn}")

    def expunge(self, name: str, x: int, y: int) -> None:
        node, box = self.nodes[name], BOXES[x % len(BOXES)]
        msgs = self.messages(node, box)
        if not msgs:
            return
        m = msgs[y % len(msgs)]
        self.tick()
        lsn = node.expunge(box, [m.uid])
        self.last_ms = self.event(node, lsn).expunged_ms
        self.expunges.setdefault(m.guid, []).append((name, lsn, node.log.hash_at(lsn)))
        note(f"{name}: expunge {box} uid {m.uid} ({m.guid[:8]}) at lsn {lsn}")

    # -- cluster operations --------------------------------------------------------------------

    def copy(self, src: str) -> None:
        """A replica of ``src`` holding its whole log now (it lags from here on)."""
        name = f"n{len(self.nodes)}"
        self.nodes[src].close()
        shutil.copytree(self.tmp / src, self.tmp / name, ignore=SKIP_DIRS)
        self.nodes[src] = Node.open(str(self.tmp / src))
        node = Node.open(str(self.tmp / name))
        node.set_role("replica")
        self.nodes[name], self.follows[name] = node, src
        note(f"copy {src} -> {name} (replica of {src} at lsn {node.log.last_lsn})")

    def promote(self, name: str) -> None:
        node = self.nodes[name]
        self.epoch = max(self.epoch, *(n.log.epoch for n in self.nodes.values())) + 1
        node.set_role("master")
        promote(node, epoch=self.epoch)
        self.follows[name] = None
        note(f"promote {name} at epoch {self.epoch}")

    def follow(self, name: str, master: str) -> None:
        """``name`` becomes ``master``'s replica: its diverged tail (if any) is cut aside."""
        node, m = self.nodes[name], self.nodes[master]
        node.set_role("replica")
        fork = find_fork(node.log.path, m.log.path).lsn
        if node.log.last_lsn > fork:
            tail = node.cut_diverged(fork)
            self.stats["tails cut"] += 1
            if name in self.applied_on:
                self.stats["reconciled into a master that later lost its place"] += 1
            requeued = [t["path"] for t in node.diverged_tails() if t.get("requeued", {}).get("after_cut") == tail]
            self.stats["tails requeued (their apply cut away)"] += len(requeued)
            note(f"{name} follows {master}: tail {tail.rsplit('/', 1)[1]} cut after {fork}"
                 + (f"; pending again: {', '.join(p.rsplit('/', 1)[1] for p in requeued)}" if requeued else ""))
        else:
            note(f"{name} follows {master} from {fork}")
        if m.log.last_lsn > fork:
            node.log.append_records(list(m.log.read(fork + 1)))
        node.catch_up()
        self.follows[name] = master

    def pending(self) -> list[tuple[str, str]]:
        return [(n, t["path"]) for n in sorted(self.nodes) for t in self.nodes[n].diverged_tails()
                if not t.get("reconciled")]

    def reconcile(self, holder: str, tail: str, *, interrupt: int | None = None) -> bool:
        """Ship one pending tail as the cluster does; False when its node has no master to ship to.

        ``interrupt``: the apply stops after that many actions (injected); it fails and the
        tail stays pending, as a real cluster leaves it for the next attempt."""
        if interrupt is not None:
            done = []
            real_run = _Executor.run

            def run_then_stop(executor, act):
                if len(done) >= interrupt:
                    raise ReconcileError(f"injected: the apply stopped after {interrupt} action(s)")
                done.append(act.kind)
                return real_run(executor, act)

            with patch.object(_Executor, "run", run_then_stop):
                try:
                    return self.reconcile(holder, tail)
                except (ReconcileError, TailPlacementError):  # the apply, or a CTL-9 merge's
                    note(f"(that apply stopped after {done}, injected; the tail stays pending)")
                    self.stats["applies interrupted"] += 1
                    self.last_ms = now_ms()
                    return True
        node = self.nodes[holder]
        c = Cluster(ClusterConfig(name=holder))
        c.node = node
        if node.role == "master":
            merged = c._place_tail(tail)
            tail = merged[-1]["path"] if merged else tail
            report = c._reconcile_locally(tail)
            target, target_name, shipped = node, holder, tail
        else:
            master = self.follows[holder]
            if master is None or self.nodes[master].role != "master":
                return False
            self.follow(holder, master)  # the replica is streaming from its master again
            merged = c._place_tail(tail)
            tail = merged[-1]["path"] if merged else tail
            target, target_name = self.nodes[master], master
            mc = Cluster(ClusterConfig(name=master))
            mc.node = target
            out = mc._reconcile_tail(**tail_dir_args(tail))
            report, shipped = out["report"], out["tail"]  # the master's kept copy of the tail
        node.mark_reconciled(tail, report)
        note(f"reconcile a tail of {holder} into {target_name}"
             f"{' (merged %d)' % len(merged) if merged else ''}")
        self.stats["tails reconciled"] += 1
        self.stats["tails merged (CTL-9)"] += len(merged)
        self.applied_on.add(target_name)
        if report:
            with open(report) as f:
                plan = json.load(f)["plan"]
            self.stats["REC-6 moves"] += sum(a["kind"] == "redeliver" for a in plan["actions"])
            self.stats["REC-14 decisions"] += sum(d.get("rule") == "REC-14" for d in plan["decisions"])
        again = apply_reconcile(target, target.log.path, shipped, dry_run=True)
        assert again.plan.actions == [], ("REC-12", [a.to_dict() for a in again.plan.actions])
        self.check_uids(target)
        self.last_ms = now_ms()
        return True

    # -- checks --------------------------------------------------------------------------------

    def check_uids(self, node: Node) -> None:
        for box in ("user/u/INBOX", "user/u/Work"):
            uids = [m.uid for m in self.messages(node, box)]
            assert len(uids) == len(set(uids)), ("UIDs unique per mailbox", box, sorted(uids))

    def check(self, name: str) -> None:
        node = self.nodes[name]
        self.check_uids(node)
        held: dict[str, list] = {}
        for box in ("user/u/INBOX", "user/u/Work"):
            for m in self.messages(node, box):
                held.setdefault(m.guid, []).append((box, m))
        nobody = sorted(g for g in held if g not in self.delivered)
        assert not nobody, ("messages nobody delivered", nobody)
        for guid, box in self.delivered.items():
            standing = [e for e in self.expunges.get(guid, ())
                        if e[1] <= node.log.last_lsn and node.log.hash_at(e[1]) == e[2]]
            copies = held.get(guid, [])
            if standing:
                assert copies == [], (guid[:8], "expunged on the survivor's history (REC-5) yet present", copies)
                continue
            assert len(copies) == 1, (guid[:8], "acknowledged delivery present", len(copies), "times",
                                      self.expunges.get(guid))
            assert copies[0][0] == box, (guid[:8], "in the wrong mailbox", copies[0][0])
            m = copies[0][1]
            for flag in FLAGS:
                ops = sorted(self.flag_ops.get((guid, flag), []))
                want = ops[-1][1] if ops else False
                assert (flag in m.flags) == want, (
                    f"{guid[:8]} uid {m.uid}: flag {flag} should be {'set' if want else 'clear'} (REC-8)", ops)


def run_history(tmp, prefix, replicas, rounds, survivor, order) -> None:
    """Play one generated history (see the module docstring) and check the final survivor."""
    w = World(tmp)
    try:
        w.start(prefix)
        note(f"prefix: {len(prefix)} deliveries on n0")
        for lag in replicas:  # replicas copied at different points: they lag by different amounts
            w.copy("n0")
            for i in range(lag):
                w.deliver("n0", i, lag + i)
        for ops, (kind, a, b) in rounds:
            for op, c, x, y, z in ops:
                masters = w.masters()
                name = masters[c % len(masters)]
                if op == "deliver":
                    w.deliver(name, x, y)
                elif op == "flags":
                    w.flags(name, x, y, z)
                else:
                    w.expunge(name, x, y)
            names, masters = sorted(w.nodes), w.masters()
            replicas_now = [n for n in names if n not in masters]
            if kind in ("failover", "promote") and replicas_now:
                new = replicas_now[a % len(replicas_now)]
                w.promote(new)  # the old master may go on taking operations (it was cut off)
                if kind == "failover":  # ... or it comes back as the new master's replica
                    w.follow(masters[b % len(masters)], new)
            elif kind == "follow" and len(masters) > 1:
                m = masters[a % len(masters)]
                others = [n for n in names if n != m]
                w.follow(others[b % len(others)], m)
            elif kind == "sync" and replicas_now:
                r = replicas_now[a % len(replicas_now)]
                if w.follows[r] in masters:
                    w.follow(r, w.follows[r])
            elif kind == "copy" and len(names) < MAX_NODES:
                w.copy(masters[a % len(masters)])
            elif kind in ("reconcile", "reconcile-interrupted"):
                pending = w.pending()
                if pending:
                    w.reconcile(*pending[a % len(pending)], interrupt=b if kind == "reconcile-interrupted" else None)
        masters = w.masters()
        final = masters[survivor % len(masters)]
        note(f"final survivor: {final}")
        for n in sorted(w.nodes):
            if n != final:
                w.follow(n, final)
        i = 0
        while True:
            pending = w.pending()
            if not pending:
                break
            holder, tail = pending[order[i % len(order)] % len(pending)] if order else pending[0]
            i += 1
            assert w.reconcile(holder, tail), (holder, tail)
            assert i < 50, "tails keep coming"
        w.check(final)
        for what, count in w.stats.items():
            event(f"{what}: {min(count, 3)}{'+' if count >= 3 else ''}")
    finally:
        for n in w.nodes.values():
            n.close()


CLIENT_OP = st.tuples(st.sampled_from(["deliver", "deliver", "flags", "flags", "expunge"]), st.integers(0, 3),
                      st.integers(0, 40), st.integers(0, 40), st.integers(0, 40))
CLUSTER_EVENT = st.tuples(st.sampled_from(["failover", "failover", "promote", "follow", "sync", "copy",
                                           "reconcile", "reconcile", "reconcile-interrupted"]),
                          st.integers(0, 3), st.integers(0, 3))
histories = dict(
    prefix=st.lists(st.integers(0, 14), min_size=1, max_size=4),
    replicas=st.lists(st.integers(0, 3), min_size=1, max_size=2),
    rounds=st.lists(st.tuples(st.lists(CLIENT_OP, max_size=4), CLUSTER_EVENT), min_size=2, max_size=9),
    survivor=st.integers(0, 3),
    order=st.lists(st.integers(0, 3), max_size=4),
)


_D = ("deliver", 0, 0, 0, 0)


@pytest.mark.heavy
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(**histories)
# REC-8: a loser's pre-fork UID the survivor moved and the loser's own delivery of that GUID
# are one message, with one set_flags action (weighed separately, the older change could be
# logged last, and the same apply run again would plan a change, REC-12).
@example(prefix=[0], replicas=[1], rounds=[([], ("failover", 0, 0)), ([_D, _D], ("reconcile", 0, 0)),
                                           ([], ("failover", 0, 0)), ([_D, _D], ("failover", 0, 0)),
                                           ([("flags", 0, 0, 1, 0)], ("reconcile", 2, 0)), ([], ("failover", 0, 0))],
         survivor=0, order=[])
# CTL-9: a stranded tail's \Seen on a message the newer tail expunged is kept by the merge
# (keep_flag_changes): that expunge is a loser's, never applied, so dropping the change by
# REC-14 against the scratch node would lose the acknowledged \Seen.
@example(prefix=[0], replicas=[0, 0], rounds=[([], ("failover", 0, 0)), ([_D, ("flags", 0, 0, 0, 0)], ("failover", 0, 0)),
                                              ([], ("failover", 0, 0)), ([_D, ("expunge", 0, 0, 0, 0)], ("failover", 1, 0))],
         survivor=0, order=[])
# REC-8 with MS-16: in a tail holding an apply's move of a pre-fork message, the move's copied
# \\Seen is no client's add, and the survivor's side includes its later remove on the old UID:
# \\Seen stays removed. A move's track carries the old UID's operations.
@example(prefix=[0], replicas=[0], rounds=[([("deliver", 0, 38, 0, 0)], ("failover", 0, 0)),
                                           ([_D, _D, ("deliver", 0, 26, 27, 0)], ("reconcile", 0, 0)),
                                           ([], ("failover", 0, 0)),
                                           ([_D, _D, _D, ("flags", 0, 2, 0, 1)], ("failover", 0, 0))],
         survivor=0, order=[3])
# An apply stopped before its first action inside a CTL-9 merge: the merge fails
# (TailPlacementError), both tails stay pending and the later reconciles merge them.
@example(prefix=[0], replicas=[1, 1], rounds=[([], ("failover", 1, 0)), ([], ("failover", 0, 0)),
                                              ([], ("failover", 0, 0)), ([], ("reconcile-interrupted", 0, 0))],
         survivor=0, order=[])
def test_rec5_rec6_rec8_rec12_rec14_ctl9_multifork_histories_converge(tmp_path_factory, prefix, replicas, rounds,
                                                                     survivor, order):
    run_history(tmp_path_factory.mktemp("multifork"), prefix, replicas, rounds, survivor, order)


@pytest.mark.slow
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(**histories)
def test_rec5_rec6_rec8_rec12_rec14_ctl9_multifork_histories_converge_soak(tmp_path_factory, prefix, replicas,
                                                                          rounds, survivor, order):
    run_history(tmp_path_factory.mktemp("multifork"), prefix, replicas, rounds, survivor, order)
