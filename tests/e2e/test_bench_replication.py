"""``walctl bench replication`` runs end to end on a tiny load (speed is never asserted, only that it measures)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from engine.store.events import body_guid
from tools.bench_replication import GOALS, lag_figures, render_markdown
from tools.walctl import cli


def test_bench_replication_small_run_reports_every_figure(tmp_path):
    # A directory too deep for AF_UNIX: the nodes have no control.sock, the bench uses their TCP control ports.
    deep = tmp_path / ("d" * 100)
    result = CliRunner().invoke(cli, ["bench", "replication", "--json", "--messages", "40", "--rounds", "1",
                                      "--lag-messages", "30", "--late-messages", "5", "--late-runs", "1",
                                      "--catchup-mib", "1", "--dir", str(deep)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)

    tp = report["throughput"]
    assert [r["mode"] for r in tp["rows"]] == ["alone", "async", "sync"]
    for r in tp["rows"]:
        assert r["ok"] == 40 and r["errors"] == {} and r["deliveries_per_s"] > 0 and r["connections"] == 64
        assert len(r["replica_cpu_us_per_delivery"]) == r["replicas"]
        # every node's store holds the same mail once the replicas caught up
        assert set(r["store_digests"]) == {"m"} | {f"r{i + 1}" for i in range(r["replicas"])}
        assert len(set(r["store_digests"].values())) == 1, r["store_digests"]
    # each run delivered its own 40 messages: three different stores
    assert len({r["store_digests"]["m"] for r in tp["rows"]}) == 3
    for r in tp["rows"][1:]:
        assert r["replicas"] == 2 and "caught_up_after_s" in r and "behind_at_end_records" in r
    assert tp["rows"][2]["sync_replicas"] == 1
    assert tp["async_vs_alone"] > 0 and abs(tp["async_cost"] - (1 - tp["async_vs_alone"])) < 1e-9
    cpu = tp["master_cpu_us_per_delivery"]  # the median over rounds: with one round, each row's own figure
    assert cpu == {r["mode"]: r["master_cpu_us_per_delivery"] for r in tp["rows"]}
    assert tp["async_master_cpu_vs_alone"] == (cpu["async"] / cpu["alone"] if cpu["alone"] else 0.0)

    lag = report["lag"]
    assert lag["ok"] == 30 and lag["connections"] == 8
    assert [r["replica"] for r in lag["replicas"]] == ["r1", "r2"]
    for r in lag["replicas"]:
        assert r["messages"] == 30 and r["not_seen"] == 0 and r["polls"] > 0
        assert 0 <= r["p50_s"] <= r["p99_s"] <= r["max_s"]
        assert r["p99_lower_bound_s"] <= r["p99_s"]
    assert 0 <= lag["p50_s"] <= lag["p99_s"] <= lag["max_s"] == max(r["max_s"] for r in lag["replicas"])

    late = report["late_start"]
    assert late["delivered"] == 5 and late["master_lsn"] >= 6 and len(late["runs"]) == 1
    run = late["runs"][0]
    assert 0 < run["control_up_s"] <= run["streaming_s"] <= run["durable_s"]
    assert late["durable_worst_s"] == run["durable_s"] and late["startup_floor_s"] > 0

    cu = report["catchup"]
    assert cu["behind_bytes"] >= 2**20 and cu["behind_records"] > 0
    assert cu["replica"]["durable_s"] > 0 and cu["mb_per_s"] > 0 and cu["raw_read_hash_mb_per_s"] > 0
    assert cu["ratio_vs_raw"] == cu["mb_per_s"] / cu["raw_read_hash_mb_per_s"]
    assert cu["raw_copy_mb_per_s"] > 0 and cu["raw_per_record_hash_mb_per_s"] > 0
    # the rate is records made durable in the replica's log; the store's apply is reported on its own
    assert cu["records_per_s"] == cu["behind_records"] / cu["replica"]["durable_s"]
    assert cu["applied_records_per_s"] == cu["behind_records"] / cu["replica"]["applied_s"]
    assert cu["raw_read_mb_per_s"] > 0 and cu["ratio_vs_raw_copy"] == cu["mb_per_s"] / cu["raw_copy_mb_per_s"]

    assert {g["goal"] for g in report["goals"]} == set(GOALS)
    for g in report["goals"]:
        assert isinstance(g["met"], bool) and isinstance(g["value"], float)
    assert report["machine"]["cpus"] >= 1 and len(report["loadavg"]["start"]) == 3

    md = render_markdown(report)  # what the README's tables come from
    assert all(desc in md for desc, _ in GOALS.values())
    assert "| 2 replicas, --sync-replicas 1 |" in md and "| both |" in md and "| run 1 |" in md
    assert "| replica: Popen to durable = master (the goal's rate) |" in md
    assert md.count(" | yes |\n") >= 2  # the rows with replicas: their stores are equal


def test_lag_is_first_poll_showing_the_lsn_minus_the_250():
    a, b, c, d = (b"message %d\r\n" % i for i in range(4))
    guid_lsn = {body_guid(a): 2, body_guid(b): 3, body_guid(c): 5}  # d never reached the log
    # the replica's durable LSN: 1 until a poll sent at 10.0; 3 by the reply at 10.010; 5 by 10.050
    changes = [[9.0, 9.001, 1], [10.0, 10.010, 3], [10.040, 10.050, 5]]
    timeline = [(10.004, 250, a), (10.008, 250, b), (10.020, 250, c), (10.030, 250, d), (10.031, 451, a)]
    fig = lag_figures(timeline, guid_lsn, changes)
    assert fig["messages"] == 3 and fig["not_seen"] == 1 and fig["before_250"] == 0
    assert abs(fig["max_s"] - 0.030) < 1e-9  # c: durable by 10.050, 250 at 10.020
    assert abs(fig["p50_s"] - 0.006) < 1e-9  # a: 10.010 - 10.004
    assert fig["resolution_p99_s"] <= 0.010 + 1e-9


def test_a_record_durable_before_its_250_counts_as_zero():
    a = b"early\r\n"
    fig = lag_figures([(5.0, 250, a)], {body_guid(a): 1}, [[4.0, 4.5, 1]])
    assert fig["before_250"] == 1 and fig["max_s"] == 0.0 and fig["p99_lower_bound_s"] == 0.0
