"""``make demo``: a replicated mail node on 127.0.0.1, narrated step by step.

Three ``walctl`` processes in ``./demo-nodes`` (created afresh on every run,
on free ports): a master ``a`` and two replicas ``b`` and ``c``, each with an
LMTP and an IMAP front. The demo plays the MTA: it delivers a few hundred
real messages over LMTP, one recipient per transaction, and when a node
answers 4xx (a replica, or writes paused for a failover) it tries the next
node, as an MTA with several LMTP destinations would. It also plays alice's
mail program (Python's imaplib, :class:`MailClient`). Along the way:

1. the cluster starts (``walctl init``, ``serve``, ``follow``) and alice gets
   an IMAP password (``walctl user ... add --password-stdin``);
2. a load runs while ``walctl status`` shows each replica's lag; alice reads
   her mail over IMAP on ``a`` and flags a message, and her session on the
   replica ``b`` shows the flag (and refuses a write, naming the master);
3. replica ``c`` is killed with SIGKILL, misses mail, restarts and catches up by itself;
4. a soft failover hands the master role from ``a`` to ``b`` under load
   (``walctl failover``, which prints how long writes were refused); alice's
   session on ``a`` ends with a BYE referring her to ``b``, her session on
   ``b`` stays and can write;
5. a hard failover: with both replicas stopped, ``b`` takes mail alone and is
   killed; ``c`` is promoted (alice's session on it becomes writable) and
   takes mail; ``b`` comes back with ``walctl follow``, its diverged tail is
   cut aside and reconciled into ``c`` (alice's session sees her messages
   come back), and the reconcile report is printed;
6. the checks: every node has the same digest (``walctl digest --json``),
   every acknowledged message is on the master exactly once, and alice's
   IMAP session sees every message of hers and the flags she set.

The nodes are stopped with SIGTERM at the end (also on Ctrl-C or an error)
and their directories are left for inspection. ``main()`` returns 0 only if
the checks in step 6 pass.
"""

from __future__ import annotations

import glob
import imaplib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import blake3

from .lmtp_client import LmtpClient
from .ports import free_port

DEMO_DIR = "demo-nodes"
NAMES = ("a", "b", "c")
USERS = ("alice", "bob", "carol", "dave", "erin")
DOMAIN = "example.org"
WAIT_S = 30.0  # how long any one step may wait for the cluster before the demo gives up
SECRET = os.path.join("a", "replication.secret")  # under DEMO_DIR: the shared secret every node is given


class DemoError(Exception):
    """A step did not complete; the message says which and where to look."""


def say(text: str = "") -> None:
    print(text, flush=True)


def step(n: int, title: str) -> None:
    say(f"\n=== {n}. {title}")


def walctl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tools", *args]


def show(*args: str, check: bool = True) -> int:
    """Run one walctl command as an operator would, its output going straight to ours."""
    say(f"$ walctl {' '.join(args)}")
    rc = subprocess.run(walctl_argv(*args)).returncode
    if check and rc != 0:
        raise DemoError(f"`walctl {' '.join(args)}` exited with status {rc}")
    return rc


def show_with_input(text: str, shown: str, *args: str) -> None:
    """Run one walctl command with ``text`` on its standard input, shown as ``shown | walctl ...``."""
    say(f"$ {shown} | walctl {' '.join(args)}")
    rc = subprocess.run(walctl_argv(*args), input=text, text=True).returncode
    if rc != 0:
        raise DemoError(f"`walctl {' '.join(args)}` exited with status {rc}")


def capture(*args: str) -> str:
    """Run one walctl command quietly; its standard output."""
    p = subprocess.run(walctl_argv(*args), capture_output=True, text=True)
    if p.returncode != 0:
        raise DemoError(f"`walctl {' '.join(args)}` exited with status {p.returncode}: {p.stderr.strip()}")
    return p.stdout


class Cluster:
    """The three node processes, their addresses and command lines."""

    def __init__(self, root: str):
        self.root = root
        ports = [free_port() for _ in range(3 * len(NAMES))]
        self.lmtp = {n: ("127.0.0.1", ports[i]) for i, n in enumerate(NAMES)}
        self.repl = {n: f"127.0.0.1:{ports[len(NAMES) + i]}" for i, n in enumerate(NAMES)}
        self.imap = {n: ("127.0.0.1", ports[2 * len(NAMES) + i]) for i, n in enumerate(NAMES)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.cmdlines: dict[str, list[str]] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def args(self, mode: str, name: str) -> list[str]:
        peers = [x for n in NAMES for x in ("--peer", self.repl[n])]
        return [mode, self.path(name), "--lmtp", "%s:%d" % self.lmtp[name], "--imap", "%s:%d" % self.imap[name],
                "--listen", self.repl[name], *peers,
                "--name", name, "--auto-reconcile", "--secret-file", os.path.join(self.root, SECRET)]

    def start(self, mode: str, name: str, *, quiet: bool = False) -> None:
        """Start ``walctl serve|follow`` for ``name``; its output goes to DEMO_DIR/<name>.log."""
        args = self.args(mode, name)
        if not quiet:
            say(f"$ walctl {' '.join(args)} &")
        self.cmdlines[name] = args
        with open(os.path.join(self.root, f"{name}.log"), "ab") as out:
            self.procs[name] = subprocess.Popen(walctl_argv(*args), stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_running(name)

    def wait_running(self, name: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while True:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise DemoError(f"node {name} exited with status {proc.returncode}; see {self.root}/{name}.log")
            try:
                self.status(name)
                with socket.create_connection(self.lmtp[name], timeout=1):
                    return
            except (OSError, DemoError):
                pass
            if time.monotonic() > deadline:
                raise DemoError(f"node {name} did not come up in {WAIT_S:.0f} s; see {self.root}/{name}.log")
            time.sleep(0.05)

    def status(self, name: str) -> dict:
        """The node's status over its control socket (the fields of ``walctl status --json``)."""
        from engine.cluster.control import ControlClient, ControlError

        try:
            with ControlClient.unix(os.path.join(self.path(name), "control.sock"), timeout=10) as c:
                return c.call("status")
        except (OSError, ControlError) as exc:
            raise DemoError(f"node {name} does not answer on its control socket: {exc}") from exc

    def kill(self, name: str, sig: int) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise DemoError(f"node {name} did not exit on signal {sig}; killed it") from None

    def stop_all(self) -> list[tuple[str, int, int | None]]:
        """SIGTERM every node still running; (name, pid, exit status)."""
        out = []
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in list(self.procs.items()):
            try:
                proc.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.append((name, proc.pid, proc.returncode))
        self.procs.clear()
        return out

    def wait_for(self, what: str, predicate, timeout: float = WAIT_S):
        """Poll ``predicate()`` until it returns something true; that value."""
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = predicate()
                if value:
                    return value
            except DemoError as exc:
                last_exc = exc
            time.sleep(0.1)
        dump = os.path.join(self.root, "status-at-timeout.json")
        with open(dump, "w") as f:
            json.dump({n: self._status_or_error(n) for n in self.procs}, f, indent=2, default=str)
        raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" ({last_exc})" if last_exc else "")
                        + f"; every running node's status is in {dump}")

    def _status_or_error(self, name: str):
        try:
            return self.status(name)
        except DemoError as exc:
            return str(exc)

    def caught_up(self, master: str, replicas: tuple[str, ...]) -> bool:
        """Every replica holds and applied the master's whole log."""
        st = self.status(master)
        reps = {r["name"]: r for r in st.get("replicas") or []}
        return all(r in reps and reps[r]["connected"] and reps[r]["durable_lsn"] == st["last_lsn"]
                   and reps[r].get("applied_lsn") == st["last_lsn"] for r in replicas)


IMAP_USER, IMAP_PASSWORD = "alice", "demo password"


def imap_say(node: str, text: str) -> None:
    say(f"  imap {node}: {text}")


class MailClient(imaplib.IMAP4):
    """The demo's mail program: Python's imaplib, logged in as alice, her INBOX selected.

    Selected with SELECT on every node: a replica answers ``[READ-ONLY]`` (imaplib's own
    ``select()`` takes that for an error and wants EXAMINE, which would stay read-only for
    good), and the same session becomes writable when its node is promoted.
    """

    def __init__(self, node: str, address: tuple[str, int]):
        self.node = node
        try:
            super().__init__(*address, timeout=10)
            self.login(IMAP_USER, IMAP_PASSWORD)
            typ, data = self._simple_command("SELECT", "INBOX")
        except (OSError, imaplib.IMAP4.error) as exc:
            raise DemoError(f"IMAP on {node} ({address[0]}:{address[1]}): {exc}") from exc
        if typ != "OK":
            raise DemoError(f"IMAP on {node}: SELECT INBOX answered {typ} {data}")
        self.state = "SELECTED"
        self.read_only = self.untagged_responses.pop("READ-ONLY", None) is not None

    def _answer(self, what: str, typ: str, data) -> list:
        if typ != "OK":
            raise DemoError(f"IMAP on {self.node}: {what} answered {typ} {data}")
        return data

    def uids(self) -> list[int]:
        return [int(u) for u in self._answer("UID SEARCH", *self.uid("SEARCH", "ALL"))[0].split()]

    def flags(self, uid: int) -> tuple[str, ...]:
        for item in self._answer("UID FETCH", *self.uid("FETCH", str(uid), "(FLAGS)")):
            if isinstance(item, bytes) and re.search(rb"\bUID %d\b" % uid, item):
                return tuple(f.decode() for f in imaplib.ParseFlags(item))
        return ()

    def subject(self, uid: int) -> str:
        data = self._answer("UID FETCH", *self.uid("FETCH", str(uid), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
        return next(item[1].decode().strip() for item in data if isinstance(item, tuple))

    def store(self, uid: int, flag: str) -> tuple[str, str]:
        """``UID STORE uid +FLAGS (flag)``: (tagged status, its text)."""
        typ, data = self.uid("STORE", str(uid), "+FLAGS", f"({flag})")
        return typ, (data[-1] or b"").decode() if typ != "OK" else ""

    def wait_flag(self, uid: int, flag: str) -> float:
        """Poll until ``uid`` shows ``flag``; the seconds it took."""
        t0 = time.monotonic()
        while flag not in self.flags(uid):
            if time.monotonic() - t0 > WAIT_S:
                raise DemoError(f"IMAP on {self.node}: UID {uid} never showed {flag}")
            time.sleep(0.005)
        return time.monotonic() - t0

    def unprompted(self) -> str:
        """The next line the server sends without being asked (a BYE)."""
        try:
            return self.readline().decode().strip()
        except OSError as exc:
            raise DemoError(f"IMAP on {self.node}: nothing came ({exc})") from exc

    def close_quietly(self) -> None:
        try:
            self.shutdown()
        except OSError:
            pass


class Mta:
    """The demo's MTA: LMTP, one recipient per transaction, 4xx or no answer -> the next node.

    Every message is unique (a run id and a sequence number), so an
    acknowledged message is identified by (mailbox, GUID): the blake3 of the
    exact bytes sent, which the node stores unchanged.
    """

    def __init__(self, lmtp: dict[str, tuple[str, int]], prefer: str):
        self.lmtp = lmtp
        self.prefer = prefer
        self.run = uuid.uuid4().hex[:8]
        self.seq = 0
        self.acked: list[tuple[str, str, str]] = []  # (mailbox, guid, node that said 250)
        self.sent_guids: set[str] = set()
        self.refused = 0  # 4xx replies and refused connections, each retried on the next node
        self._conns: dict[str, LmtpClient] = {}
        self._lock = threading.Lock()

    def _message(self) -> tuple[str, str, bytes]:
        with self._lock:
            self.seq += 1
            n = self.seq
        user = USERS[n % len(USERS)]
        body = (f"From: sender@{DOMAIN}\r\nTo: {user}@{DOMAIN}\r\nMessage-ID: <demo-{self.run}-{n}@{DOMAIN}>\r\n"
                f"Subject: demo message {n}\r\n\r\nHello {user}, this is message {n} of the demo.\r\n").encode()
        return f"{user}@{DOMAIN}", f"user/{user}/INBOX", body

    def _conn(self, name: str) -> LmtpClient:
        c = self._conns.get(name)
        if c is None:
            host, port = self.lmtp[name]
            c = LmtpClient(host, port, timeout=10)
            self._conns[name] = c
        return c

    def _drop(self, name: str) -> None:
        c = self._conns.pop(name, None)
        if c is not None:
            try:
                c.close()
            except OSError:
                pass

    def deliver_one(self) -> str:
        """Deliver one new message; returns the node that acknowledged it."""
        rcpt, mailbox, body = self._message()
        guid = blake3.blake3(body).hexdigest()
        self.sent_guids.add(guid)
        order = list(self.lmtp)
        deadline = time.monotonic() + WAIT_S
        while True:
            start = order.index(self.prefer)
            for name in order[start:] + order[:start]:
                try:
                    acked = self._conn(name).deliver(f"sender@{DOMAIN}", [rcpt], body)[rcpt].outcome == "acked"
                except OSError:  # the node is down
                    acked = False
                if not acked:
                    # 451 from a replica or a paused master, or no answer: try the next one.
                    self.refused += 1
                    self._drop(name)
                    continue
                self.prefer = name
                self.acked.append((mailbox, guid, name))
                return name
            if time.monotonic() > deadline:
                raise DemoError(f"no node accepted a message for {WAIT_S:.0f} s")
            time.sleep(0.05)

    def deliver(self, count: int) -> dict[str, int]:
        by_node: dict[str, int] = {}
        for _ in range(count):
            name = self.deliver_one()
            by_node[name] = by_node.get(name, 0) + 1
        return by_node

    def close(self) -> None:
        for name in list(self._conns):
            self._drop(name)


class Load(threading.Thread):
    """Deliveries in the background at about ``rate`` messages/s until stopped."""

    def __init__(self, mta: Mta, rate: float):
        super().__init__(daemon=True)
        self.mta = mta
        self.rate = rate
        self.stopped = threading.Event()
        self.delivered = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            while not self.stopped.is_set():
                self.mta.deliver_one()
                self.delivered += 1
                ahead = t0 + self.delivered / self.rate - time.monotonic()
                if ahead > 0:
                    self.stopped.wait(ahead)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        if self.error is not None:
            raise DemoError(f"the background load failed: {self.error}") from self.error
        return self.delivered


def lag_line(st: dict) -> str:
    """One line: each replica's state and both lags (records not yet durable there, not yet applied there)."""
    parts = []
    for r in st.get("replicas") or []:
        state = "connected" if r.get("connected") else "DOWN"
        applied = r.get("applied_lag_records")
        parts.append(f"{r['name']}: {state}, lag {r.get('durable_lag_records')} records durable"
                     + (f", {applied} applied" if applied is not None else "")
                     + f" ({r.get('lag_bytes', 0)} bytes, {r.get('lag_seconds') or 0:.3f} s)")
    return f"master {st['node']} at LSN {st['last_lsn']}; " + "; ".join(parts)


def print_reconcile_report(path: str) -> None:
    """A summary of a reconcile report (NODE/reconcile/*.json, the ``walctl reconcile --apply --json`` fields)."""
    with open(path) as f:
        doc = json.load(f)
    fork = doc["fork"]
    say(f"  fork point: LSN {fork['lsn']} (epoch {fork['epoch']})")
    for side in ("a", "b"):
        s = doc[side]
        role = "survivor" if doc["survivor"]["side"] == side else "diverged tail"
        say(f"  {role:>13}: {os.path.relpath(s['path'])}: {s['last_lsn'] - fork['lsn']} records after the fork")
    win, lose = doc["survivor"]["side"], "b" if doc["survivor"]["side"] == "a" else "a"
    say(f"  {'mailbox':<18} {'only on survivor':>16} {'only in tail':>12} {'on both':>7} {'UID collisions':>14}")
    for m in doc["mailboxes"]:
        say(f"  {m['mailbox']:<18} {len(m['only_in_' + win]):>16} {len(m['only_in_' + lose]):>12} "
            f"{len(m['both']):>7} {len(m['uid_collisions']):>14}")
    kinds: dict[str, int] = {}
    for act in doc["plan"]["actions"]:
        key = f"{act['rule']} {act['kind']}"
        kinds[key] = kinds.get(key, 0) + 1
    say(f"  plan ({doc['plan']['strategy']}): " + ", ".join(f"{n} x {k}" for k, n in kinds.items()))
    a = doc["apply"]
    say(f"  applied: {a['done']} done, {a['skipped']} skipped, {a['failed']} failed; status {a['status']}")


def delivery_problems(acked: list[tuple[str, str, str]], stored: dict[str, list[str]],
                      sent: set[str]) -> dict[str, list]:
    """What breaks "every acknowledged message is on the master exactly once".

    ``acked``: (mailbox, GUID, node) per 250 received; ``stored``: mailbox ->
    the GUIDs the master holds; ``sent``: every GUID the demo ever sent.
    Returns only the kinds of problem found: ``missing`` and ``twice``
    (mailbox, GUID) pairs, ``never sent`` GUIDs.
    """
    problems = {
        "missing": [(m, g) for m, g, _ in acked if stored.get(m, []).count(g) == 0],
        "twice": [(m, g) for m, g, _ in acked if stored.get(m, []).count(g) > 1],
        "never sent": [g for guids in stored.values() for g in guids if g not in sent],
    }
    return {k: v for k, v in problems.items() if v}


def run_demo(cl: Cluster) -> bool:
    root = cl.root
    t_start = time.monotonic()

    step(1, "a master and two replicas")
    say("a: the master, with an LMTP front. b and c: replicas, each an exact copy of a's log, fed over TCP.")
    show("init", cl.path("a"), "--name", "a")
    say(f"(every node is given a's replication secret with --secret-file {os.path.join(root, SECRET)})")
    cl.start("serve", "a")
    cl.start("follow", "b")
    cl.start("follow", "c")
    cl.wait_for("b and c to connect", lambda: cl.caught_up("a", ("b", "c")))
    say(f"(each node logs to {root}/NAME.log; each serves IMAP too, the replicas read-only)")
    say("alice gets a password for IMAP; its hash is a record in the log, so every replica can log her in:")
    show_with_input(IMAP_PASSWORD + "\n", f"echo '{IMAP_PASSWORD}'", "user", cl.path("a"), "add", IMAP_USER,
                    "--password-stdin")

    mta = Mta(cl.lmtp, prefer="a")
    load: Load | None = None
    clients: list[MailClient] = []
    try:
        step(2, "deliveries over LMTP, with each replica's lag")
        say("250 comes after the master's fsync; replication is asynchronous, so replicas may lag a little.")
        load = Load(mta, rate=100)
        load.start()
        time.sleep(0.6)
        say(lag_line(cl.status("a")))
        time.sleep(0.6)
        show("status", cl.path("a"))
        time.sleep(0.6)
        say(lag_line(cl.status("a")))
        n = load.stop()
        say(f"delivered {n} messages to a")
        cl.wait_for("b and c to catch up", lambda: cl.caught_up("a", ("b", "c")))
        say(lag_line(cl.status("a")))
        say("alice reads her mail with an IMAP client (Python's imaplib) on a, and flags a message:")
        on_a = MailClient("a", cl.imap["a"])
        clients.append(on_a)
        uids = on_a.uids()
        first = uids[0]
        imap_say("a", f"SELECT INBOX -> {len(uids)} messages; UID FETCH {first} (BODY.PEEK[HEADER.FIELDS "
                      f"(SUBJECT)]) -> {on_a.subject(first)}")
        on_b = MailClient("b", cl.imap["b"])
        clients.append(on_b)
        on_a.store(first, "\\Flagged")
        took = on_b.wait_flag(first, "\\Flagged")
        imap_say("a", f"UID STORE {first} +FLAGS (\\Flagged) -> OK (in a's log, fsynced, before the OK)")
        imap_say("b", f"SELECT INBOX -> [READ-ONLY] (a replica); UID {first} shows \\Flagged "
                      f"{took * 1000:.0f} ms after a's OK")
        typ, text = on_b.store(first, "\\Seen")
        imap_say("b", f"UID STORE {first} +FLAGS (\\Seen) -> {typ} {text}")
        cl.wait_for("c to hold the flag change too", lambda: cl.caught_up("a", ("b", "c")))

        step(3, "replica c is killed (SIGKILL) and catches up by itself")
        pid = cl.procs["c"].pid
        say(f"$ kill -9 {pid}        # c")
        cl.kill("c", signal.SIGKILL)
        by_node = mta.deliver(100)
        say(f"delivered {sum(by_node.values())} more messages to a while c was down")
        cl.wait_for("a to see c down", lambda: not {r["name"]: r for r in cl.status("a")["replicas"]}["c"]["connected"])
        say(lag_line(cl.status("a")))
        say("restart c, as it was started: it resumes at its own durable LSN")
        cl.start("follow", "c")
        cl.wait_for("c to catch up", lambda: cl.caught_up("a", ("b", "c")))
        show("status", cl.path("a"))

        step(4, "soft failover: a hands the master role to b, under load")
        say("a refuses new writes (451), waits until b holds its whole log, promotes b in a new epoch and")
        say("becomes b's replica; c follows b by itself. The MTA retries the 451s on the next node.")
        refused_before = mta.refused
        load = Load(mta, rate=100)
        load.start()
        time.sleep(0.5)
        show("failover", cl.path("a"), "--to", "b")
        time.sleep(0.8)
        n = load.stop()
        say(f"the background MTA delivered {n} messages during the handover; {mta.refused - refused_before} "
            f"attempts got 4xx (or no answer) and were retried on another node")
        cl.wait_for("a and c to follow b", lambda: cl.caught_up("b", ("a", "c")))
        show("status", cl.path("b"))
        say("alice's IMAP sessions: the one on a is told where the master went; the one on b carries on, writable:")
        bye = on_a.unprompted()
        imap_say("a", bye)
        referral = re.search(r"REFERRAL imap://([^:/\]]+):(\d+)/", bye)
        if referral is None:
            raise DemoError(f"a's IMAP session ended without a referral to b: {bye!r}")
        typ, text = on_b.store(first, "\\Seen")
        imap_say("b", f"UID STORE {first} +FLAGS (\\Seen) -> {typ} {text}(the same session; it was told "
                      f"* OK [READ-WRITE])")
        followed = MailClient("b", (referral[1], int(referral[2])))
        clients.append(followed)
        imap_say("b", f"(reconnected where the referral points) UID {first} -> FLAGS ({' '.join(followed.flags(first))})"
                      f", {len(followed.uids())} messages")

        step(5, "hard failover: the master b dies with mail no replica has")
        say("Both replicas are stopped (SIGTERM) and b, alone, acknowledges 20 messages (asynchronous")
        say("replication: 250 after b's own fsync). Then b is killed before any replica has them.")
        for client in clients:
            client.close_quietly()
        clients.clear()
        for name in ("a", "c"):
            say(f"$ kill {cl.procs[name].pid}        # {name}")
            cl.kill(name, signal.SIGTERM)
        by_node = mta.deliver(20)
        say(f"acknowledged by b alone: {by_node.get('b', 0)} messages")
        say(f"$ kill -9 {cl.procs['b'].pid}        # b")
        cl.kill("b", signal.SIGKILL)
        say("a and c come back as replicas (`walctl follow`: a replica never runs with `serve`); no master answers")
        cl.start("follow", "c")
        cl.start("follow", "a")
        cl.wait_for("c to find no master", lambda: not (cl.status("c").get("connection") or {}).get("connected"))
        on_c = MailClient("c", cl.imap["c"])
        clients.append(on_c)
        imap_say("c", f"SELECT INBOX -> [READ-ONLY] (c is a replica): {len(on_c.uids())} messages")
        show("promote", cl.path("c"))
        typ, text = on_c.store(first, "\\Answered")
        imap_say("c", f"UID STORE {first} +FLAGS (\\Answered) -> {typ} {text}(the same session, writable now)")
        cl.wait_for("a to follow c", lambda: cl.caught_up("c", ("a",)))
        by_node = mta.deliver(30)
        say(f"delivered {by_node.get('c', 0)} messages to the new master c")
        say("b comes back with `walctl follow`: its log forked from c's, so its tail is cut aside")
        say("(b/diverged/) and, with --auto-reconcile, sent to c's reconciler. Without it, an operator runs")
        say(f"`walctl reconcile {cl.path('c')}/log.wal {cl.path('b')}/diverged/*.wal --apply {cl.path('c')}`")
        on_c.noop()
        before = len(on_c.uids())
        cl.start("follow", "b")
        ev = cl.wait_for("b's tail to be reconciled into c", lambda: [
            e for e in cl.status("b").get("events") or [] if e["kind"] in ("reconciled", "reconcile-failed")])
        if ev[-1]["kind"] != "reconciled":
            raise DemoError(f"reconcile failed: {ev[-1]['text']}")
        reports = sorted(glob.glob(os.path.join(cl.path("c"), "reconcile", "*.json")))
        if not reports:
            raise DemoError(f"no reconcile report in {cl.path('c')}/reconcile")
        say(f"the reconcile report ({reports[-1]}; the whole plan is in that file):")
        print_reconcile_report(reports[-1])
        on_c.noop()
        imap_say("c", f"NOOP, UID SEARCH ALL -> {len(on_c.uids()) - before} more messages in alice's INBOX: the "
                      f"ones only b had acknowledged, copied back by the reconcile")
        mta.deliver(10)
        cl.wait_for("a and b to catch up with c", lambda: cl.caught_up("c", ("a", "b")))
        show("status", cl.path("c"))
        imap_view = (len(on_c.uids()), set(on_c.flags(first)))
    finally:
        if load is not None:
            load.stopped.set()
            load.join()
        mta.close()
        for client in clients:
            client.close_quietly()

    step(6, "checks")
    ok = True
    digests = {}
    for _ in range(50):  # the master may log a checkpoint meanwhile: compare at one LSN
        cl.wait_for("every node to apply c's whole log", lambda: cl.caught_up("c", ("a", "b")))
        digests = {n: json.loads(capture("digest", cl.path(n), "--json")) for n in NAMES}
        if len({d["applied_lsn"] for d in digests.values()}) == 1:
            break
    say("$ walctl digest NODE --json     # for a, b and c")
    for n in NAMES:
        d = digests[n]
        say(f"  {n}: applied LSN {d['applied_lsn']}, store digest {d['store'][:32]}…")
    same = len({(d["applied_lsn"], d["store"]) for d in digests.values()}) == 1
    say("same digest on every node: " + ("yes" if same else "NO"))
    ok &= same

    stored = {mailbox: [m["guid"] for m in json.loads(capture("messages", cl.path("c"), mailbox, "--json"))]
              for mailbox in sorted(digests["c"]["mailboxes"])}
    problems = delivery_problems(mta.acked, stored, mta.sent_guids)
    total = sum(len(g) for g in stored.values())
    say(f"acknowledged: {len(mta.acked)} messages; on the master c: {total} messages in {len(stored)} mailboxes")
    say("every acknowledged message on c exactly once: " + ("yes" if not problems else "NO"))
    for kind, items in problems.items():
        say(f"  {kind}: {len(items)}, e.g. {items[0]}")
    ok &= not problems
    alice = sum(1 for m, _, _ in mta.acked if m == f"user/{IMAP_USER}/INBOX")
    count, flags = imap_view
    say(f"alice's IMAP client on c: {count} messages ({alice} acknowledged for her); UID {first}: "
        f"{' '.join(sorted(flags))}")
    imap_ok = count == alice and {"\\Flagged", "\\Seen", "\\Answered"} <= flags
    say("her client sees every message once and the flags she set on a, b and c: " + ("yes" if imap_ok else "NO"))
    ok &= imap_ok
    say(f"\ndemo took {time.monotonic() - t_start:.1f} s")
    return ok


def _walctl_path() -> str:
    """How to call walctl from here: the virtualenv's script when there is one."""
    script = os.path.join(os.path.dirname(sys.executable), "walctl")
    if os.path.exists(script):
        rel = os.path.relpath(script)
        return script if rel.startswith("..") else rel
    return "walctl"


def main() -> int:
    from .cmd_node import log_in_use

    root = os.path.abspath(DEMO_DIR)
    running = [n for n in NAMES if log_in_use(os.path.join(root, n))]
    if running:
        say(f"Error: a node of an earlier demo still runs in ./{DEMO_DIR}/{running[0]}: stop it first "
            f"(kill -TERM the `walctl serve|follow {DEMO_DIR}/{running[0]}` process)")
        return 1
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    cl = Cluster(os.path.relpath(root))
    say(f"mailwal demo: three nodes on 127.0.0.1 in ./{DEMO_DIR} (Ctrl-C stops it and its nodes)")
    ok = False
    try:
        ok = run_demo(cl)
    except DemoError as exc:
        say(f"\nError: {exc}")
    except KeyboardInterrupt:
        say("\ninterrupted")
    finally:
        cmdlines = dict(cl.cmdlines)
        stopped = cl.stop_all()
        say("\nstopping the nodes (SIGTERM): " + ", ".join(f"{n} (pid {pid}) exited {rc}" for n, pid, rc in stopped))
    say(f"\nThe node directories are left in ./{DEMO_DIR} (a, b, c and their logs NAME.log).")
    w = _walctl_path()
    say("Look at them with, for example:")
    say(f"  {w} status {DEMO_DIR}/c          {w} messages {DEMO_DIR}/c user/alice/INBOX")
    say(f"  {w} verify {DEMO_DIR}/b/log.wal   ls {DEMO_DIR}/b/diverged {DEMO_DIR}/c/reconcile")
    if "c" in cmdlines:
        say("Start a node again by hand (SIGTERM or Ctrl-C stops it), e.g. the master c:")
        say(f"  {w} " + " ".join(cl.args("serve", "c")))
    say("Rerun the whole demo (it starts afresh): make demo")
    say("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
