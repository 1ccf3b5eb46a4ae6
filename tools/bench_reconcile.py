"""``walctl bench reconcile``: the cost of finding a fork point and reconciling.

Builds two logs of N mail records (deliveries of ``--record-bytes`` each, and
flag changes) that share the first 99% and then diverge (each side delivers
its own 1%, with UID collisions and flag changes), then measures, each in a
fresh interpreter so memory figures are its own:

* ``find fork``: :func:`wal.fork.search_fork` alone, with what its probes
  read apart from what finding each log's end read (the last record whole:
  only its hash tells it from a torn write);
* ``reconcile``: fork search + reading and diffing both tails;
* ``compare from LSN 1``: what one would do without the search: read both
  logs with :class:`wal.LogReader` until the hashes differ;
* ``raw read, all``: a plain sequential read of both logs (the ceiling for
  anything that reads the logs whole);
* ``raw read, tails``: a plain read of the bytes after the fork point only
  (the floor for any reconcile).

Bytes read come from two places: the reader's own count of bytes it asked
for, and the ``rchar`` delta of ``/proc/self/io`` (every byte through a read
system call, page cache hits included).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import click

from .bench_report import BenchReport, Stamp, machine_info, percent, print_report, times
from .cliutil import CONTEXT_SETTINGS

__all__ = ["bench_reconcile", "build_logs", "run_benchmark", "bench_report"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAILBOXES = 20
BODY_BYTES = 60
BATCH = 5000
BATCH_BYTES = 8 << 20  # a batch also ends at this many payload bytes (large records)
FLAG_EVERY = 10  # one flag change per this many records


def _io() -> dict:
    out = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, v = line.split(":")
                out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def _events(start: int, count: int, side: str, uid_base: dict[int, int], body_bytes: int = BODY_BYTES):
    """``count`` records after record ``start``: deliveries (and flag changes) spread over the mailboxes."""
    from engine.store.events import FlagsChanged, MessageAppended, body_guid, encode_event

    for i in range(start, start + count):
        mbox = i % MAILBOXES
        mid = f"{mbox + 1:032x}"
        if i % FLAG_EVERY == FLAG_EVERY - 1 and uid_base.get(mbox, 0) > 1:
            uid = max(1, uid_base[mbox] - 1)
            stamp = 1_700_000_000_000 + i + {"A": 1, "B": 2}.get(side, 0) * 1000  # the sides' tails differ
            yield encode_event(FlagsChanged(mid, (uid,), "add", ("\\Seen",), i + 1, stamp))
            continue
        uid = uid_base.get(mbox, 0) + 1
        uid_base[mbox] = uid
        body = (f"{side} message {i} ".encode()).ljust(body_bytes, b".")
        yield encode_event(MessageAppended(mid, uid, i + 1, body_guid(body), body, (), 1_700_000_000_000 + i,
                                           1_700_000_000_000 + i))


def _append(log, items) -> int:
    """Append ``items`` in batches; returns the payload length of the last one."""
    batch, size, last = [], 0, 0
    for item in items:
        batch.append(item)
        size += len(item[1])
        last = len(item[1])
        if len(batch) >= BATCH or size >= BATCH_BYTES:
            log.append_many(batch)
            batch, size = [], 0
    if batch:
        log.append_many(batch)
    return last


def build_logs(directory: str, records: int, record_bytes: int = BODY_BYTES) -> dict:
    """Two logs of ``records`` records each, equal for the first 99%; each
    delivery carries a body of ``record_bytes``."""
    import wal
    from engine.store.events import MailboxCreated, encode_event

    a, b = os.path.join(directory, "a.wal"), os.path.join(directory, "b.wal")
    tail = max(1, records // 100)
    shared = records - tail
    t0 = time.perf_counter()
    log = wal.Log.create(a)
    creates = [encode_event(MailboxCreated(f"{i + 1:032x}", f"box{i}", 1000 + i)) for i in range(min(MAILBOXES, shared))]
    log.append_many(creates)
    uid_base: dict[int, int] = {}
    _append(log, _events(len(creates), shared - len(creates), "shared", uid_base, record_bytes))
    log.close()
    shutil.copytree(a, b)
    last_frames = 0  # the two logs' last frames (header + payload)
    for path, side in ((a, "A"), (b, "B")):
        with wal.Log.open(path) as lg:
            last_frames += 64 + _append(lg, _events(shared, tail, side, dict(uid_base), record_bytes))
    size = {k: sum(os.path.getsize(os.path.join(p, n)) for n in os.listdir(p) if n.endswith(".seg"))
            for k, p in (("a", a), ("b", b))}
    return {"a": a, "b": b, "records": records, "shared": shared, "tail": tail, "log_bytes": size,
            "last_frames_bytes": last_frames, "build_seconds": time.perf_counter() - t0}


# -- phases (each runs in a child interpreter) ------------------------------------------


def _phase(name: str, a: str, b: str, fork_lsn: int) -> dict:
    import wal
    from wal import SeekReader, search_fork

    out: dict = {"phase": name}
    io0 = _io()
    t0 = time.perf_counter()
    if name == "baseline":
        pass
    elif name == "find_fork":
        s = search_fork(a, b)
        out.update(fork=s.fork.lsn, probes=s.probes, records_read=s.records_read, bytes_read=s.bytes_read,
                   probe_bytes_read=s.probe_bytes_read, end_bytes_read=s.end_bytes_read)
    elif name == "reconcile":
        from engine.reconcile import reconcile

        r = reconcile(a, b)
        c = r.diff.counts()
        out.update(fork=r.search.fork.lsn, records_read=r.records_read, bytes_read=r.bytes_read,
                   only_in_a=c["only_in_a"], only_in_b=c["only_in_b"], collisions=c["uid_collisions"],
                   flag_changes=c["flag_changes_a"] + c["flag_changes_b"])
    elif name == "naive":
        ra, rb = wal.LogReader(a), wal.LogReader(b)
        n = 0
        fork = 0
        for x, y in zip(ra.records(1), rb.records(1)):
            n += 2
            if x.hash != y.hash:
                break
            fork = x.lsn
        out.update(fork=fork, records_read=n)
    elif name in ("raw_all", "raw_tail"):
        total = 0
        for path in (a, b):
            start = {}
            if name == "raw_tail":
                with SeekReader(path) as r:
                    seg, off, _ = r.locate(fork_lsn + 1)
                start = {seg: off}
            names = sorted(n for n in os.listdir(path) if n.endswith(".seg"))
            if start:
                names = [n for n in names if n >= next(iter(start))]
            for n in names:
                with open(os.path.join(path, n), "rb", buffering=0) as f:
                    f.seek(start.get(n, 0))
                    while True:
                        chunk = f.read(1 << 20)
                        if not chunk:
                            break
                        total += len(chunk)
        out.update(bytes_read=total)
    else:
        raise ValueError(name)
    out["seconds"] = time.perf_counter() - t0
    io1 = _io()
    out["rchar"] = io1.get("rchar", 0) - io0.get("rchar", 0)
    out["disk_read_bytes"] = io1.get("read_bytes", 0) - io0.get("read_bytes", 0)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _evict(paths: list[str]) -> None:
    """Drop these logs' pages from the page cache (only theirs: POSIX_FADV_DONTNEED per file)."""
    for path in paths:
        for n in os.listdir(path):
            if n.endswith(".seg"):
                fd = os.open(os.path.join(path, n), os.O_RDONLY)
                try:
                    os.fsync(fd)  # dirty pages are not dropped
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def _run_child(name: str, a: str, b: str, fork_lsn: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench_reconcile", name, a, b, str(fork_lsn)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise click.ClickException(f"bench phase {name} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def run_benchmark(records: int, directory: str | None = None, cold: bool = True,
                  record_bytes: int = BODY_BYTES) -> dict:
    """Build the two logs, run every phase, return the report (see module docstring).

    With ``cold`` the logs' pages are dropped from the page cache before each
    phase, so ``disk_read_bytes`` and times include the disk.
    """
    tmp = tempfile.mkdtemp(prefix="mailwal-bench-reconcile-", dir=directory)
    try:
        built = build_logs(tmp, records, record_bytes)
        a, b = built["a"], built["b"]
        fork_lsn = built["shared"]
        rows = {}
        for name in ("baseline", "find_fork", "reconcile", "naive", "raw_all", "raw_tail"):
            if cold:
                _evict([a, b])
            rows[name] = _run_child(name, a, b, fork_lsn)
        total = built["log_bytes"]["a"] + built["log_bytes"]["b"]
        ff, rc = rows["find_fork"], rows["reconcile"]
        ends = built["last_frames_bytes"]
        report = {
            "records": records, "record_bytes": record_bytes, "last_frames_bytes": ends,
            "shared": built["shared"], "tail_per_side": built["tail"],
            "log_bytes": built["log_bytes"], "build_seconds": built["build_seconds"],
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "dir": tmp},
            "cache": "cold" if cold else "warm",
            "fork": {"expected": fork_lsn, "found": ff["fork"]},
            "phases": rows,
            "ratios": {
                "find_fork_bytes_vs_logs": ff["bytes_read"] / total,
                "find_fork_rchar_vs_logs": ff["rchar"] / total,
                "reconcile_bytes_vs_logs": rc["bytes_read"] / total,
                "reconcile_seconds_vs_raw_tail": rc["seconds"] / max(rows["raw_tail"]["seconds"], 1e-9),
                "naive_seconds_vs_find_fork": rows["naive"]["seconds"] / max(ff["seconds"], 1e-9),
            },
        }
        report["goals"] = [
            {"goal": "fork_found", "description": "the fork point found is the last shared record",
             "value": ff["fork"], "met": ff["fork"] == fork_lsn and rc["fork"] == fork_lsn},
            {"goal": "fork_search_reads_little",
             "description": "finding the fork reads < 1 MiB and < 1% of the logs besides the two last records",
             "value": (ff["rchar"] - ends) / total,
             "met": ff["rchar"] - ends < (1 << 20) and (ff["rchar"] - ends) / total < 0.01},
            {"goal": "fork_probes_read_headers",
             "description": "the probes read < 16 KiB per probe whatever the record size",
             "value": ff["probe_bytes_read"], "met": ff["probe_bytes_read"] < (16 << 10) * max(1, ff["probes"])},
            {"goal": "reconcile_reads_tails_only",
             "description": "reconcile reads < 2x the raw tails + 1 MiB (rchar)",
             "value": rc["rchar"] / max(rows["raw_tail"]["rchar"], 1),
             "met": rc["rchar"] < 2 * rows["raw_tail"]["rchar"] + (1 << 20)},
        ]
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_report(report: dict) -> BenchReport:
    """The tables of a :func:`run_benchmark` report. Its stamp describes the disk that held the
    scratch logs (the report's ``machine`` names only the CPUs, Python and the removed scratch dir)."""
    out = BenchReport(Stamp.capture(machine_info(os.path.dirname(report["machine"]["dir"]))))
    lb = report["log_bytes"]
    out.line(f"two logs of {report['records']:,} records, deliveries of {report['record_bytes']:,} B bodies "
             f"({lb['a'] / 2**20:,.1f} MiB and {lb['b'] / 2**20:,.1f} MiB), "
             f"shared {report['shared']:,}, then {report['tail_per_side']:,} different records on each side; "
             f"fork found at LSN {report['fork']['found']:,} (expected {report['fork']['expected']:,})")
    t = out.table(f"reconcile: time, memory and bytes read ({report['cache']} page cache, each phase in a "
                  f"fresh interpreter)", ["phase", "seconds", "records", "bytes read", "of logs", "from disk", "RSS MiB"])
    total = lb["a"] + lb["b"]
    labels = {"baseline": "imports only", "find_fork": "find fork", "reconcile": "reconcile",
              "naive": "compare from 1", "raw_all": "raw read all", "raw_tail": "raw read tails"}
    for name, row in report["phases"].items():
        t.add_row(labels[name], f"{row['seconds']:.3f}", f"{row['records_read']:,}" if "records_read" in row else "",
                  f"{row['rchar']:,}", percent(row["rchar"] / total, 2), f"{row['disk_read_bytes']:,}",
                  f"{row['peak_rss_mib']:.0f}")
    ff = report["phases"]["find_fork"]
    out.line(f"find fork: {ff['bytes_read']:,} bytes in {ff['probes']} probes: {ff['probe_bytes_read']:,} by the "
             f"probes, {ff['end_bytes_read']:,} finding both logs' ends (their last records, "
             f"{report['last_frames_bytes']:,} B, are read whole: only a record's hash tells it from a torn write)")
    gt = out.table("goals", ["goal", "measured", "met"])
    for g in report["goals"]:
        v = g["value"]
        shown = (f"{v:,}" if isinstance(v, int) else
                 times(v) if g["goal"] == "reconcile_reads_tails_only" else percent(v, 4))
        gt.add_row(g["description"], shown, "yes" if g["met"] else "NO")
    return out


@click.command(name="reconcile", context_settings=CONTEXT_SETTINGS)
@click.option("--records", type=click.IntRange(min=50), default=1_000_000, show_default=True,
              help="Records in each log; the last 1% (at least one) differ between the two.")
@click.option("--record-bytes", type=click.IntRange(min=1, max=32 << 20), default=BODY_BYTES, show_default=True,
              help="Body bytes of each delivery (large ones show that the fork search reads frame headers, "
                   "not payloads).")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="Where to build the scratch logs (deleted afterwards). Default: the system temp dir.")
@click.option("--cache", type=click.Choice(["cold", "warm"]), default="cold", show_default=True,
              help="cold: drop the two logs' pages from the page cache before each phase (only theirs).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of tables.")
def bench_reconcile(records: int, record_bytes: int, directory: str | None, cache: str, as_json: bool) -> None:
    """Time, memory and bytes read to find a fork point and reconcile two logs.

    The two logs share 99% of their records; finding the fork point must
    read a tiny fraction of them (compare with 'compare from LSN 1' and the
    raw reads measured in the same run).

    \b
    Examples:
        walctl bench reconcile --records 200000
        walctl bench reconcile --records 60 --record-bytes 1048576
    """
    report = run_benchmark(records, directory, cold=cache == "cold", record_bytes=record_bytes)
    print_report(report, bench_report, as_json=as_json, json_indent=1)


if __name__ == "__main__":  # a measured phase in its own interpreter
    _name, _a, _b, _fork = sys.argv[1:5]
    print(json.dumps(_phase(_name, _a, _b, int(_fork))))
