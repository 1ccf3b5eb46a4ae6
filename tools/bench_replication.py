"""``walctl bench replication``: what replication costs the master, and how far behind replicas are.

Every figure comes from real ``walctl serve`` / ``walctl follow`` processes
on 127.0.0.1, fresh nodes per measurement, 4 KiB messages delivered over
LMTP by ``tools.bench_lmtp``'s asyncio client:

1. **Throughput**: LMTP deliveries/s from 64 connections to a master alone,
   to a master with two asynchronous replicas, and to a master with two
   replicas and ``--sync-replicas 1``. The three run alternately for
   ``rounds`` rounds; the median round of each is reported. Each row also
   says how far the replicas were behind when the load ended and how long
   they took to hold everything (an asynchronous replica that falls behind
   hides its cost in lag, not throughput), and every node's store digest
   once they do (``store_digests``: equal when the replicas hold the
   master's mail).
2. **Lag**: a burst of 2,000 messages from 8 connections to a master with two
   asynchronous replicas. For each message, the client notes the monotonic
   time it read the final 250. A separate poller process asks each
   replica's control socket (or port, op ``status``) for its
   durable LSN (``Log.last_lsn``: set only after the replica's
   ``fdatasync``) every ``POLL_INTERVAL_S``, noting the monotonic time before
   each request and after each reply (CLOCK_MONOTONIC is one clock for all
   processes of the machine). Afterwards the master's log is read and each
   message is matched to its record's LSN by GUID (blake3 of the bytes). A
   message's lag on a replica is the reply time of the first poll that
   showed a durable LSN >= its LSN, minus its 250 time: an upper bound,
   too late by at most one poll interval plus one round trip (the
   ``resolution`` figures; the lower bound is the request time of the poll
   before it). A record already durable on the replica when the client read
   the 250 counts as 0 (counted in ``before_250``).
3. **Late start**: a master that has delivered 100 messages; a new replica
   directory is started with ``walctl follow`` (it is seeded from LSN 1) and
   timed from ``Popen`` until its control socket reports a durable LSN equal
   to the master's last (polled every ``LATE_POLL_S``). Python's start-up and
   imports are included; the floor for them is measured too.
4. **Catch-up**: a replica that was following is stopped; the master's log
   grows by ``catchup_mib`` MiB of 4 KiB messages (``Node.deliver_many`` in
   threads, no LMTP, to build it quickly); then ``walctl serve`` runs on it
   again and the replica is restarted and timed until its durable LSN equals
   the master's. **Catch-up rate** = the log bytes (and records) the replica
   was behind, made durable in its own log (fdatasynced, verified against the
   hash chain), divided by the seconds from the replica's ``Popen`` (and,
   separately, from the moment it streams) until its durable LSN equals the
   master's. Its store applying the same records is timed and reported
   separately (``applied``): the store follows the log and is not what the
   goal measures. The goal's ceiling, in the same run, is the **raw read
   rate** of the master's segment files: 1 MiB ``readinto`` calls hashed with
   blake3 (warm cache, like the replica's master, which just wrote them); a
   plain read without hashing is shown too. Two lower ceilings show what
   the work itself costs: blake3 per 4 KiB piece (the format hashes each
   record), and read + blake3 + write to one file with an fdatasync every
   8 MiB (the least any replica does with those bytes: it cannot be faster
   than copying them durably to its disk).

Speeds are never asserted by tests; ``tests/e2e/test_bench_replication.py`` runs a
tiny configuration and checks the figures exist.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from . import bench_lmtp, bench_wal
from .bench_report import BenchReport, Column, Stamp, machine_info, percent, print_report, progress_printer

__all__ = ["run_replication_bench", "render_markdown", "bench_report", "bench_replication_command", "main", "GOALS"]

MESSAGE_BYTES = bench_lmtp.MESSAGE_BYTES
THROUGHPUT_CONNECTIONS = 64
LAG_MESSAGES = 2000
LAG_CONNECTIONS = 8
LATE_MESSAGES = 100
LATE_RUNS = 3
CATCHUP_MIB = 1024
POLL_INTERVAL_S = 0.002  # lag poller: one status request per replica per interval
LATE_POLL_S = 0.005
CATCHUP_POLL_S = 0.02
CATCHUP_MAILBOXES = 64  # one body to this many mailboxes per deliver_many (one fsync)
CATCHUP_THREADS = 2
START_TIMEOUT_S = 60.0
CONVERGE_TIMEOUT_S = 600.0
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024 * 1024

GOALS = {
    "async_replicas_cost": ("two asynchronous replicas cost <= 15% of master throughput", 0.15),
    "lag_p99_s": ("replication lag p99 < 100 ms (2,000-message burst, 8 connections)", 0.100),
    "late_start_s": ("a replica started after 100 deliveries holds them within 2 s (worst run)", 2.0),
    "catchup_ratio": ("catch-up (durable in the replica's log) >= 50% of raw read + blake3 of the same log", 0.50),
}
#: Measured by the project on these machines with the other systems' own replication (the brief's anchors).
ANCHORS = {
    "lag_p99_s": {"Cyrus 3.6": 1.55, "Dovecot 2.3": 6.1},
    "late_start_s": {"Cyrus 3.6": 19.5, "Dovecot 2.3": 297.0},
}


# -- child processes ---------------------------------------------------------------------------


class _Walctl:
    """One ``walctl serve`` or ``walctl follow`` child; its output goes to ``NAME.out``, its log to ``NAME.log``.

    Control goes over ``NODE/control.sock`` (the cheapest for the node, about
    75 µs of its CPU per ``status``) or, when the node has none (it skips the
    Unix socket when its path is too long for AF_UNIX, and ``--dir`` may be
    deep), over its TCP port (``--listen``, authenticated with the shared
    secret, about 110 µs).
    """

    def __init__(self, node: str, args: list[str], secret_file: str):
        self.node = node
        self.secret_file = secret_file
        self.control_port: int | None = None
        self.out_path = node + ".out"
        self.out = open(self.out_path, "ab")
        self.out_offset = self.out.tell()  # a restarted node appends: read only this run's lines
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "tools", *args, "--log-file", node + ".log"], cwd=_ROOT,
                                     stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def _find(self, needles) -> dict[str, str]:
        found: dict[str, str] = {}
        with open(self.out_path, "rb") as f:
            f.seek(self.out_offset)
            for line in f.read().decode("utf-8", errors="replace").splitlines():
                for n in needles:
                    if n in line and n not in found:
                        found[n] = line.strip()
        return found

    def wait_output(self, *needles: str, timeout: float = START_TIMEOUT_S) -> dict[str, str]:
        """The first output line containing each needle (waits for all of them)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self._find(needles)
            if len(found) == len(needles):
                return found
            if self.proc.poll() is not None:
                raise RuntimeError(f"walctl exited {self.proc.returncode} before printing {needles}: "
                                   f"see {self.out_path} and {self.node}.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"walctl did not print {needles} within {timeout:g} s: see {self.out_path}")
            time.sleep(0.02)

    def find_control_port(self) -> int | None:
        """The node's control (and replication) port once it has announced it."""
        if self.control_port is None:
            line = self._find([CONTROL_ANNOUNCEMENT]).get(CONTROL_ANNOUNCEMENT)
            if line is not None:
                self.control_port = _address(line)
        return self.control_port

    def control_target(self) -> str | None:
        """``unix:PATH`` or ``tcp:PORT`` once the node answers control requests, else None."""
        port = self.find_control_port()  # announced once control is up (the socket too, if any)
        if port is None:
            return None
        sock = os.path.join(self.node, "control.sock")
        return f"unix:{sock}" if os.path.exists(sock) else f"tcp:{port}"

    def control(self, timeout: float = 30.0):
        target = self.control_target()
        if target is None:
            raise RuntimeError(f"{self.node} has not announced its control port yet: see {self.out_path}")
        return _control_client(target, self.secret_file, timeout)

    def status(self, timeout: float = 30.0) -> dict:
        with self.control(timeout) as c:
            return c.call("status")

    def try_status(self) -> dict | None:
        """Status, or None while the node is not answering yet (raises if the process died)."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"walctl exited {self.proc.returncode}: see {self.out_path} and {self.node}.log")
        if self.find_control_port() is None:
            return None
        try:
            return self.status(timeout=10)
        except OSError:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


CONTROL_ANNOUNCEMENT = "replication and control on"


def _control_client(target: str, secret_file: str, timeout: float):
    from engine.cluster.control import ControlClient
    from engine.replication.secret import load_secret

    kind, _, where = target.partition(":")
    if kind == "unix":
        return ControlClient.unix(where, timeout=timeout)
    return ControlClient.tcp("127.0.0.1", int(where), load_secret(secret_file), timeout=timeout)


def _address(line: str) -> int:
    """The port at the end of an announcement such as '... listening on 127.0.0.1:2424'."""
    return int(line.rstrip().rsplit(":", 1)[1])


class _Master:
    def __init__(self, path: str, *, sync_replicas: int = 0, init: bool = True):
        if init:
            from engine.node import Node
            from engine.replication.secret import create_secret

            Node.init(path, name=os.path.basename(path)).close()
            create_secret(os.path.join(path, "replication.secret"))
        self.path = path
        self.secret = os.path.join(path, "replication.secret")
        self.proc = _Walctl(path, ["serve", path, "--lmtp", "127.0.0.1:0", "--listen", "127.0.0.1:0",
                                   "--sync-replicas", str(sync_replicas)], self.secret)
        try:
            lines = self.proc.wait_output("LMTP listening on", CONTROL_ANNOUNCEMENT)
        except BaseException:
            self.proc.stop()
            raise
        self.lmtp_port = _address(lines["LMTP listening on"])
        self.listen_port = _address(lines[CONTROL_ANNOUNCEMENT])

    def status(self) -> dict:
        return self.proc.status()

    def stop(self) -> None:
        self.proc.stop()


def _start_replica(master: _Master, path: str) -> _Walctl:
    return _Walctl(path, ["follow", path, "--master", f"127.0.0.1:{master.listen_port}", "--lmtp", "",
                          "--listen", "127.0.0.1:0", "--name", os.path.basename(path),
                          "--secret-file", master.secret], master.secret)


def _wait(predicate, what: str, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _wait_streaming(master: _Master, names: list[str], timeout: float = START_TIMEOUT_S) -> None:
    def ok():
        reps = {r["name"]: r for r in master.status().get("replicas", [])}
        return all(n in reps and reps[n]["connected"] for n in names)

    _wait(ok, f"replicas {names} to stream from the master", timeout)


def _wait_replica_streaming(replica: _Walctl, timeout: float = START_TIMEOUT_S) -> None:
    """Until the replica itself says it streams (the master already lists it while it is being seeded)."""
    def ok():
        st = replica.try_status()
        return st is not None and (st.get("connection") or {}).get("state") == "streaming"

    _wait(ok, f"replica {replica.node} to stream", timeout)


def _wait_caught_up(master: _Master, names: list[str], timeout: float = CONVERGE_TIMEOUT_S) -> dict:
    def ok():
        st = master.status()
        reps = {r["name"]: r for r in st.get("replicas", [])}
        if all(n in reps and reps[n]["durable_lsn"] >= st["last_lsn"] for n in names):
            return st
        return None

    return _wait(ok, f"replicas {names} to hold the master's last LSN", timeout, 0.01)


class _Cluster:
    """A fresh master (``walctl serve``) and ``replicas`` fresh replicas (``walctl follow``) under ``directory``."""

    def __init__(self, directory: str, *, replicas: int = 0, sync_replicas: int = 0):
        self.master = _Master(os.path.join(directory, "m"), sync_replicas=sync_replicas)
        self.replicas: list[_Walctl] = []
        try:
            for i in range(replicas):
                self.replicas.append(_start_replica(self.master, os.path.join(directory, f"r{i + 1}")))
            for r in self.replicas:
                _wait_replica_streaming(r)
            _wait_streaming(self.master, self.names)
        except BaseException:
            self.stop()
            raise

    @property
    def names(self) -> list[str]:
        return [os.path.basename(r.node) for r in self.replicas]

    def store_digests(self) -> dict[str, str]:
        """Node name -> its store's digest (MS-7), read once the store applied everything
        durable in its log: after :func:`_wait_caught_up`, equal on every node that holds
        the master's mail."""
        out = {}
        for name, proc in [(os.path.basename(self.master.path), self.master.proc)] + list(zip(self.names,
                                                                                               self.replicas)):
            with proc.control() as c:
                out[name] = c.call("digest")["store"]
        return out

    def stop(self) -> None:
        for r in self.replicas:
            r.stop()
        self.master.stop()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# -- 1. throughput -----------------------------------------------------------------------------

MODES = (
    ("alone", "master alone", 0, 0),
    ("async", "2 asynchronous replicas", 2, 0),
    ("sync", "2 replicas, --sync-replicas 1", 2, 1),
)


def _throughput_row(base: str, mode: str, replicas: int, sync: int, messages: int, connections: int,
                    tag: str) -> dict:
    d = tempfile.mkdtemp(prefix=f"t{mode[:2]}", dir=base)
    cluster = _Cluster(d, replicas=replicas, sync_replicas=sync)
    try:
        pids = [cluster.master.proc.proc.pid] + [r.proc.pid for r in cluster.replicas]
        cpu0 = [_cpu_seconds(p) for p in pids]
        load = bench_lmtp.lmtp_load("127.0.0.1", cluster.master.lmtp_port, connections, messages, tag=tag)
        t_end = time.monotonic()
        row = {"mode": mode, "replicas": replicas, "sync_replicas": sync, **load}
        if replicas:
            st = cluster.master.status()
            row["behind_at_end_records"] = max(r["lag_records"] for r in st["replicas"])
            _wait_caught_up(cluster.master, cluster.names)
            row["caught_up_after_s"] = time.monotonic() - t_end
        # CPU per delivery (until the replicas hold everything): what replication costs each process,
        # independent of how the machine's cores are shared between them.
        cpu = [_cpu_seconds(p) - c for p, c in zip(pids, cpu0)]
        ok = max(1, load["ok"])
        row["master_cpu_us_per_delivery"] = cpu[0] / ok * 1e6
        row["replica_cpu_us_per_delivery"] = [c / ok * 1e6 for c in cpu[1:]]
        row["store_digests"] = cluster.store_digests()
    finally:
        cluster.stop()
    shutil.rmtree(d, ignore_errors=True)
    return row


def bench_throughput(base: str, messages: int, rounds: int, connections: int = THROUGHPUT_CONNECTIONS,
                     say=lambda m: None) -> dict:
    rows: dict[str, list[dict]] = {m[0]: [] for m in MODES}
    for rnd in range(rounds):
        order = MODES if rnd % 2 == 0 else tuple(reversed(MODES))  # alternate against drift
        for mode, label, replicas, sync in order:
            say(f"throughput round {rnd + 1}/{rounds}: {label}, {connections} connections, {messages} messages")
            rows[mode].append(_throughput_row(base, mode, replicas, sync, messages, connections,
                                              tag=f"tp-{mode}-{rnd}-{time.time_ns()}"))
    out: dict = {"connections": connections, "messages": messages, "rounds": rounds, "rows": [], "all_rounds": rows}
    medians = {}
    for mode, label, replicas, sync in MODES:
        runs = sorted(rows[mode], key=lambda r: r["deliveries_per_s"])
        med = runs[len(runs) // 2]
        medians[mode] = med["deliveries_per_s"]
        out["rows"].append({"label": label, **med,
                            "min_deliveries_per_s": runs[0]["deliveries_per_s"],
                            "max_deliveries_per_s": runs[-1]["deliveries_per_s"]})
    alone = medians["alone"] or 1.0
    for r in out["rows"]:
        r["vs_alone"] = r["deliveries_per_s"] / alone
    out["async_vs_alone"] = medians["async"] / alone
    out["async_cost"] = 1.0 - out["async_vs_alone"]
    out["sync_vs_alone"] = medians["sync"] / alone
    # The master's own CPU per delivery (median over rounds): what replication adds on the master,
    # less sensitive than deliveries/s to how the shared cores are split between the processes.
    cpu = {mode: statistics.median(r["master_cpu_us_per_delivery"] for r in rows[mode]) for mode, *_ in MODES}
    out["master_cpu_us_per_delivery"] = cpu
    out["async_master_cpu_vs_alone"] = cpu["async"] / cpu["alone"] if cpu["alone"] else 0.0
    return out


# -- 2. lag under a burst ----------------------------------------------------------------------


def _guid_lsns(log_dir: str) -> dict[bytes, int]:
    """GUID -> LSN of every MessageAppended record of a (stopped) log."""
    from engine.store.events import MessageAppended, decode_event
    from wal import LogReader

    out: dict[bytes, int] = {}
    for rec in LogReader(log_dir).records(1):
        if rec.type == MessageAppended.TYPE:
            out[decode_event(rec.type, rec.payload).guid] = rec.lsn
    return out


def _start_poller(secret_file: str, targets: list[str], out_path: str, interval: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tools.bench_replication", "poll", out_path, repr(interval),
                             secret_file, *targets], cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    line = proc.stdout.readline().decode()
    if not line.startswith("polling"):
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(f"the lag poller did not start: {line!r} {err.decode(errors='replace')[-500:]}")
    return proc


def _stop_poller(proc: subprocess.Popen, out_path: str) -> dict:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode != 0 or not os.path.exists(out_path):
        raise RuntimeError(f"the lag poller failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    with open(out_path) as f:
        return json.load(f)


def lag_figures(timeline: list[tuple[float, int, bytes]], guid_lsn: dict[bytes, int],
                changes: list[list[float]]) -> dict:
    """Per-message lag on one replica from the client's 250 times and the poller's samples.

    ``changes`` are the poller's ``(t_lo, t_hi, durable_lsn)`` rows: the
    replica's durable LSN became ``durable_lsn`` after ``t_lo`` (the request
    time of the previous poll, which showed less) and no later than ``t_hi``
    (the reply time of the poll that showed it).
    """
    from engine.store.events import body_guid

    lsns = [c[2] for c in changes]
    lags, lows, windows = [], [], []
    before = missing = 0
    for t250, code, msg in timeline:
        if code != 250:
            continue
        lsn = guid_lsn.get(body_guid(msg))
        if lsn is None:
            missing += 1
            continue
        i = bisect.bisect_left(lsns, lsn)
        if i == len(lsns):
            missing += 1
            continue
        t_lo, t_hi, _ = changes[i]
        lag = t_hi - t250
        if lag < 0:
            before += 1
        lags.append(max(0.0, lag))
        lows.append(max(0.0, t_lo - t250))
        windows.append(t_hi - t_lo)
    return {
        "messages": len(lags),
        "not_seen": missing,
        "before_250": before,
        "p50_s": _percentile(lags, 0.50),
        "p99_s": _percentile(lags, 0.99),
        "max_s": max(lags, default=0.0),
        "mean_s": statistics.fmean(lags) if lags else 0.0,
        "p99_lower_bound_s": _percentile(lows, 0.99),
        "resolution_p50_s": _percentile(windows, 0.50),
        "resolution_p99_s": _percentile(windows, 0.99),
        "_lags": lags,
    }


def bench_lag(base: str, messages: int = LAG_MESSAGES, connections: int = LAG_CONNECTIONS,
              interval: float = POLL_INTERVAL_S) -> dict:
    d = tempfile.mkdtemp(prefix="lag", dir=base)
    cluster = _Cluster(d, replicas=2)
    timeline: list = []
    try:
        out_path = os.path.join(d, "poll.json")
        poller = _start_poller(cluster.master.secret, [r.control_target() for r in cluster.replicas], out_path,
                               interval)
        try:
            load = bench_lmtp.lmtp_load("127.0.0.1", cluster.master.lmtp_port, connections, messages,
                                        tag=f"lag-{time.time_ns()}", timeline=timeline)
            t_end = time.monotonic()
            _wait_caught_up(cluster.master, cluster.names)
            caught_up_s = time.monotonic() - t_end
            time.sleep(max(0.05, 5 * interval))
        finally:
            polled = _stop_poller(poller, out_path)
    finally:
        cluster.stop()
    guid_lsn = _guid_lsns(os.path.join(cluster.master.path, "log.wal"))
    per = []
    every: list[float] = []
    for name, changes, polls, span in zip(cluster.names, polled["changes"], polled["polls"], polled["spans"]):
        fig = lag_figures(timeline, guid_lsn, changes)
        every += fig.pop("_lags")
        fig.update(replica=name, polls=polls, polls_per_s=polls / span if span else 0.0)
        per.append(fig)
    shutil.rmtree(d, ignore_errors=True)
    return {
        "messages": messages,
        "connections": connections,
        "poll_interval_s": interval,
        "ok": load["ok"],
        "errors": load["errors"],
        "deliveries_per_s": load["deliveries_per_s"],
        "master_p50_ms": load["p50_ms"],
        "master_p99_ms": load["p99_ms"],
        "caught_up_after_burst_s": caught_up_s,
        "replicas": per,
        "p50_s": _percentile(every, 0.50),
        "p99_s": _percentile(every, 0.99),
        "max_s": max(every, default=0.0),
    }


def poll_main(out_path: str, interval: float, secret_file: str, targets: list[str]) -> int:
    """The lag poller child: durable LSN of each replica, as fast as ``interval`` allows, until SIGTERM.

    ``targets`` are ``unix:PATH`` or ``tcp:PORT``. Writes
    ``{"changes": [[[t_lo, t_hi, lsn], ...] per target], "polls": [...], "spans": [...]}``
    (monotonic seconds) to ``out_path``.
    """
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    clients = [_control_client(t, secret_file, 30) for t in targets]
    n = len(clients)
    changes: list[list[list[float]]] = [[] for _ in range(n)]
    last: list[int | None] = [None] * n
    prev_t: list[float | None] = [None] * n
    polls = [0] * n
    first = time.monotonic()
    print("polling", flush=True)
    while not stop.is_set():
        for i, c in enumerate(clients):
            t_send = time.monotonic()
            lsn = c.call("status")["durable_lsn"]
            t_recv = time.monotonic()
            if lsn != last[i]:
                changes[i].append([prev_t[i] if prev_t[i] is not None else t_send, t_recv, lsn])
                last[i] = lsn
            prev_t[i] = t_send
            polls[i] += 1
        time.sleep(interval)
    span = time.monotonic() - first
    for c in clients:
        c.close()
    with open(out_path, "w") as f:
        json.dump({"changes": changes, "polls": polls, "spans": [span] * n}, f)
    return 0


# -- 3. late start -----------------------------------------------------------------------------


def _time_replica(master_lsn: int, replica: _Walctl, poll_s: float, timeout: float) -> dict:
    """Seconds from the replica's Popen until it answers, streams, holds ``master_lsn`` durably, applies it."""
    t0 = replica.started
    out: dict = {}
    deadline = t0 + timeout
    while True:
        st = replica.try_status()
        now = time.monotonic()
        if st is not None:
            out.setdefault("control_up_s", now - t0)
            conn = st.get("connection") or {}
            if conn.get("state") == "streaming":
                out.setdefault("streaming_s", now - t0)
            if st["durable_lsn"] >= master_lsn:
                out.setdefault("durable_s", now - t0)
            if st["applied_lsn"] >= master_lsn:
                out.setdefault("applied_s", now - t0)
            if "durable_s" in out and "applied_s" in out:
                out.setdefault("streaming_s", out["durable_s"])
                return out
        if now > deadline:
            raise RuntimeError(f"replica {replica.node} did not reach LSN {master_lsn} within {timeout:g} s: {st}")
        time.sleep(poll_s)


def _startup_floor() -> float:
    """Seconds for ``walctl --version``: the interpreter and the command line's imports."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "tools", "--version"], cwd=_ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"walctl --version exited {p.returncode}: {p.stderr[-500:]}")
    return seconds


def bench_late_start(base: str, messages: int = LATE_MESSAGES, runs: int = LATE_RUNS) -> dict:
    d = tempfile.mkdtemp(prefix="late", dir=base)
    cluster = _Cluster(d, replicas=0)
    results = []
    try:
        load = bench_lmtp.lmtp_load("127.0.0.1", cluster.master.lmtp_port, 8, messages, tag=f"late-{time.time_ns()}")
        master_lsn = cluster.master.status()["last_lsn"]
        for k in range(runs):
            replica = _start_replica(cluster.master, os.path.join(d, f"late{k + 1}"))
            try:
                results.append(_time_replica(master_lsn, replica, LATE_POLL_S, CONVERGE_TIMEOUT_S))
            finally:
                replica.stop()
    finally:
        cluster.stop()
    shutil.rmtree(d, ignore_errors=True)
    durable = sorted(r["durable_s"] for r in results)
    return {
        "messages": messages,
        "delivered": load["ok"],
        "master_lsn": master_lsn,
        "runs": results,
        "durable_median_s": durable[len(durable) // 2],
        "durable_worst_s": durable[-1],
        "startup_floor_s": _startup_floor(),
    }


# -- 4. catch-up ---------------------------------------------------------------------------------


def _grow(node_path: str, add_bytes: int, threads: int = CATCHUP_THREADS) -> dict:
    """Append ~``add_bytes`` of 4 KiB message records to a stopped node with Node.deliver_many from threads."""
    from engine.node import Node

    node = Node.open(node_path)
    try:
        target = node.log.size_bytes() + add_bytes
        targets = [(f"user/c{i}/INBOX", ()) for i in range(CATCHUP_MAILBOXES)]
        node.deliver_many(targets, bench_lmtp.bench_message("catchup-create"), create=True)
        t0 = time.perf_counter()

        def work(k: int) -> None:
            i = 0
            while node.log.size_bytes() < target:
                node.deliver_many(targets, bench_lmtp.bench_message(f"catchup-{k}-{i}"))
                i += 1

        ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        seconds = time.perf_counter() - t0
        return {"last_lsn": node.log.last_lsn, "log_bytes": node.log.size_bytes(), "build_s": seconds}
    finally:
        node.close()


def bench_raw_copy(log_dir: str, dest_dir: str, sync_bytes: int = 8 * MIB) -> dict:
    """A second catch-up ceiling: read + blake3 the segments, write them to one file, fdatasync every ``sync_bytes``.

    The least any replica does with the same bytes (a replica appends and
    fdatasyncs each batch of up to 8 MiB, REP-11).
    """
    import blake3

    buf = bytearray(MIB)
    view = memoryview(buf)
    path = os.path.join(dest_dir, "raw-copy.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    total = unsynced = 0
    t0 = time.perf_counter()
    try:
        for seg in bench_wal._segment_files(log_dir):
            hasher = blake3.blake3()
            with open(seg, "rb", buffering=0) as f:
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    hasher.update(view[:n])
                    chunk = view[:n]
                    while chunk:
                        chunk = chunk[os.write(fd, chunk):]
                    total += n
                    unsynced += n
                    if unsynced >= sync_bytes:
                        os.fdatasync(fd)
                        unsynced = 0
            hasher.digest()
        os.fdatasync(fd)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    return {"bytes": total, "seconds": seconds, "mb_per_s": total / seconds / 1e6, "sync_bytes": sync_bytes}


def bench_raw_read(log_dir: str) -> dict:
    """The plain read rate of the segment files: 1 MiB ``readinto`` calls, no hashing (warm cache)."""
    buf = bytearray(MIB)
    total = 0
    t0 = time.perf_counter()
    for seg in bench_wal._segment_files(log_dir):
        with open(seg, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                total += n
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": seconds, "mb_per_s": total / seconds / 1e6}


def bench_catchup(base: str, catchup_mib: float, say=lambda m: None) -> dict:
    d = tempfile.mkdtemp(prefix="cu", dir=base)
    master_path, replica_path = os.path.join(d, "m"), os.path.join(d, "r1")
    master = _Master(master_path)
    try:  # a replica that follows, then stops
        replica = _start_replica(master, replica_path)
        try:
            _wait_replica_streaming(replica)
            _wait_streaming(master, ["r1"])
            _wait_caught_up(master, ["r1"])
        finally:
            replica.stop()
    finally:
        master.stop()
    from wal import Log

    with Log.open(os.path.join(replica_path, "log.wal")) as lg:
        replica_lsn, replica_bytes = lg.last_lsn, lg.size_bytes()
    say(f"catch-up: growing the master's log by {catchup_mib:g} MiB (Node.deliver_many, {CATCHUP_THREADS} threads)")
    built = _grow(master_path, int(catchup_mib * MIB))
    master = _Master(master_path, init=False)
    try:
        st = master.status()
        target = st["last_lsn"]
        log_dir = os.path.join(master_path, "log.wal")
        behind_bytes = st["log_bytes"] - replica_bytes
        say("catch-up: raw read + blake3 of the master's log (ceiling)")
        raw = bench_wal.bench_raw_read_hash(log_dir)
        say(f"catch-up: replica {behind_bytes / MIB:,.0f} MiB ({target - replica_lsn:,} records) behind")
        replica = _start_replica(master, replica_path)
        try:
            timing = _time_replica(target, replica, CATCHUP_POLL_S, CONVERGE_TIMEOUT_S)
        finally:
            replica.stop()
        raw_after = bench_wal.bench_raw_read_hash(log_dir)
        plain = bench_raw_read(log_dir)
        pieces = bench_wal.bench_raw_read_hash_pieces(log_dir, MESSAGE_BYTES + 64)
        copy = bench_raw_copy(log_dir, d)
    finally:
        master.stop()
    shutil.rmtree(d, ignore_errors=True)
    ceiling = max(raw["mb_per_s"], raw_after["mb_per_s"])  # the faster of two reads: the stricter ceiling
    behind_records = target - replica_lsn
    from_start = behind_bytes / timing["durable_s"] / 1e6
    streaming_s = max(1e-9, timing["durable_s"] - timing["streaming_s"])
    while_streaming = behind_bytes / streaming_s / 1e6
    return {
        "catchup_mib": catchup_mib,
        "behind_bytes": behind_bytes,
        "behind_records": behind_records,
        "build": built,
        "replica": timing,
        "definition": "log bytes the replica was behind, durable in its own log, per second from its Popen "
                      "(mb_per_s) or from streaming (mb_per_s_while_streaming); store apply timed separately",
        "mb_per_s": from_start,
        "records_per_s": behind_records / timing["durable_s"],
        "mb_per_s_while_streaming": while_streaming,
        "records_per_s_while_streaming": behind_records / streaming_s,
        "applied_mb_per_s": behind_bytes / timing["applied_s"] / 1e6,
        "applied_records_per_s": behind_records / timing["applied_s"],
        "raw_read_hash_mb_per_s": ceiling,
        "raw_read_hash_runs": [raw, raw_after],
        "raw_read_mb_per_s": plain["mb_per_s"],
        "raw_per_record_hash_mb_per_s": pieces["mb_per_s"],
        "ratio_vs_raw": from_start / ceiling,
        "ratio_vs_raw_while_streaming": while_streaming / ceiling,
        "ratio_vs_raw_per_record": from_start / pieces["mb_per_s"],
        "raw_copy_mb_per_s": copy["mb_per_s"],
        "ratio_vs_raw_copy": from_start / copy["mb_per_s"],
        "ratio_vs_raw_copy_while_streaming": while_streaming / copy["mb_per_s"],
    }


# -- the whole run ---------------------------------------------------------------------------------


def _goal(name: str, value: float, met: bool) -> dict:
    desc, target = GOALS[name]
    return {"goal": name, "description": desc, "target": target, "value": value, "met": met}


def run_replication_bench(directory: str | None = None, *, messages: int = 5000, rounds: int = 3,
                          lag_messages: int = LAG_MESSAGES, late_messages: int = LATE_MESSAGES,
                          late_runs: int = LATE_RUNS, catchup_mib: float = CATCHUP_MIB, progress=None) -> dict:
    say = progress or (lambda msg: None)
    base = tempfile.mkdtemp(prefix="mwr", dir=directory)
    report: dict = {"machine": machine_info(base), "message_bytes": MESSAGE_BYTES,
                    "loadavg": {"start": _loadavg()}}
    try:
        report["throughput"] = bench_throughput(base, messages, rounds, say=say)
        report["loadavg"]["after_throughput"] = _loadavg()
        say(f"lag: burst of {lag_messages} messages from {LAG_CONNECTIONS} connections, 2 asynchronous replicas")
        report["lag"] = bench_lag(base, lag_messages)
        report["loadavg"]["after_lag"] = _loadavg()
        say(f"late start: a new replica after {late_messages} deliveries ({late_runs} runs)")
        report["late_start"] = bench_late_start(base, late_messages, late_runs)
        report["loadavg"]["after_late_start"] = _loadavg()
        report["catchup"] = bench_catchup(base, catchup_mib, say=say)
        report["loadavg"]["end"] = _loadavg()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    tp, lag, late, cu = report["throughput"], report["lag"], report["late_start"], report["catchup"]
    report["goals"] = [
        _goal("async_replicas_cost", tp["async_cost"], tp["async_cost"] <= GOALS["async_replicas_cost"][1]),
        _goal("lag_p99_s", lag["p99_s"], lag["p99_s"] < GOALS["lag_p99_s"][1]),
        _goal("late_start_s", late["durable_worst_s"], late["durable_worst_s"] <= GOALS["late_start_s"][1]),
        _goal("catchup_ratio", cu["ratio_vs_raw"], cu["ratio_vs_raw"] >= GOALS["catchup_ratio"][1]),
    ]
    report["anchors"] = ANCHORS
    return report


# -- rendering and the click command ---------------------------------------------------------------


def _goal_value(g: dict) -> str:
    if g["goal"] == "lag_p99_s":
        return f"{g['value'] * 1000:.1f} ms"
    if g["goal"] == "late_start_s":
        return f"{g['value']:.2f} s"
    return percent(g["value"])


def _stores_equal(row: dict) -> str:
    digests = row.get("store_digests") or {}
    if len(digests) < 2:
        return "-"
    return "yes" if len(set(digests.values())) == 1 else "NO"


def bench_report(report: dict) -> BenchReport:
    """The tables of a :func:`run_replication_bench` report."""
    out = BenchReport(Stamp.capture(report["machine"]))
    la = report["loadavg"]
    out.line(f"load average at start {la['start'][0]:.2f}, at end {la.get('end', ['?'])[0]}")
    tp = report["throughput"]
    t = out.table(f"1. LMTP throughput: {report['message_bytes']} B messages, {tp['connections']} connections, "
                  f"{tp['messages']:,} per run, median of {tp['rounds']} rounds",
                  ["master", "deliveries/s", "min..max", "vs alone", "p50 ms", "p99 ms", "errors",
                   "replicas behind at end", "caught up after", "master CPU µs/msg", "replica CPU µs/msg",
                   "stores equal"])
    for r in tp["rows"]:
        t.add_row(r["label"], f"{r['deliveries_per_s']:,.0f}",
                  f"{r['min_deliveries_per_s']:,.0f}..{r['max_deliveries_per_s']:,.0f}", percent(r["vs_alone"]),
                  f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", str(sum(r["errors"].values())) if r["errors"] else "0",
                  f"{r['behind_at_end_records']:,} rec" if "behind_at_end_records" in r else "-",
                  f"{r['caught_up_after_s']:.2f} s" if "caught_up_after_s" in r else "-",
                  f"{r['master_cpu_us_per_delivery']:,.0f}",
                  ", ".join(f"{c:,.0f}" for c in r["replica_cpu_us_per_delivery"]) or "-", _stores_equal(r))
    cpu = tp["master_cpu_us_per_delivery"]
    out.line(f"master CPU per delivery (median of rounds): alone {cpu['alone']:,.0f} µs, 2 async replicas "
             f"{cpu['async']:,.0f} µs ({percent(tp['async_master_cpu_vs_alone'])}), sync {cpu['sync']:,.0f} µs")
    lag = report["lag"]
    lt = out.table(f"2. replication lag: 250 to durable on the replica, burst of {lag['messages']:,} messages "
                   f"from {lag['connections']} connections ({lag['deliveries_per_s']:,.0f} deliveries/s; "
                   f"master p50 {lag['master_p50_ms']:.1f} ms, p99 {lag['master_p99_ms']:.1f} ms)",
                   ["replica", "messages", "p50 ms", "p99 ms", "max ms", "p99 lower bound ms", "durable before 250",
                    "resolution p50/p99 ms", "polls/s"])
    for r in lag["replicas"]:
        lt.add_row(r["replica"], f"{r['messages']:,}", f"{r['p50_s'] * 1000:.1f}", f"{r['p99_s'] * 1000:.1f}",
                   f"{r['max_s'] * 1000:.1f}", f"{r['p99_lower_bound_s'] * 1000:.1f}", f"{r['before_250']:,}",
                   f"{r['resolution_p50_s'] * 1000:.1f}/{r['resolution_p99_s'] * 1000:.1f}", f"{r['polls_per_s']:,.0f}")
    lt.add_row("both", "", f"{lag['p50_s'] * 1000:.1f}", f"{lag['p99_s'] * 1000:.1f}", f"{lag['max_s'] * 1000:.1f}",
               "", "", "", "")
    late = report["late_start"]
    st = out.table(f"3. late start: new replica after {late['messages']} deliveries (master LSN "
                   f"{late['master_lsn']}); seconds from process start "
                   f"(walctl start-up floor {late['startup_floor_s']:.2f} s)",
                   ["run", "control up", "streaming", "durable = master", "applied = master"])
    for i, r in enumerate(late["runs"], 1):
        st.add_row(f"run {i}", f"{r['control_up_s']:.2f}", f"{r['streaming_s']:.2f}", f"{r['durable_s']:.2f}",
                   f"{r['applied_s']:.2f}")
    cu = report["catchup"]
    ct = out.table(f"4. catch-up: replica {cu['behind_bytes'] / MIB:,.0f} MiB ({cu['behind_records']:,} records) "
                   f"behind; master log built in {cu['build']['build_s']:.1f} s; rate = bytes durable in the "
                   f"replica's log per second",
                   ["pass", "seconds", "MB/s", "records/s", "vs raw read+blake3", "vs raw copy"])
    for label, row in _catchup_rows(cu):
        ct.add_row(label, *row)
    gt = out.table("goals", ["goal", "measured", "met", Column("anchors", figures=False)])
    for g in report["goals"]:
        anchors = ", ".join(f"{k} {v:g} s" for k, v in report["anchors"].get(g["goal"], {}).items())
        gt.add_row(g["description"], _goal_value(g), "yes" if g["met"] else "NO", anchors)
    return out


def _catchup_rows(cu: dict) -> list[tuple[str, tuple[str, ...]]]:
    """The catch-up table's rows: the ceilings, then the replica (durable, then applied)."""
    ceiling, copy = cu["raw_read_hash_mb_per_s"], cu["raw_copy_mb_per_s"]
    rep = cu["replica"]
    rows = []
    if "raw_read_mb_per_s" in cu:
        rows.append(("raw read, 1 MiB calls, no hashing", ("", f"{cu['raw_read_mb_per_s']:,.0f}", "",
                                                          percent(cu["raw_read_mb_per_s"] / ceiling), "")))
    rows += [
        ("raw read + blake3, 1 MiB calls (the goal's ceiling)", ("", f"{ceiling:,.0f}", "", "100%", "")),
        ("raw read + blake3 per 4 KiB record", ("", f"{cu['raw_per_record_hash_mb_per_s']:,.0f}", "",
                                                percent(cu["raw_per_record_hash_mb_per_s"] / ceiling), "")),
        ("raw copy: read + blake3 + write + fdatasync per 8 MiB", ("", f"{copy:,.0f}", "", percent(copy / ceiling),
                                                                   "100%")),
        ("replica: Popen to durable = master (the goal's rate)",
         (f"{rep['durable_s']:.1f}", f"{cu['mb_per_s']:,.0f}", f"{cu.get('records_per_s', 0):,.0f}",
          percent(cu["ratio_vs_raw"], 1), percent(cu["mb_per_s"] / copy))),
        ("replica: streaming to durable = master",
         (f"{rep['durable_s'] - rep['streaming_s']:.1f}", f"{cu['mb_per_s_while_streaming']:,.0f}",
          f"{cu.get('records_per_s_while_streaming', 0):,.0f}", percent(cu["ratio_vs_raw_while_streaming"], 1),
          percent(cu["mb_per_s_while_streaming"] / copy))),
        ("replica's store: Popen to applied = master (not the goal)",
         (f"{rep['applied_s']:.1f}", f"{cu['applied_mb_per_s']:,.0f}", f"{cu.get('applied_records_per_s', 0):,.0f}",
          "", "")),
    ]
    return rows


def render_markdown(report: dict) -> str:
    """The report as markdown tables, stamped (the benchmark pages of the docs)."""
    return bench_report(report).markdown()


def _make_command():
    import click

    from .cliutil import CONTEXT_SETTINGS

    @click.command(name="replication", context_settings=CONTEXT_SETTINGS)
    @click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of tables.")
    @click.option("--markdown", is_flag=True, help="Print README-ready markdown tables instead.")
    @click.option("--messages", type=click.IntRange(min=1), default=5000, show_default=True,
                  help="Messages per throughput run (64 connections).")
    @click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
                  help="Throughput rounds (the three setups alternate); the median round is reported.")
    @click.option("--lag-messages", type=click.IntRange(min=1), default=LAG_MESSAGES, show_default=True,
                  help="Messages in the lag burst (8 connections).")
    @click.option("--late-messages", type=click.IntRange(min=1), default=LATE_MESSAGES, show_default=True,
                  help="Messages the master holds before a new replica starts.")
    @click.option("--late-runs", type=click.IntRange(min=1), default=LATE_RUNS, show_default=True,
                  help="New replicas started one after another for the late-start figure (worst is the goal).")
    @click.option("--catchup-mib", type=click.FloatRange(min=0.0, min_open=True), default=CATCHUP_MIB,
                  show_default=True, help="How far behind (MiB of log) the catch-up replica is.")
    @click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
                  help="Where the scratch nodes go (the disk under test). Default: the system temp dir.")
    def bench_replication(as_json, markdown, messages, rounds, lag_messages, late_messages, late_runs, catchup_mib,
                          directory):
        """Benchmark replication: master throughput, lag, late start, catch-up.

        Starts real `walctl serve` and `walctl follow` processes on 127.0.0.1
        and measures: LMTP deliveries/s of 4 KiB messages from 64 connections
        to a master alone, with two asynchronous replicas, and with
        --sync-replicas 1; the lag from each message's 250 until it is durable
        on each replica under a 2,000-message burst (replicas' durable LSN
        polled on their control sockets); how long a replica started after
        100 deliveries takes to hold them; and the catch-up rate of a replica
        --catchup-mib behind, next to reading and hashing the same log raw.
        Scratch nodes are deleted afterwards.

        \b
        Example:
            walctl bench replication --dir /var/lib/mailwal
            walctl bench replication --json --messages 200 --catchup-mib 8 | jq '.goals'
        """
        if directory:
            os.makedirs(directory, exist_ok=True)
        report = run_replication_bench(directory, messages=messages, rounds=rounds, lag_messages=lag_messages,
                                       late_messages=late_messages, late_runs=late_runs, catchup_mib=catchup_mib,
                                       progress=progress_printer())
        print_report(report, bench_report, as_json=as_json, markdown=markdown)

    return bench_replication


bench_replication_command = _make_command()


def main(argv: list[str]) -> int:
    """``python -m tools.bench_replication poll OUT INTERVAL SECRET_FILE unix:PATH|tcp:PORT...``: the lag poller."""
    if len(argv) < 5 or argv[0] != "poll":
        print("usage: python -m tools.bench_replication poll OUT INTERVAL SECRET_FILE unix:PATH|tcp:PORT...",
              file=sys.stderr)
        return 2
    return poll_main(argv[1], float(argv[2]), argv[3], argv[4:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
