"""Real `walctl serve`/`walctl follow` processes on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import blake3

from tests.support.helpers import assert_no_traceback
from tools.lmtp_client import LmtpClient
from tools.ports import free_port
from tests.support import ROOT

WALCTL = [sys.executable, "-m", "tools"]


def walctl(*args, check=True, timeout=60) -> subprocess.CompletedProcess:
    p = subprocess.run(WALCTL + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert_no_traceback(p.stderr, args)
    if check and p.returncode != 0:
        raise AssertionError(f"walctl {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


class NodeProc:
    def __init__(self, cluster: "Cluster", name: str):
        self.cluster = cluster
        self.name = name
        self.path = os.path.join(cluster.dir, name)
        self.listen = free_port()
        self.lmtp = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = open(os.path.join(cluster.dir, f"{name}.out"), "ab")

    def start(self, mode: str, extra=(), auto_reconcile: bool = True) -> None:
        peers = []
        for other in self.cluster.nodes.values():
            peers += ["--peer", f"127.0.0.1:{other.listen}"]
        args = [mode, self.path, "--listen", f"127.0.0.1:{self.listen}", "--lmtp", f"127.0.0.1:{self.lmtp}",
                *peers, "--secret-file", self.cluster.secret, "--name", self.name,
                "--auto-reconcile" if auto_reconcile else "--no-auto-reconcile", *extra]
        self.proc = subprocess.Popen(WALCTL + args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_control()

    def wait_control(self, timeout=20) -> None:
        deadline = time.monotonic() + timeout
        sock = os.path.join(self.path, "control.sock")
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"node {self.name} exited {self.proc.returncode}: see {self.log.name}")
            if os.path.exists(sock):
                try:
                    self.status()
                    return
                except Exception:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"node {self.name} did not come up")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        if self.proc is not None:
            self.log.flush()
            with open(self.log.name, encoding="utf-8", errors="replace") as f:
                assert_no_traceback(f.read(), self.proc.args, what=f"node {self.name}:")
        self.proc = None

    def status(self) -> dict:
        from engine.cluster.control import ControlClient

        with ControlClient.unix(os.path.join(self.path, "control.sock"), timeout=10) as c:
            return c.call("status")

    def control(self, op: str, **args):
        from engine.cluster.control import ControlClient

        with ControlClient.unix(os.path.join(self.path, "control.sock"), timeout=60) as c:
            return c.call(op, **args)

    def messages(self, mailbox: str) -> list[dict]:
        p = walctl("messages", self.path, mailbox, "--json")
        return json.loads(p.stdout)


class Cluster:
    def __init__(self, tmp_path, names=("a", "b", "c")):
        self.dir = str(tmp_path)
        self.nodes = {n: NodeProc(self, n) for n in names}
        first = self.nodes[names[0]]
        walctl("init", first.path, "--name", first.name)
        self.secret = os.path.join(self.dir, "secret")
        shutil.copy(os.path.join(first.path, "replication.secret"), self.secret)
        os.chmod(self.secret, 0o600)

    def __getitem__(self, name) -> NodeProc:
        return self.nodes[name]

    def master(self) -> NodeProc | None:
        for n in self.nodes.values():
            if n.proc is not None and n.proc.poll() is None:
                try:
                    if n.status()["role"] == "master":
                        return n
                except Exception:
                    pass
        return None

    def stop(self) -> None:
        for n in self.nodes.values():
            n.kill(signal.SIGTERM)
            n.log.close()

    def wait_converged(self, names=None, timeout=60) -> dict:
        """Until every named running node has the same last LSN and hash, all applied."""
        names = names or [n for n, p in self.nodes.items() if p.proc is not None]
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                sts = {n: self.nodes[n].status() for n in names}
            except Exception as exc:
                last = exc
                time.sleep(0.1)
                continue
            pos = {(s["last_lsn"], s["last_hash"]) for s in sts.values()}
            if len(pos) == 1 and all(s["applied_lsn"] == s["last_lsn"] for s in sts.values()):
                return sts
            last = {n: (s["role"], s["last_lsn"], s["applied_lsn"]) for n, s in sts.items()}
            time.sleep(0.1)
        raise AssertionError(f"nodes did not converge: {last}")

    def digests(self, names) -> dict:
        return {n: self.nodes[n].control("digest")["store"] for n in names}


class Mailer:
    """LMTP clients delivering unique messages; records every attempt's outcome."""

    def __init__(self, cluster: Cluster, *, threads=4, users=4):
        self.cluster = cluster
        self.threads = threads
        self.users = users
        self.ops: list[dict] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self._workers: list[threading.Thread] = []
        self.seq = 0

    def _next(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq

    def send_one(self, port: int, user: str, body: bytes) -> str:
        """acked, temp, perm, or unknown (no connection, or it failed in the transaction)."""
        rcpt = f"{user}@example.org"
        try:
            with LmtpClient("127.0.0.1", port, timeout=10) as c:
                return c.deliver("sender@example.org", [rcpt], body)[rcpt].outcome
        except OSError:
            return "unknown"

    def deliver(self, n: int | None = None) -> None:
        """Deliver until stopped (or n messages): to whichever node is master, retrying 4xx."""
        count = 0
        while not self.stop_event.is_set() and (n is None or count < n):
            i = self._next()
            user = f"u{i % self.users}"
            body = f"Message-ID: <{i}@test>\r\nSubject: message {i}\r\n\r\nbody {i}\r\n".encode()
            for attempt in range(200):
                m = self.cluster.master()
                if m is None:
                    time.sleep(0.05)
                    continue
                t0 = time.time()
                outcome = self.send_one(m.lmtp, user, body)
                with self.lock:
                    self.ops.append({"id": i, "mailbox": f"user/{user}/INBOX", "guid": blake3.blake3(body).hexdigest(),
                                     "outcome": outcome, "t0": t0, "t1": time.time(), "node": m.name})
                if outcome == "acked" or outcome == "perm":
                    break
                time.sleep(0.02)
            count += 1

    def start(self) -> None:
        for _ in range(self.threads):
            t = threading.Thread(target=self.deliver, daemon=True)
            t.start()
            self._workers.append(t)

    def stop(self) -> None:
        self.stop_event.set()
        for t in self._workers:
            t.join(timeout=60)

    def acked(self) -> dict[str, str]:
        """guid -> mailbox of every acknowledged delivery."""
        return {o["guid"]: o["mailbox"] for o in self.ops if o["outcome"] == "acked"}

    def attempted(self) -> dict[str, str]:
        return {o["guid"]: o["mailbox"] for o in self.ops}


def assert_all_present_once(node: NodeProc, mailer: Mailer) -> int:
    """Every acknowledged message is on ``node`` exactly once; nothing unknown appears."""
    acked = mailer.acked()
    attempted = mailer.attempted()
    mailboxes = sorted(set(attempted.values()))
    seen: dict[str, int] = {}
    for mb in mailboxes:
        try:
            msgs = node.messages(mb)
        except AssertionError:
            msgs = []
        uids = [m["uid"] for m in msgs]
        assert len(uids) == len(set(uids)), f"duplicate UIDs in {mb} on {node.name}"
        for m in msgs:
            seen[m["guid"]] = seen.get(m["guid"], 0) + 1
    lost = [g for g in acked if seen.get(g, 0) != 1]
    assert not lost, f"{len(lost)} acknowledged message(s) not present exactly once on {node.name}: {lost[:5]}"
    dups = [g for g, n in seen.items() if n > 1]
    assert not dups, f"duplicated on {node.name}: {dups[:5]}"
    phantom = [g for g in seen if g not in attempted]
    assert not phantom, f"messages nobody sent on {node.name}: {phantom[:5]}"
    return len(acked)
