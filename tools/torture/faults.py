"""The fault injectors of a torture run: each fault kind breaks something, waits,
and heals what it broke before it returns (the next fault starts on a healed cluster)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time
from collections import Counter

from .cluster import Cluster, Links, SkipFault
from .faultproxy import FaultProxy
from .journal import Journal
from .nodes import Features, walctl
from .schedule import Fault

__all__ = ["FaultRunner", "ProcessFaults", "LinkFaults", "SystemFaults", "SkipFault"]


def _pick(items: list, draw: int, what: str):
    """The ``draw``-th of ``items`` (modulo their number), so a schedule drawn up front maps onto
    whatever qualifies when the fault runs.

    Raises:
        SkipFault: nothing qualifies.
    """
    if not items:
        raise SkipFault(f"no {what}")
    return items[draw % len(items)]


class ProcessFaults:
    """Faults on the node processes and their roles: kill -9, SIGSTOP, soft and hard failover."""

    def __init__(self, cluster: Cluster, journal: Journal):
        self.cluster = cluster
        self.journal = journal

    def kill_replica(self, f: Fault) -> dict:
        cl = self.cluster
        cl.current_master()
        node = _pick(cl.replicas(), f.pick, "running replica")
        cl.kill(node)
        cl.sleep(f.duration_s)
        cl.restart(node)
        return {"node": node.name}

    def kill_master(self, f: Fault) -> dict:
        cl = self.cluster
        node = cl.current_master()
        cl.kill(node)
        cl.sleep(f.duration_s)
        cl.start(node, "serve")
        return {"node": node.name}

    def stop(self, f: Fault) -> dict:
        node = _pick(self.cluster.running(), f.pick, "running node")
        self.cluster.sigstop(node)
        try:
            time.sleep(min(f.duration_s, 4.0))
        finally:
            self.cluster.sigcont(node)
        return {"node": node.name}

    def soft_failover(self, f: Fault) -> dict:
        cl = self.cluster
        master = cl.current_master()
        deadline = time.monotonic() + 15.0
        while True:  # like an operator, wait (a while) for a replica that streams from the master
            st = master.status() or {}
            streaming = {r["name"] for r in st.get("replicas") or [] if r.get("connected")}
            candidates = [n for n in cl.replicas() if n.name in streaming]
            if candidates or time.monotonic() > deadline:
                break
            cl.sleep(0.5)
        target = _pick(candidates, f.pick, "streaming replica (waited 15 s)")
        slowed = None
        if f.param < 0.3:  # hand over through a slow link
            slowed = cl.links.proxy(target, master)
            cl.links.call(slowed.set_mode, "delay", 0.05)
        try:
            r = walctl(["failover", master.path, "--to", target.name, "--timeout", "15", "--json"], timeout=60,
                       check=False)
        finally:
            if slowed is not None:
                cl.links.call(slowed.heal)
        if r.returncode == 0:
            cl.master = target
            cl.failovers["soft"] += 1
            result = json.loads(r.stdout)
            self.journal.progress(f"           {master.name} -> {target.name}, epoch {result.get('epoch')}, "
                                  f"writes refused {result.get('refused_writes_s')} s")
            return {"from": master.name, "to": target.name, "result": result, "slow_link": slowed is not None}
        cl.failovers["soft_aborted"] += 1
        self.journal.progress(f"           aborted: {r.stderr.strip()[-300:]}")
        return {"from": master.name, "to": target.name, "aborted": r.stderr.strip()[-1000:]}

    def hard_failover(self, f: Fault) -> dict:
        cl = self.cluster
        master = cl.current_master()
        target = _pick(cl.replicas(), f.pick, "running replica")
        lag_s = 0.0
        if f.pick2 % 4 != 0:
            # The usual way to lose a master: its replica lags (here: its link hangs), the master
            # goes on acknowledging, then dies. Those records end up in the old master's tail.
            lag_s = round(0.5 + f.param * 2.0, 3)
            link = cl.links.proxy(target, master)
            cl.links.call(link.set_mode, "blackhole")
            cl.sleep(lag_s)
        cl.kill(master)
        if lag_s:
            cl.links.call(link.heal)
        deadline = time.monotonic() + 60
        out = None
        while time.monotonic() < deadline:
            r = walctl(["promote", target.path, "--json"], timeout=60, check=False)
            if r.returncode == 0:
                out = json.loads(r.stdout)
                break
            out = r.stderr.strip()
            cl.sleep(0.5)
        if not isinstance(out, dict):
            self.journal.finding("a replica could not be promoted within 60 s of its master's kill -9",
                                 node=target.name, error=str(out)[-1000:])
            cl.start(master, "serve")
            return {"from": master.name, "to": target.name, "promote_failed": str(out)[-1000:]}
        cl.master = target
        cl.failovers["hard"] += 1
        self.journal.progress(f"           {master.name} killed, {target.name} promoted (epoch {out.get('epoch')})")
        cl.sleep(f.duration_s)
        cl.start(master, "follow")  # its diverged tail, if any, is cut aside and auto-reconciled
        return {"from": master.name, "to": target.name, "promoted": out, "replica_lagged_s": lag_s}


class LinkFaults:
    """Faults on the replication links, through their proxies: cut, delay, 1-byte slices,
    blackhole, and a partitioned node."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.links: Links = cluster.links

    def _link(self, f: Fault) -> FaultProxy:
        keys = sorted(self.links.proxies)
        return self.links.proxies[keys[f.pick % len(keys)]][0]

    def cut(self, f: Fault) -> dict:
        proxy = self._link(f)
        reset = f.pick2 % 2 == 0
        if f.pick2 % 3 == 0:
            self.links.call(lambda: proxy.cut_all(reset=reset))
            how = "now"
        else:
            nbytes = 1 + int(f.param * 6000)
            self.links.call(lambda: proxy.cut_after(nbytes, reset=reset))
            how = f"after {nbytes} bytes"
        self.cluster.sleep(f.duration_s)
        self.links.call(proxy.heal)
        return {"link": proxy.name, "cut": how, "reset": reset}

    def _mode(self, f: Fault, mode: str, duration: float, delay_s: float = 0.0) -> dict:
        proxy = self._link(f)
        self.links.call(proxy.set_mode, mode, delay_s)
        try:
            self.cluster.sleep(duration)
        finally:
            self.links.call(proxy.heal)
        return {"link": proxy.name, "mode": mode, "delay_s": delay_s, "for_s": duration}

    def delay(self, f: Fault) -> dict:
        return self._mode(f, "delay", f.duration_s, delay_s=round(0.02 + f.param * 0.4, 3))

    def slice(self, f: Fault) -> dict:
        return self._mode(f, "slice", min(f.duration_s, 3.0))

    def blackhole(self, f: Fault) -> dict:
        # longer than the replication idle timeout (5 s) half of the time
        return self._mode(f, "blackhole", f.duration_s + f.param * 6.0)

    def partition(self, f: Fault) -> dict:
        node = _pick(self.cluster.nodes, f.pick, "node")
        cut_off = [p for (src, dst), (p, _) in self.links.proxies.items() if node.index in (src, dst)]
        for p in cut_off:
            self.links.call(p.set_mode, "refuse")
            self.links.call(lambda p=p: p.cut_all(reset=True))
        try:
            self.cluster.sleep(f.duration_s + f.param * 4.0)
        finally:
            for p in cut_off:
                self.links.call(p.heal)
        return {"node": node.name}


class SystemFaults:
    """Faults through the operating system: a full disk (a ballast file on the node's tmpfs),
    fsync and write errors (strace injects EIO), a jumped wall clock (libfaketime)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def disk_full(self, f: Fault) -> dict:
        disk = self.cluster.disk
        node = disk.node
        if not node.alive() or node.stopped:
            raise SkipFault(f"{node.name} (on the tmpfs) is not running")
        leave = int(f.param * 16384)
        disk.fill(leave)
        try:
            self.cluster.sleep(f.duration_s)
        finally:
            disk.empty()
        return {"node": node.name, "left_bytes": leave, **self.cluster.recover_if_failed(node)}

    def fsync_error(self, f: Fault) -> dict:
        return self._inject_eio(f, "fdatasync")

    def write_error(self, f: Fault) -> dict:
        return self._inject_eio(f, "write")

    def _inject_eio(self, f: Fault, syscall: str) -> dict:
        """strace fails the Nth ``syscall`` on the node's current segment with EIO
        (the call is not made); the node's log is then failed (LOG-12) and the
        node is restarted, which reopens it from what is on disk."""
        node = _pick(self.cluster.running(), f.pick, "running node")
        segs = sorted(glob.glob(os.path.join(node.path, "log.wal", "*.seg")))
        if not segs:
            raise SkipFault(f"{node.name} has no log segment yet")
        nth = 1 + int(f.param * 4)  # a low count, so the call comes within the fault's seconds
        node.tracer = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", "/dev/null", "-p", str(node.proc.pid), "-P", segs[-1], "-e", f"trace={syscall}",
             "-e", f"inject={syscall}:error=EIO:when={nth}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            self.cluster.sleep(f.duration_s + 1.0)
        finally:
            node.detach_tracer()
        return {"node": node.name, f"nth_{syscall}": nth, **self.cluster.recover_if_failed(node)}

    def clock_jump(self, f: Fault) -> dict:
        node = _pick(self.cluster.running(), f.pick, "running node")
        minutes = int((f.param - 0.5) * 360) or 7  # -3 h .. +3 h, never 0
        node.set_clock(f"{minutes:+d}m")
        node.clock_skewed = True
        try:
            self.cluster.sleep(f.duration_s + 1.0)  # the library rereads the file every second
        finally:
            node.set_clock("+0")
            self.cluster.sleep(1.2)
            node.clock_skewed = False
        return {"node": node.name, "offset_minutes": minutes}


class FaultRunner:
    """Runs one scheduled fault by its kind, or skips it (its feature is missing, or
    nothing qualifies now), and counts both."""

    def __init__(self, cluster: Cluster, journal: Journal, features: Features):
        self.journal = journal
        self.features = features
        self.run_counts: Counter = Counter()
        self.skip_counts: Counter = Counter()
        self.skip_reasons: dict[str, str] = {}
        process, links, system = ProcessFaults(cluster, journal), LinkFaults(cluster), SystemFaults(cluster)
        self.injectors = {
            "kill-replica": process.kill_replica,
            "kill-master": process.kill_master,
            "stop": process.stop,
            "soft-failover": process.soft_failover,
            "hard-failover": process.hard_failover,
            "link-cut": links.cut,
            "link-delay": links.delay,
            "link-slice": links.slice,
            "link-blackhole": links.blackhole,
            "partition": links.partition,
            "disk-full": system.disk_full,
            "fsync-error": system.fsync_error,
            "write-error": system.write_error,
            "clock-jump": system.clock_jump,
        }

    def run(self, f: Fault) -> None:
        unavailable = self.features.unavailable()
        if f.kind in unavailable:
            self.skip_counts[f.kind] += 1
            self.skip_reasons[f.kind] = unavailable[f.kind]
            return
        self.journal.progress(f"[{self.journal.now():7.1f}s] {f.kind} (scheduled at {f.at_s:.1f}s)")
        try:
            detail = self.injectors[f.kind](f) or {}
        except SkipFault as exc:
            self.skip_counts[f.kind] += 1
            self.journal.event("fault-skipped", fault=f.to_dict(), reason=str(exc))
            self.journal.progress(f"           skipped: {exc}")
            return
        self.run_counts[f.kind] += 1
        self.journal.event("fault", fault=f.to_dict(), **detail)

