"""``walctl bench``: throughput tables with a raw ceiling measured in the same run."""

from __future__ import annotations

import sys

import click

from . import bench_wal
from .cliutil import CONTEXT_SETTINGS, dump_json, stderr_console

__all__ = ["bench"]


@click.group(name="bench", context_settings=CONTEXT_SETTINGS)
def bench() -> None:
    """Measure throughput against a raw ceiling measured in the same run.

    Every figure comes with the plainest code doing the same I/O on the same
    disk, and the ratio between them; speed is never asserted by tests.

    \b
    Example:
        walctl bench wal
    """


def _render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    # In a pipe rich assumes 80 columns, too narrow for these tables: widen them.
    console = Console(width=None if sys.stdout.isatty() else 180)
    m = report["machine"]
    console.print(
        f"machine: {m['cpus']} vCPU {m['cpu_model']}, {m['memory_gib']} GiB RAM, Python {m['python']}, "
        f"{m['fs_type']} on {m['device']} ({m['device_kind']}, {m['disk_size_gib']} GiB), dir {m['dir']}"
    )
    t = Table(title=f"appends: {report['record_bytes']} B records, one fdatasync per batch")
    for col in ("appenders", "records/s", "MB/s", "fsyncs/rec", "avg batch", "p50 ms", "p99 ms",
                "raw rec/s @avg batch", "log/raw", "raw rec/s @batch=appenders", "log/raw"):
        t.add_column(col, justify="right")
    for a in report["appends"] + report.get("async_appends", []):
        who = str(a["threads"]) if a.get("mode", "threads") == "threads" else f"{a['threads']} asyncio tasks"
        t.add_row(
            who, f"{a['records_per_s']:,.0f}", f"{a['mb_per_s']:,.1f}", f"{a['fsyncs_per_record']:.3f}",
            f"{a['avg_batch']:.1f}", f"{a['p50_ms']:.2f}", f"{a['p99_ms']:.2f}",
            f"{a['raw_records_per_s']:,.0f} (b={a['raw_batch']})", f"{a['ratio_vs_raw']:.0%}",
            f"{a['raw_nominal_records_per_s']:,.0f} (b={a['raw_nominal_batch']})", f"{a['ratio_vs_raw_nominal']:.0%}",
        )
    console.print(t)
    for a in report["appends"] + report.get("async_appends", []):
        if len(a.get("all_rounds", [])) > 1:
            console.print(f"  {a['threads']} {a.get('mode', 'threads')}, every round (records/s, log/raw at batch "
                          f"{a['threads']}): " + ", ".join(f"{x['records_per_s']:,.0f} {x['ratio_vs_raw_nominal']:.0%}"
                                                           for x in a["all_rounds"]))
    r = report["read"]
    rt = Table(title=f"reading a {r['log']['bytes'] / 2**20:,.0f} MiB log ({r['log']['records']:,} records), warm cache")
    for col in ("pass", "MB/s", "records/s", "seconds", "vs raw read+blake3", "vs raw per-record blake3",
                "vs raw, CPU time"):
        rt.add_column(col, justify="right")
    raw, pieces = r["raw_read_hash"], r["raw_read_hash_per_record"]

    def cpu(x: dict) -> str:
        return f"{x['ratio_vs_raw_cpu']:.0%}" if "ratio_vs_raw_cpu" in x else ""

    rt.add_row("raw read + blake3 (1 MiB calls)", f"{raw['mb_per_s']:,.0f}", "", f"{raw['seconds']:.2f}", "100%", "",
               "100%")
    rt.add_row(f"raw read + blake3 per {pieces['piece_bytes']} B piece", f"{pieces['mb_per_s']:,.0f}", "",
               f"{pieces['seconds']:.2f}", f"{pieces['mb_per_s'] / raw['mb_per_s']:.0%}", "100%", cpu(pieces))
    for name in ("verify", "replay"):
        x = r[name]
        rt.add_row(f"wal {name}", f"{x['mb_per_s']:,.0f}", f"{x['records_per_s']:,.0f}", f"{x['seconds']:.2f}",
                   f"{x['ratio_vs_raw']:.0%}", f"{x['ratio_vs_raw_per_record']:.0%}", cpu(x))
    console.print(rt)
    rss = report["verify_rss"]
    console.print(
        f"verify peak RSS: {rss['peak_rss_mib']:.1f} MiB for a {rss['log_bytes'] / 2**20:,.0f} MiB log "
        f"(interpreter + wal alone: {rss['baseline_rss_mib']:.1f} MiB)"
    )
    gt = Table(title="goals")
    for col in ("goal", "measured", "met"):
        gt.add_column(col)
    for g in report["goals"]:
        value = f"{g['value']:.1f} MiB" if g["goal"].endswith("_mib") else f"{g['value']:.0%}"
        gt.add_row(g["description"], value, "yes" if g["met"] else "NO")
    console.print(gt)


@bench.command(name="wal")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of tables.")
@click.option("--records", type=click.IntRange(min=1), default=20000, show_default=True,
              help="Records appended per appender configuration (shared by its threads).")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="Where to put the scratch logs (the disk under test). Default: the system temp dir.")
@click.option("--verify-gib", type=click.FloatRange(min=0.0, min_open=True), default=0.25, show_default=True,
              help="Size of the log that verify, replay and the RSS check read (2 for the 2 GiB check).")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Repeat each log/raw pair this many times, alternating, and report the median round.")
@click.option("--record-bytes", type=click.IntRange(min=1), default=bench_wal.RECORD_BYTES, show_default=True,
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
    console = stderr_console()
    say = (lambda msg: console.print(f"[dim]bench: {msg}[/dim]")) if console is not None else None
    report = bench_wal.run_wal_bench(
        directory, records=records, verify_bytes=int(verify_gib * 2**30), record_bytes=record_bytes, rounds=rounds,
        progress=say,
    )
    if as_json:
        dump_json(report, indent=2)
    else:
        _render(report)
