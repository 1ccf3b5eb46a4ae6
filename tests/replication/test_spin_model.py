"""The Promela model of replication and failover (specs/replication.pml), checked by spin.

* The model as written: an exhaustive search (``spin -a``, ``gcc``, ``./pan -a``)
  finds no assertion violation (``errors: 0``) in three configurations, with
  no search truncated by the depth bound; in the main one every statement of
  the model is reached (no action is dead, so the properties are not vacuous).
* Each ``-DBUG_...`` switch plants one known mistake; spin must find a
  violation of the property that mistake breaks, and its error trail must
  replay (``spin -t``). This proves the model can fail.

The properties (NoAckedLoss, SoftFailoverLosesNothing, PrefixOfSomeMaster,
OneWriterPerEpoch) and the mapping to specs/replication.md are in
specs/replication-model.md.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from tests.support import ROOT

MODEL = os.path.join(ROOT, "specs", "replication.pml")
PAN_TIMEOUT_S = 600

pytestmark = pytest.mark.skipif(
    shutil.which("spin") is None or shutil.which("gcc") is None,
    reason="needs spin and gcc (Debian packages spin and gcc: apt-get install -y spin gcc)",
)


def _pan(workdir, *defines: str) -> str:
    """Generate, compile and run the verifier for the model with ``defines``; returns pan's output."""
    shutil.copy(MODEL, os.path.join(workdir, "replication.pml"))
    spin = subprocess.run(["spin", "-a", *defines, "replication.pml"], cwd=workdir, capture_output=True, text=True)
    assert spin.returncode == 0 and os.path.exists(os.path.join(workdir, "pan.c")), spin.stdout + spin.stderr
    # NOREDUCE: partial order reduction must not skip the monitor's step in any state
    gcc = subprocess.run(["gcc", "-O2", "-w", "-DNOREDUCE", "-o", "pan", "pan.c"], cwd=workdir, capture_output=True,
                         text=True)
    assert gcc.returncode == 0, gcc.stderr[-3000:]
    pan = subprocess.run(["./pan", "-a", "-m100000"], cwd=workdir, capture_output=True, text=True,
                         timeout=PAN_TIMEOUT_S)
    return pan.stdout + pan.stderr


def _errors(out: str) -> int:
    m = re.search(r"errors: (\d+)", out)
    assert m, f"no error count in pan's output:\n{out}"
    return int(m.group(1))


def _stored(out: str) -> int:
    return int(re.search(r"(\d+) states, stored", out).group(1))


CONFIGS = {
    # 3 nodes, logs of 3, 2 messages, one soft and one hard failover, a crash, a broken connection
    "three-nodes": [],
    "two-nodes-longer-logs": ["-DN=2", "-DMAXLEN=4", "-DMAXID=3", "-DMAXCRASH=2", "-DMAXBREAK=2"],
    "two-soft-failovers": ["-DN=3", "-DMAXSOFT=2", "-DMAXHARD=0"],
}


@pytest.mark.heavy
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_the_model_satisfies_its_properties(tmp_path, config):
    out = _pan(str(tmp_path), *CONFIGS[config])
    assert _errors(out) == 0, out
    assert "assertion violations\t+" in out, out  # assertions were checked
    assert "max search depth too small" not in out, "the search was truncated: raise -m"
    assert _stored(out) > 10_000, out  # a real search, not a model stuck in its initial state
    if config == "three-nodes":
        # only the ends of the never-ending loops are unreachable: every action happens in some state
        unreached = out.split("unreached in proctype monitor", 1)[1].split("pan: elapsed", 1)[0]
        lines = [ln.strip() for ln in unreached.strip().splitlines() if ln.strip()]
        assert len(lines) == 5 and lines[2] == "unreached in proctype cluster", unreached
        for end, count in ((lines[0], lines[1]), (lines[3], lines[4])):
            assert end.endswith('"-end-"') and re.fullmatch(r"\(1 of \d+ states\)", count), unreached


BUGS = {
    # the client gets its answer when the record is written, before fdatasync: a crash loses it
    "BUG_ACK_BEFORE_DURABLE": "NoAckedLoss",
    # soft failover promotes a replica that has not confirmed it holds everything (no Fence/Drained wait)
    "BUG_PROMOTE_BEFORE_DRAINED": "SoftFailoverLosesNothing",
    # the master accepts a Position by LSN alone, without comparing the hash there (REP-7)
    "BUG_ACCEPT_WITHOUT_HASH": "PrefixOfSomeMaster",
    # a promotion reuses the old master's epoch
    "BUG_PROMOTE_SAME_EPOCH": "OneWriterPerEpoch",
    # a lost Promoted reply (or a crash) after Promote was sent makes the old master resume writing
    "BUG_RESUME_AFTER_PROMOTE": "SoftFailoverLosesNothing",
    # the master ships records that are written but not yet durable (REP-11)
    "BUG_SHIP_BEFORE_DURABLE": "PrefixOfSomeMaster",
}


@pytest.mark.heavy
@pytest.mark.parametrize("bug", sorted(BUGS))
def test_a_planted_bug_is_caught(tmp_path, bug):
    out = _pan(str(tmp_path), f"-D{bug}")
    assert _errors(out) > 0, f"spin did not catch {bug}:\n{out}"
    assert f"assertion violated {BUGS[bug]}" in out, out
    trail = subprocess.run(["spin", "-t", f"-D{bug}", "replication.pml"], cwd=str(tmp_path), capture_output=True,
                           text=True, timeout=PAN_TIMEOUT_S)
    assert f"text of failed assertion: assert({BUGS[bug]})" in trail.stdout, trail.stdout[-3000:] + trail.stderr
