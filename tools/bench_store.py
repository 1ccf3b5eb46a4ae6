"""``walctl bench store``: how fast a store applies the log, against plain SQLite.

Every node's store follows its log (MS-5): on a master beside the deliveries,
on a replica beside the receiver, and alone when a store is rebuilt or a
seeded replica catches up. This bench builds a log of 4 KiB deliveries (and a
flag change every ``FLAG_EVERY`` deliveries) to a few mailboxes, then applies
it to a fresh store in transactions of 1, 16, 128 and 512 records
(``Store.apply_records``, as the applier does) and measures records/s, MB/s of
log payload and thread CPU per record.

The ceiling, measured in the same run on the same disk: plain SQLite with the
store's settings (WAL, ``synchronous=NORMAL``, the store's checkpoint interval)
inserting each record's payload
as one row of a one-table database, in transactions of the same size. It is
the least any SQLite store must do with the same bytes; the store also keeps
message rows, reference counts, digests and its applied LSN, and checks every
body against its GUID.

Each batch size runs ``rounds`` times, alternating with its ceiling; the median
round by CPU time is reported. Every store the run builds must end with the
same digest (the figures are of the same work).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import click

from .bench_report import BenchReport, Stamp, machine_info, percent, print_report, progress_printer
from .cliutil import CONTEXT_SETTINGS

__all__ = ["bench_store", "run_store_bench", "bench_report"]

BODY_BYTES = 4096
FLAG_EVERY = 8
BATCHES = (1, 16, 128, 512)


def build_log(directory: str, messages: int, mailboxes: int) -> list:
    """A node's log of ``messages`` distinct 4 KiB deliveries; its records."""
    from engine.node import Node

    node = Node.init(os.path.join(directory, "source"))
    try:
        names = [f"user/u{i}/INBOX" for i in range(mailboxes)]
        for name in names:
            node.create_mailbox(name)

        def deliver(i: int) -> None:
            body = b"Subject: %d\r\n\r\n" % i
            receipt = node.deliver(names[i % mailboxes], body + os.urandom(BODY_BYTES - len(body)))
            if i % FLAG_EVERY == FLAG_EVERY - 1:
                node.store_flags(receipt.mailbox, [receipt.uid], "add", ["\\Seen"])

        with ThreadPoolExecutor(16) as pool:  # group commit: the build takes seconds, not minutes
            list(pool.map(deliver, range(messages)))
        return list(node.log.read(1))
    finally:
        node.close()


def apply_store(path: str, records: list, batch: int) -> dict:
    """Apply ``records`` to a fresh store at ``path`` in transactions of ``batch``."""
    from engine.store import Store, remove_store_files

    remove_store_files(path)
    store = Store(path)
    try:
        wall, cpu = time.perf_counter(), time.thread_time()
        for i in range(0, len(records), batch):
            store.apply_records(records[i:i + batch])
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        return {"seconds": wall, "cpu_seconds": cpu, "digest": store.digest()["store"]}
    finally:
        store.close()
        remove_store_files(path)


def apply_raw(path: str, records: list, batch: int) -> dict:
    """The ceiling: each payload as one row of plain SQLite, same settings and transaction size."""
    from engine.store.database import WAL_CHECKPOINT_PAGES, remove_store_files

    remove_store_files(path)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        db.execute("CREATE TABLE records (lsn INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        wall, cpu = time.perf_counter(), time.thread_time()
        for i in range(0, len(records), batch):
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO records VALUES (?,?)", ((r.lsn, r.payload) for r in records[i:i + batch]))
            db.execute("COMMIT")
        return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.thread_time() - cpu}
    finally:
        db.close()
        remove_store_files(path)


def run_store_bench(directory: str | None, *, messages: int = 8192, mailboxes: int = 4,
                    batches: tuple[int, ...] = BATCHES, rounds: int = 3, progress=None) -> dict:
    """Build the log, apply it at every batch size against the ceiling; the report (module docstring)."""
    say = progress or (lambda msg: None)
    scratch = tempfile.mkdtemp(prefix="mailwal-bench-store-", dir=directory)
    try:
        say(f"building a log of {messages:,} deliveries to {mailboxes} mailboxes")
        records = build_log(scratch, messages, mailboxes)
        payload = sum(len(r.payload) for r in records)
        n = len(records)
        rows, digests = [], set()
        for batch in batches:
            tries = []
            for k in range(rounds):
                say(f"batch {batch}: round {k + 1} of {rounds}")
                store = apply_store(os.path.join(scratch, "store.sqlite"), records, batch)
                raw = apply_raw(os.path.join(scratch, "raw.sqlite"), records, batch)
                digests.add(store.pop("digest"))
                tries.append((store, raw))
            store, raw = sorted(tries, key=lambda t: t[0]["cpu_seconds"])[len(tries) // 2]
            rows.append({
                "batch": batch,
                "records_per_s": n / store["seconds"],
                "mb_per_s": payload / store["seconds"] / 1e6,
                "cpu_us_per_record": store["cpu_seconds"] / n * 1e6,
                "raw_records_per_s": n / raw["seconds"],
                "raw_cpu_us_per_record": raw["cpu_seconds"] / n * 1e6,
                "ratio_vs_raw": raw["seconds"] / store["seconds"],
                "ratio_vs_raw_cpu": raw["cpu_seconds"] / store["cpu_seconds"],
                "all_rounds_cpu_us_per_record": [t[0]["cpu_seconds"] / n * 1e6 for t in tries],
            })
        return {
            "machine": machine_info(scratch),
            "records": n, "deliveries": messages, "mailboxes": mailboxes, "payload_bytes": payload,
            "rounds": rounds, "batches": rows,
            "same_digest_everywhere": len(digests) == 1,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def bench_report(report: dict) -> BenchReport:
    """The table of a :func:`run_store_bench` report."""
    out = BenchReport(Stamp.capture(report["machine"]))
    t = out.table(f"store apply: {report['records']:,} records ({report['deliveries']:,} deliveries of 4 KiB to "
                  f"{report['mailboxes']} mailboxes, a flag change every {FLAG_EVERY}), median of "
                  f"{report['rounds']} rounds",
                  ["records per transaction", "records/s", "MB/s", "CPU µs/record", "plain SQLite records/s",
                   "plain SQLite CPU µs/record", "vs plain", "vs plain, CPU"])
    for r in report["batches"]:
        t.add_row(str(r["batch"]), f"{r['records_per_s']:,.0f}", f"{r['mb_per_s']:,.1f}",
                  f"{r['cpu_us_per_record']:.1f}", f"{r['raw_records_per_s']:,.0f}",
                  f"{r['raw_cpu_us_per_record']:.1f}", percent(r["ratio_vs_raw"]), percent(r["ratio_vs_raw_cpu"]))
    out.line("every store built ended with the same digest: " + ("yes" if report["same_digest_everywhere"] else "NO"))
    return out


@click.command(name="store", context_settings=CONTEXT_SETTINGS)
@click.option("--messages", type=click.IntRange(min=1), default=8192, show_default=True,
              help="4 KiB deliveries in the log applied.")
@click.option("--mailboxes", type=click.IntRange(min=1), default=4, show_default=True,
              help="Mailboxes the deliveries are spread over.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs of each batch size (alternating with its ceiling); the median is shown.")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="Where to put the scratch node and stores (the disk under test). Default: the system temp dir.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of a table.")
def bench_store(messages: int, mailboxes: int, rounds: int, directory: str | None, as_json: bool) -> None:
    """Benchmark the store applying the log, against plain SQLite.

    Applies a log of 4 KiB deliveries to a fresh store in transactions of 1,
    16, 128 and 512 records (records/s, MB/s, CPU per record) and compares
    each with plain SQLite inserting the same payloads, one row each, in
    transactions of the same size on the same disk. Scratch files are
    deleted afterwards.

    \b
    Example:
        walctl bench store --dir /var/lib/mailwal
    """
    report = run_store_bench(directory, messages=messages, mailboxes=mailboxes, rounds=rounds,
                             progress=progress_printer())
    print_report(report, bench_report, as_json=as_json)
    if not report["same_digest_everywhere"]:
        raise SystemExit(1)
