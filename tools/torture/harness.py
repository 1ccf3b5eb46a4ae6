"""One torture run from start to verdicts (see the package's docstring)."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter

from .checker import judge, observe, reconcile_reports
from .cluster import Cluster
from .faults import FaultRunner
from .journal import Journal
from .nodes import detect_features
from .schedule import draw_schedule
from .workload import Flagger, History, Mailer, Sampler

__all__ = ["Torture", "QUIESCENCE_TIMEOUT_S", "QUIESCENCE_MAX_S"]

QUIESCENCE_TIMEOUT_S = 120.0  # without progress
QUIESCENCE_MAX_S = 3600.0


class Torture:
    """One torture run; ``run()`` returns the summary (the ``--json`` output of ``walctl torture``).

    The run's parts: a :class:`~tools.torture.journal.Journal`, the
    :class:`~tools.torture.cluster.Cluster`, the workload
    (:class:`~tools.torture.workload.Mailer`, ``Flagger``, ``Sampler`` writing to a
    :class:`~tools.torture.workload.History`) and the
    :class:`~tools.torture.faults.FaultRunner` playing the schedule.
    """

    def __init__(self, *, seed: int, seconds: float, nodes: int = 3, workdir: str, clients: int = 4,
                 users: int = 6, progress=None):
        self.seed = seed
        self.seconds = seconds
        self.n_nodes = nodes
        self.dir = workdir
        self.n_clients = clients
        self.journal = Journal(progress)
        self.schedule = draw_schedule(seed, seconds)
        self.features = detect_features()
        rng = random.Random(seed ^ 0x5EED)  # harness choices that are not part of the schedule
        self.cluster = Cluster(workdir, nodes, seed=seed, rng=rng, features=self.features, journal=self.journal)
        self.history = History()
        self.mailer = Mailer(self.cluster, self.history, seed=seed, users=[f"u{i}" for i in range(users)])
        self.flagger = Flagger(self.cluster, self.history, seed=seed)
        self.sampler = Sampler(self.cluster)
        self.faults = FaultRunner(self.cluster, self.journal, self.features)
        self.faults_not_run = 0  # scheduled after the end of the fault phase (slow faults before them)
        self.stop_clients = threading.Event()
        self.no_new_messages = threading.Event()  # healing: clients only retry what is pending
        self.stop_sampler = threading.Event()

    def setup(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        self.journal.open(os.path.join(self.dir, "events.jsonl"))
        with open(os.path.join(self.dir, "schedule.json"), "w") as f:
            json.dump({"seed": self.seed, "seconds": self.seconds, "faults": [x.to_dict() for x in self.schedule]}, f,
                      indent=1)
        self.cluster.create()

    def run(self) -> dict:
        say = self.journal.progress
        cluster = self.cluster
        try:
            self.setup()
            say(f"torture: seed {self.seed}, {self.seconds:g} s, {self.n_nodes} nodes, "
                f"{len(self.schedule)} faults scheduled, in {self.dir}")
            for kind, why in self.features.unavailable().items():
                say(f"  {kind}: skipped ({why})")
            threads = [threading.Thread(target=self.mailer.run, args=(k, self.stop_clients, self.no_new_messages),
                                        name=f"client-{k}", daemon=True) for k in range(self.n_clients)]
            threads.append(threading.Thread(target=self.flagger.run, args=(self.no_new_messages,), name="flags",
                                            daemon=True))
            sampler = threading.Thread(target=self.sampler.run, args=(self.stop_sampler,), name="sampler", daemon=True)
            phase_start = time.monotonic()
            for t in threads:
                t.start()
            sampler.start()
            for f in self.schedule:
                wait = f.at_s - (time.monotonic() - phase_start)
                if wait > 0:
                    cluster.sleep(wait)
                if time.monotonic() - phase_start >= self.seconds:
                    self.faults_not_run += 1
                    continue
                cluster.ensure_master()
                self.faults.run(f)
            left = self.seconds - (time.monotonic() - phase_start)
            if left > 0:
                cluster.sleep(left)
            say(f"[{self.journal.now():7.1f}s] healing")
            self.no_new_messages.set()
            self.heal()
            self.drain_pending()
            self.stop_clients.set()
            for t in threads:
                t.join(60)
            quiet = self.wait_quiescence()
            self.stop_sampler.set()
            sampler.join(30)
            nodes = observe(cluster, self.journal)
            return self.summary(nodes, quiet)
        finally:
            self.teardown()

    def heal(self) -> None:
        """Undo every fault, restart every node that is down, keep one master, restart failed logs."""
        cluster = self.cluster
        cluster.links.heal_all()
        for n in cluster.nodes:
            n.detach_tracer()
            if n.stopped:
                cluster.sigcont(n)
            if n.clock_file:
                n.set_clock("+0")
            n.clock_skewed = False
        if cluster.disk is not None:
            cluster.disk.empty()
        masters = cluster.find_masters()
        if len(masters) > 1:
            self.journal.finding("more than one master after the faults", masters=[m.name for m in masters])
            keep = cluster.master if cluster.master in masters else masters[0]
            for m in masters:
                if m is not keep:
                    cluster.kill(m)
                    cluster.start(m, "follow")
            masters = [keep]
        if masters:
            cluster.master = masters[0]
        for n in cluster.nodes:
            if not n.alive():
                cluster.restart(n)
            elif n is not cluster.master:
                cluster.recover_if_failed(n)
        if cluster.master is not None:
            cluster.recover_if_failed(cluster.master)
        cluster.ensure_master()

    def drain_pending(self, timeout_s: float = 90.0) -> None:
        """Let the clients retry what is pending until nothing is (an MTA's queue run after an outage)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.history.lock:
                if not self.history.pending and self.history.inflight == 0:
                    break
            self.cluster.sleep(0.2)
        self.journal.event("drained", still_pending=self.history.still_pending())

    def wait_quiescence(self) -> dict:
        """Until every node is at the master's last LSN and hash, applied, with no unreconciled tail."""
        # Reconciling big tails after many failovers takes a while: wait as long as
        # something moves, and give up after QUIESCENCE_TIMEOUT_S without any progress.
        started = time.monotonic()
        deadline = started + QUIESCENCE_TIMEOUT_S
        stable = 0
        last = None
        progress = None
        while time.monotonic() < deadline and time.monotonic() - started < QUIESCENCE_MAX_S:
            self.cluster.supervise()
            sts = {n.name: n.status() for n in self.cluster.nodes}
            now_progress = tuple((k, s["last_lsn"], s["applied_lsn"], len(s.get("diverged_tails") or []))
                                 if s else (k, None) for k, s in sts.items())
            if now_progress != progress:
                progress = now_progress
                deadline = time.monotonic() + QUIESCENCE_TIMEOUT_S
            problems = []
            if any(s is None for s in sts.values()):
                problems.append(f"not answering: {[k for k, s in sts.items() if s is None]}")
            else:
                masters = [k for k, s in sts.items() if s["role"] == "master"]
                if len(masters) != 1:
                    problems.append(f"masters: {masters}")
                ends = {(s["last_lsn"], s["last_hash"]) for s in sts.values()}
                if len(ends) != 1:
                    problems.append(f"last LSNs differ: {sorted({k: s['last_lsn'] for k, s in sts.items()}.items())}")
                for k, s in sts.items():
                    if s["applied_lsn"] != s["last_lsn"]:
                        problems.append(f"{k} applied {s['applied_lsn']} of {s['last_lsn']}")
                    if s.get("diverged_tails"):
                        problems.append(f"{k} has unreconciled diverged tails")
                    if s.get("log_failed") or s.get("applier_error"):
                        problems.append(f"{k} failed: {s.get('log_failed') or s.get('applier_error')}")
                    if s["role"] != "master" and (s.get("connection") or {}).get("state") != "streaming":
                        problems.append(f"{k} is not streaming ({(s.get('connection') or {}).get('state')})")
            last = {"problems": problems, "statuses": sts}
            if not problems:
                stable += 1
                if stable >= 3:
                    self.journal.event("quiescent", waited_s=round(time.monotonic() - started, 1))
                    self.journal.progress(f"[{self.journal.now():7.1f}s] quiescent after "
                                          f"{time.monotonic() - started:.0f} s")
                    return {"ok": True, "after_s": self.journal.now(), "waited_s": round(time.monotonic() - started, 1)}
            else:
                stable = 0
            time.sleep(1.0)
        self.journal.finding("no quiescence after healing", problems=last["problems"] if last else None)
        return {"ok": False, "problems": last["problems"] if last else None,
                "statuses": {k: {x: (s or {}).get(x) for x in ("role", "last_lsn", "applied_lsn", "diverged_tails",
                                                              "connection", "events")}
                             for k, s in (last or {}).get("statuses", {}).items()}}

    def summary(self, nodes: list[dict], quiet: dict) -> dict:
        """The verdicts and the run's figures; writes ``history.jsonl`` and ``summary.json`` in the run directory."""
        reports, rcounts = reconcile_reports(self.dir)
        ops = self.history.ops
        verdicts, result = judge(ops, nodes, quiet, cursor_samples=self.sampler.cursor_samples,
                                 uidvalidity_samples=self.sampler.uidvalidity_samples, reports=reports,
                                 journal=self.journal)
        ok = all(v["ok"] for v in verdicts.values())
        deliveries = [o for o in ops if o["op"] == "deliver"]
        flag_ops = [o for o in ops if o["op"] == "flags"]
        failovers = self.cluster.failovers
        summary = {
            "seed": self.seed,
            "seconds": self.seconds,
            "minutes": round(self.seconds / 60.0, 2),
            "nodes": self.n_nodes,
            "ok": ok,
            "attempted": len(ops),
            "acked": sum(o["outcome"] == "acked" or o.get("real_outcome") == "acked" for o in ops),
            "deliveries": {"attempted": len(deliveries),
                           "messages": len({o["msg"] for o in deliveries}),
                           **Counter(o["outcome"] for o in deliveries),
                           "still_pending": self.history.still_pending()},
            "flag_changes": {"attempted": len(flag_ops), **Counter(o.get("real_outcome") or o["outcome"]
                                                                     for o in flag_ops)},
            "lost": result["lost"],
            "duplicated": result["duplicated"],
            "diverged": result["diverged"],
            "faults": dict(sorted(self.faults.run_counts.items())),
            "faults_skipped": dict(sorted(self.faults.skip_counts.items())),
            "skipped_features": self.features.unavailable(),
            "faults_scheduled": len(self.schedule),
            "faults_not_run": self.faults_not_run,
            "failovers": failovers["soft"] + failovers["hard"],
            "failover_detail": dict(failovers),
            "unexpected_exits": self.cluster.unexpected_exits,
            "reconcile": {**rcounts, "conflicts": sum(r["conflicts"] for r in reports)},
            "cursor_samples": len(self.sampler.cursor_samples),
            "quiescent_after_s": quiet.get("waited_s"),
            "final": {"master": nodes[0]["name"] if nodes else None, "last_lsn": nodes[0]["last_lsn"] if nodes else None,
                      "epoch": nodes[0].get("epoch") if nodes else None},
            "verdicts": {name: {"ok": v["ok"], "checked": v["checked"], "violations": v["violations"][:5]}
                         for name, v in verdicts.items()},
            "dir": self.dir,
        }
        with open(os.path.join(self.dir, "history.jsonl"), "w") as f:
            for o in ops:
                f.write(json.dumps(o) + "\n")
        with open(os.path.join(self.dir, "summary.json"), "w") as f:
            json.dump({**summary, "verdicts_full": verdicts, "reconcile_reports": reports}, f, indent=1, default=str)
        return summary

    def teardown(self) -> None:
        self.stop_clients.set()
        self.stop_sampler.set()
        # when something was wrong, every thread's stack is left in the node logs for the post-mortem
        self.cluster.close(dump_stacks=bool(self.journal.findings))
        self.journal.close()
