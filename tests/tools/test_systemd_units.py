"""contrib/systemd units: systemd accepts them, and they run walctl commands that exist.

``systemd-analyze verify`` (Debian package ``systemd``) checks every key and
value and that ExecStart's program exists; the units name
/usr/local/bin/walctl, so the test verifies copies pointing at this
checkout's walctl.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys

import click
import pytest

from engine.cluster.config import DEFAULTS
from tools.walctl import cli
from tests.support import ROOT

UNIT_DIR = os.path.join(ROOT, "contrib", "systemd")
UNITS = {"mailwal-master@.service": "serve", "mailwal-replica@.service": "follow"}
INSTALLED_WALCTL = "/usr/local/bin/walctl"


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # keys are case-sensitive
    with open(os.path.join(UNIT_DIR, name), encoding="utf-8") as f:
        cp.read_file(f)
    return cp


def _walctl() -> str:
    path = shutil.which("walctl", path=os.path.dirname(sys.executable)) or shutil.which("walctl")
    if path is None:
        pytest.skip("no walctl executable (pip install -e . puts one next to the Python interpreter)")
    return path


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_analyze_verify_accepts_the_unit(tmp_path, name):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing: apt-get install systemd")
    walctl = _walctl()
    for unit in UNITS:
        with open(os.path.join(UNIT_DIR, unit), encoding="utf-8") as f:
            text = f.read()
        assert INSTALLED_WALCTL in text
        (tmp_path / unit).write_text(text.replace(INSTALLED_WALCTL, walctl), encoding="utf-8")
    instance = tmp_path / name.replace("@.", "@node1.")
    proc = subprocess.run([analyze, "verify", str(instance)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "mailwal" in line]
    assert proc.returncode == 0 and ours == [], proc.stdout + proc.stderr


@pytest.mark.parametrize("name,command", sorted(UNITS.items()))
def test_unit_runs_an_existing_walctl_command_with_hardening(name, command):
    service = _unit(name)["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == INSTALLED_WALCTL
    assert argv[1:] == [command, "/var/lib/mailwal/%i", "--config", "/etc/mailwal/%i.toml"]
    cmd = cli.commands[command]
    assert "--config" in {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts}
    assert [p.name for p in cmd.params if isinstance(p, click.Argument)] == ["node"]
    # The node directory is the only writable place; SIGTERM drains within TimeoutStopSec.
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/mailwal/%i"
    assert service["StateDirectory"] == "mailwal/%i"
    assert service["NoNewPrivileges"] == "yes"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > DEFAULTS["lmtp"]["shutdown_grace_s"]
