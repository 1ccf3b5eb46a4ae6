"""tools/bench_report.py: the one renderer of the ``walctl bench`` tables, text and markdown."""

from __future__ import annotations

import io
import json
import re

import pytest

from tools.bench_report import BenchReport, Column, Stamp, git_commit, machine_info, percent, print_report, times

MACHINE = {"cpus": 2, "cpu_model": "Test CPU", "memory_gib": 4.0, "python": "3.11.7", "kernel": "6.1",
           "dir": "/srv/x", "fs_type": "ext4", "device": "/dev/vda", "device_kind": "non-rotational",
           "disk_size_gib": 100.0}
STAMP = Stamp("abc1234", False, "2025-01-02T03:04:05+00:00", MACHINE)


def sample() -> BenchReport:
    report = BenchReport(STAMP)
    t = report.table("appends: 4096 B records", ["appenders", "records/s", "log/raw"])
    t.add_row("1", "1,234", percent(0.934))
    t.add_row("64 | tasks", "[bold]9[/bold]", percent(None))
    report.line("verify peak RSS: 41.0 MiB")
    g = report.table("goals", ["goal", "met", Column("anchors", figures=False)])
    g.add_row("UID FETCH 1:* FLAGS, 64 appenders >= 70% of raw", "yes", "Cyrus 3.6 1.55 s")
    return report


def test_ratios_are_written_one_way():
    assert percent(0.934) == "93%" and percent(0.9345, 1) == "93.5%" and percent(None) == ""
    assert times(1.5) == "1.50×" and times(None) == ""


def test_the_stamp_names_commit_date_and_machine():
    assert STAMP.line() == ("commit abc1234, 2025-01-02T03:04:05+00:00; machine: 2 vCPU Test CPU, 4.0 GiB RAM, "
                            "Python 3.11.7, kernel 6.1, ext4 on /dev/vda (non-rotational, 100.0 GiB), dir /srv/x")
    partial = Stamp("abc1234", True, "2025-01-02T03:04:05+00:00", {"cpus": 2, "python": "3.11.7"})
    assert partial.line().endswith("(with uncommitted changes), 2025-01-02T03:04:05+00:00; machine: 2 vCPU, "
                                   "Python 3.11.7")


def test_a_report_that_carries_its_stamp_keeps_it():
    report = {"commit": "def5678", "dirty": True, "date": "2024-12-31T23:59:59+00:00", "machine": MACHINE}
    assert Stamp.of_report(report) == Stamp("def5678", True, "2024-12-31T23:59:59+00:00", MACHINE)
    fresh = Stamp.of_report({"machine": MACHINE})  # one without: this checkout, now
    assert fresh.commit == git_commit()[0] and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", fresh.date)


def test_git_commit_outside_a_checkout_is_unknown(tmp_path):
    assert git_commit(str(tmp_path)) == ("unknown", False)


def test_machine_info_describes_the_disk_under_the_directory(tmp_path):
    m = machine_info(str(tmp_path))
    assert m["cpus"] >= 1 and m["dir"] == str(tmp_path) and m["fs_type"] and m["disk_size_gib"] > 0


def test_markdown_has_the_stamp_then_each_block_in_order():
    assert sample().markdown() == "\n".join([
        "**Measured:** " + STAMP.line() + ".",
        "",
        "**appends: 4096 B records**",
        "",
        "| appenders | records/s | log/raw |",
        "|---|---:|---:|",
        "| 1 | 1,234 | 93% |",
        "| 64 \\| tasks | [bold]9[/bold] |  |",
        "",
        "verify peak RSS: 41.0 MiB",
        "",
        "**goals**",
        "",
        "| goal | met | anchors |",
        "|---|---:|---|",
        "| UID FETCH 1:\\* FLAGS, 64 appenders >= 70% of raw | yes | Cyrus 3.6 1.55 s |",
    ]) + "\n"


def test_text_prints_every_cell_as_written():
    out = io.StringIO()
    sample().print_text(out)
    text = out.getvalue()
    assert text.splitlines()[0] == STAMP.line()
    for cell in ("appends: 4096 B records", "1,234", "93%", "64 | tasks", "[bold]9[/bold]", "verify peak RSS: 41.0 MiB",
                 "Cyrus 3.6 1.55 s"):
        assert cell in text  # markup in a cell is text, not a style
    assert text.index("appends") < text.index("verify peak RSS") < text.index("goals")


def test_a_row_must_fill_the_table():
    t = BenchReport(STAMP).table("t", ["a", "b"])
    with pytest.raises(ValueError, match="2 columns, the row 3 cells"):
        t.add_row("1", "2", "3")


def test_print_report_prints_json_markdown_or_text(capsys):
    report = {"records": 3}
    docs = BenchReport(STAMP)
    docs.line("for the docs")
    print_report(report, lambda r: sample(), as_json=True)
    assert json.loads(capsys.readouterr().out) == report
    print_report(report, lambda r: sample(), as_json=False, markdown=True)
    assert capsys.readouterr().out == sample().markdown()
    print_report(report, lambda r: sample(), as_json=False, markdown=True, markdown_tables=lambda r: docs)
    assert capsys.readouterr().out == docs.markdown()
    print_report(report, lambda r: sample(), as_json=False)
    assert capsys.readouterr().out.splitlines()[0] == STAMP.line()
