"""``make demo``: a write-ahead log from scratch, narrated step by step.

Creates ``./demo-nodes/demo.wal`` (afresh on every run), appends a few
thousand mail deliveries from several threads (they share fsyncs: group
commit), verifies the whole log, replays a few records, stores a cursor and
replays from it, all with the same ``walctl`` commands an operator would use.
A plain script: ``main()`` returns the exit status.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time

import wal
from wal import codec

from .walctl import cli

DEMO_DIR = "demo-nodes"
LOG_NAME = "demo.wal"
THREADS = 4
RECORDS_PER_THREAD = 750
SEGMENT_MAX_BYTES = 256 * 1024  # small, so the demo log rolls over into several segments
DELIVERY = 1  # record type used by this demo for "message delivered"


def say(text: str) -> None:
    print(text, flush=True)


def walctl(*args: str) -> int:
    """Run one walctl command in-process, showing it as typed."""
    say(f"\n$ walctl {' '.join(args)}")
    sys.stdout.flush()
    try:
        rc = cli.main(list(args), prog_name="walctl", standalone_mode=False)
    except SystemExit as exc:  # pragma: no cover - click may still exit on usage errors
        rc = exc.code
    return int(rc or 0)


def message(thread: int, n: int) -> bytes:
    return (
        f"From: sender{thread}@example.org\r\nTo: alice@example.org\r\n"
        f"Subject: demo message {n} from thread {thread}\r\n\r\n"
        f"Hello Alice, this is message {n}.\r\n"
    ).encode()


def append_from_threads(log: wal.Log) -> tuple[float, int]:
    """THREADS appenders, each delivering RECORDS_PER_THREAD messages; returns (seconds, fsyncs)."""
    done = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []
    total = THREADS * RECORDS_PER_THREAD

    def appender(t: int) -> None:
        try:
            for n in range(1, RECORDS_PER_THREAD + 1):
                payload = codec.dumps({"mailbox": "INBOX", "from_thread": t, "n": n, "body": message(t, n)})
                log.append(DELIVERY, payload)
                with lock:
                    done[0] += 1
        except BaseException as exc:
            errors.append(exc)

    fsyncs_before = log.fsync_count
    t0 = time.perf_counter()
    workers = [threading.Thread(target=appender, args=(t,)) for t in range(THREADS)]
    for w in workers:
        w.start()
    quarter = 0
    while any(w.is_alive() for w in workers) or quarter < 4:
        time.sleep(0.05)
        while quarter < 4 and done[0] * 4 >= (quarter + 1) * total:
            quarter += 1
            say(f"   ... {quarter * 25}% ({quarter * total // 4} records durable)")
        if errors:
            break
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0, log.fsync_count - fsyncs_before


def main() -> int:
    log_path = os.path.join(DEMO_DIR, LOG_NAME)
    say("mailwal demo: one write-ahead log, from nothing to replay.\n")

    say(f"1. Create a fresh log at {log_path} (segments roll over every {SEGMENT_MAX_BYTES // 1024} KiB).")
    if os.path.exists(log_path):
        shutil.rmtree(log_path)
    log = wal.Log.create(log_path, segment_max_bytes=SEGMENT_MAX_BYTES)

    total = THREADS * RECORDS_PER_THREAD
    say(f"\n2. {THREADS} threads deliver {RECORDS_PER_THREAD} messages each. An append returns only")
    say("   after its record is fdatasync'ed; concurrent appends share one fsync (group commit).")
    try:
        seconds, fsyncs = append_from_threads(log)
        say(f"   {total} records in {seconds:.2f} s ({total / seconds:,.0f} records/s) with {fsyncs} fsyncs: "
            f"{total / max(fsyncs, 1):.1f} records per fsync.")
        say(f"   last LSN {log.last_lsn}, {log.segment_count()} segments, last hash {log.last_hash.hex()[:16]}...")
    finally:
        log.close()

    say("\n3. Verify every header, frame, record hash and chain link (read-only).")
    if walctl("verify", log_path) != 0:
        say("   verification failed: see the error above")
        return 1

    say("\n4. Replay the first three records (bodies are shown as size + blake3 GUID).")
    walctl("replay", log_path, "--from", "1", "--to", "3")

    say("\n5. A consumer stores its position as a named cursor: the last LSN it finished.")
    cursor_at = total - 2
    walctl("cursor", log_path, "set", "indexer", str(cursor_at))
    walctl("cursor", log_path, "list")

    say("\n6. Replaying from the cursor's name starts right after it, as JSON for programs.")
    walctl("replay", log_path, "--from", "indexer", "--json")

    say("\n7. The counts.")
    report = wal.verify(log_path)
    cursors = wal.CursorStore(log_path, wal.OS_FILEOPS).list()
    say(f"   records   {report.records} (LSN {report.first_lsn}..{report.last_lsn})")
    say(f"   segments  {report.segments}, {report.bytes:,} bytes")
    say(f"   fsyncs    {fsyncs} for {total} appends")
    say(f"   cursors   {', '.join(f'{k}={v}' for k, v in cursors.items())}")
    say(f"\nDone. Inspect it yourself: .venv/bin/walctl replay {log_path} --from indexer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
