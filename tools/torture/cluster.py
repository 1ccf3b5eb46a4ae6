"""The cluster of a torture run: real ``walctl serve``/``follow`` processes on 127.0.0.1,
the fault proxies on their replication links, and which node is master."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time

from ..ports import free_port
from .faultproxy import FaultProxy
from .journal import Journal
from .nodes import HOST, WALCTL, Features, NodeProc, SmallDisk, walctl

__all__ = ["Cluster", "Links", "SkipFault"]


class SkipFault(Exception):
    """The fault cannot run now (e.g. no running replica); recorded as skipped."""


class Links:
    """A fault proxy on every replication link, served by an anyio event loop in a
    thread of its own: node *i* reaches node *j* through the proxy ``(i, j)``, so
    any link can be cut, delayed, sliced or blackholed in either direction."""

    def __init__(self):
        self.proxies: dict[tuple[int, int], tuple[FaultProxy, int]] = {}  # (src, dst) -> (proxy, its port)
        self._portal = None
        self._portal_cm = None

    def open(self, nodes: list[NodeProc]) -> None:
        import anyio.from_thread

        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        for src in nodes:
            for dst in nodes:
                if src is dst:
                    continue
                proxy = FaultProxy(HOST, dst.listen_port, name=f"{src.name}->{dst.name}")
                _, port = self._portal.start_task(proxy.serve)
                self.proxies[(src.index, dst.index)] = (proxy, port)

    def call(self, fn, *args):
        """Run ``fn(*args)`` in the proxies' event loop (every proxy method must run there)."""
        return self._portal.call(fn, *args)

    def port(self, src: NodeProc, dst: NodeProc) -> int:
        return self.proxies[(src.index, dst.index)][1]

    def proxy(self, src: NodeProc, dst: NodeProc) -> FaultProxy:
        return self.proxies[(src.index, dst.index)][0]

    def retarget(self, node: NodeProc) -> None:
        """Point every proxy in front of ``node`` at its (new) replication port."""
        for (_, dst), (proxy, _) in self.proxies.items():
            if dst == node.index:
                self.call(proxy.retarget, HOST, node.listen_port)

    def heal_all(self) -> None:
        for proxy, _ in self.proxies.values():
            self.call(proxy.heal)

    def close(self) -> None:
        if self._portal_cm is not None:
            with contextlib.suppress(Exception):
                self._portal.call(self._portal.stop, True)  # cancel the proxies
            with contextlib.suppress(Exception):
                self._portal_cm.__exit__(None, None, None)
            self._portal_cm = None


class Cluster:
    """The nodes of a run and what an operator and a service manager would do with them:
    start, kill, restart what exits by itself, know the master, promote one when there is none.

    Every node runs with ``--auto-reconcile``; ``failovers`` counts the role changes
    (``soft``, ``hard``, ``soft_aborted`` by the faults, ``operator`` by :meth:`ensure_master`).
    """

    def __init__(self, directory: str, n_nodes: int, *, seed: int, rng: random.Random, features: Features,
                 journal: Journal):
        self.dir = directory
        self.n_nodes = n_nodes
        self.seed = seed
        self.rng = rng
        self.features = features
        self.journal = journal
        self.nodes: list[NodeProc] = []
        self.links = Links()
        self.master: NodeProc | None = None
        self.secret = os.path.join(directory, "replication.secret")
        self.disk: SmallDisk | None = None  # the node on a small tmpfs (disk-full faults)
        self.failovers = {"soft": 0, "hard": 0, "soft_aborted": 0, "operator": 0}
        self.unexpected_exits = 0

    def create(self) -> None:
        """Make the node directories, the disk and clocks for the faults and the proxies, init
        node 0 and start it as master, then the others as its replicas."""
        for i in range(self.n_nodes):
            self.nodes.append(NodeProc(i, os.path.join(self.dir, f"n{i}"), free_port(self.rng, HOST),
                                       free_port(self.rng, HOST), os.path.join(self.dir, "logs", f"n{i}.log")))
        if self.features.tmpfs is None:
            disk = SmallDisk(self.nodes[1 + self.seed % (self.n_nodes - 1)])  # a replica at first
            reason = disk.mount()
            if reason is None:
                self.disk = disk
            else:
                self.features.tmpfs = reason
        if self.features.faketime is None:
            os.makedirs(os.path.join(self.dir, "clock"), exist_ok=True)
            for n in self.nodes:
                n.clock_file = os.path.join(self.dir, "clock", f"{n.name}.faketime")
                n.set_clock("+0")
        self.links.open(self.nodes)
        first = self.nodes[0]
        walctl(["init", first.path, "--name", first.name])
        shutil.copy(os.path.join(first.path, "replication.secret"), self.secret)
        os.chmod(self.secret, 0o600)
        self.start(first, "serve")
        self.master = first
        for n in self.nodes[1:]:
            self.start(n, "follow")
        self.journal.event("setup", nodes={n.name: {"listen": n.listen_port, "lmtp": n.lmtp_port} for n in self.nodes},
                           disk_node=self.disk.node.name if self.disk is not None else None,
                           unavailable=self.features.unavailable())

    # -- processes -----------------------------------------------------------------------------

    def _command(self, node: NodeProc, mode: str) -> list[str]:
        cmd = WALCTL + [mode, node.path, "--lmtp", f"{HOST}:{node.lmtp_port}", "--listen",
                        f"{HOST}:{node.listen_port}", "--name", node.name, "--secret-file", self.secret,
                        "--auto-reconcile", "--quiet"]
        for other in self.nodes:
            if other is not node:
                cmd += ["--peer", f"{HOST}:{self.links.port(node, other)}"]
        return cmd

    def _env(self, node: NodeProc) -> dict:
        env = dict(os.environ)
        env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT dumps every thread's stack into the node's log
        if node.clock_file is not None:
            # Wall clock only: monotonic time never jumps on a real machine, and timers depend on it.
            env.update(LD_PRELOAD=self.features.faketime_lib, FAKETIME_TIMESTAMP_FILE=node.clock_file,
                       FAKETIME_CACHE_DURATION="1", FAKETIME_DONT_FAKE_MONOTONIC="1")
        return env

    def start(self, node: NodeProc, mode: str, *, wait: bool = True) -> None:
        """Start ``walctl serve|follow`` for ``node`` and wait until its control socket answers."""
        for attempt in range(4):
            with open(node.log_path, "ab") as logf:
                logf.write(f"\n=== {self.journal.now()} start {mode} (start #{node.starts + 1})\n".encode())
                logf.flush()
                node.proc = subprocess.Popen(self._command(node, mode), stdout=logf, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self._env(node), start_new_session=True)
            node.mode = mode
            node.starts += 1
            node.stopped = False
            node.expected_down = False
            self.journal.event("start", node=node.name, mode=mode, pid=node.proc.pid)
            if not wait:
                return
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if not node.alive():
                    break
                st = node.status(timeout=2)
                if st is not None:
                    return
                time.sleep(0.1)
            tail = node.log_tail()
            if node.alive():
                self.journal.finding("node did not answer on its control socket within 90 s of starting",
                                     node=node.name, log_tail=tail)
                return
            if "Address already in use" in tail and attempt < 3:
                self._move_ports(node)
                continue
            self.journal.finding("node exited while starting", node=node.name, mode=mode,
                                 returncode=node.proc.returncode, log_tail=tail)
            time.sleep(1)
        node.expected_down = True

    def _move_ports(self, node: NodeProc) -> None:
        """Another process took one of the node's ports: pick new ones, point the proxies there."""
        node.listen_port = free_port(self.rng, HOST)
        node.lmtp_port = free_port(self.rng, HOST)
        self.links.retarget(node)
        self.journal.event("ports-moved", node=node.name, listen=node.listen_port, lmtp=node.lmtp_port)

    def kill(self, node: NodeProc) -> None:
        """kill -9 (a stopped node too), and reap it."""
        node.detach_tracer()
        node.expected_down = True
        if node.proc is not None and node.proc.poll() is None:
            try:
                os.kill(node.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                node.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.journal.finding("node survived kill -9 for 30 s", node=node.name)
        node.stopped = False
        self.journal.event("kill", node=node.name)

    def sigstop(self, node: NodeProc) -> None:
        os.kill(node.proc.pid, signal.SIGSTOP)
        node.stopped = True
        self.journal.event("sigstop", node=node.name)

    def sigcont(self, node: NodeProc) -> None:
        if node.alive():
            os.kill(node.proc.pid, signal.SIGCONT)
        node.stopped = False
        self.journal.event("sigcont", node=node.name)

    def restart(self, node: NodeProc) -> None:
        """Start a node that is down, as replica unless it is the only master there can be."""
        others = [m for m in self.find_masters() if m is not node]
        mode = "follow" if others or node is not self.master else "serve"
        if mode == "serve":
            with contextlib.suppress(OSError, KeyError, ValueError):
                with open(os.path.join(node.path, "node.json")) as f:
                    if json.load(f).get("role") != "master":
                        mode = "follow"
        self.start(node, mode)

    def recover_if_failed(self, node: NodeProc) -> dict:
        """A failed log stays failed until the node reopens it: restart such a node."""
        st = node.status()
        failed = st is None or st.get("log_failed") or st.get("applier_error")
        if not failed:
            return {"restarted": False}
        self.kill(node)
        self.restart(node)
        return {"restarted": True, "log_failed": (st or {}).get("log_failed"),
                "applier_error": (st or {}).get("applier_error")}

    def supervise(self) -> None:
        """Like a service manager: a node that exited on its own is recorded and restarted."""
        for n in self.nodes:
            if not n.expected_down and n.proc is not None and n.proc.poll() is not None:
                self.unexpected_exits += 1
                tail = n.log_tail(1500)
                self.journal.event("unexpected-exit", node=n.name, returncode=n.proc.returncode, log_tail=tail)
                n.expected_down = True
                if self.disk is not None and self.disk.full and n is self.disk.node:
                    # its disk is full: it cannot start until the disk-full fault frees it
                    self.journal.progress(f"  node {n.name} exited by itself (rc {n.proc.returncode}); "
                                          f"its disk is full")
                    continue
                self.journal.progress(f"  node {n.name} exited by itself (rc {n.proc.returncode}); restarting it")
                self.restart(n)

    def sleep(self, seconds: float) -> None:
        """Sleep, supervising the nodes every quarter of a second."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.25))
            self.supervise()

    # -- roles --------------------------------------------------------------------------------------

    def running(self) -> list[NodeProc]:
        return [n for n in self.nodes if n.alive() and not n.stopped]

    def replicas(self) -> list[NodeProc]:
        return [n for n in self.running() if n is not self.master]

    def find_masters(self) -> list[NodeProc]:
        return [n for n in self.running() if (n.status() or {}).get("role") == "master"]

    def current_master(self) -> NodeProc:
        """The master per status; adopts it when the harness's view was stale.

        Raises:
            SkipFault: no single running master.
        """
        masters = self.find_masters()
        if len(masters) == 1:
            if masters[0] is not self.master:
                self.journal.event("master-view", was=self.master.name if self.master else None, now=masters[0].name)
                self.master = masters[0]
            return masters[0]
        if len(masters) > 1:
            self.journal.finding("more than one node is master", masters=[m.name for m in masters])
        raise SkipFault(f"no single running master ({[m.name for m in masters]})")

    def ensure_master(self, grace_s: float = 5.0) -> None:
        """What an operator does when no node is master (a soft failover whose target did
        not confirm leaves none, by design): promote the running replica with the longest
        log, with `walctl promote` (which refuses while a master serves)."""
        deadline = time.monotonic() + grace_s
        while True:
            running = self.running()
            sts = {n.name: n.status() for n in running}
            if any(st and st.get("role") == "master" for st in sts.values()) or not running:
                return
            if time.monotonic() > deadline:
                break
            self.sleep(0.5)
        candidates = sorted((n for n in running if sts.get(n.name)),
                            key=lambda n: (sts[n.name]["last_lsn"], n.name), reverse=True)
        for node in candidates:
            r = walctl(["promote", node.path, "--json"], timeout=60, check=False)
            if r.returncode == 0:
                self.master = node
                self.failovers["operator"] += 1
                self.journal.event("operator-promote", node=node.name, result=r.stdout.strip()[-500:])
                self.journal.progress(f"  no master: promoted {node.name} as an operator would")
                return
            self.journal.event("operator-promote-refused", node=node.name, error=r.stderr.strip()[-500:])
        self.journal.finding("no master, and no replica could be promoted",
                             statuses={k: (v or {}).get("role") for k, v in sts.items()})

    def close(self, *, dump_stacks: bool) -> None:
        """Kill every node (after SIGABRT, so each leaves its threads' stacks in its log, when
        ``dump_stacks``), stop the proxies, unmount the small disk."""
        if dump_stacks:
            for n in self.nodes:
                n.resume_and_signal(signal.SIGABRT, wait_s=10)
        for n in self.nodes:
            with contextlib.suppress(Exception):
                n.detach_tracer()
            n.resume_and_signal(signal.SIGKILL, wait_s=30)
        self.links.close()
        if self.disk is not None:
            self.disk.unmount()
