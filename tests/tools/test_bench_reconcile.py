"""``walctl bench reconcile --record-bytes``: with large records the fork search's
probes read frame headers only, and each log's end costs its last record (REC-3)."""

import json

from click.testing import CliRunner

from tools.walctl import cli


def test_bench_reconcile_with_large_records_reports_what_the_fork_search_read(tmp_path):
    record = 256 * 1024
    r = CliRunner().invoke(cli, ["bench", "reconcile", "--records", "55", "--record-bytes", str(record),
                                 "--cache", "warm", "--dir", str(tmp_path), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["record_bytes"] == record and doc["records"] == 55
    assert doc["fork"] == {"expected": 54, "found": 54}
    assert doc["log_bytes"]["a"] > 30 * record  # mostly deliveries of 256 KiB
    ff = doc["phases"]["find_fork"]
    assert ff["bytes_read"] == ff["probe_bytes_read"] + ff["end_bytes_read"]
    assert ff["probe_bytes_read"] < 64 * 1024  # headers, not payloads (none of the 256 KiB bodies)
    # each end: its last record whole, plus the look for a frame near the end
    assert doc["last_frames_bytes"] <= ff["end_bytes_read"] <= doc["last_frames_bytes"] + 2 * 128 * 1024
    goals = {g["goal"]: g["met"] for g in doc["goals"]}
    assert goals["fork_found"] and goals["fork_search_reads_little"] and goals["fork_probes_read_headers"]
    assert list(tmp_path.iterdir()) == []  # scratch logs removed
