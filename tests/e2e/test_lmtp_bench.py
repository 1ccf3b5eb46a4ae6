"""``walctl bench lmtp`` runs end to end on a tiny load (speed is never asserted, only that it measures)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from engine.store.events import body_guid
from tools.bench_lmtp import bench_message, log_batches, summarise_pyspy
from tools.walctl import cli
from tests.support.lmtp import served_node


def test_bench_lmtp_small_run_reports_every_row(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "lmtp", "--json", "--messages", "24", "--connections", "1,3",
                                      "--client", "asyncio", "--no-profile", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = {(r["server"], r["connections"]): r for r in report["runs"]}
    assert set(rows) == {(s, c) for s in ("mailwal", "maildir", "null", "aiosmtpd") for c in (1, 3)}
    for r in rows.values():
        assert r["ok"] == 24 and r["errors"] == {} and r["deliveries_per_s"] > 0
        assert r["p99_ms"] >= r["p50_ms"] > 0
    for c in (1, 3):
        m = rows[("mailwal", c)]
        assert m["avg_batch"] >= 1 and m["raw_per_s"] > 0 and m["ratio_vs_raw"] > 0
    assert [(a["mode"], a["threads"]) for a in report["node_api"]] == [
        ("threads", 1), ("threads", 3), ("tasks", 1), ("tasks", 3)]
    for a in report["node_api"]:
        assert a["deliveries_per_s"] > 0 and a["avg_batch"] >= 1 and a["raw_nominal_batch"] == a["threads"]
        assert a["ratio_vs_raw"] > 0 and a["ratio_vs_raw_nominal"] > 0
    assert report["machine"]["cpus"] >= 1


def test_bench_target_points_the_client_at_any_server(tmp_path):
    with served_node(str(tmp_path / "n")) as runner:
        port = runner.lmtp_address[1]
        result = CliRunner().invoke(cli, ["bench", "lmtp", "--json", "--messages", "10", "--connections", "2",
                                          "--client", "asyncio", "--target", f"127.0.0.1:{port}"])
        assert result.exit_code == 0, result.output
        (row,) = json.loads(result.output)["runs"]
        assert row["server"] == f"127.0.0.1:{port}" and row["ok"] == 10
        msgs = runner.anode.node.list_messages("user/bench/INBOX")
        assert len({m.guid for m in msgs}) == 10


def test_bench_message_is_exact_size_and_distinct():
    a, b = bench_message("a"), bench_message("b")
    assert len(a) == len(b) == 4096 and a.endswith(b"\r\n") and body_guid(a) != body_guid(b)
    assert b"\r\n." not in a


def test_log_batches_counts_fsync_batches(tmp_path):
    from engine.node import Node

    with Node.init(str(tmp_path / "n")) as n:
        n.deliver_many([("user/a/INBOX", ()), ("user/b/INBOX", ())], b"x\r\n", create=True)  # 4 records, 1 batch
        n.deliver("user/a/INBOX", b"y\r\n")
    b = log_batches(str(tmp_path / "n" / "log.wal"))
    assert (b["records"], b["batches"]) == (5, 2)


def test_summarise_pyspy_groups_by_component(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text("thread (1): MainThread;run (asyncio/base_events.py:1);_step_data (engine/lmtp.py:5) 30\n"
                   "thread (2): worker;enqueue (wal/writer.py:9) 10\n")
    s = summarise_pyspy(str(raw))
    assert s["samples"] == 40
    assert s["components"][0] == {"component": "LMTP protocol (engine/lmtp.py)", "share": 0.75}
