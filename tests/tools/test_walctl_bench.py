"""walctl bench wal: runs with tiny sizes and reports every field (speed is never asserted)."""

import json
import os

from click.testing import CliRunner

from tools.walctl import cli


def test_bench_wal_json_has_all_fields(tmp_path):
    r = CliRunner().invoke(
        cli, ["bench", "wal", "--json", "--records", "64", "--verify-gib", "0.002", "--rounds", "2", "--dir", str(tmp_path)],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert [a["threads"] for a in rep["appends"]] == [1, 16, 64]
    for a in rep["appends"]:
        assert a["records"] == 64 and a["record_bytes"] == 4096
        for key in ("records_per_s", "mb_per_s", "fsyncs_per_record", "avg_batch", "p50_ms", "p99_ms",
                    "raw_records_per_s", "ratio_vs_raw", "raw_nominal_records_per_s", "ratio_vs_raw_nominal"):
            assert a[key] > 0, key
        assert a["fsyncs"] >= 1 and a["fsyncs_per_record"] <= 1
        assert a["p50_ms"] <= a["p99_ms"]
        assert a["raw_nominal_batch"] == a["threads"]
    assert rep["appends"][0]["fsyncs"] == 64  # one appender: one fsync per record
    (tasks,) = rep["async_appends"]
    assert tasks["mode"] == "asyncio tasks" and tasks["threads"] == 64 and tasks["records"] == 64
    assert tasks["fsyncs"] >= 1 and tasks["fsyncs_per_record"] <= 1 and tasks["ratio_vs_raw_nominal"] > 0
    assert len(tasks["all_rounds"]) == 2
    read = rep["read"]
    assert read["log"]["records"] > 0
    assert read["verify"]["records"] == read["replay"]["records"] == read["log"]["records"]
    for key in ("raw_read_hash", "raw_read_hash_per_record", "verify", "replay"):
        assert read[key]["bytes"] == read["log"]["bytes"] and read[key]["mb_per_s"] > 0
    for key in ("verify", "replay"):
        assert read[key]["ratio_vs_raw"] > 0 and read[key]["ratio_vs_raw_per_record"] > 0
        assert read[key]["cpu_mb_per_s"] > 0 and read[key]["ratio_vs_raw_cpu"] > 0
    assert rep["verify_rss"]["peak_rss_mib"] >= rep["verify_rss"]["baseline_rss_mib"] > 0
    assert {g["goal"] for g in rep["goals"]} == {
        "appenders_64_vs_raw_batch_64", "appenders_1_vs_raw_batch_1", "tasks_64_vs_raw_batch_64", "verify_vs_raw_read_hash",
        "replay_vs_raw_read_hash", "verify_peak_rss_mib",
    }
    assert all(isinstance(g["met"], bool) for g in rep["goals"])
    assert rep["machine"]["cpus"] >= 1 and rep["machine"]["fs_type"]
    assert os.listdir(tmp_path) == []  # scratch files removed


def test_bench_wal_table_output(tmp_path):
    r = CliRunner().invoke(
        cli, ["bench", "wal", "--records", "32", "--verify-gib", "0.001", "--rounds", "1", "--dir", str(tmp_path)],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    for text in ("appenders", "raw read + blake3", "wal verify", "wal replay", "verify peak RSS", "goals"):
        assert text in r.stdout


def test_bench_store_json_and_table(tmp_path):
    """walctl bench store: every batch size applied the same log to the same digest."""
    r = CliRunner().invoke(
        cli, ["bench", "store", "--json", "--messages", "40", "--rounds", "2", "--dir", str(tmp_path)],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["deliveries"] == 40 and rep["mailboxes"] == 4
    # 4 mailbox creations, 40 deliveries, one flag change every 8
    assert rep["records"] == 4 + 40 + 5
    assert rep["payload_bytes"] > 40 * 4096
    assert [b["batch"] for b in rep["batches"]] == [1, 16, 128, 512]
    for b in rep["batches"]:
        for key in ("records_per_s", "mb_per_s", "cpu_us_per_record", "raw_records_per_s", "raw_cpu_us_per_record",
                    "ratio_vs_raw", "ratio_vs_raw_cpu"):
            assert b[key] > 0, key
        assert len(b["all_rounds_cpu_us_per_record"]) == 2
    assert rep["same_digest_everywhere"] is True
    assert os.listdir(tmp_path) == []  # scratch files removed
    table = CliRunner().invoke(cli, ["bench", "store", "--messages", "16", "--rounds", "1", "--dir", str(tmp_path)],
                               catch_exceptions=False)
    assert table.exit_code == 0, table.output
    for text in ("store apply", "records per transaction", "plain SQLite", "same digest: yes"):
        assert text in table.stdout
