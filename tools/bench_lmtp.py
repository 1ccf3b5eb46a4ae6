"""``walctl bench lmtp``: LMTP delivery throughput and latency, with ceilings from the same run.

What one run measures (all on 127.0.0.1, 4 KiB messages, one recipient each,
all to one mailbox, like the Cyrus/Dovecot anchors' "c=8, 1 mailbox"):

* **mailwal**: ``walctl serve`` (a fresh node per connection count) under
  1, 8 and 64 concurrent LMTP connections: deliveries/s and p50/p99 latency
  from MAIL FROM to the final 250, plus the log's average batch (records per
  fdatasync, counted from the frames' batch markers afterwards).
* **maildir**: the same LMTP front (engine/server.py) over a Maildir-style
  writer: write to tmp/, fsync the file, rename into new/, fsync the
  directory. What a classic delivery agent pays per message.
* **null**: the same LMTP front over a backend that stores nothing (the
  protocol's own ceiling), and **aiosmtpd**: aiosmtpd's LMTP server with a
  handler that stores nothing. These two decide the LMTP implementation.
* **raw ceiling**: ``os.write`` + ``os.fdatasync`` in a loop at the batch size
  the log achieved, on the same disk (``tools.bench_wal.bench_raw_sync``).
* **Node API**: ``Node.deliver`` from 1, 8 and 64 threads, no LMTP, against
  the raw ceiling at its own batch size.
* **profile**: py-spy samples of the mailwal server under the 64-connection
  load (only the threads holding the GIL), summarised by component.

The load client is Postfix's ``smtp-source`` when installed (C, no
pipelining, throughput only) and always the asyncio client of
:mod:`tools.lmtp_client` (pipelines MAIL/RCPT/DATA; :func:`lmtp_load` times
each message). ``--target``
points the asyncio client (and smtp-source) at any LMTP server instead.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from . import bench_wal
from .bench_report import BenchReport, Stamp, machine_info, percent, print_report, progress_printer
from .lmtp_client import PipeliningLmtpClient

__all__ = ["bench_lmtp_command", "run_lmtp_bench", "lmtp_load", "smtp_source_load", "MaildirBackend", "NullBackend",
           "bench_report", "render_markdown", "main"]

MESSAGE_BYTES = 4096
CONNECTIONS = (1, 8, 64)
RCPT = "bench@example.com"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_message(tag: str, size: int = MESSAGE_BYTES) -> bytes:
    """A distinct message of exactly ``size`` octets, CRLF lines, no line starting with '.'."""
    head = f"From: <bench@localhost>\r\nTo: <{RCPT}>\r\nMessage-ID: <{tag}@bench>\r\nSubject: {tag}\r\n\r\n".encode()
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopqrstuvwxyz\r\n"
    out = bytearray(head)
    while len(out) + len(line) <= size - 2:
        out += line
    out += b"x" * (size - 2 - len(out)) + b"\r\n"
    return bytes(out)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# -- the asyncio LMTP load client -----------------------------------------------------------


async def _connection(host: str, port: int, messages: list[bytes], rcpt: str, latencies: list[float],
                      codes: collections.Counter, timeline: list | None = None) -> None:
    client = await PipeliningLmtpClient.connect(host, port, local_hostname="bench.localhost")
    try:
        for msg in messages:
            t0 = time.perf_counter()
            reply = (await client.deliver("bench@localhost", [rcpt], msg))[rcpt]  # one write, three replies
            codes[reply.code] += 1
            if not reply.after_data:
                continue
            latencies.append(time.perf_counter() - t0)
            if timeline is not None:
                timeline.append((time.monotonic(), reply.code, msg))
    finally:
        await client.close()


def lmtp_load(host: str, port: int, connections: int, messages: int, *, size: int = MESSAGE_BYTES,
              rcpt: str = RCPT, tag: str = "", timeline: list | None = None) -> dict:
    """Deliver ``messages`` distinct messages over ``connections`` connections; time each one.

    ``timeline``, if given, receives ``(time.monotonic() when the final reply was read, its code,
    the message bytes)`` per message (``walctl bench replication`` matches them to LSNs).
    """
    tag = tag or f"{os.getpid()}-{time.time_ns()}"
    per = [[] for _ in range(connections)]
    for i in range(messages):
        per[i % connections].append(bench_message(f"{tag}-{i}", size))
    latencies: list[float] = []
    codes: collections.Counter = collections.Counter()

    async def run():
        await asyncio.gather(*(_connection(host, port, m, rcpt, latencies, codes, timeline) for m in per if m))

    t0 = time.perf_counter()
    asyncio.run(run())
    seconds = time.perf_counter() - t0
    ok = codes.get(250, 0)
    return {
        "client": "asyncio",
        "connections": connections,
        "messages": messages,
        "ok": ok,
        "errors": {str(k): v for k, v in codes.items() if k != 250},
        "seconds": seconds,
        "deliveries_per_s": ok / seconds if seconds else 0.0,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
    }


def smtp_source_load(host: str, port: int, connections: int, messages: int, *, size: int = MESSAGE_BYTES,
                     rcpt: str = RCPT) -> dict | None:
    """Postfix's smtp-source as the load client (throughput only); None when it is not installed."""
    exe = shutil.which("smtp-source") or ("/usr/sbin/smtp-source" if os.path.exists("/usr/sbin/smtp-source") else None)
    if exe is None:
        return None
    header_bytes = 150  # smtp-source adds From/To/Date/Message-Id headers to -l payload octets
    cmd = [exe, "-L", "-d", "-s", str(connections), "-m", str(messages), "-l", str(max(1, size - header_bytes)),
           "-f", "bench@localhost", "-t", rcpt, "-M", "localhost", f"{host}:{port}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, timeout=600)
    seconds = time.perf_counter() - t0
    return {
        "client": "smtp-source",
        "connections": connections,
        "messages": messages,
        "ok": messages if proc.returncode == 0 else 0,
        "errors": {} if proc.returncode == 0 else {"smtp-source": proc.stderr.decode(errors="replace")[-300:]},
        "seconds": seconds,
        "deliveries_per_s": messages / seconds if proc.returncode == 0 else 0.0,
    }


# -- servers behind the same LMTP front ------------------------------------------------------


class NullBackend:
    """Stores nothing: the LMTP front's own ceiling."""

    role = "master"

    def __init__(self):
        self.uid = 0

    def mailbox_exists(self, name: str) -> bool:
        return True

    async def deliver_many(self, targets, body, *, create=False):
        from engine.node import Receipt

        out = []
        for mailbox, _ in targets:
            self.uid += 1
            out.append(Receipt(mailbox, 1, self.uid, "0" * 64, 0))
        return out


class MaildirBackend:
    """Maildir delivery: tmp/ file, fsync it, rename into new/, fsync new/ (one thread per delivery)."""

    role = "master"

    def __init__(self, root: str, threads: int = 256):
        import anyio

        self.root = root
        self.limiter = anyio.CapacityLimiter(threads)
        self.counter = 0
        self.lock = threading.Lock()
        self.host = os.uname().nodename
        self.made: set[str] = set()

    def mailbox_exists(self, name: str) -> bool:
        return True

    def _dir(self, mailbox: str) -> str:
        d = os.path.join(self.root, "." + mailbox.replace("/", "."))
        if d not in self.made:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(d, sub), exist_ok=True)
            self.made.add(d)
        return d

    def _deliver(self, targets, body):
        from engine.store.events import body_guid
        from engine.node import Receipt

        guid = body_guid(body).hex()
        out = []
        for mailbox, _ in targets:
            d = self._dir(mailbox)
            with self.lock:
                self.counter += 1
                n = self.counter
            name = f"{time.time_ns()}.P{os.getpid()}Q{n}.{self.host}"
            tmp, new = os.path.join(d, "tmp", name), os.path.join(d, "new", name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, new)
            dfd = os.open(os.path.join(d, "new"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            out.append(Receipt(mailbox, 1, n, guid, 0))
        return out

    async def deliver_many(self, targets, body, *, create=False):
        import anyio

        return await anyio.to_thread.run_sync(self._deliver, targets, body, limiter=self.limiter)


def _serve_variant(kind: str, directory: str) -> None:
    """Child process: the LMTP front over a Maildir or null backend, or aiosmtpd; until SIGTERM."""
    if kind == "aiosmtpd":
        _serve_aiosmtpd()
        return
    import anyio

    from engine.lmtp import LmtpConfig, LmtpServer

    backend = MaildirBackend(directory) if kind == "maildir" else NullBackend()

    async def main():
        server = LmtpServer(backend, LmtpConfig(port=0))
        host, port = await server.start()
        print(f"{kind} LMTP listening on {host}:{port}", flush=True)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        await server.drain(5)

    anyio.run(main)


def _serve_aiosmtpd() -> None:
    import socket

    from aiosmtpd.lmtp import LMTP

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 OK"

    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: LMTP(Handler(), hostname="bench"), "127.0.0.1", 0)
        host, port = srv.sockets[0].getsockname()[:2]
        print(f"aiosmtpd LMTP listening on {host}:{port}", flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        srv.close()

    del socket
    asyncio.run(main())


class _Server:
    """A benchmark server child: ``walctl serve`` or a variant of this module."""

    def __init__(self, kind: str, directory: str):
        self.kind = kind
        self.directory = directory
        if kind == "mailwal":
            from engine.node import Node

            self.node = os.path.join(directory, "n")
            Node.init(self.node).close()
            cmd = [sys.executable, "-m", "tools", "serve", self.node, "--lmtp", "127.0.0.1:0",
                   "--log-file", os.path.join(directory, "deliveries.log")]
        else:
            cmd = [sys.executable, "-m", "tools.bench_lmtp", kind, directory]
        self.errlog = open(os.path.join(directory, "server.stderr"), "wb")
        self.proc = subprocess.Popen(cmd, cwd=_ROOT, stdout=subprocess.PIPE, stderr=self.errlog,
                                     stdin=subprocess.DEVNULL)
        line = ""
        for _ in range(20):  # services may announce themselves first
            line = self.proc.stdout.readline().decode()
            if not line or "listening on" in line:
                break
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"{kind} server did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.errlog.close()


def log_batches(log_dir: str) -> dict:
    """Records, fdatasync batches and bytes of a log (frames with batch_back == 0 start a batch)."""
    from wal.format import FRAME_HEADER_SIZE, SEGMENT_HEADER_SIZE
    from wal.framewalk import walk_frames
    from wal.segment import list_segments

    records = batches = 0
    size = 0
    for _first, name in list_segments(log_dir):
        for frame in walk_frames(os.path.join(log_dir, name), SEGMENT_HEADER_SIZE):
            records += 1
            batches += frame[5] == 0
            size += FRAME_HEADER_SIZE + frame[1]
    return {"records": records, "batches": batches, "avg_batch": records / batches if batches else 0.0,
            "bytes_per_record": size / records if records else 0.0}


# -- profile ---------------------------------------------------------------------------------

_CATEGORIES = [
    ("LMTP protocol (engine/lmtp.py)", ("engine/lmtp.py",)),
    ("LMTP transport + delivery log (engine/server.py, logging)", ("engine/server.py", "logging/")),
    ("asyncio event loop and sockets", ("asyncio/", "selectors.py")),
    ("thread hand-off (anyio to_thread, threading, queue)", ("anyio/", "threading.py", "queue.py",
                                                              "concurrent/")),
    ("planning + events (engine/node.py, state.py, events.py, cbor2)", ("engine/node.py", "engine/state.py",
                                                                         "engine/events.py", "cbor2", "wal/codec.py")),
    ("log: hash, frame, write, fdatasync (wal/)", ("wal/",)),
    ("store apply, SQLite (engine/store.py)", ("engine/store.py", "sqlite")),
]


def _categorise(frame: str) -> str:
    for name, needles in _CATEGORIES:
        if any(n in frame for n in needles):
            return name
    return "other"


def summarise_pyspy(raw_path: str, top: int = 12) -> dict:
    """Collapsed py-spy stacks -> samples per component (innermost known frame) and top functions."""
    per_cat: collections.Counter = collections.Counter()
    per_func: collections.Counter = collections.Counter()
    total = 0
    with open(raw_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            total += n
            inner = frames[-1]
            per_func[re.sub(r":\d+\)$", ")", inner)] += n
            cat = "other"
            for fr in reversed(frames):
                c = _categorise(fr)
                if c != "other":
                    cat = c
                    break
            per_cat[cat] += n
    return {
        "samples": total,
        "components": [{"component": k, "share": v / total if total else 0.0} for k, v in per_cat.most_common()],
        "top_functions": [{"function": k, "share": v / total if total else 0.0} for k, v in per_func.most_common(top)],
    }


def _pyspy() -> str | None:
    exe = shutil.which("py-spy")
    if exe is None:
        cand = os.path.join(os.path.dirname(sys.executable), "py-spy")
        exe = cand if os.path.exists(cand) else None
    return exe


def profile_server(directory: str, connections: int, messages: int) -> dict:
    """py-spy (GIL-holding samples) of ``walctl serve`` under the asyncio client's load."""
    exe = _pyspy()
    if exe is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    d = os.path.join(directory, "profile")
    os.makedirs(d)
    srv = _Server("mailwal", d)
    raw = os.path.join(d, "pyspy.txt")
    try:
        spy = subprocess.Popen([exe, "record", "--pid", str(srv.proc.pid), "--rate", "500", "--gil", "--threads",
                                "--format", "raw", "--output", raw, "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        load = lmtp_load("127.0.0.1", srv.port, connections, messages, tag="profile")
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
    finally:
        srv.stop()
    if not os.path.exists(raw):
        return {"skipped": f"py-spy failed: {err.decode(errors='replace')[-300:]}"}
    out = summarise_pyspy(raw)
    out.update(connections=connections, messages=messages, deliveries_per_s=load["deliveries_per_s"])
    return out


# -- Node API alone --------------------------------------------------------------------------


def node_api_bench(directory: str, threads: int, messages: int, size: int = MESSAGE_BYTES,
                   mode: str = "threads") -> dict:
    """``Node.deliver`` from ``threads`` threads (mode "threads"), or
    ``AsyncNode.deliver`` from that many asyncio tasks in one event loop
    (mode "tasks": the async face's fast path, one loop wake-up per fsync)."""
    from engine.node import Node

    path = os.path.join(directory, f"api-{mode}-{threads}")
    node = Node.init(path)
    try:
        node.create_mailbox("user/bench/INBOX")
        bodies = [bench_message(f"api-{mode}-{threads}-{i}", size) for i in range(messages)]
        latencies: list[float] = []
        f0, b0 = node.log.fsync_count, node.log.last_lsn

        if mode == "tasks":
            import asyncio

            from engine.node import AsyncNode

            async def run() -> float:
                anode = AsyncNode(node)

                async def work(k: int) -> None:
                    for i in range(k, messages, threads):
                        t = time.perf_counter()
                        await anode.deliver("user/bench/INBOX", bodies[i])
                        latencies.append(time.perf_counter() - t)

                t0 = time.perf_counter()
                await asyncio.gather(*(work(k) for k in range(threads)))
                return time.perf_counter() - t0

            seconds = asyncio.run(run())
        else:
            def work(k: int) -> None:
                lat = []
                for i in range(k, messages, threads):
                    t = time.perf_counter()
                    node.deliver("user/bench/INBOX", bodies[i])
                    lat.append(time.perf_counter() - t)
                latencies.extend(lat)

            ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            seconds = time.perf_counter() - t0
        fsyncs = node.log.fsync_count - f0
        records = node.log.last_lsn - b0
    finally:
        node.close()
    batches = log_batches(os.path.join(path, "log.wal"))
    shutil.rmtree(path, ignore_errors=True)
    return {
        "mode": mode,
        "threads": threads,
        "messages": messages,
        "seconds": seconds,
        "deliveries_per_s": messages / seconds,
        "p50_ms": _percentile(latencies, 0.5) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "avg_batch": records / fsyncs if fsyncs else 0.0,
        "bytes_per_record": batches["bytes_per_record"],
    }


# -- the whole run -----------------------------------------------------------------------------


def _ceiling(directory: str, batch: float, bytes_per_record: float, cache: dict) -> dict:
    """The raw write+fdatasync rate at ``batch`` records per sync: the median of three
    measurements (the shared virtual disk's fsync latency drifts from second to second)."""
    b = max(1, int(round(batch)))
    if b not in cache:
        os.sync()  # the store's dirty pages from the run just before would compete with the ceiling's fsyncs
        runs = sorted((bench_raw_sync(directory, b, max(400, b * 40), int(bytes_per_record)) for _ in range(3)),
                      key=lambda r: r["records_per_s"])
        cache[b] = runs[1]
    return cache[b]


def bench_raw_sync(directory: str, batch: int, records: int, bytes_per_record: int) -> dict:
    return bench_wal.bench_raw_sync(directory, batch, records, bytes_per_record)


def run_lmtp_bench(directory: str | None = None, *, connections=CONNECTIONS, messages: int = 3000,
                   target: tuple[str, int] | None = None, variants=("mailwal", "maildir", "null", "aiosmtpd"),
                   clients=("smtp-source", "asyncio"), api: bool = True, profile: bool = True,
                   progress=None) -> dict:
    say = progress or (lambda msg: None)
    base = tempfile.mkdtemp(prefix="mwb", dir=directory)  # short: a node's control.sock path must fit AF_UNIX
    report: dict = {"machine": machine_info(base), "message_bytes": MESSAGE_BYTES, "messages": messages,
                    "runs": [], "node_api": [], "profile": None,
                    "smtp_source": bool(shutil.which("smtp-source") or os.path.exists("/usr/sbin/smtp-source"))}
    ceilings: dict = {}
    try:
        if target is not None:
            for c in connections:
                for client in clients:
                    say(f"{client} -> {target[0]}:{target[1]}, {c} connections")
                    r = _load(client, target[0], target[1], c, messages)
                    if r is not None:
                        report["runs"].append({"server": f"{target[0]}:{target[1]}", **r})
            return report
        for kind in variants:
            for c in connections:
                for client in clients:
                    d = tempfile.mkdtemp(prefix=f"{kind[:2]}{c}", dir=base)
                    say(f"{kind} server, {client} client, {c} connections, {messages} messages")
                    srv = _Server(kind, d)
                    try:
                        r = _load(client, "127.0.0.1", srv.port, c, messages)
                    finally:
                        srv.stop()
                    if r is None:
                        continue
                    row = {"server": kind, **r}
                    if kind == "mailwal":
                        b = log_batches(os.path.join(srv.node, "log.wal"))
                        ceil = _ceiling(base, b["avg_batch"], b["bytes_per_record"], ceilings)
                        row.update(avg_batch=b["avg_batch"], raw_batch=ceil["batch"],
                                   raw_per_s=ceil["records_per_s"],
                                   ratio_vs_raw=row["deliveries_per_s"] / ceil["records_per_s"])
                    report["runs"].append(row)
                    shutil.rmtree(d, ignore_errors=True)
        if api:
            for mode, unit in (("threads", "threads"), ("tasks", "asyncio tasks")):
                for t in connections:
                    say(f"{'Node' if mode == 'threads' else 'AsyncNode'}.deliver from {t} {unit}")
                    r = node_api_bench(base, t, messages, mode=mode)
                    ceil = _ceiling(base, r["avg_batch"], r["bytes_per_record"], ceilings)
                    nominal = _ceiling(base, t, r["bytes_per_record"], ceilings)
                    r.update(raw_batch=ceil["batch"], raw_per_s=ceil["records_per_s"],
                             ratio_vs_raw=r["deliveries_per_s"] / ceil["records_per_s"],
                             raw_nominal_batch=nominal["batch"], raw_nominal_per_s=nominal["records_per_s"],
                             ratio_vs_raw_nominal=r["deliveries_per_s"] / nominal["records_per_s"])
                    report["node_api"].append(r)
        if profile:
            c = max(connections)
            say(f"profiling walctl serve under {c} connections")
            report["profile"] = profile_server(base, c, max(messages, 3000) * 2)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return report


def _load(client: str, host: str, port: int, connections: int, messages: int) -> dict | None:
    if client == "smtp-source":
        return smtp_source_load(host, port, connections, messages)
    return lmtp_load(host, port, connections, messages)


def main(argv: list[str]) -> int:
    """``python -m tools.bench_lmtp maildir|null|aiosmtpd DIR``: a benchmark server child."""
    if len(argv) != 2 or argv[0] not in ("maildir", "null", "aiosmtpd"):
        print("usage: python -m tools.bench_lmtp maildir|null|aiosmtpd DIR", file=sys.stderr)
        return 2
    _serve_variant(argv[0], argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# -- the click command (registered on ``walctl bench`` in tools/walctl.py) -------------------


def _conn_list(value: str) -> tuple[int, ...]:
    import click

    try:
        out = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
    if not out or min(out) < 1:
        raise click.BadParameter("connection counts must be >= 1")
    return out


def _errors(r: dict) -> str:
    if not r["errors"]:
        return "0"
    return str(sum(r["errors"].values())) if all(isinstance(v, int) for v in r["errors"].values()) else "yes"


def _callers(r: dict) -> str:
    if r.get("mode") == "tasks":
        return f"AsyncNode, {r['threads']} asyncio tasks"
    return f"Node, {r['threads']} threads"


def _nominal(r: dict) -> str:
    return f"{r['raw_nominal_per_s']:,.0f} (b={r['raw_nominal_batch']})" if "raw_nominal_per_s" in r else "-"


def _raw_at_batch(r: dict, missing: str = "-") -> str:
    return f"{r['raw_per_s']:,.0f} (b={r['raw_batch']})" if "raw_per_s" in r else missing


def _api_and_profile(out: BenchReport, report: dict, *, functions: bool) -> None:
    """The Node API table and the profile's tables (its top functions only when ``functions``)."""
    if report["node_api"]:
        a = out.table("Node.deliver() from threads and AsyncNode.deliver() from asyncio tasks, no LMTP",
                      ["callers", "deliveries/s", "p50 ms", "p99 ms", "avg batch", "raw rec/s @batch", "vs raw",
                       "raw rec/s @batch=callers", "vs raw"])
        for r in report["node_api"]:
            a.add_row(_callers(r), f"{r['deliveries_per_s']:,.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['avg_batch']:.1f}", _raw_at_batch(r), percent(r["ratio_vs_raw"]), _nominal(r),
                      percent(r.get("ratio_vs_raw_nominal", 0)))
    p = report.get("profile")
    if not p:
        return
    if "skipped" in p:
        out.line(f"profile: skipped ({p['skipped']})")
        return
    pt = out.table(f"where the GIL goes: py-spy, walctl serve under {p['connections']} connections "
                   f"({p['deliveries_per_s']:,.0f} deliveries/s, {p['samples']} samples)", ["component", "share"])
    for c in p["components"]:
        pt.add_row(c["component"], percent(c["share"]))
    if functions:
        ft = out.table("top functions (innermost frame)", ["function", "share"])
        for f in p["top_functions"]:
            ft.add_row(f["function"][:110], percent(f["share"], 1))


def _workload(report: dict) -> str:
    return f"{report['message_bytes']} B messages, 1 recipient, 1 mailbox, {report['messages']} per row"


def bench_report(report: dict) -> BenchReport:
    """The tables of a :func:`run_lmtp_bench` report: one row per server, client and connection count."""
    out = BenchReport(Stamp.capture(report["machine"]))
    t = out.table(f"LMTP deliveries: {_workload(report)}",
                  ["server", "client", "conns", "deliveries/s", "p50 ms", "p99 ms", "errors", "avg batch",
                   "raw rec/s @batch", "vs raw"])
    for r in report["runs"]:
        t.add_row(r["server"], r["client"], str(r["connections"]), f"{r['deliveries_per_s']:,.0f}",
                  f"{r['p50_ms']:.2f}" if "p50_ms" in r else "-", f"{r['p99_ms']:.2f}" if "p99_ms" in r else "-",
                  _errors(r), f"{r['avg_batch']:.1f}" if "avg_batch" in r else "-", _raw_at_batch(r),
                  percent(r["ratio_vs_raw"]) if "ratio_vs_raw" in r else "-")
    _api_and_profile(out, report, functions=True)
    return out


def markdown_report(report: dict) -> BenchReport:
    """The tables for the docs: one row per server and connection count, the two load clients
    side by side."""
    out = BenchReport(Stamp.capture(report["machine"]))
    t = out.table(f"LMTP deliveries: {_workload(report)}",
                  ["server", "conns", "deliveries/s (smtp-source)", "deliveries/s (asyncio client)", "p50 ms",
                   "p99 ms", "avg batch", "raw write+fdatasync at that batch", "vs raw"])
    rows: dict = {}
    for r in report["runs"]:
        rows.setdefault((r["server"], r["connections"]), {})[r["client"]] = r
    for (server, conns), by in rows.items():
        src, aio = by.get("smtp-source"), by.get("asyncio")
        ref = aio or src
        t.add_row(server, str(conns), f"{src['deliveries_per_s']:,.0f}" if src else "-",
                  f"{aio['deliveries_per_s']:,.0f}" if aio else "-",
                  f"{aio['p50_ms']:.2f}" if aio else "-", f"{aio['p99_ms']:.2f}" if aio else "-",
                  f"{ref['avg_batch']:.1f}" if "avg_batch" in ref else "", _raw_at_batch(ref, ""),
                  percent(ref.get("ratio_vs_raw")))
    _api_and_profile(out, report, functions=False)
    return out


def render_markdown(report: dict) -> str:
    """The report as markdown for the docs (:func:`markdown_report`)."""
    return markdown_report(report).markdown()


def _make_command():
    import click

    from .cliutil import CONTEXT_SETTINGS

    @click.command(name="lmtp", context_settings=CONTEXT_SETTINGS)
    @click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of tables.")
    @click.option("--markdown", is_flag=True, help="Print README-ready markdown tables instead.")
    @click.option("--target", default=None, metavar="HOST:PORT",
                  help="Load this LMTP server instead of starting walctl serve and the comparison servers.")
    @click.option("--messages", type=click.IntRange(min=1), default=3000, show_default=True,
                  help="Messages per row (spread over the connections).")
    @click.option("--connections", default="1,8,64", show_default=True, help="Concurrent connection counts.")
    @click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
                  help="Where the scratch nodes and files go (the disk under test). Default: the temp dir.")
    @click.option("--client", "clients", type=click.Choice(["smtp-source", "asyncio"]), multiple=True,
                  help="Load clients to use (repeatable; default both, smtp-source only when installed).")
    @click.option("--only-mailwal", is_flag=True, help="Skip the Maildir, null and aiosmtpd servers.")
    @click.option("--no-api", is_flag=True, help="Skip the Node.deliver() thread benchmark.")
    @click.option("--no-profile", is_flag=True, help="Skip the py-spy profile of the server.")
    def bench_lmtp(as_json, markdown, target, messages, connections, directory, clients, only_mailwal, no_api, no_profile):
        """Benchmark LMTP deliveries: throughput and latency against ceilings.

        Starts `walctl serve` on a fresh node per row and delivers 4 KiB
        messages from 1, 8 and 64 connections on 127.0.0.1 (deliveries/s,
        p50/p99 from MAIL FROM to the final 250). In the same run: a Maildir
        writer (tmp/, fsync, rename to new/, fsync dir) and a null store
        behind the same LMTP front, aiosmtpd's LMTP server with a null
        handler, the raw write+fdatasync ceiling at the log's batch size,
        Node.deliver() from threads alone, and a py-spy profile of the
        server. Load comes from Postfix's smtp-source when installed and from
        a built-in asyncio LMTP client (which also times each message).

        \b
        Example:
            walctl bench lmtp
            walctl bench lmtp --target 127.0.0.1:24 --connections 8 --json
        """
        from .cmd_node import _host_port

        chosen = tuple(clients) or ("smtp-source", "asyncio")
        report = run_lmtp_bench(
            directory, connections=_conn_list(connections), messages=messages,
            target=_host_port(target) if target else None,
            variants=("mailwal",) if only_mailwal else ("mailwal", "maildir", "null", "aiosmtpd"),
            clients=chosen, api=not no_api, profile=not no_profile, progress=progress_printer(),
        )
        print_report(report, bench_report, as_json=as_json, markdown=markdown, markdown_tables=markdown_report)

    return bench_lmtp


bench_lmtp_command = _make_command()
