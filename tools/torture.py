"""``walctl torture``: a seeded fault-injection run of a real cluster, checked
by the history checker (tools/history.py).

Theory of operation
-------------------
The harness starts ``--nodes`` nodes as real ``walctl serve``/``walctl
follow`` processes on 127.0.0.1 in a scratch directory. Every replication
link goes through a :class:`~tools.faultproxy.FaultProxy` run by the harness:
node *i*'s ``--peer`` addresses are proxies in front of the other nodes'
replication ports, so the harness can cut, delay, slice or blackhole any
link in either direction. Every node runs with ``--auto-reconcile``.

While the fault schedule runs, client threads deliver unique messages over
LMTP to whichever node is master, one recipient or two per transaction, and
record every attempt with its outcome (``acked`` 2xx, ``temp`` 4xx or refused
before DATA, ``perm`` 5xx, ``unknown`` the connection died after DATA);
``temp`` and ``unknown`` recipients are retried later with the same bytes,
as an MTA would. Another thread changes flags through the master's control
channel, and a sampler polls the master's replica cursors.

The **schedule** is drawn up front from ``random.Random(seed)``: a list of
(time offset, fault) with every parameter decided (node and link choices are
drawn as numbers and mapped onto the nodes that qualify when the fault
runs). Same seed, same schedule. Faults run one after another, each healing
what it broke before the next starts (a fault never starts before its
offset; a slow one delays the next). Kinds: kill -9 and restart of a
replica or of the master, SIGSTOP/SIGCONT, a link cut (RST now, or FIN/RST
after N more bytes, mid-frame), a slow link, a sliced link (1-byte writes), a
blackholed link, a partitioned node, soft failover, hard failover (kill -9
the master, ``walctl promote`` a replica, later restart the old master with
``walctl follow``: its diverged tail is cut aside and reconciled into the new
master), disk full (the node lives on a small tmpfs, filled with a ballast
file; needs root), fsync and write errors (strace attaches to a node and
fails one ``fdatasync``, or one ``write``, of its log's current segment with
EIO), and wall-clock jumps (libfaketime).
Features whose tools are missing are skipped and the summary says so.

At the end the harness heals everything, restarts every node that is down
(an old master's tail is only reconciled once it runs again), retries the
deliveries still pending, waits for quiescence (one master; every node at
the same last LSN and hash, its store applied to it, no unreconciled tail),
collects the final observations and hands everything to
:func:`tools.history.check`. Exit status 0 only when every verdict holds.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import blake3
import click

from engine.control import ControlClient, ControlError

from .cliutil import CONTEXT_SETTINGS
from .faultproxy import FaultProxy
from .history import check
from .lmtp_client import LmtpClient, TransactionInterrupted
from .ports import free_port

__all__ = ["torture", "Fault", "draw_schedule", "FAULT_KINDS", "Torture"]

WALCTL = [sys.executable, "-m", "tools"]
HOST = "127.0.0.1"
FAKETIME_LIBS = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
                 "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

# kind -> weight of the draws after the first round (the first round has every kind once)
FAULT_KINDS = {
    "kill-replica": 3,
    "kill-master": 2,
    "stop": 2,
    "link-cut": 2,
    "link-delay": 2,
    "link-slice": 1,
    "link-blackhole": 2,
    "partition": 1,
    "soft-failover": 3,
    "hard-failover": 3,
    "disk-full": 1,
    "fsync-error": 1,
    "write-error": 1,
    "clock-jump": 1,
}
WARMUP_S = 3.0  # deliveries only, so every mailbox exists before the first fault
FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "$Torture")
LMTP_TIMEOUT_S = 8.0
QUIESCENCE_TIMEOUT_S = 120.0  # without progress
QUIESCENCE_MAX_S = 3600.0
# control errors that prove a flag change was not made (refused before anything was logged)
_FLAG_PERM_TYPES = {"UnknownUidError", "UnknownMailboxError", "BadFlagError", "BadMailboxNameError", "RequestError"}


@dataclass(frozen=True)
class Fault:
    """One scheduled fault. ``pick`` and ``pick2`` choose the node or link
    among those that qualify when it runs; ``param`` in [0, 1) sets the
    kind's knob (delay, byte count, clock offset...)."""

    at_s: float
    kind: str
    pick: int
    pick2: int
    duration_s: float
    param: float

    def to_dict(self) -> dict:
        return asdict(self)


def draw_schedule(seed: int, seconds: float) -> list[Fault]:
    """The fault schedule of a run: a pure function of ``seed`` and ``seconds``.

    The first faults are every kind once, in a seeded order; then kinds are
    drawn by weight. Gaps between offsets are 2-6 s, durations 1-5 s.
    """
    rng = random.Random(seed)
    deck = sorted(FAULT_KINDS)
    rng.shuffle(deck)
    kinds, weights = zip(*sorted(FAULT_KINDS.items()))
    out: list[Fault] = []
    t = WARMUP_S
    while True:
        t += rng.uniform(2.0, 6.0)
        if t >= seconds - 2.0:
            return out
        kind = deck.pop(0) if deck else rng.choices(kinds, weights)[0]
        out.append(Fault(round(t, 3), kind, rng.randrange(1 << 30), rng.randrange(1 << 30),
                         round(rng.uniform(1.0, 5.0), 3), round(rng.random(), 6)))


# -- node processes ---------------------------------------------------------------------


class NodeProc:
    """One node directory and the process running it (if any)."""

    def __init__(self, index: int, path: str, listen_port: int, lmtp_port: int):
        self.index = index
        self.name = f"n{index}"
        self.path = path
        self.listen_port = listen_port
        self.lmtp_port = lmtp_port
        self.proc: subprocess.Popen | None = None
        self.mode: str | None = None  # serve | follow
        self.stopped = False  # SIGSTOPped
        self.expected_down = True
        self.starts = 0
        self.tracer: subprocess.Popen | None = None  # strace attached
        self.clock_file: str | None = None

    @property
    def control_path(self) -> str:
        return os.path.join(self.path, "control.sock")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        return f"<{self.name} {self.mode} pid={self.proc.pid if self.proc else None}>"


@dataclass
class PendingMessage:
    id: int
    body: bytes
    guid: str
    users: list[str]
    attempts: int = 0
    due: float = 0.0
    # per user: start of the first attempt that may have stored it without saying so
    # (a 4xx after DATA, or no reply after DATA): the earliest time it can be in the log
    maybe_stored_at: dict = field(default_factory=dict)


class SkipFault(Exception):
    """The fault cannot run now (e.g. no running replica); recorded as skipped."""


@dataclass
class Features:
    tmpfs: str | None = None  # reason when unavailable
    strace: str | None = None
    faketime: str | None = None
    faketime_lib: str | None = None

    def unavailable(self) -> dict[str, str]:
        out = {}
        if self.tmpfs:
            out["disk-full"] = self.tmpfs
        if self.strace:
            out["fsync-error"] = self.strace
            out["write-error"] = self.strace
        if self.faketime:
            out["clock-jump"] = self.faketime
        return out


def detect_features() -> Features:
    f = Features()
    if os.geteuid() != 0:
        f.tmpfs = "needs root to mount a tmpfs"
    elif not shutil.which("mount"):
        f.tmpfs = "no mount command"
    if not shutil.which("strace"):
        f.strace = "strace is not installed (Debian package strace)"
    lib = next((p for p in FAKETIME_LIBS if os.path.exists(p)), None)
    if lib is None:
        f.faketime = "libfaketime is not installed (Debian package faketime)"
    f.faketime_lib = lib
    return f


# -- the harness --------------------------------------------------------------------------


class Torture:
    """One torture run; see the module docstring. ``run()`` returns the summary."""

    def __init__(self, *, seed: int, seconds: float, nodes: int = 3, workdir: str, clients: int = 4,
                 users: int = 6, progress=None):
        self.seed = seed
        self.seconds = seconds
        self.n_nodes = nodes
        self.dir = workdir
        self.n_clients = clients
        self.users = [f"u{i}" for i in range(users)]
        self.progress = progress or (lambda text: None)
        self.rng = random.Random(seed ^ 0x5EED)  # harness choices that are not part of the schedule
        self.schedule = draw_schedule(seed, seconds)
        self.features = detect_features()
        self.nodes: list[NodeProc] = []
        self.proxies: dict[tuple[int, int], tuple[FaultProxy, int]] = {}
        self.master: NodeProc | None = None
        self.lock = threading.RLock()
        self.ops: list[dict] = []
        self.op_seq = 0
        self.msg_seq = 0
        self.pending: list[PendingMessage] = []
        self.acked_keys: list[tuple[str, str]] = []  # (mailbox, guid) acknowledged at least once
        self.cursor_samples: list[dict] = []
        self.uidvalidity_samples: list[dict] = []
        self.events: list[dict] = []
        self.faults_run: Counter = Counter()
        self.faults_skipped: Counter = Counter()
        self.skip_reasons: dict[str, str] = {}
        self.failovers = {"soft": 0, "hard": 0, "soft_aborted": 0, "operator": 0}
        self.unexpected_exits = 0
        self.findings: list[dict] = []  # harness-level problems (become a verdict)
        self.skewed: set[str] = set()
        self.stop_clients = threading.Event()
        self.no_new_messages = threading.Event()  # healing: clients only retry what is pending
        self.inflight = 0
        self.stop_sampler = threading.Event()
        self.t_start = time.time()
        self.disk_node: int | None = None
        self.tmpfs_mount: str | None = None
        self.ballast: str | None = None
        self.portal = None
        self._portal_cm = None
        self._uid_cache: dict[tuple, dict] = {}
        self._events_file = None

    # -- bookkeeping -----------------------------------------------------------------

    def now(self) -> float:
        return round(time.time() - self.t_start, 3)

    def event(self, kind: str, **details) -> None:
        ev = {"t": self.now(), "kind": kind, **details}
        with self.lock:
            self.events.append(ev)
            if self._events_file is not None:
                self._events_file.write(json.dumps(ev, default=str) + "\n")
                self._events_file.flush()

    def finding(self, problem: str, **details) -> None:
        self.findings.append({"problem": problem, "t": self.now(), **details})
        self.event("finding", problem=problem, **details)
        self.progress(f"  FINDING: {problem} {details if details else ''}")

    # -- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        self._events_file = open(os.path.join(self.dir, "events.jsonl"), "a")
        with open(os.path.join(self.dir, "schedule.json"), "w") as f:
            json.dump({"seed": self.seed, "seconds": self.seconds, "faults": [x.to_dict() for x in self.schedule]}, f,
                      indent=1)
        for i in range(self.n_nodes):
            path = os.path.join(self.dir, f"n{i}")
            self.nodes.append(NodeProc(i, path, free_port(self.rng, HOST), free_port(self.rng, HOST)))
        if self.features.tmpfs is None:
            self.disk_node = 1 + self.seed % (self.n_nodes - 1)  # a replica at first
            self._mount_tmpfs(self.nodes[self.disk_node].path)
        if self.features.faketime is None:
            os.makedirs(os.path.join(self.dir, "clock"), exist_ok=True)
            for n in self.nodes:
                n.clock_file = os.path.join(self.dir, "clock", f"{n.name}.faketime")
                with open(n.clock_file, "w") as f:
                    f.write("+0\n")
        import anyio.from_thread

        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        for src in self.nodes:
            for dst in self.nodes:
                if src is dst:
                    continue
                proxy = FaultProxy(HOST, dst.listen_port, name=f"{src.name}->{dst.name}")
                _, port = self.portal.start_task(proxy.serve)
                self.proxies[(src.index, dst.index)] = (proxy, port)
        first = self.nodes[0]
        self._walctl(["init", first.path, "--name", first.name])
        self.secret = os.path.join(self.dir, "replication.secret")
        shutil.copy(os.path.join(first.path, "replication.secret"), self.secret)
        os.chmod(self.secret, 0o600)
        self.start(first, "serve")
        self.master = first
        for n in self.nodes[1:]:
            self.start(n, "follow")
        self.event("setup", nodes={n.name: {"listen": n.listen_port, "lmtp": n.lmtp_port} for n in self.nodes},
                   disk_node=self.nodes[self.disk_node].name if self.disk_node is not None else None,
                   unavailable=self.features.unavailable())

    def _mount_tmpfs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m,mode=0755", "tmpfs", path],
                           capture_output=True, text=True)
        if r.returncode != 0:
            self.features.tmpfs = f"mount -t tmpfs failed: {r.stderr.strip() or r.returncode}"
            self.disk_node = None
            return
        self.tmpfs_mount = path

    def _walctl(self, args: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        try:
            r = subprocess.run(WALCTL + args, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            r = subprocess.CompletedProcess(exc.cmd, -1, "", f"timed out after {timeout} s: {exc.stderr or ''}")
        if check and r.returncode != 0:
            raise RuntimeError(f"walctl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        return r

    # -- node processes ------------------------------------------------------------------------

    def _peers(self, node: NodeProc) -> list[str]:
        return [f"{HOST}:{self.proxies[(node.index, other.index)][1]}" for other in self.nodes if other is not node]

    def _command(self, node: NodeProc, mode: str) -> list[str]:
        cmd = WALCTL + [mode, node.path, "--lmtp", f"{HOST}:{node.lmtp_port}", "--listen",
                        f"{HOST}:{node.listen_port}", "--name", node.name, "--secret-file", self.secret,
                        "--auto-reconcile", "--quiet"]
        for p in self._peers(node):
            cmd += ["--peer", p]
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
            log_path = os.path.join(self.dir, "logs", f"{node.name}.log")
            with open(log_path, "ab") as logf:
                logf.write(f"\n=== {self.now()} start {mode} (start #{node.starts + 1})\n".encode())
                logf.flush()
                node.proc = subprocess.Popen(self._command(node, mode), stdout=logf, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self._env(node), start_new_session=True)
            node.mode = mode
            node.starts += 1
            node.stopped = False
            node.expected_down = False
            self.event("start", node=node.name, mode=mode, pid=node.proc.pid)
            if not wait:
                return
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if not node.alive():
                    break
                st = self.status(node, timeout=2)
                if st is not None:
                    return
                time.sleep(0.1)
            tail = self._log_tail(node)
            if node.alive():
                self.finding("node did not answer on its control socket within 90 s of starting", node=node.name,
                             log_tail=tail)
                return
            if "Address already in use" in tail and attempt < 3:
                self._move_ports(node)
                continue
            self.finding("node exited while starting", node=node.name, mode=mode,
                         returncode=node.proc.returncode, log_tail=tail)
            time.sleep(1)
        node.expected_down = True

    def _move_ports(self, node: NodeProc) -> None:
        """Another process took one of the node's ports: pick new ones, point the proxies there."""
        node.listen_port = free_port(self.rng, HOST)
        node.lmtp_port = free_port(self.rng, HOST)
        for (src, dst), (proxy, _) in self.proxies.items():
            if dst == node.index:
                self.portal.call(proxy.retarget, HOST, node.listen_port)
        self.event("ports-moved", node=node.name, listen=node.listen_port, lmtp=node.lmtp_port)

    def _log_tail(self, node: NodeProc, n: int = 3000) -> str:
        try:
            with open(os.path.join(self.dir, "logs", f"{node.name}.log"), "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def kill(self, node: NodeProc) -> None:
        """kill -9 (a stopped node too), and reap it."""
        self._detach_tracer(node)
        node.expected_down = True
        if node.proc is not None and node.proc.poll() is None:
            try:
                os.kill(node.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                node.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.finding("node survived kill -9 for 30 s", node=node.name)
        node.stopped = False
        self.event("kill", node=node.name)

    def sigstop(self, node: NodeProc) -> None:
        os.kill(node.proc.pid, signal.SIGSTOP)
        node.stopped = True
        self.event("sigstop", node=node.name)

    def sigcont(self, node: NodeProc) -> None:
        if node.alive():
            os.kill(node.proc.pid, signal.SIGCONT)
        node.stopped = False
        self.event("sigcont", node=node.name)

    def status(self, node: NodeProc, timeout: float = 5.0) -> dict | None:
        if not node.alive() or node.stopped:
            return None
        try:
            with ControlClient.unix(node.control_path, timeout=timeout) as c:
                return c.call("status")
        except (OSError, ControlError, ValueError):
            return None

    def control(self, node: NodeProc, op: str, timeout: float = 10.0, **args):
        with ControlClient.unix(node.control_path, timeout=timeout) as c:
            return c.call(op, **args)

    def running(self) -> list[NodeProc]:
        return [n for n in self.nodes if n.alive() and not n.stopped]

    def find_masters(self) -> list[NodeProc]:
        return [n for n in self.running() if (self.status(n) or {}).get("role") == "master"]

    def current_master(self) -> NodeProc:
        """The master per status; adopts it when the harness's view was stale."""
        masters = self.find_masters()
        if len(masters) == 1:
            if masters[0] is not self.master:
                self.event("master-view", was=self.master.name if self.master else None, now=masters[0].name)
                self.master = masters[0]
            return masters[0]
        if len(masters) > 1:
            self.finding("more than one node is master", masters=[m.name for m in masters])
        raise SkipFault(f"no single running master ({[m.name for m in masters]})")

    def ensure_master(self, grace_s: float = 5.0) -> None:
        """What an operator does when no node is master (a soft failover whose target did
        not confirm leaves none, by design): promote the running replica with the longest
        log, with `walctl promote` (which refuses while a master serves)."""
        deadline = time.monotonic() + grace_s
        while True:
            running = self.running()
            sts = {n.name: self.status(n) for n in running}
            if any(st and st.get("role") == "master" for st in sts.values()) or not running:
                return
            if time.monotonic() > deadline:
                break
            self.sleep(0.5)
        candidates = sorted((n for n in running if sts.get(n.name)),
                            key=lambda n: (sts[n.name]["last_lsn"], n.name), reverse=True)
        for node in candidates:
            r = self._walctl(["promote", node.path, "--json"], timeout=60, check=False)
            if r.returncode == 0:
                self.master = node
                self.failovers["operator"] += 1
                self.event("operator-promote", node=node.name, result=r.stdout.strip()[-500:])
                self.progress(f"  no master: promoted {node.name} as an operator would")
                return
            self.event("operator-promote-refused", node=node.name, error=r.stderr.strip()[-500:])
        self.finding("no master, and no replica could be promoted", statuses={k: (v or {}).get("role")
                                                                               for k, v in sts.items()})

    def replicas(self) -> list[NodeProc]:
        return [n for n in self.running() if n is not self.master]

    def supervise(self) -> None:
        """Like a service manager: a node that exited on its own is recorded and restarted."""
        for n in self.nodes:
            if not n.expected_down and n.proc is not None and n.proc.poll() is not None:
                self.unexpected_exits += 1
                tail = self._log_tail(n, 1500)
                self.event("unexpected-exit", node=n.name, returncode=n.proc.returncode, log_tail=tail)
                n.expected_down = True
                if self.ballast is not None and n.index == self.disk_node:
                    # its disk is full: it cannot start until the disk-full fault frees it
                    self.progress(f"  node {n.name} exited by itself (rc {n.proc.returncode}); its disk is full")
                    continue
                self.progress(f"  node {n.name} exited by itself (rc {n.proc.returncode}); restarting it")
                self._restart(n)

    def _restart(self, node: NodeProc) -> None:
        """Start a node that is down, as replica unless it is the only master there can be."""
        others = [m for m in self.find_masters() if m is not node]
        mode = "follow" if others or node is not self.master else "serve"
        if mode == "serve":
            with contextlib.suppress(OSError, KeyError, ValueError):
                with open(os.path.join(node.path, "node.json")) as f:
                    if json.load(f).get("role") != "master":
                        mode = "follow"
        self.start(node, mode)

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.25))
            self.supervise()

    # -- clients -----------------------------------------------------------------------------

    def _new_message(self, rng: random.Random, client: int) -> PendingMessage:
        with self.lock:
            self.msg_seq += 1
            mid = self.msg_seq
        k = 1 if rng.random() < 0.8 else 2
        users = rng.sample(self.users, k)
        head = (f"From: <torture@harness>\r\nTo: {', '.join(f'<{u}@torture>' for u in users)}\r\n"
                f"Message-ID: <s{self.seed}.m{mid}@torture>\r\nSubject: torture {self.seed} message {mid}\r\n\r\n")
        filler = "".join(rng.choice("abcdefghij ") for _ in range(rng.randrange(100, 2500)))
        lines = [filler[i:i + 70] for i in range(0, len(filler), 70)]
        body = (head + "\r\n".join(lines) + "\r\n").encode()
        return PendingMessage(mid, body, blake3.blake3(body).hexdigest(), users)

    def _record(self, op: dict) -> None:
        with self.lock:
            self.op_seq += 1
            op["id"] = self.op_seq
            self.ops.append(op)
            if op["op"] == "deliver" and op["outcome"] == "acked":
                self.acked_keys.append((op["mailbox"], op["guid"]))

    def deliver(self, msg: PendingMessage) -> list[str]:
        """One LMTP transaction for ``msg``'s pending users; records the outcomes; returns users to retry."""
        node = self.master
        msg.attempts += 1
        t0 = time.time()
        results = lmtp_deliver(HOST, node.lmtp_port, msg.body, [f"{u}@torture" for u in msg.users], LMTP_TIMEOUT_S)
        t1 = time.time()
        retry = []
        for u in msg.users:
            outcome, code, text, after_data = results[f"{u}@torture"]
            # t0 is the earliest time this delivery can have been stored (see PendingMessage), so
            # the checker's UID order compares a retry answered "already delivered" correctly.
            op = {"op": "deliver", "msg": msg.id, "mailbox": f"user/{u}/INBOX", "guid": msg.guid, "outcome": outcome,
                  "t0": msg.maybe_stored_at.get(u, t0), "t1": t1, "attempt_t0": t0, "node": node.name,
                  "attempt": msg.attempts, "code": code, "reply": text[:160]}
            if outcome in ("temp", "unknown") and after_data:
                msg.maybe_stored_at.setdefault(u, t0)
            m = re.search(r"UID (\d+)", text)
            if outcome == "acked" and m:
                op["uid"] = int(m.group(1))
            self._record(op)
            if outcome in ("temp", "unknown"):
                retry.append(u)
        return retry

    def _client(self, k: int) -> None:
        """New messages and retries of pending ones; only retries once ``no_new_messages`` is set."""
        rng = random.Random(f"{self.seed}-client-{k}")
        while not self.stop_clients.is_set():
            msg = None
            with self.lock:
                now = time.monotonic()
                due = [p for p in self.pending if p.due <= now]
                if due and (self.no_new_messages.is_set() or rng.random() < 0.5):
                    msg = due[0]
                    self.pending.remove(msg)
                    self.inflight += 1
            if msg is None:
                if self.no_new_messages.is_set():
                    time.sleep(0.05)
                    continue
                msg = self._new_message(rng, k)
                with self.lock:
                    self.inflight += 1
            retry = []
            try:
                retry = self.deliver(msg)
            finally:
                with self.lock:
                    if retry:
                        msg.users = retry
                        msg.due = time.monotonic() + rng.uniform(0.5, 3.0)
                        self.pending.append(msg)
                    self.inflight -= 1
            if retry:
                time.sleep(0.1)  # a refusing or absent master: do not spin
            time.sleep(rng.uniform(0.0, 0.03))

    def _uid_of(self, node: NodeProc, st: dict, mailbox: str, guid: str) -> int | None:
        """The UID of ``guid`` on the master, from a listing at most 2 s old of this master incarnation."""
        key = (node.name, node.starts, st.get("epoch"), mailbox)
        entry = self._uid_cache.get(key)
        if entry is None or time.monotonic() - entry["at"] > 2.0:
            msgs = self.control(node, "messages", mailbox=mailbox)
            entry = {"at": time.monotonic(), "uids": {m["guid"]: m["uid"] for m in msgs}}
            self._uid_cache = {k: v for k, v in self._uid_cache.items() if k[:3] == key[:3]}
            self._uid_cache[key] = entry
        return entry["uids"].get(guid)

    def _flagger(self) -> None:
        rng = random.Random(f"{self.seed}-flags")
        while not self.no_new_messages.is_set():
            time.sleep(rng.uniform(0.05, 0.25))
            with self.lock:
                if not self.acked_keys:
                    continue
                mailbox, guid = rng.choice(self.acked_keys)
            node = self.master
            try:
                st = self.status(node, timeout=3)
                if st is None or st.get("role") != "master":
                    continue
                uid = self._uid_of(node, st, mailbox, guid)
            except (OSError, ControlError, ValueError):
                continue
            if uid is None:
                continue  # not on this master (yet): in a diverged tail, or expunged by a reconcile
            flag, action = rng.choice(FLAGS), rng.choice(("add", "remove"))
            skewed = bool(self.skewed)
            t0 = time.time()
            outcome, error = "acked", None
            try:
                client = ControlClient.unix(node.control_path, timeout=LMTP_TIMEOUT_S)
            except (OSError, ControlError, ValueError) as exc:
                outcome, error = "temp", str(exc)
            else:
                try:
                    client.call("store_flags", mailbox=mailbox, uids=[uid], action=action, flags=[flag])
                except ControlError as exc:
                    outcome = "perm" if exc.type in _FLAG_PERM_TYPES else (
                        "unknown" if "closed the control connection" in str(exc) else "temp")
                    error = f"{exc.type}: {exc}"
                except (OSError, ValueError) as exc:
                    outcome, error = "unknown", str(exc)
                finally:
                    with contextlib.suppress(OSError):
                        client.close()
            op = {"op": "flags", "mailbox": mailbox, "guid": guid, "uid": uid, "flag": flag, "action": action,
                  "outcome": outcome, "t0": t0, "t1": time.time(), "node": node.name}
            if error:
                op["error"] = error[:200]
            if skewed and outcome == "acked":
                # REC-8 orders conflicting flag changes by the nodes' clocks: while a clock is
                # jumped, an acknowledged change is not decisive for the history check.
                op["outcome"], op["real_outcome"], op["clock_skew"] = "unknown", "acked", sorted(self.skewed)
            self._record(op)

    def _sampler(self) -> None:
        """Poll the master's view of its replicas (cursor samples) and its mailboxes' UIDVALIDITY."""
        last_uv = 0.0
        while not self.stop_sampler.wait(0.5):
            node = self.master
            st = self.status(node, timeout=3) if node is not None else None
            if not st or st.get("role") != "master":
                continue
            t = time.time()
            for r in st.get("replicas") or []:
                # durable_lsn is the hub's view in this process; cursor_lsn what is persisted
                self.cursor_samples.append({"master": f"{node.name}#{node.starts}", "epoch": st["epoch"],
                                            "replica": r["name"], "durable_lsn": r["durable_lsn"], "t": t})
                if r.get("cursor_lsn") is not None:
                    self.cursor_samples.append({"master": f"{node.name} (persisted)", "epoch": st["epoch"],
                                                "replica": r["name"], "durable_lsn": r["cursor_lsn"], "t": t})
            if t - last_uv > 2.0:
                last_uv = t
                # through the control channel: a CLI reading a node that just died would open it
                # offline, locking its log against the restart
                with contextlib.suppress(OSError, ControlError, ValueError):
                    for mb in self.control(node, "mailboxes", timeout=5):
                        self.uidvalidity_samples.append({"t": t, "node": node.name, "mailbox": mb["name"],
                                                         "uidvalidity": mb["uidvalidity"]})

    # -- faults ---------------------------------------------------------------------------------

    def run_fault(self, f: Fault) -> None:
        unavailable = self.features.unavailable()
        if f.kind in unavailable:
            self.faults_skipped[f.kind] += 1
            self.skip_reasons[f.kind] = unavailable[f.kind]
            return
        handler = getattr(self, "fault_" + f.kind.replace("-", "_"))
        self.progress(f"[{self.now():7.1f}s] {f.kind} (scheduled at {f.at_s:.1f}s)")
        try:
            detail = handler(f) or {}
        except SkipFault as exc:
            self.faults_skipped[f.kind] += 1
            self.event("fault-skipped", fault=f.to_dict(), reason=str(exc))
            self.progress(f"           skipped: {exc}")
            return
        self.faults_run[f.kind] += 1
        self.event("fault", fault=f.to_dict(), **detail)

    def _pick(self, items: list, draw: int, what: str):
        if not items:
            raise SkipFault(f"no {what}")
        return items[draw % len(items)]

    def fault_kill_replica(self, f: Fault) -> dict:
        self.current_master()
        node = self._pick(self.replicas(), f.pick, "running replica")
        self.kill(node)
        self.sleep(f.duration_s)
        self._restart(node)
        return {"node": node.name}

    def fault_kill_master(self, f: Fault) -> dict:
        node = self.current_master()
        self.kill(node)
        self.sleep(f.duration_s)
        self.start(node, "serve")
        return {"node": node.name}

    def fault_stop(self, f: Fault) -> dict:
        node = self._pick(self.running(), f.pick, "running node")
        self.sigstop(node)
        try:
            time.sleep(min(f.duration_s, 4.0))
        finally:
            self.sigcont(node)
        return {"node": node.name}

    def _link(self, f: Fault) -> tuple[tuple[int, int], FaultProxy]:
        keys = sorted(self.proxies)
        key = keys[f.pick % len(keys)]
        return key, self.proxies[key][0]

    def fault_link_cut(self, f: Fault) -> dict:
        key, proxy = self._link(f)
        reset = f.pick2 % 2 == 0
        if f.pick2 % 3 == 0:
            self.portal.call(lambda: proxy.cut_all(reset=reset))
            how = "now"
        else:
            nbytes = 1 + int(f.param * 6000)
            self.portal.call(lambda: proxy.cut_after(nbytes, reset=reset))
            how = f"after {nbytes} bytes"
        self.sleep(f.duration_s)
        self.portal.call(proxy.heal)
        return {"link": proxy.name, "cut": how, "reset": reset}

    def _link_mode(self, f: Fault, mode: str, duration: float, delay_s: float = 0.0) -> dict:
        key, proxy = self._link(f)
        self.portal.call(proxy.set_mode, mode, delay_s)
        try:
            self.sleep(duration)
        finally:
            self.portal.call(proxy.heal)
        return {"link": proxy.name, "mode": mode, "delay_s": delay_s, "for_s": duration}

    def fault_link_delay(self, f: Fault) -> dict:
        return self._link_mode(f, "delay", f.duration_s, delay_s=round(0.02 + f.param * 0.4, 3))

    def fault_link_slice(self, f: Fault) -> dict:
        return self._link_mode(f, "slice", min(f.duration_s, 3.0))

    def fault_link_blackhole(self, f: Fault) -> dict:
        # longer than the replication idle timeout (5 s) half of the time
        return self._link_mode(f, "blackhole", f.duration_s + f.param * 6.0)

    def fault_partition(self, f: Fault) -> dict:
        node = self._pick(self.nodes, f.pick, "node")
        links = [p for (src, dst), (p, _) in self.proxies.items() if node.index in (src, dst)]
        for p in links:
            self.portal.call(p.set_mode, "refuse")
            self.portal.call(lambda p=p: p.cut_all(reset=True))
        try:
            self.sleep(f.duration_s + f.param * 4.0)
        finally:
            for p in links:
                self.portal.call(p.heal)
        return {"node": node.name}

    def fault_soft_failover(self, f: Fault) -> dict:
        master = self.current_master()
        deadline = time.monotonic() + 15.0
        while True:  # like an operator, wait (a while) for a replica that streams from the master
            st = self.status(master) or {}
            streaming = {r["name"] for r in st.get("replicas") or [] if r.get("connected")}
            candidates = [n for n in self.replicas() if n.name in streaming]
            if candidates or time.monotonic() > deadline:
                break
            self.sleep(0.5)
        target = self._pick(candidates, f.pick, "streaming replica (waited 15 s)")
        slowed = None
        if f.param < 0.3:  # hand over through a slow link
            slowed = self.proxies[(target.index, master.index)][0]
            self.portal.call(slowed.set_mode, "delay", 0.05)
        try:
            r = self._walctl(["failover", master.path, "--to", target.name, "--timeout", "15", "--json"], timeout=60,
                             check=False)
        finally:
            if slowed is not None:
                self.portal.call(slowed.heal)
        if r.returncode == 0:
            self.master = target
            self.failovers["soft"] += 1
            result = json.loads(r.stdout)
            self.progress(f"           {master.name} -> {target.name}, epoch {result.get('epoch')}, writes refused "
                          f"{result.get('refused_writes_s')} s")
            return {"from": master.name, "to": target.name, "result": result, "slow_link": slowed is not None}
        self.failovers["soft_aborted"] += 1
        self.progress(f"           aborted: {r.stderr.strip()[-300:]}")
        return {"from": master.name, "to": target.name, "aborted": r.stderr.strip()[-1000:]}

    def fault_hard_failover(self, f: Fault) -> dict:
        master = self.current_master()
        target = self._pick(self.replicas(), f.pick, "running replica")
        lag_s = 0.0
        if f.pick2 % 4 != 0:
            # The usual way to lose a master: its replica lags (here: its link hangs), the master
            # goes on acknowledging, then dies. Those records end up in the old master's tail.
            lag_s = round(0.5 + f.param * 2.0, 3)
            link = self.proxies[(target.index, master.index)][0]
            self.portal.call(link.set_mode, "blackhole")
            self.sleep(lag_s)
        self.kill(master)
        if lag_s:
            self.portal.call(link.heal)
        deadline = time.monotonic() + 60
        out = None
        while time.monotonic() < deadline:
            r = self._walctl(["promote", target.path, "--json"], timeout=60, check=False)
            if r.returncode == 0:
                out = json.loads(r.stdout)
                break
            out = r.stderr.strip()
            self.sleep(0.5)
        if not isinstance(out, dict):
            self.finding("a replica could not be promoted within 60 s of its master's kill -9", node=target.name,
                         error=str(out)[-1000:])
            self.start(master, "serve")
            return {"from": master.name, "to": target.name, "promote_failed": str(out)[-1000:]}
        self.master = target
        self.failovers["hard"] += 1
        self.progress(f"           {master.name} killed, {target.name} promoted (epoch {out.get('epoch')})")
        self.sleep(f.duration_s)
        self.start(master, "follow")  # its diverged tail, if any, is cut aside and auto-reconciled
        return {"from": master.name, "to": target.name, "promoted": out, "replica_lagged_s": lag_s}

    def fault_disk_full(self, f: Fault) -> dict:
        node = self.nodes[self.disk_node]
        if not node.alive() or node.stopped:
            raise SkipFault(f"{node.name} (on the tmpfs) is not running")
        st = os.statvfs(self.tmpfs_mount)
        free = st.f_bavail * st.f_frsize
        leave = int(f.param * 16384)
        self.ballast = os.path.join(self.tmpfs_mount, "ballast")
        fd = os.open(self.ballast, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, 0, max(1, free - leave))
        finally:
            os.close(fd)
        try:
            self.sleep(f.duration_s)
        finally:
            os.unlink(self.ballast)
            self.ballast = None
        return {"node": node.name, "left_bytes": leave, **self._recover_if_failed(node)}

    def _recover_if_failed(self, node: NodeProc) -> dict:
        """A failed log stays failed until the node reopens it: restart such a node."""
        st = self.status(node)
        failed = st is None or st.get("log_failed") or st.get("applier_error")
        if not failed:
            return {"restarted": False}
        self.kill(node)
        self._restart(node)
        return {"restarted": True, "log_failed": (st or {}).get("log_failed"),
                "applier_error": (st or {}).get("applier_error")}

    def fault_fsync_error(self, f: Fault) -> dict:
        return self._inject_eio(f, "fdatasync")

    def fault_write_error(self, f: Fault) -> dict:
        return self._inject_eio(f, "write")

    def _inject_eio(self, f: Fault, syscall: str) -> dict:
        """strace fails the Nth ``syscall`` on the node's current segment with EIO
        (the call is not made); the node's log is then failed (LOG-12) and the
        node is restarted, which reopens it from what is on disk."""
        node = self._pick(self.running(), f.pick, "running node")
        segs = sorted(glob.glob(os.path.join(node.path, "log.wal", "*.seg")))
        if not segs:
            raise SkipFault(f"{node.name} has no log segment yet")
        nth = 1 + int(f.param * 4)  # a low count, so the call comes within the fault's seconds
        node.tracer = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", "/dev/null", "-p", str(node.proc.pid), "-P", segs[-1], "-e", f"trace={syscall}",
             "-e", f"inject={syscall}:error=EIO:when={nth}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            self.sleep(f.duration_s + 1.0)
        finally:
            self._detach_tracer(node)
        return {"node": node.name, f"nth_{syscall}": nth, **self._recover_if_failed(node)}

    def _detach_tracer(self, node: NodeProc) -> None:
        if node.tracer is not None:
            with contextlib.suppress(ProcessLookupError):
                node.tracer.send_signal(signal.SIGTERM)  # strace detaches cleanly (SIGINT may be ignored)
            try:
                node.tracer.wait(15)
            except subprocess.TimeoutExpired:
                node.tracer.kill()
                node.tracer.wait()
            node.tracer = None

    def fault_clock_jump(self, f: Fault) -> dict:
        node = self._pick(self.running(), f.pick, "running node")
        minutes = int((f.param - 0.5) * 360) or 7  # -3 h .. +3 h, never 0
        with open(node.clock_file, "w") as fh:
            fh.write(f"{minutes:+d}m\n")
        self.skewed.add(node.name)
        try:
            self.sleep(f.duration_s + 1.0)  # the library rereads the file every second
        finally:
            with open(node.clock_file, "w") as fh:
                fh.write("+0\n")
            self.sleep(1.2)
            self.skewed.discard(node.name)
        return {"node": node.name, "offset_minutes": minutes}

    # -- the run ------------------------------------------------------------------------------------

    def run(self) -> dict:
        try:
            self.setup()
            self.progress(f"torture: seed {self.seed}, {self.seconds:g} s, {self.n_nodes} nodes, "
                          f"{len(self.schedule)} faults scheduled, in {self.dir}")
            for kind, why in self.features.unavailable().items():
                self.progress(f"  {kind}: skipped ({why})")
            threads = [threading.Thread(target=self._client, args=(k,), name=f"client-{k}", daemon=True)
                       for k in range(self.n_clients)]
            threads.append(threading.Thread(target=self._flagger, name="flags", daemon=True))
            sampler = threading.Thread(target=self._sampler, name="sampler", daemon=True)
            phase_start = time.monotonic()
            for t in threads:
                t.start()
            sampler.start()
            not_run = 0
            for f in self.schedule:
                wait = f.at_s - (time.monotonic() - phase_start)
                if wait > 0:
                    self.sleep(wait)
                if time.monotonic() - phase_start >= self.seconds:
                    not_run += 1
                    continue
                self.ensure_master()
                self.run_fault(f)
            left = self.seconds - (time.monotonic() - phase_start)
            if left > 0:
                self.sleep(left)
            self.faults_not_run = not_run
            self.progress(f"[{self.now():7.1f}s] healing")
            self.no_new_messages.set()
            self.heal()
            self.drain_pending()
            self.stop_clients.set()
            for t in threads:
                t.join(60)
            quiet = self.wait_quiescence()
            self.stop_sampler.set()
            sampler.join(30)
            nodes = self.observe()
            return self.verdicts(nodes, quiet)
        finally:
            self.teardown()

    def heal(self) -> None:
        for proxy, _ in self.proxies.values():
            self.portal.call(proxy.heal)
        for n in self.nodes:
            self._detach_tracer(n)
            if n.stopped:
                self.sigcont(n)
            if n.clock_file:
                with open(n.clock_file, "w") as fh:
                    fh.write("+0\n")
        self.skewed.clear()
        if self.ballast and os.path.exists(self.ballast):
            os.unlink(self.ballast)
        self.ballast = None
        masters = self.find_masters()
        if len(masters) > 1:
            self.finding("more than one master after the faults", masters=[m.name for m in masters])
            keep = self.master if self.master in masters else masters[0]
            for m in masters:
                if m is not keep:
                    self.kill(m)
                    self.start(m, "follow")
            masters = [keep]
        if masters:
            self.master = masters[0]
        for n in self.nodes:
            if not n.alive():
                self._restart(n)
            elif n is not self.master:
                self._recover_if_failed(n)
        if self.master is not None:
            self._recover_if_failed(self.master)
        self.ensure_master()

    def drain_pending(self, timeout_s: float = 90.0) -> None:
        """Let the clients retry what is pending until nothing is (an MTA's queue run after an outage)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if not self.pending and self.inflight == 0:
                    break
            self.sleep(0.2)
        self.event("drained", still_pending=sum(len(p.users) for p in self.pending))

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
            self.supervise()
            sts = {n.name: self.status(n) for n in self.nodes}
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
                    self.event("quiescent", waited_s=round(time.monotonic() - started, 1))
                    self.progress(f"[{self.now():7.1f}s] quiescent after {time.monotonic() - started:.0f} s")
                    return {"ok": True, "after_s": self.now(), "waited_s": round(time.monotonic() - started, 1)}
            else:
                stable = 0
            time.sleep(1.0)
        self.finding("no quiescence after healing", problems=last["problems"] if last else None)
        return {"ok": False, "problems": last["problems"] if last else None,
                "statuses": {k: {x: (s or {}).get(x) for x in ("role", "last_lsn", "applied_lsn", "diverged_tails",
                                                              "connection", "events")}
                             for k, s in (last or {}).get("statuses", {}).items()}}

    # -- observations and verdicts -----------------------------------------------------------------

    def observe(self) -> list[dict]:
        """Final observations of every node (master first); repeated if a node moved meanwhile."""
        for _ in range(5):
            before = {n.name: (self.status(n) or {}).get("last_lsn") for n in self.nodes}
            nodes = [self._observe(n) for n in sorted(self.nodes, key=lambda n: n is not self.master)]
            after = {n.name: (self.status(n) or {}).get("last_lsn") for n in self.nodes}
            if before == after:
                break
            self.event("observe-again", before=before, after=after)
        master = nodes[0]
        for n in nodes[1:]:
            lsn = n["last_lsn"]
            if lsn is not None and lsn != master["last_lsn"] and 0 < lsn <= (master["last_lsn"] or 0):
                r = self._walctl(["replay", os.path.join(self.master.path, "log.wal"), "--from", str(lsn), "--to",
                                  str(lsn), "--json"], check=False)
                with contextlib.suppress(ValueError, IndexError):
                    master["hashes"][str(lsn)] = json.loads(r.stdout.splitlines()[0])["hash"]
        with open(os.path.join(self.dir, "nodes.json"), "w") as f:
            json.dump(nodes, f, indent=1)
        return nodes

    def _observe(self, node: NodeProc) -> dict:
        st = self.status(node) or {}
        out = {"name": node.name, "role": st.get("role"), "epoch": st.get("epoch"), "last_lsn": st.get("last_lsn"),
               "last_hash": st.get("last_hash"), "applied_lsn": st.get("applied_lsn"), "hashes": {}, "mailboxes": {}}
        r = self._walctl(["digest", node.path, "--json"], check=False)
        try:
            d = json.loads(r.stdout)
            out["digest"] = {"mailboxes": d.get("mailboxes"), "store": d.get("store")}
        except ValueError:
            out["digest"] = {"error": r.stderr.strip()[-500:]}
        try:
            boxes = self.control(node, "mailboxes", timeout=60)
        except (OSError, ControlError, ValueError) as exc:
            boxes = []
            out["mailbox_error"] = str(exc)
        for mb in boxes:
            try:
                msgs = self.control(node, "messages", timeout=60, mailbox=mb["name"])
            except (OSError, ControlError, ValueError) as exc:
                r = self._walctl(["messages", node.path, mb["name"], "--json"], check=False)
                try:
                    msgs = json.loads(r.stdout)
                except ValueError:
                    msgs = []
                    out.setdefault("errors", []).append(f"{mb['name']}: {exc}")
            out["mailboxes"][mb["name"]] = {"uidvalidity": mb["uidvalidity"],
                                            "messages": [{"uid": m["uid"], "guid": m["guid"], "flags": m["flags"]}
                                                         for m in msgs]}
        v = self._walctl(["verify", os.path.join(node.path, "log.wal"), "--json"], check=False)
        try:
            out["verify_ok"] = bool(json.loads(v.stdout).get("ok"))
        except ValueError:
            out["verify_ok"] = False
        out["quarantined"] = st.get("quarantined")
        return out

    def reconcile_reports(self) -> tuple[list[dict], dict]:
        """What the reconciles did, from every NODE/reconcile/*.json, for the checker."""
        reports, counts = [], Counter()
        for path in sorted(glob.glob(os.path.join(self.dir, "n*", "reconcile", "*.json"))):
            try:
                with open(path) as f:
                    doc = json.load(f)
            except (OSError, ValueError):
                continue
            names = {}
            for mb in doc.get("mailboxes") or []:
                if isinstance(mb, dict) and mb.get("mailbox_id"):
                    names[mb["mailbox_id"]] = mb.get("mailbox")
            renumbered, uv_changed = [], []
            for act in (doc.get("plan") or {}).get("actions") or []:
                counts[act.get("kind")] += 1
                name = act.get("mailbox")
                if act.get("mailbox_id") and act.get("mailbox_id") in names:
                    name = names[act["mailbox_id"]] or name
                if act.get("kind") in ("copy_message", "redeliver") and act.get("guid"):
                    renumbered.append([name, act["guid"]])
                elif act.get("kind") == "renumber":
                    uv_changed.append(name)
            apply = doc.get("apply") or {}
            counts["reports"] += 1
            if apply.get("status") != "done":
                counts[f"status {apply.get('status')}"] += 1
            reports.append({"path": path, "renumbered": renumbered, "uidvalidity_changed": uv_changed,
                            "status": apply.get("status"),
                            "conflicts": sum(len(m.get("uid_collisions") or []) + len(m.get("flag_conflicts") or [])
                                             for m in doc.get("mailboxes") or [] if isinstance(m, dict))})
        return reports, dict(counts)

    def verdicts(self, nodes: list[dict], quiet: dict) -> dict:
        reports, rcounts = self.reconcile_reports()
        result = check(self.ops, nodes, cursor_samples=self.cursor_samples, reconcile_reports=reports)
        verdicts = dict(result["verdicts"])
        v_quiet = {"ok": quiet["ok"], "checked": 1, "violations": [] if quiet["ok"] else [quiet]}
        verdicts["the cluster reached quiescence after healing"] = v_quiet
        bad_logs = [n["name"] for n in nodes if not n.get("verify_ok")]
        verdicts["every node's log verifies"] = {"ok": not bad_logs, "checked": len(nodes),
                                                 "violations": [{"node": b} for b in bad_logs]}
        uv = self._uidvalidity_verdict(reports)
        verdicts[uv[0]] = uv[1]
        verdicts["the harness found no other problem (nodes start, promote, stay single-master)"] = {
            "ok": not self.findings, "checked": len(self.events), "violations": self.findings[:20]}
        ok = all(v["ok"] for v in verdicts.values())
        ops = self.ops
        deliveries = [o for o in ops if o["op"] == "deliver"]
        flag_ops = [o for o in ops if o["op"] == "flags"]
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
                           "still_pending": sum(len(p.users) for p in self.pending)},
            "flag_changes": {"attempted": len(flag_ops), **Counter(o.get("real_outcome") or o["outcome"]
                                                                     for o in flag_ops)},
            "lost": result["lost"],
            "duplicated": result["duplicated"],
            "diverged": result["diverged"],
            "faults": dict(sorted(self.faults_run.items())),
            "faults_skipped": dict(sorted(self.faults_skipped.items())),
            "skipped_features": self.features.unavailable(),
            "faults_scheduled": len(self.schedule),
            "faults_not_run": getattr(self, "faults_not_run", 0),
            "failovers": self.failovers["soft"] + self.failovers["hard"],
            "failover_detail": dict(self.failovers),
            "unexpected_exits": self.unexpected_exits,
            "reconcile": {**rcounts, "conflicts": sum(r["conflicts"] for r in reports)},
            "cursor_samples": len(self.cursor_samples),
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

    def _uidvalidity_verdict(self, reports: list[dict]) -> tuple[str, dict]:
        """UIDVALIDITY seen on the masters during the run changes only where a reconcile renumbered."""
        name = "UIDVALIDITY seen on the masters changed only by a uidvalidity reconcile"
        allowed = {m for r in reports for m in r["uidvalidity_changed"]}
        seen: dict[str, int] = {}
        v = {"ok": True, "checked": 0, "violations": []}
        for s in sorted(self.uidvalidity_samples, key=lambda s: s["t"]):
            v["checked"] += 1
            prev = seen.get(s["mailbox"])
            if prev is not None and prev != s["uidvalidity"] and s["mailbox"] not in allowed:
                v["ok"] = False
                if len(v["violations"]) < 20:
                    v["violations"].append({"mailbox": s["mailbox"], "before": prev, "after": s["uidvalidity"],
                                            "node": s["node"], "t": s["t"]})
            seen[s["mailbox"]] = s["uidvalidity"]
        return name, v

    def teardown(self) -> None:
        self.stop_clients.set()
        self.stop_sampler.set()
        if self.findings:
            # something was wrong: leave every thread's stack in the node logs for the post-mortem
            for n in self.nodes:
                _resume_and_signal(n, signal.SIGABRT, wait_s=10)
        for n in self.nodes:
            with contextlib.suppress(Exception):
                self._detach_tracer(n)
            _resume_and_signal(n, signal.SIGKILL, wait_s=30)
        if self._portal_cm is not None:
            with contextlib.suppress(Exception):
                self.portal.call(self.portal.stop, True)  # cancel the proxies
            with contextlib.suppress(Exception):
                self._portal_cm.__exit__(None, None, None)
            self._portal_cm = None
        if self.tmpfs_mount:
            # the node on the tmpfs is copied out first, so a kept run directory is complete
            saved = self.tmpfs_mount + ".saved"
            with contextlib.suppress(OSError):
                shutil.copytree(self.tmpfs_mount, saved, symlinks=True,
                                ignore=shutil.ignore_patterns("control.sock", "ballast"))
            r = subprocess.run(["umount", self.tmpfs_mount], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", self.tmpfs_mount], capture_output=True)
            if os.path.isdir(saved):
                with contextlib.suppress(OSError):
                    os.rmdir(self.tmpfs_mount)
                    os.rename(saved, self.tmpfs_mount)
            self.tmpfs_mount = None
        if self._events_file is not None:
            self._events_file.close()
            self._events_file = None


# -- LMTP ---------------------------------------------------------------------------------------


def lmtp_deliver(host: str, port: int, body: bytes, rcpts: list[str],
                 timeout: float) -> dict[str, tuple[str, int, str, bool]]:
    """One LMTP transaction; ``{rcpt: (outcome, code, text, after_data)}`` for every recipient.

    The outcome is the reply's (``acked``, ``temp``, ``perm``; see
    :class:`tools.lmtp_client.Reply`). A failure before the message went out
    is ``temp`` (nothing can have been stored), after it ``unknown``.
    """
    try:
        client = LmtpClient(host, port, timeout=timeout)
    except OSError as exc:
        return {r: ("temp", 0, f"{type(exc).__name__}: {exc}", False) for r in rcpts}
    with client:
        try:
            replies = client.deliver("torture@harness", rcpts, body)
        except TransactionInterrupted as exc:
            replies = exc.replies
            cause = exc.__cause__ or exc
            lost = ("unknown" if exc.after_data else "temp", 0, f"{type(cause).__name__}: {cause}", exc.after_data)
        else:
            lost = None
    out = {r: (reply.outcome, reply.code, reply.text, reply.after_data) for r, reply in replies.items()}
    for r in rcpts:
        out.setdefault(r, lost)
    return out


# -- the command ------------------------------------------------------------------------------


def _print_summary(s: dict) -> None:
    echo = click.echo
    echo(f"torture seed {s['seed']}: {s['minutes']} min ({s['seconds']:g} s), {s['nodes']} nodes")
    d, fl = s["deliveries"], s["flag_changes"]
    echo(f"  operations   {s['attempted']} attempted, {s['acked']} acknowledged")
    echo(f"  deliveries   {d['attempted']} attempts of {d['messages']} messages: {d.get('acked', 0)} acked, "
         f"{d.get('temp', 0)} temp, {d.get('unknown', 0)} unknown, {d.get('perm', 0)} perm; "
         f"{d['still_pending']} still pending")
    echo(f"  flag changes {fl['attempted']} attempted: {fl.get('acked', 0)} acked, {fl.get('temp', 0)} temp, "
         f"{fl.get('unknown', 0)} unknown, {fl.get('perm', 0)} perm")
    echo(f"  faults       " + (", ".join(f"{k} {v}" for k, v in s["faults"].items()) or "none"))
    if s["faults_skipped"]:
        echo(f"  skipped      " + ", ".join(f"{k} {v}" for k, v in s["faults_skipped"].items()))
    for kind, why in s["skipped_features"].items():
        echo(f"  unavailable  {kind}: {why}")
    fd = s["failover_detail"]
    echo(f"  failovers    {s['failovers']} ({fd['soft']} soft, {fd['hard']} hard; {fd['soft_aborted']} soft aborted; "
         f"{fd['operator']} promotions by the operator after a failover left no master)")
    rc = s["reconcile"]
    echo(f"  reconciles   {rc.get('reports', 0)} reports, {rc.get('copy_message', 0)} messages copied back, "
         f"{rc.get('redeliver', 0)} renumbered, {rc.get('set_flags', 0)} flag changes, "
         f"{rc.get('conflicts', 0)} conflicts")
    echo(f"  unexpected node exits {s['unexpected_exits']}; final master {s['final']['master']} "
         f"epoch {s['final']['epoch']} at LSN {s['final']['last_lsn']}")
    echo(f"  lost {s['lost']}, duplicated {s['duplicated']}, diverged {s['diverged']}")
    for name, v in s["verdicts"].items():
        echo(f"  [{'ok' if v['ok'] else 'FAIL'}] {name} ({v['checked']} checked)")
        for viol in v["violations"][:3]:
            echo(f"         {json.dumps(viol, default=str)[:400]}")
    echo("verdict: " + ("every verdict holds" if s["ok"] else "VIOLATIONS FOUND") + f" (run directory {s['dir']})")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--minutes", type=click.FloatRange(min=0), default=None, help="Length of the fault phase (default 2).")
@click.option("--seconds", type=click.FloatRange(min=0), default=None, help="Length in seconds (added to --minutes).")
@click.option("--seed", type=int, default=None, help="Seed of the fault schedule (default: random, printed).")
@click.option("--nodes", type=click.IntRange(min=2, max=7), default=3, show_default=True, help="Cluster size.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (progress still goes to stderr).")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Run directory, kept (must be empty or absent). Default: a temporary directory, removed when "
                   "every verdict holds unless --keep.")
@click.option("--keep", is_flag=True, help="Keep the run directory (it is always kept when a verdict fails).")
@click.option("--clients", type=click.IntRange(min=1, max=64), default=4, show_default=True,
              help="Concurrent LMTP client threads.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def torture(minutes, seconds, seed, nodes, as_json, workdir, keep, clients, quiet) -> None:
    """Torture a real cluster with seeded faults, then check its history.

    Starts NODES nodes (walctl serve/follow) on 127.0.0.1 with fault proxies
    on every replication link, delivers over LMTP and changes flags while a
    fault schedule drawn from SEED runs (kill -9, SIGSTOP, link cuts, delays,
    1-byte slices, blackholes, partitions, soft and hard failovers, disk
    full, fsync errors, clock jumps), heals, waits for quiescence and checks
    that every acknowledged operation survived exactly once and every node
    holds the same log. Exit 0 only when every verdict holds. The same seed
    draws the same schedule.

    \b
    Example:
        walctl torture --minutes 2 --seed 7
        walctl torture --seconds 100 --seed 1 --json | jq '.lost, .faults'
    """
    total = (minutes or 0) * 60 + (seconds or 0)
    if minutes is None and seconds is None:
        total = 120.0
    if total < 10:
        raise click.BadParameter("a run needs at least 10 seconds", param_hint="--seconds")
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    created = workdir is None
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix=f"walctl-torture-{seed}-")
    elif os.path.exists(workdir) and os.listdir(workdir):
        raise click.BadParameter(f"{workdir} is not empty", param_hint="--dir")
    progress = (lambda text: None) if quiet else (lambda text: click.echo(text, err=True))
    t = Torture(seed=seed, seconds=total, nodes=nodes, workdir=os.path.abspath(workdir), clients=clients,
                progress=progress)
    try:
        summary = t.run()
    except KeyboardInterrupt:
        click.echo(f"interrupted; run directory {workdir}", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(summary, default=str))
    else:
        _print_summary(summary)
    if summary["ok"] and not keep and created:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(0 if summary["ok"] else 1)


def _resume_and_signal(n: "NodeProc", sig: int, *, wait_s: float) -> None:
    """SIGCONT (it may be stopped), then ``sig``, and wait up to ``wait_s`` for a live node to exit."""
    if not n.alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(n.proc.pid, signal.SIGCONT)
        os.kill(n.proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        n.proc.wait(wait_s)
