"""The parts of ``walctl torture`` (tools/torture/) on their own, without a cluster run:
the fault runner's table and its skips, the journal, and the LMTP outcomes the history records."""

from __future__ import annotations

import json
import random
import socket

from tests.support.lmtp import served_node
from tools.torture.cluster import Cluster
from tools.torture.faults import FaultRunner
from tools.torture.journal import Journal
from tools.torture.nodes import Features
from tools.torture.schedule import FAULT_KINDS, Fault
from tools.torture.workload import lmtp_deliver


def _runner(tmp_path, features: Features) -> tuple[FaultRunner, Journal]:
    journal = Journal()
    cluster = Cluster(str(tmp_path), 3, seed=1, rng=random.Random(1), features=features, journal=journal)
    return FaultRunner(cluster, journal, features), journal


def test_every_fault_kind_has_an_injector(tmp_path):
    runner, _ = _runner(tmp_path, Features())
    assert set(runner.injectors) == set(FAULT_KINDS)


def test_a_fault_without_its_tool_or_its_target_is_skipped_and_counted(tmp_path):
    features = Features()
    features.strace = "strace is not installed"
    runner, journal = _runner(tmp_path, features)
    runner.run(Fault(5.0, "fsync-error", 0, 0, 1.0, 0.5))
    runner.run(Fault(6.0, "kill-replica", 0, 0, 1.0, 0.5))  # no node runs: no master to find
    assert runner.skip_counts == {"fsync-error": 1, "kill-replica": 1} and not runner.run_counts
    assert runner.skip_reasons == {"fsync-error": "strace is not installed"}
    (skipped,) = [e for e in journal.events if e["kind"] == "fault-skipped"]
    assert skipped["fault"]["kind"] == "kill-replica" and "no single running master" in skipped["reason"]


def test_the_journal_keeps_and_appends_events_and_findings(tmp_path):
    lines = []
    journal = Journal(lines.append)
    journal.open(str(tmp_path / "events.jsonl"))
    journal.event("start", node="n0")
    journal.finding("node exited while starting", node="n1")
    journal.close()
    written = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in written] == ["start", "finding"] == [e["kind"] for e in journal.events]
    assert journal.findings[0]["problem"] == "node exited while starting" and journal.findings[0]["node"] == "n1"
    assert lines == ["  FINDING: node exited while starting {'node': 'n1'}"]


def test_lmtp_outcomes_are_what_the_history_checker_expects(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: refused before anything was sent
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    (refused,) = lmtp_deliver("127.0.0.1", closed, b"x\r\n", ["ann@torture"], 5).values()
    assert refused[0] == "temp" and refused[1] == 0 and refused[3] is False
    with served_node(str(tmp_path / "n")) as runner:
        out = lmtp_deliver("127.0.0.1", runner.lmtp_address[1], b"Subject: t\r\n\r\nbody\r\n",
                           ["ann@torture", "bad/name@torture"], 10)
    assert out["ann@torture"][:2] == ("acked", 250) and "UID 1" in out["ann@torture"][2] and out["ann@torture"][3]
    assert out["bad/name@torture"][:2] == ("perm", 550) and out["bad/name@torture"][3] is False
