"""`walctl torture`: a seeded run of a real cluster under faults.

The short run is part of the default suite: three `walctl serve/follow`
processes on 127.0.0.1 behind fault proxies, LMTP deliveries and flag
changes while kill -9, SIGSTOP, link faults, soft and hard failovers (and,
where the tools exist, disk full, fsync errors and clock jumps) run; then
healing, quiescence and the history checker. The soak run is marked slow.
"""

import json
import subprocess
import sys

import pytest

from tools.torture import FAULT_KINDS, draw_schedule
from tests.support import ROOT


def run_torture(tmp_path, seconds: float, seed: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "tools", "torture", "--seconds", str(seconds), "--seed", str(seed),
                        "--json", "--quiet", "--dir", str(tmp_path / "run")],
                       cwd=ROOT, capture_output=True, text=True, timeout=seconds * 4 + 600)
    assert r.stdout.strip(), f"no summary (exit {r.returncode}): {r.stderr[-5000:]}"
    summary = json.loads(r.stdout)
    failed = {k: v for k, v in summary["verdicts"].items() if not v["ok"]}
    assert r.returncode == 0, f"verdicts failed (run kept in {tmp_path / 'run'}): {json.dumps(failed)[:5000]}"
    return summary


def check_summary(s: dict, seed: int) -> None:
    assert s["seed"] == seed and s["minutes"] > 0
    assert s["acked"] > 0 and s["attempted"] >= s["acked"]
    assert s["deliveries"]["acked"] > 0 and s["flag_changes"]["acked"] > 0
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["diverged"] == 0
    assert all(v["ok"] for v in s["verdicts"].values())
    ran = {kind for kind, n in s["faults"].items() if n > 0}
    assert len(ran) >= 5, s["faults"]
    assert {"kill-replica", "hard-failover"} <= ran | set(s["faults_skipped"]), s["faults"]
    assert s["failovers"] >= 1
    assert s["cursor_samples"] > 0


def test_short_torture_run_holds_every_verdict(tmp_path):
    check_summary(run_torture(tmp_path, 100, 1), 1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12])
def test_soak_torture_run(tmp_path, seed):
    s = run_torture(tmp_path, 600, seed)
    check_summary(s, seed)
    assert s["failovers"] >= 4


def test_same_seed_draws_the_same_schedule():
    a = draw_schedule(7, 300)
    assert a == draw_schedule(7, 300)
    assert a != draw_schedule(8, 300)
    assert all(x.at_s < y.at_s for x, y in zip(a, a[1:]))
    assert all(f.kind in FAULT_KINDS and 1.0 <= f.duration_s <= 5.0 and 0 <= f.param < 1 for f in a)


def test_a_100_second_schedule_has_every_kind_of_fault():
    # the first round of draws is every kind once (the short run above relies on it)
    assert {f.kind for f in draw_schedule(1, 100)} == set(FAULT_KINDS)
