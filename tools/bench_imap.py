"""``walctl bench imap``: what mail clients ask of an IMAP server, timed with imaplib, mailwal beside its peers.

One run measures every target with the same client (Python's ``imaplib``,
one thread per connection) on the same machine, so the ratios between
targets come from one run:

* **fill**: a fresh mailbox (``bench-imap-NAME-...`` in the user's personal
  namespace) gets ``--messages`` distinct 4 KiB messages by APPEND from 8
  connections (its rate is reported too);
* **rows**, each the median of ``--rounds``: SELECT; ``UID FETCH 1:* (UID
  FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)``; ``UID FETCH 1:*
  BODY.PEEK[HEADER]``; ``--stores`` single ``UID STORE n +FLAGS.SILENT
  (\\Seen)`` from 1 client and from 8 (the flag is cleared, untimed, before
  each round, so every STORE changes something); ``UID SEARCH UNSEEN``; a
  QRESYNC SELECT (RFC 7162) by a client that went away before 100 flag
  changes; and, for a target given a replica (``--replica NAME=HOST:PORT``),
  how long after the last OK of ``--replica-stores`` STOREs on the master the
  replica shows them all, and the lag of each STORE (first poll of the
  replica showing it, minus its OK; polls are NOOP + ``UID SEARCH ANSWERED``);
* **ratios**: each target's speed on a row divided by the best speed among
  its peers on that row (above 1: faster than all of them); the peers are the
  other targets, the in-memory backend (a reference, not a mail server) left out.

Targets are ``--target NAME=HOST:PORT`` (any IMAP server; the same
``--user``/``--password`` everywhere). Without ``--target`` (or with
``--own node``, ``--own memory``) the bench starts mailwal's own servers as
child processes: a master and a replica node (``walctl serve --imap``,
``walctl follow --imap``), or the in-memory backend; see :data:`OWN_SERVERS`.
The output is stamped with the commit and the machine. The bench mailbox is
deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import imaplib
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .bench_report import BenchReport, Column, Stamp, machine_info, progress_printer, times

__all__ = ["bench_imap_command", "run_imap_bench", "build_report", "render_markdown", "ROWS", "BenchError", "Target",
           "main"]

MESSAGE_BYTES = 4096
FILL_CLIENTS = 8
STORE_CLIENTS = 8
QRESYNC_CHANGES = 100
REPLICA_TIMEOUT_S = 600.0
POLL_PAUSE_S = 0.002
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = "(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)"

# row key -> (what is measured, unit, True when a higher value is better)
ROWS: dict[str, tuple[str, str, bool]] = {
    "select": ("SELECT", "ms", False),
    "fetch_meta": (f"UID FETCH 1:* {META}", "ms", False),
    "fetch_headers": ("UID FETCH 1:* BODY.PEEK[HEADER]", "ms", False),
    "store_1": ("UID STORE n +FLAGS.SILENT (\\Seen), 1 client", "STOREs/s", True),
    "store_8": (f"UID STORE n +FLAGS.SILENT (\\Seen), {STORE_CLIENTS} clients", "STOREs/s", True),
    "search_unseen": ("UID SEARCH UNSEEN", "ms", False),
    "qresync_select": (f"SELECT (QRESYNC) after {QRESYNC_CHANGES} flag changes", "ms", False),
    "replica_all": ("replica shows every STORE, after the last OK", "ms", False),
    "replica_lag_p99": ("replica lag per STORE, p99", "ms", False),
    "append_8": (f"APPEND 4 KiB from {FILL_CLIENTS} clients (the fill, 1 run)", "msgs/s", True),
}


class BenchError(Exception):
    """A target could not be measured (connection, login, a refused command): the message says which and why."""


@dataclass
class Target:
    """An IMAP server under test; ``label`` says what it is (shown beside its name)."""

    name: str
    host: str
    port: int
    label: str = ""
    replica: tuple[str, int] | None = None
    reference: bool = False  # shown for comparison, never anyone's best peer (the in-memory backend)
    processes: list[subprocess.Popen] = field(default_factory=list, repr=False)  # stopped in this order


# -- messages and connections ---------------------------------------------------------------


def bench_message(n: int, size: int = MESSAGE_BYTES) -> bytes:
    """A distinct message of exactly ``size`` octets with the headers a client parses."""
    head = (f"From: Bench Sender <sender{n % 97}@bench.example>\r\nTo: <bench@bench.example>\r\n"
            f"Subject: bench message {n}\r\nDate: Mon, 3 Jan 2022 10:{n % 60:02d}:00 +0000\r\n"
            f"Message-ID: <{n}.{os.getpid()}@bench.example>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopqrstuvwxyz\r\n"
    out = bytearray(head)
    while len(out) + len(line) <= size - 2:
        out += line
    out += b"x" * (size - 2 - len(out)) + b"\r\n"
    return bytes(out)


def _check(target: str, what: str, typ: str, data) -> list:
    if typ != "OK":
        text = b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace") if data else ""
        raise BenchError(f"{target}: {what} answered {typ} {text}".rstrip())
    return data


class Client:
    """One logged-in imaplib connection to a target, with the errors turned into :class:`BenchError`."""

    def __init__(self, name: str, host: str, port: int, user: str, password: str, timeout_s: float = 300):
        self.name = name
        try:
            self.imap = imaplib.IMAP4(host, port, timeout=timeout_s)
        except OSError as exc:
            raise BenchError(f"{name}: cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
        # imaplib sends an APPEND's literal and its final CRLF in two writes: with Nagle's algorithm the
        # CRLF waits for the server's delayed ACK (about 40 ms a message on Linux), whatever the server.
        self.imap.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.imap.login(user, password)
        except imaplib.IMAP4.error as exc:
            self.imap.shutdown()
            raise BenchError(f"{name}: login as {user} refused at {host}:{port}: {exc}") from exc

    def run(self, what: str, fn: Callable, *args) -> list:
        try:
            typ, data = fn(*args)
        except (imaplib.IMAP4.error, OSError) as exc:
            raise BenchError(f"{self.name}: {what} failed: {exc}") from exc
        return _check(self.name, what, typ, data)

    def uid(self, command: str, *args) -> list:
        return self.run(f"UID {command}", self.imap.uid, command, *args)

    def select(self, mailbox: str, readonly: bool = False) -> int:
        return int(self.run("SELECT", self.imap.select, mailbox, readonly)[0])

    def code(self, name: str) -> int:
        """The value of response code ``name`` (e.g. HIGHESTMODSEQ) from the last SELECT."""
        values = self.imap.untagged_responses.get(name.upper())
        if not values:
            raise BenchError(f"{self.name}: SELECT sent no [{name}] response code")
        return int(values[-1].split()[0])

    def capabilities(self) -> set[str]:
        """Asked after login: servers announce more then (Dovecot's greeting lists no CONDSTORE or QRESYNC)."""
        data = self.run("CAPABILITY", self.imap.capability)
        return {c.upper() for c in (data[-1] or b"").decode().split()}

    def close(self) -> None:
        try:
            self.imap.logout()
        except (imaplib.IMAP4.error, OSError):
            self.imap.shutdown()


def _namespace(c: Client) -> tuple[str, str]:
    """(personal namespace prefix, hierarchy delimiter): from NAMESPACE, else an empty prefix and the
    delimiter LIST "" "" names."""
    if "NAMESPACE" in c.capabilities():
        data = c.run("NAMESPACE", c.imap.namespace)
        m = re.match(rb'\(\("([^"]*)" (?:"(.)"|NIL)\)', data[0] or b"")
        if m:
            return m.group(1).decode(), (m.group(2) or b"").decode()
    data = c.run('LIST "" ""', c.imap.list, '""', '""')
    m = re.search(rb'\) (?:"(.)"|NIL) ', data[0] or b"")
    return "", (m.group(1).decode() if m and m.group(1) else "")


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else 0.0


def _in_threads(n: int, work: Callable[[int], None]) -> float:
    """Run ``work(k)`` for k in range(n) on n threads released together; seconds until the last ends.

    The first error raised by any thread is raised here after all have ended.
    """
    barrier = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def body(k: int) -> None:
        try:
            barrier.wait()
            work(k)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


# -- one target --------------------------------------------------------------------------------


class TargetBench:
    """Everything measured on one target (and its replica), in the order of :data:`ROWS`."""

    def __init__(self, target: Target, user: str, password: str, *, messages: int, stores: int,
                 replica_stores: int, rounds: int, say: Callable[[str], None]):
        self.t = target
        self.user, self.password = user, password
        self.messages, self.rounds = messages, rounds
        self.stores = min(stores, messages)
        self.replica_stores = min(replica_stores, messages)
        self.say = say
        self.mailbox = ""
        self.uids: list[int] = []
        self.result: dict = {"name": target.name, "label": target.label, "host": target.host, "port": target.port,
                             "replica": f"{target.replica[0]}:{target.replica[1]}" if target.replica else None,
                             "reference": target.reference, "rows": {}, "rounds": {}, "notes": {}}

    def connect(self, host_port: tuple[str, int] | None = None) -> Client:
        host, port = host_port or (self.t.host, self.t.port)
        return Client(self.t.name, host, port, self.user, self.password)

    def _row(self, key: str, values: list[float], extra: dict | None = None) -> None:
        self.result["rounds"][key] = values
        self.result["rows"][key] = _median(values)
        if extra:
            self.result.setdefault("details", {})[key] = extra

    # -- the steps --

    def fill(self) -> None:
        c = self.connect()
        try:
            self.result["capabilities"] = sorted(c.capabilities())
            prefix, delim = _namespace(c)
            self.mailbox = f"{prefix}bench-imap-{self.t.name}-{os.getpid()}-{int(time.time())}"
            self.result["mailbox"] = self.mailbox
            self.say(f"{self.t.name}: creating {self.mailbox} (delimiter {delim!r})")
            c.run(f"CREATE {self.mailbox}", c.imap.create, self.mailbox)
        finally:
            c.close()
        self.say(f"{self.t.name}: appending {self.messages} messages of {MESSAGE_BYTES} B from {FILL_CLIENTS} clients")
        clients = [self.connect() for _ in range(FILL_CLIENTS)]
        try:
            def work(k: int) -> None:
                for n in range(k, self.messages, FILL_CLIENTS):
                    clients[k].run("APPEND", clients[k].imap.append, self.mailbox, None, None, bench_message(n))
            elapsed = _in_threads(FILL_CLIENTS, work)
        finally:
            for cl in clients:
                cl.close()
        self._row("append_8", [self.messages / elapsed])
        c = self.connect()
        try:
            c.select(self.mailbox, readonly=True)
            self.uids = [int(u) for u in c.uid("SEARCH", "ALL")[0].split()]
        finally:
            c.close()
        if len(self.uids) != self.messages:
            raise BenchError(f"{self.t.name}: {self.mailbox} holds {len(self.uids)} messages after "
                             f"{self.messages} APPENDs")

    def reads(self) -> None:
        c = self.connect()
        try:
            selects, metas, headers = [], [], []
            for r in range(self.rounds):
                self.say(f"{self.t.name}: SELECT and FETCH 1:*, round {r + 1} of {self.rounds}")
                t0 = time.perf_counter()
                exists = c.select(self.mailbox)
                selects.append(time.perf_counter() - t0)
                if exists != self.messages:
                    raise BenchError(f"{self.t.name}: SELECT {self.mailbox} says {exists} EXISTS, "
                                     f"{self.messages} were appended")
                t0 = time.perf_counter()
                data = c.uid("FETCH", "1:*", META)
                metas.append(time.perf_counter() - t0)
                self._expect_fetches(data, "FETCH 1:* metadata")
                t0 = time.perf_counter()
                data = c.uid("FETCH", "1:*", "BODY.PEEK[HEADER]")
                headers.append(time.perf_counter() - t0)
                self._expect_fetches(data, "FETCH 1:* BODY.PEEK[HEADER]")
                c.run("CLOSE", c.imap.close)
        finally:
            c.close()
        self._row("select", [s * 1000 for s in selects])
        self._row("fetch_meta", [s * 1000 for s in metas])
        self._row("fetch_headers", [s * 1000 for s in headers])

    def _expect_fetches(self, data: list, what: str) -> None:
        answered = sum(1 for d in data if isinstance(d, tuple) or (isinstance(d, bytes) and b"FETCH" not in d
                                                                    and d[:1].isdigit()))
        if answered != self.messages:
            raise BenchError(f"{self.t.name}: {what} answered for {answered} of {self.messages} messages")

    def writes(self) -> None:
        targets = self.uids[:self.stores]
        for clients, key in ((1, "store_1"), (STORE_CLIENTS, "store_8")):
            rates = []
            for r in range(self.rounds):
                self.say(f"{self.t.name}: {len(targets)} single STOREs from {clients} client(s), "
                         f"round {r + 1} of {self.rounds}")
                self._clear("\\Seen")  # every timed STORE changes a flag
                conns = [self.connect() for _ in range(clients)]
                try:
                    for cl in conns:
                        cl.select(self.mailbox)

                    def work(k: int) -> None:
                        cl = conns[k]
                        for uid in targets[k::clients]:
                            cl.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Seen)")
                    rates.append(len(targets) / _in_threads(clients, work))
                finally:
                    for cl in conns:
                        cl.close()
            self._row(key, rates)
        c = self.connect()
        try:
            c.select(self.mailbox, readonly=True)
            times = []
            for r in range(self.rounds):
                t0 = time.perf_counter()
                found = c.uid("SEARCH", "UNSEEN")[0].split()
                times.append(time.perf_counter() - t0)
                if len(found) != self.messages - len(targets):
                    raise BenchError(f"{self.t.name}: SEARCH UNSEEN found {len(found)} messages, expected "
                                     f"{self.messages - len(targets)}")
        finally:
            c.close()
        self._row("search_unseen", [s * 1000 for s in times])

    def _clear(self, flag: str) -> None:
        """Remove ``flag`` from every message, on a connection of its own that is gone before the timed
        connections SELECT (so none of them is told about these changes while it is timed)."""
        c = self.connect()
        try:
            c.select(self.mailbox)
            c.uid("STORE", "1:*", "-FLAGS.SILENT", f"({flag})")
        finally:
            c.close()

    def qresync(self) -> None:
        if "QRESYNC" not in self.result.get("capabilities", ()):
            self.result["notes"]["qresync_select"] = "the server does not announce QRESYNC"
            return
        changes = self.uids[:min(QRESYNC_CHANGES, len(self.uids))]
        times, answered = [], []
        for r in range(self.rounds):
            self.say(f"{self.t.name}: QRESYNC SELECT after {len(changes)} changes, round {r + 1} of {self.rounds}")
            seen = self.connect()
            try:
                seen.run("ENABLE QRESYNC", seen.imap.enable, "QRESYNC")
                seen.select(self.mailbox, readonly=True)
                uidvalidity, modseq = seen.code("UIDVALIDITY"), seen.code("HIGHESTMODSEQ")
            finally:
                seen.close()
            other = self.connect()
            try:
                other.select(self.mailbox)
                sign = "+" if r % 2 == 0 else "-"
                for uid in changes:
                    other.uid("STORE", str(uid), f"{sign}FLAGS.SILENT", "(\\Flagged)")
            finally:
                other.close()
            back = self.connect()
            try:
                back.run("ENABLE QRESYNC", back.imap.enable, "QRESYNC")
                t0 = time.perf_counter()
                back.run("SELECT (QRESYNC)", back.imap._simple_command, "SELECT", self.mailbox,
                         f"(QRESYNC ({uidvalidity} {modseq}))")
                times.append(time.perf_counter() - t0)
                answered.append(len(back.imap.untagged_responses.get("FETCH", [])))
            finally:
                back.close()
        if any(a < len(changes) for a in answered):
            raise BenchError(f"{self.t.name}: a QRESYNC SELECT reported {min(answered)} changed messages of "
                             f"{len(changes)}")
        self._row("qresync_select", [s * 1000 for s in times])

    def replica(self) -> None:
        if self.t.replica is None:
            self.result["notes"]["replica_all"] = "no replica given (--replica NAME=HOST:PORT)"
            return
        uids = self.uids[:self.replica_stores]
        rep = self.connect(self.t.replica)
        master = self.connect()
        try:
            self.say(f"{self.t.name}: waiting for the replica to hold {self.messages} messages")
            self._wait_replica(rep, lambda r: int(self._status_messages(r)) >= self.messages,
                               "the replica to hold the bench mailbox")
            rep.select(self.mailbox, readonly=True)
            master.select(self.mailbox)
            all_after, lags, polls = [], [], 0
            for r in range(self.rounds):
                master.uid("STORE", "1:*", "-FLAGS.SILENT", "(\\Answered)")
                self._wait_replica(rep, lambda r: not self._answered(r), "the replica to clear \\Answered")
                self.say(f"{self.t.name}: {len(uids)} STOREs on the master, replica polled, "
                         f"round {r + 1} of {self.rounds}")
                fig = self._replica_round(master, rep, uids)
                all_after.append(fig["all_after_last_ok_s"] * 1000)
                lags += fig["lags_s"]
                polls += fig["polls"]
        finally:
            rep.close()
            master.close()
        self._row("replica_all", all_after)
        lag_ms = [x * 1000 for x in lags]
        self.result["rows"]["replica_lag_p99"] = _percentile(lag_ms, 0.99)
        self.result["rounds"]["replica_lag_p99"] = [_percentile(lag_ms, 0.99)]
        self.result.setdefault("details", {})["replica_lag"] = {
            "stores": len(lag_ms), "p50_ms": _percentile(lag_ms, 0.5), "p99_ms": _percentile(lag_ms, 0.99),
            "max_ms": max(lag_ms, default=0.0), "polls": polls}

    def _status_messages(self, c: Client) -> int:
        try:
            data = c.run("STATUS", c.imap.status, self.mailbox, "(MESSAGES)")
        except BenchError:
            return 0  # not replicated yet
        m = re.search(rb"MESSAGES (\d+)", data[0] or b"")
        return int(m.group(1)) if m else 0

    @staticmethod
    def _answered(c: Client) -> set[int]:
        c.run("NOOP", c.imap.noop)
        return {int(u) for u in c.uid("SEARCH", "ANSWERED")[0].split()}

    def _wait_replica(self, c: Client, done: Callable[[Client], bool], what: str) -> None:
        deadline = time.monotonic() + REPLICA_TIMEOUT_S
        while not done(c):
            if time.monotonic() > deadline:
                raise BenchError(f"{self.t.name}: gave up waiting {REPLICA_TIMEOUT_S:.0f} s for {what}")
            time.sleep(0.05)

    def _replica_round(self, master: Client, rep: Client, uids: list[int]) -> dict:
        ok_at: dict[int, float] = {}
        seen_at: dict[int, float] = {}
        stop = threading.Event()
        polls = [0]
        errors: list[BaseException] = []

        def poll() -> None:
            try:
                while not stop.is_set():
                    shown = self._answered(rep)
                    now = time.monotonic()
                    polls[0] += 1
                    for uid in shown:
                        seen_at.setdefault(uid, now)
                    if len(seen_at) >= len(uids) and len(ok_at) == len(uids):
                        return
                    time.sleep(POLL_PAUSE_S)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                errors.append(exc)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        for uid in uids:
            master.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Answered)")
            ok_at[uid] = time.monotonic()
        poller.join(REPLICA_TIMEOUT_S)
        stop.set()
        poller.join()
        if errors:
            raise errors[0]
        missing = [u for u in uids if u not in seen_at]
        if missing:
            raise BenchError(f"{self.t.name}: the replica never showed {len(missing)} of {len(uids)} STOREs")
        last_ok = max(ok_at.values())
        return {"all_after_last_ok_s": max(0.0, max(seen_at.values()) - last_ok),
                "lags_s": [max(0.0, seen_at[u] - ok_at[u]) for u in uids], "polls": polls[0]}

    def cleanup(self, keep: bool) -> None:
        if keep or not self.mailbox:
            return
        try:
            c = self.connect()
        except BenchError:
            return
        try:
            c.run(f"DELETE {self.mailbox}", c.imap.delete, self.mailbox)
        except BenchError as exc:
            self.say(f"{self.t.name}: could not delete {self.mailbox}: {exc}")
        finally:
            c.close()

    def run(self, keep: bool) -> dict:
        try:
            self.fill()
            self.reads()
            self.writes()
            self.qresync()
            self.replica()
        finally:
            self.cleanup(keep)
        return self.result


# -- mailwal's own server -------------------------------------------------------------------------


def _start_memory(directory: str, user: str, password: str) -> Target:
    """The IMAP front over the in-memory backend: ``python -m tools.bench_imap serve-memory USER``."""
    proc = subprocess.Popen([sys.executable, "-m", "tools.bench_imap", "serve-memory", user],
                            cwd=_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write(password + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        proc.wait()
        raise BenchError("mailwal-memory: its IMAP server did not start")
    return Target("mailwal-memory", "127.0.0.1", int(line.split()[1]), label="in-memory backend, no log, no fsync",
                  reference=True, processes=[proc])


def _walctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "tools", *args]


def _die_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM it when the bench dies, however the bench ends."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _log_tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-2000:].strip()
    except OSError:
        return ""


def _wait_for_login(name: str, host: str, port: int, user: str, password: str, proc: subprocess.Popen,
                    log: str, timeout_s: float = 120) -> None:
    """Until ``user`` can log in at host:port (the node is up and, on a replica, the user has arrived)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{name}: the node exited with status {proc.returncode}: {_log_tail(log)}")
        try:
            Client(name, host, port, user, password, timeout_s=10).close()
            return
        except BenchError as exc:
            if time.monotonic() > deadline:
                raise BenchError(f"{name}: no login at {host}:{port} within {timeout_s:.0f} s ({exc}): "
                                 f"{_log_tail(log)}") from exc
        time.sleep(0.2)


def _start_node(directory: str, user: str, password: str) -> Target:
    """A master (``walctl serve --imap``) and its replica (``walctl follow --imap``) in ``directory``.

    The master is made with ``walctl init``; the user is added to its store before it starts
    (a user record in its log, which the replica receives with the rest).
    """
    from engine.node import Node

    from .ports import free_port

    master, replica = os.path.join(directory, "master"), os.path.join(directory, "replica")
    os.makedirs(directory, exist_ok=True)
    done = subprocess.run(_walctl("init", master, "--name", "master"), cwd=_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"mailwal: walctl init failed: {(done.stdout + done.stderr).strip()}")
    node = Node.open(master)
    try:
        node.add_user(user, password)
    finally:
        node.close()
    listen, imap, replica_listen, replica_imap = (free_port() for _ in range(4))
    target = Target("mailwal", "127.0.0.1", imap, label="walctl serve --imap (fsynced log, SQLite store), replica by walctl follow --imap",
                    replica=("127.0.0.1", replica_imap))
    commands = [
        (master, _walctl("serve", master, "--lmtp", "", "--imap", f"127.0.0.1:{imap}", "--listen",
                         f"127.0.0.1:{listen}")),
        (replica, _walctl("follow", replica, "--master", f"127.0.0.1:{listen}", "--listen",
                          f"127.0.0.1:{replica_listen}", "--secret-file", os.path.join(master, "replication.secret"),
                          "--name", "replica", "--imap", f"127.0.0.1:{replica_imap}")),
    ]
    try:
        for path, argv in commands:
            with open(path + ".log", "w") as log:
                target.processes.insert(0, subprocess.Popen(argv, cwd=_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent))
        _wait_for_login("mailwal", "127.0.0.1", imap, user, password, target.processes[-1], master + ".log")
        _wait_for_login("mailwal's replica", "127.0.0.1", replica_imap, user, password, target.processes[0],
                        replica + ".log")
    except BaseException:
        _stop(target)
        raise
    return target


# The servers the bench can start itself, by --own name, each as child processes on 127.0.0.1
# running mailwal's IMAP front (engine/imap/server.py):
# * node: a master node (`walctl serve --imap`) and its replica (`walctl follow --imap`), fresh
#   node directories in the scratch directory: every STORE and APPEND is fdatasync'ed in the
#   master's log before its OK, and the replica rows poll the replica;
# * memory: the in-memory backend (the executor's model): the protocol's own cost, no durability.
OWN_SERVERS: dict[str, Callable[[str, str, str], Target]] = {"node": _start_node, "memory": _start_memory}


def _stop(target: Target) -> None:
    """Stop the target's processes: SIGTERM (the memory server: its stdin closed), then SIGKILL after 30 s."""
    for proc in target.processes:
        if proc.stdin is not None:
            proc.stdin.close()  # the memory server stops when its stdin ends
        elif proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the run ----------------------------------------------------------------------------------------


def _ratios(targets: list[dict]) -> None:
    """Each target's speed on each row over the best speed of its peers there (above 1: faster than all).

    A target's peers are the other targets, references (the in-memory backend) left out.
    """
    for key, (_, _, higher_better) in ROWS.items():
        for t in targets:
            value = t["rows"].get(key)
            others = [o["rows"][key] for o in targets
                      if o is not t and not o.get("reference") and o["rows"].get(key) is not None]
            if value is None or not others:
                continue
            if higher_better:
                best = max(others)
                ratio = value / best if best > 0 else None
            else:
                best = min(others)
                ratio = best / value if value > 0 else None
            if ratio is not None:
                t.setdefault("vs_best_peer", {})[key] = ratio


def run_imap_bench(targets: list[Target], *, user: str | None = None, password: str | None = None,
                   own: tuple[str, ...] = (), messages: int = 10000, stores: int = 2000, replica_stores: int = 500,
                   rounds: int = 3, keep: bool = False, directory: str | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Measure every target (first mailwal's own servers named in ``own``, see OWN_SERVERS); see the module doc.

    Raises:
        BenchError: a target could not be reached, refused the login or a command.
    """
    say = progress or (lambda msg: None)
    base = directory or tempfile.gettempdir()
    started: list[Target] = []
    stamp = Stamp.capture(machine_info(base))
    report: dict = {
        "date": stamp.date, "commit": stamp.commit, "dirty": stamp.dirty, "machine": stamp.machine,
        "client": f"Python {sys.version.split()[0]} imaplib",
        "messages": messages, "message_bytes": MESSAGE_BYTES, "stores": min(stores, messages),
        "replica_stores": min(replica_stores, messages), "rounds": rounds,
        "loadavg": {"start": list(os.getloadavg())}, "targets": [],
    }
    user = user or "bench"
    password = password or secrets.token_urlsafe(12)
    with tempfile.TemporaryDirectory(prefix="bench-imap-", dir=directory) as scratch:
        try:
            for kind in own:
                say(f"starting mailwal's own IMAP server ({kind})")
                started.append(OWN_SERVERS[kind](os.path.join(scratch, kind), user, password))
            for target in started + list(targets):
                report["targets"].append(TargetBench(
                    target, user, password, messages=messages, stores=stores, replica_stores=replica_stores,
                    rounds=rounds, say=say).run(keep))
        finally:
            for target in started:
                _stop(target)
    report["loadavg"]["end"] = list(os.getloadavg())
    _ratios(report["targets"])
    return report


# -- output ---------------------------------------------------------------------------------------------


def _value(t: dict, key: str) -> str:
    v = t["rows"].get(key)
    if v is None:
        return "n/a"
    return f"{v:,.0f}" if ROWS[key][2] or v >= 100 else f"{v:,.1f}" if v >= 10 else f"{v:,.2f}"


def _title(report: dict) -> str:
    replicas = any(t["replica"] for t in report["targets"])
    return (f"{report['messages']:,} messages of {report['message_bytes']} B, {report['client']}; median of "
            f"{report['rounds']} rounds; {report['stores']:,} STOREs per store row"
            + (f", {report['replica_stores']:,} per replica round" if replicas else ""))


def _notes(report: dict) -> list[str]:
    """One line per (row, note), naming the targets it applies to."""
    by: dict[tuple[str, str], list[str]] = {}
    for t in report["targets"]:
        for key, note in t["notes"].items():
            by.setdefault((key, note), []).append(t["name"])
    return [f"{ROWS[key][0]}: {note} ({', '.join(names)})" for (key, note), names in by.items()]


def build_report(report: dict) -> BenchReport:
    """The table of a run (its ``--json`` dict): one row per measure, per target its value and its
    speed over the best peer; then the notes."""
    out = BenchReport(Stamp.of_report(report))
    labelled = [f"{t['name']}: {t['label']}" + (" (a reference, never a peer)" if t["reference"] else "")
                for t in report["targets"] if t["label"]]
    if labelled:
        out.line("; ".join(labelled))
    columns: list[str | Column] = [Column("measure", figures=False), Column("unit", figures=False)]
    for t in report["targets"]:
        columns += [t["name"], "vs best peer"]
    table = out.table(_title(report), columns)
    for key, (what, unit, _) in ROWS.items():
        cells = [what, unit]
        for t in report["targets"]:
            cells += [_value(t, key), times(t.get("vs_best_peer", {}).get(key))]
        table.add_row(*cells)
    for line in _notes(report):
        out.line(line)
    return out


def render_markdown(report: dict) -> str:
    """The table as markdown under its stamp line (docs/benchmarks/imap.md)."""
    return build_report(report).markdown()


def main(argv: list[str]) -> int:
    """``python -m tools.bench_imap serve-memory USER`` (password on stdin): the in-memory own server.

    Prints ``PORT n`` once listening; stops when its stdin ends.
    """
    if len(argv) != 2 or argv[0] != "serve-memory":
        print("usage: python -m tools.bench_imap serve-memory USER  (password on stdin)", file=sys.stderr)
        return 2
    from engine.imap.memory import MemoryBackend
    from engine.imap.server import serve_in_thread

    password = sys.stdin.readline().rstrip("\n")
    backend = MemoryBackend()
    backend.add_user(argv[1], password)
    with serve_in_thread(backend, failed_login_delay_s=0, max_sessions_per_user=64) as srv:
        print(f"PORT {srv.port}", flush=True)
        sys.stdin.read()  # until the bench closes our stdin (or dies)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# -- the click command (registered on ``walctl bench`` in tools/walctl.py) -------------------------------


def _make_command():
    import click

    from .cliutil import CONTEXT_SETTINGS, dump_json
    from .cmd_node import _host_port

    def named(value: str, option: str) -> tuple[str, tuple[str, int]]:
        name, sep, where = value.partition("=")
        if not sep or not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise click.BadParameter(f"{value!r} is not NAME=HOST:PORT", param_hint=option)
        return name, _host_port(where)

    @click.command(name="imap", context_settings=CONTEXT_SETTINGS)
    @click.option("--target", "targets", multiple=True, metavar="NAME=HOST:PORT",
                  help="An IMAP server to measure (repeatable), e.g. cyrus=127.0.0.1:21143.")
    @click.option("--replica", "replicas", multiple=True, metavar="NAME=HOST:PORT",
                  help="The IMAP address of a replica of target NAME (repeatable): adds the replica rows.")
    @click.option("--own", type=click.Choice(sorted(OWN_SERVERS)), multiple=True,
                  help="Start mailwal's own server of this kind too (repeatable; without --target: node).")
    @click.option("--user", default=None, help="User on every target (default for the own server: bench).")
    @click.option("--password", default=None, help="Its password (default for the own server: a random one).")
    @click.option("--messages", type=click.IntRange(min=1), default=10000, show_default=True,
                  help="Messages appended to the bench mailbox.")
    @click.option("--stores", type=click.IntRange(min=1), default=2000, show_default=True,
                  help="Single STOREs per store row and round.")
    @click.option("--replica-stores", type=click.IntRange(min=1), default=500, show_default=True,
                  help="STOREs on the master per replica round.")
    @click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
                  help="Rounds per row; each row reports the median.")
    @click.option("--keep", is_flag=True, help="Leave the bench mailbox on each target.")
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
    @click.option("--markdown", is_flag=True, help="Print the table as markdown with its stamp (for the docs).")
    def bench_imap(targets, replicas, own, user, password, messages, stores, replica_stores, rounds, keep,
                   as_json, markdown):
        """Benchmark IMAP commands with imaplib on mailwal and on other servers.

        Fills a fresh mailbox on each target with 4 KiB messages (APPEND from
        8 clients), then times, median of --rounds: SELECT, UID FETCH 1:* of
        the metadata a client lists (UID FLAGS RFC822.SIZE INTERNALDATE
        ENVELOPE), UID FETCH 1:* BODY.PEEK[HEADER], single UID STOREs from 1
        and from 8 clients, UID SEARCH UNSEEN, a QRESYNC SELECT after 100
        changes, and with --replica how soon a replica shows STOREs made on
        its master. Each row also shows each target's speed over the best of
        its peers (the in-memory backend is never one). Without --target the bench starts mailwal's own server.
        The bench mailbox is deleted afterwards unless --keep.

        \b
        Example:
            walctl bench imap --messages 2000
            walctl bench imap --own node --target cyrus=127.0.0.1:21143 \\
                --target dovecot=127.0.0.1:31143 --user test --password secret
        """
        parsed = [named(t, "--target") for t in targets]
        names = [n for n, _ in parsed]
        if len(set(names)) != len(names):
            raise click.BadParameter("each --target needs its own NAME", param_hint="--target")
        rep = dict(named(r, "--replica") for r in replicas)
        unknown = sorted(set(rep) - set(names))
        if unknown:
            raise click.BadParameter(f"no --target named {', '.join(unknown)}", param_hint="--replica")
        if parsed and (user is None or password is None):
            raise click.UsageError("--target needs --user and --password (the same account on every target)")
        if not own and not parsed:
            own = ("node",)
        chosen = [Target(n, h, p, replica=rep.get(n)) for n, (h, p) in parsed]
        try:
            report = run_imap_bench(chosen, user=user, password=password, own=own, messages=messages,
                                    stores=stores, replica_stores=replica_stores, rounds=rounds, keep=keep,
                                    progress=progress_printer())
        except BenchError as exc:
            raise click.ClickException(str(exc)) from exc
        if as_json:
            dump_json(report, indent=2)
        elif markdown:
            click.echo(render_markdown(report), nl=False)
        else:
            build_report(report).print_text()

    return bench_imap


bench_imap_command = _make_command()
