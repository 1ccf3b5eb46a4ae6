"""``walctl bench wal``: the log against a raw ceiling.

Every figure is paired with a ceiling measured in the same run, on the same
disk, by the plainest code that does the same I/O, and reported as a ratio:

* appends: N concurrent appender threads calling :meth:`wal.Log.append` with
  4 KiB records, and N asyncio tasks appending through the async face's
  mechanism (:class:`engine.node.aio.DurableFutures`); the ceiling is a loop of ``os.write`` + ``os.fdatasync`` on
  an append-only file, writing the same number of bytes per sync as the log's
  average batch (records / fsyncs), and also at the nominal batch (= threads);
* verify and replay: :func:`wal.verify` and a full :meth:`wal.LogReader.records`
  pass over a log of ``verify_bytes``, against reading the same segment files
  in 1 MiB chunks and hashing them with blake3 (warm page cache for both);
  and, for context, against the same read with one blake3 call per
  record-sized piece (the hashing the format itself requires);
* memory: peak RSS of a subprocess that runs :func:`wal.verify`, next to the
  RSS of the same subprocess that only imports :mod:`wal`.

The measuring functions return plain dicts (the ``--json`` contract) and never
print; :func:`bench_report` turns the report into tables
(:mod:`tools.bench_report`) and :data:`bench_wal_command` is the command.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

import blake3
import click

import wal
from wal.format import FRAME_HEADER_SIZE

from .bench_report import BenchReport, Stamp, machine_info, percent, print_report, progress_printer
from .cliutil import CONTEXT_SETTINGS

__all__ = [
    "RECORD_BYTES",
    "THREADS",
    "TASKS",
    "GOALS",
    "bench_appends",
    "bench_async_appends",
    "bench_raw_sync",
    "build_log",
    "bench_verify",
    "bench_replay",
    "bench_raw_read_hash",
    "bench_raw_read_hash_pieces",
    "verify_peak_rss",
    "machine_info",
    "run_wal_bench",
    "bench_report",
    "bench_wal_command",
]

RECORD_BYTES = 4096
THREADS = (1, 16, 64)
TASKS = (64,)
MIB = 1024 * 1024
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: name -> (description, threshold, "min" or "max")
GOALS = {
    "appenders_64_vs_raw_batch_64": ("64 appenders >= 70% of raw write+fdatasync at batch 64", 0.70, "min"),
    "appenders_1_vs_raw_batch_1": ("1 appender >= 80% of raw write+fdatasync at batch 1", 0.80, "min"),
    "tasks_64_vs_raw_batch_64": ("64 asyncio tasks (async face) >= 70% of raw write+fdatasync at batch 64", 0.70, "min"),
    "verify_vs_raw_read_hash": ("verify >= 50% of raw read+blake3", 0.50, "min"),
    "replay_vs_raw_read_hash": ("replay >= 50% of raw read+blake3", 0.50, "min"),
    "verify_peak_rss_mib": ("verify peak RSS < 100 MiB", 100.0, "max"),
}

Progress = Callable[[str], None]


def _payloads(record_bytes: int, count: int = 8) -> list[bytes]:
    return [os.urandom(record_bytes) for _ in range(count)]


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


def bench_appends(directory: str, threads: int, records: int, record_bytes: int = RECORD_BYTES) -> dict:
    """``threads`` appenders share ``records`` appends of ``record_bytes`` into a fresh log."""
    path = os.path.join(directory, f"appends-{threads}.wal")
    per_thread = max(1, records // threads)
    total = per_thread * threads
    payloads = _payloads(record_bytes)
    latencies: list[list[int]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    log = wal.Log.create(path)
    try:
        barrier = threading.Barrier(threads + 1)

        def appender(i: int) -> None:
            lat = latencies[i]
            append = log.append
            clock = time.perf_counter_ns
            p = payloads[i % len(payloads)]
            try:
                barrier.wait()
                for _ in range(per_thread):
                    t0 = clock()
                    append(1, p)
                    lat.append(clock() - t0)
            except BaseException as exc:  # reported below, never swallowed
                errors.append(exc)

        workers = [threading.Thread(target=appender, args=(i,), daemon=True) for i in range(threads)]
        for w in workers:
            w.start()
        fsyncs_before = log.fsync_count
        barrier.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        seconds = time.perf_counter() - t0
        fsyncs = log.fsync_count - fsyncs_before
        if errors:
            raise errors[0]
        if log.last_lsn != total:
            raise RuntimeError(f"bench appended {total} records but the log ends at LSN {log.last_lsn}")
    finally:
        log.close()
    all_lat = sorted(x for lat in latencies for x in lat)
    return _append_row("threads", threads, total, record_bytes, seconds, fsyncs, all_lat, path)


def bench_async_appends(directory: str, tasks: int, records: int, record_bytes: int = RECORD_BYTES) -> dict:
    """``tasks`` asyncio tasks in one event loop share ``records`` appends, each
    awaiting its record's durability the way the async face does
    (:class:`engine.node.aio.DurableFutures`: ``Log.enqueue`` in the loop,
    one ``Log.notify_durable`` callback and one ``call_soon_threadsafe`` per
    fsync batch). A task's append returns only after its batch's fdatasync."""
    import asyncio

    from engine.node.aio import DurableFutures

    path = os.path.join(directory, f"async-appends-{tasks}.wal")
    per_task = max(1, records // tasks)
    total = per_task * tasks
    payloads = _payloads(record_bytes)
    latencies: list[int] = []
    log = wal.Log.create(path)
    try:
        async def run() -> tuple[float, int]:
            durable = DurableFutures(log, asyncio.get_running_loop())
            enqueue, wait, clock = log.enqueue, durable.wait, time.perf_counter_ns

            async def appender(i: int) -> None:
                item = [(1, payloads[i % len(payloads)])]
                lat = latencies.append
                for _ in range(per_task):
                    t0 = clock()
                    await wait(enqueue(item)[0].lsn)
                    lat(clock() - t0)

            fsyncs_before = log.fsync_count
            t0 = time.perf_counter()
            await asyncio.gather(*(appender(i) for i in range(tasks)))
            return time.perf_counter() - t0, log.fsync_count - fsyncs_before

        seconds, fsyncs = asyncio.run(run())
        if log.last_lsn != total:
            raise RuntimeError(f"bench appended {total} records but the log ends at LSN {log.last_lsn}")
    finally:
        log.close()
    return _append_row("asyncio tasks", tasks, total, record_bytes, seconds, fsyncs, sorted(latencies), path)


def _append_row(mode: str, concurrency: int, total: int, record_bytes: int, seconds: float, fsyncs: int,
                all_lat: list[int], path: str) -> dict:
    return {
        "mode": mode,
        "threads": concurrency,
        "records": total,
        "record_bytes": record_bytes,
        "seconds": seconds,
        "records_per_s": total / seconds,
        "mb_per_s": total * record_bytes / seconds / 1e6,
        "fsyncs": fsyncs,
        "fsyncs_per_record": fsyncs / total,
        "avg_batch": total / max(fsyncs, 1),
        "p50_ms": _percentile(all_lat, 0.50) / 1e6,
        "p99_ms": _percentile(all_lat, 0.99) / 1e6,
        "bytes_per_record_on_disk": FRAME_HEADER_SIZE + record_bytes,
        "log_path": path,
    }


def bench_raw_sync(directory: str, batch: int, records: int, bytes_per_record: int) -> dict:
    """The ceiling: ``os.write`` of ``batch`` records' bytes, then ``os.fdatasync``, in a loop."""
    batch = max(1, int(batch))
    path = os.path.join(directory, f"raw-batch-{batch}.dat")
    buf = os.urandom(batch * bytes_per_record)
    syncs = max(1, math.ceil(records / batch))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        t0 = time.perf_counter()
        for _ in range(syncs):
            view = memoryview(buf)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fdatasync(fd)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    done = syncs * batch
    return {
        "batch": batch,
        "records": done,
        "seconds": seconds,
        "records_per_s": done / seconds,
        "mb_per_s": done * bytes_per_record / seconds / 1e6,
    }


def build_log(path: str, total_bytes: int, record_bytes: int = RECORD_BYTES, batch: int = 256) -> dict:
    """Fill a new log with about ``total_bytes`` of ``record_bytes`` records, in big batches."""
    payloads = _payloads(record_bytes)
    per_record = FRAME_HEADER_SIZE + record_bytes
    count = max(1, total_bytes // per_record)
    t0 = time.perf_counter()
    with wal.Log.create(path) as log:
        done = 0
        while done < count:
            n = min(batch, count - done)
            log.append_many([(1, payloads[(done + i) % len(payloads)]) for i in range(n)])
            done += n
        last = log.last_lsn
    return {"records": last, "bytes": _segment_bytes(path), "seconds": time.perf_counter() - t0}


def _segment_files(path: str) -> list[str]:
    return [os.path.join(path, name) for _, name in wal.LogReader(path).segments()]


def _segment_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in _segment_files(path))


def bench_raw_read_hash(path: str) -> dict:
    """The ceiling for reading: every segment byte read in 1 MiB chunks and blake3-hashed."""
    buf = bytearray(MIB)
    view = memoryview(buf)
    total = 0
    t0, c0 = time.perf_counter(), time.thread_time()
    for seg in _segment_files(path):
        hasher = blake3.blake3()
        with open(seg, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                hasher.update(view[:n])
                total += n
        hasher.digest()
    seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return {"bytes": total, "seconds": seconds, "cpu_seconds": cpu, "mb_per_s": total / seconds / 1e6}


def bench_raw_read_hash_pieces(path: str, piece_bytes: int) -> dict:
    """A second ceiling: the same read, blake3 called once per record-sized piece.

    The format hashes every payload on its own (LOG-5), and blake3's cost per
    call for a 4 KiB input is several times its per-byte cost on 1 MiB; this
    shows what per-record hashing alone costs, with no parsing or chaining.
    """
    buf = bytearray(MIB - MIB % piece_bytes or piece_bytes)
    view = memoryview(buf)
    total = 0
    hasher = blake3.blake3
    t0, c0 = time.perf_counter(), time.thread_time()
    for seg in _segment_files(path):
        with open(seg, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                for i in range(0, n, piece_bytes):
                    hasher(view[i:min(i + piece_bytes, n)]).digest()
                total += n
    seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return {"bytes": total, "piece_bytes": piece_bytes, "seconds": seconds, "cpu_seconds": cpu, "mb_per_s": total / seconds / 1e6}


def bench_verify(path: str) -> dict:
    t0, c0 = time.perf_counter(), time.thread_time()
    report = wal.verify(path)
    seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
    if not report.ok:
        raise RuntimeError(f"benchmark log failed verification: {report.error}")
    size = _segment_bytes(path)
    return {"bytes": size, "records": report.records, "seconds": seconds, "cpu_seconds": cpu, "mb_per_s": size / seconds / 1e6,
            "records_per_s": report.records / seconds}


def bench_replay(path: str) -> dict:
    t0, c0 = time.perf_counter(), time.thread_time()
    count = 0
    payload_bytes = 0
    for rec in wal.LogReader(path).records():
        count += 1
        payload_bytes += len(rec.payload)
    seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
    size = _segment_bytes(path)
    return {"bytes": size, "records": count, "payload_bytes": payload_bytes, "seconds": seconds, "cpu_seconds": cpu,
            "mb_per_s": size / seconds / 1e6, "records_per_s": count / seconds}


_RSS_SCRIPT = """
import json, resource, sys
import wal
report = None
if sys.argv[2] == "verify":
    report = wal.verify(sys.argv[1])
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "ok": None if report is None else report.ok,
                  "records": None if report is None else report.records}))
"""


def verify_peak_rss(path: str) -> dict:
    """Peak RSS of a fresh interpreter running wal.verify(path), and of one only importing wal."""

    def run(mode: str) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = _REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        out = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, path, mode],
            check=True, capture_output=True, text=True, env=env, cwd=_REPO_ROOT,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    base = run("import")
    full = run("verify")
    if not full["ok"]:
        raise RuntimeError("benchmark log failed verification in the RSS subprocess")
    return {
        "log_bytes": _segment_bytes(path),
        "records": full["records"],
        "peak_rss_mib": full["maxrss_kib"] / 1024,
        "baseline_rss_mib": base["maxrss_kib"] / 1024,
    }


def _append_rounds(scratch: str, bench: Callable, unit: str, n: int, records: int, record_bytes: int,
                   rounds: int, say: Progress) -> dict:
    """``rounds`` log runs of ``bench`` with ``n`` appenders, each followed by the raw
    ceiling at the batch the log achieved and at batch ``n``; the median round, whole."""
    frame_bytes = FRAME_HEADER_SIZE + record_bytes
    tries = []
    for k in range(rounds):
        # The raw loop at batch n runs right before and right after the log, and
        # the ceiling is the mean of the two: the shared disk's speed drifts
        # within seconds, and bracketing the log run in time tracks it better.
        say(f"raw write+fdatasync at batch {n}")
        before = bench_raw_sync(scratch, n, records, frame_bytes)
        say(f"appending {records} records with {n} {unit}, round {k + 1} of {rounds}")
        res = bench(scratch, n, records, record_bytes)
        shutil.rmtree(res.pop("log_path"))
        achieved_batch = max(1, round(res["avg_batch"]))
        raws = {}
        for b in sorted({achieved_batch, n}):
            say(f"raw write+fdatasync at batch {b}")
            raws[b] = bench_raw_sync(scratch, b, res["records"], frame_bytes)
        after = raws[n]["records_per_s"]
        raws[n] = dict(raws[n], records_per_s=(before["records_per_s"] + after) / 2)
        res["raw_nominal_before_after"] = [before["records_per_s"], after]
        res["raw_batch"] = achieved_batch
        res["raw_records_per_s"] = raws[achieved_batch]["records_per_s"]
        res["ratio_vs_raw"] = res["records_per_s"] / res["raw_records_per_s"]
        res["raw_nominal_batch"] = n
        res["raw_nominal_records_per_s"] = raws[n]["records_per_s"]
        res["ratio_vs_raw_nominal"] = res["records_per_s"] / res["raw_nominal_records_per_s"]
        tries.append(res)
    # Log and raw runs alternate, so both see the same disk weather; report
    # the round whose log/raw ratio is the median, whole (a consistent row),
    # and every round's figures beside it (the shared disk is noisy).
    rounds_seen = [{k: t[k] for k in ("records_per_s", "avg_batch", "raw_records_per_s", "ratio_vs_raw",
                                      "raw_nominal_records_per_s", "ratio_vs_raw_nominal")} for t in tries]
    tries.sort(key=lambda r: r["ratio_vs_raw_nominal"])
    row = dict(tries[(len(tries) - 1) // 2])
    row["rounds"] = len(tries)
    row["round_ratios_vs_raw_nominal"] = [t["ratio_vs_raw_nominal"] for t in tries]
    row["all_rounds"] = rounds_seen
    return row


def _median_by(results: list[dict], key: str) -> dict:
    ordered = sorted(results, key=lambda r: r[key])
    return dict(ordered[(len(ordered) - 1) // 2], rounds=len(ordered))


def _goal(name: str, value: float) -> dict:
    description, threshold, kind = GOALS[name]
    met = value >= threshold if kind == "min" else value < threshold
    return {"goal": name, "description": description, "value": value, "threshold": threshold, "met": met}


def run_wal_bench(
    directory: str | None = None,
    *,
    records: int = 20000,
    verify_bytes: int = 256 * MIB,
    record_bytes: int = RECORD_BYTES,
    threads: tuple[int, ...] = THREADS,
    tasks: tuple[int, ...] = TASKS,
    rounds: int = 3,
    progress: Progress | None = None,
) -> dict:
    """Run every measurement in a scratch directory under ``directory``; returns the report."""
    say = progress or (lambda _msg: None)
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="walbench-", dir=directory)
    try:
        frame_bytes = FRAME_HEADER_SIZE + record_bytes
        appends = [_append_rounds(scratch, bench_appends, "thread(s)", n, records, record_bytes, rounds, say)
                   for n in threads]
        async_appends = [_append_rounds(scratch, bench_async_appends, "asyncio task(s)", n, records, record_bytes,
                                        rounds, say) for n in tasks]

        log_path = os.path.join(scratch, "read.wal")
        say(f"building a {verify_bytes / MIB:.0f} MiB log")
        built = build_log(log_path, verify_bytes, record_bytes)
        bench_raw_read_hash(log_path)  # warm the page cache; later passes are the ones measured
        raws, pieces, vers, reps = [], [], [], []
        for k in range(rounds):
            say(f"raw read+blake3, verify, replay: round {k + 1} of {rounds}")
            raws.append(bench_raw_read_hash(log_path))
            pieces.append(bench_raw_read_hash_pieces(log_path, frame_bytes))
            vers.append(bench_verify(log_path))
            reps.append(bench_replay(log_path))
        raw_read, raw_pieces, ver, rep = (_median_by(x, "mb_per_s") for x in (raws, pieces, vers, reps))
        # The same passes timed in this thread's CPU time, least of the rounds:
        # on a shared machine other processes' load distorts wall-clock ratios
        # of these CPU-bound passes (warm cache) far more than their CPU time.
        for x, runs in ((raw_read, raws), (raw_pieces, pieces), (ver, vers), (rep, reps)):
            x["cpu_mb_per_s"] = x["bytes"] / max(min(r["cpu_seconds"] for r in runs), 1e-9) / 1e6
        say("verify peak RSS (subprocess)")
        rss = verify_peak_rss(log_path)
        for x in (ver, rep, raw_pieces):
            x["ratio_vs_raw_cpu"] = x["cpu_mb_per_s"] / raw_read["cpu_mb_per_s"]
        for x in (ver, rep):
            x["ratio_vs_raw"] = x["mb_per_s"] / raw_read["mb_per_s"]
            x["ratio_vs_raw_per_record"] = x["mb_per_s"] / raw_pieces["mb_per_s"]

        by_threads = {a["threads"]: a for a in appends}
        goals = []
        if 64 in by_threads:
            goals.append(_goal("appenders_64_vs_raw_batch_64", by_threads[64]["ratio_vs_raw_nominal"]))
        if 1 in by_threads:
            goals.append(_goal("appenders_1_vs_raw_batch_1", by_threads[1]["ratio_vs_raw_nominal"]))
        for a in async_appends:
            if a["threads"] == 64:
                goals.append(_goal("tasks_64_vs_raw_batch_64", a["ratio_vs_raw_nominal"]))
        goals.append(_goal("verify_vs_raw_read_hash", ver["ratio_vs_raw"]))
        goals.append(_goal("replay_vs_raw_read_hash", rep["ratio_vs_raw"]))
        goals.append(_goal("verify_peak_rss_mib", rss["peak_rss_mib"]))
        return {
            "machine": machine_info(scratch),
            "record_bytes": record_bytes,
            "rounds": rounds,
            "appends": appends,
            "async_appends": async_appends,
            "read": {"log": built, "raw_read_hash": raw_read, "raw_read_hash_per_record": raw_pieces,
                     "verify": ver, "replay": rep},
            "verify_rss": rss,
            "goals": goals,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- the tables and the command ---------------------------------------------------------------------


def bench_report(report: dict) -> BenchReport:
    """The tables of a :func:`run_wal_bench` report."""
    out = BenchReport(Stamp.capture(report["machine"]))
    t = out.table(f"appends: {report['record_bytes']} B records, one fdatasync per batch",
                  ["appenders", "records/s", "MB/s", "fsyncs/rec", "avg batch", "p50 ms", "p99 ms",
                   "raw rec/s @avg batch", "log/raw", "raw rec/s @batch=appenders", "log/raw"])
    appends = report["appends"] + report.get("async_appends", [])
    for a in appends:
        who = str(a["threads"]) if a.get("mode", "threads") == "threads" else f"{a['threads']} asyncio tasks"
        t.add_row(who, f"{a['records_per_s']:,.0f}", f"{a['mb_per_s']:,.1f}", f"{a['fsyncs_per_record']:.3f}",
                  f"{a['avg_batch']:.1f}", f"{a['p50_ms']:.2f}", f"{a['p99_ms']:.2f}",
                  f"{a['raw_records_per_s']:,.0f} (b={a['raw_batch']})", percent(a["ratio_vs_raw"]),
                  f"{a['raw_nominal_records_per_s']:,.0f} (b={a['raw_nominal_batch']})",
                  percent(a["ratio_vs_raw_nominal"]))
    for a in appends:
        if len(a.get("all_rounds", [])) > 1:
            out.line(f"  {a['threads']} {a.get('mode', 'threads')}, every round (records/s, log/raw at batch "
                     f"{a['threads']}): " + ", ".join(f"{x['records_per_s']:,.0f} {percent(x['ratio_vs_raw_nominal'])}"
                                                      for x in a["all_rounds"]))
    r = report["read"]
    rt = out.table(f"reading a {r['log']['bytes'] / 2**20:,.0f} MiB log ({r['log']['records']:,} records), warm cache",
                   ["pass", "MB/s", "records/s", "seconds", "vs raw read+blake3", "vs raw per-record blake3",
                    "vs raw, CPU time"])
    raw, pieces = r["raw_read_hash"], r["raw_read_hash_per_record"]
    rt.add_row("raw read + blake3 (1 MiB calls)", f"{raw['mb_per_s']:,.0f}", "", f"{raw['seconds']:.2f}", "100%", "",
               "100%")
    rt.add_row(f"raw read + blake3 per {pieces['piece_bytes']} B piece", f"{pieces['mb_per_s']:,.0f}", "",
               f"{pieces['seconds']:.2f}", percent(pieces["mb_per_s"] / raw["mb_per_s"]), "100%",
               percent(pieces.get("ratio_vs_raw_cpu")))
    for name in ("verify", "replay"):
        x = r[name]
        rt.add_row(f"wal {name}", f"{x['mb_per_s']:,.0f}", f"{x['records_per_s']:,.0f}", f"{x['seconds']:.2f}",
                   percent(x["ratio_vs_raw"]), percent(x["ratio_vs_raw_per_record"]), percent(x.get("ratio_vs_raw_cpu")))
    rss = report["verify_rss"]
    out.line(f"verify peak RSS: {rss['peak_rss_mib']:.1f} MiB for a {rss['log_bytes'] / 2**20:,.0f} MiB log "
             f"(interpreter + wal alone: {rss['baseline_rss_mib']:.1f} MiB)")
    gt = out.table("goals", ["goal", "measured", "met"])
    for g in report["goals"]:
        value = f"{g['value']:.1f} MiB" if g["goal"].endswith("_mib") else percent(g["value"])
        gt.add_row(g["description"], value, "yes" if g["met"] else "NO")
    return out


@click.command(name="wal", context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of tables.")
@click.option("--records", type=click.IntRange(min=1), default=20000, show_default=True,
              help="Records appended per appender configuration (shared by its threads).")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="Where to put the scratch logs (the disk under test). Default: the system temp dir.")
@click.option("--verify-gib", type=click.FloatRange(min=0.0, min_open=True), default=0.25, show_default=True,
              help="Size of the log that verify, replay and the RSS check read (2 for the 2 GiB check).")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Repeat each log/raw pair this many times, alternating, and report the median round.")
@click.option("--record-bytes", type=click.IntRange(min=1), default=RECORD_BYTES, show_default=True,
              help="Payload size of each record.")
def bench_wal_command(as_json: bool, records: int, directory: str | None, verify_gib: float, rounds: int,
                      record_bytes: int) -> None:
    """Benchmark appends, verify, replay and verify's memory against raw I/O.

    Appends 4 KiB records from 1, 16 and 64 threads (records/s, MB/s, fsyncs
    per record, p50/p99 latency) and compares each with a plain loop of
    os.write + os.fdatasync of the same batch size on the same disk; times
    verify and a full replay of a --verify-gib log against a raw read +
    blake3 of the same bytes; and measures the peak RSS of verify in a
    subprocess. Ratios are checked against the project's goals. Scratch files
    are deleted afterwards.

    \b
    Example:
        walctl bench wal --dir /var/lib/mailwal --verify-gib 2
        walctl bench wal --json --records 2000 | jq '.goals'
    """
    report = run_wal_bench(directory, records=records, verify_bytes=int(verify_gib * 2**30), record_bytes=record_bytes,
                           rounds=rounds, progress=progress_printer())
    print_report(report, bench_report, as_json=as_json)
