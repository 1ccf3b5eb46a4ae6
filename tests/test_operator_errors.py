"""What an operator meets when something is wrong: the real ``walctl`` as a process.

Every failure is one ``Error:`` line on stderr with the documented exit
status (1: the operation failed, 2: bad usage or a bad node.toml), never a
traceback unless ``walctl --debug``, and nothing is lost or left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, assert_no_traceback

WALCTL = [sys.executable, "-m", "tools"]


def walctl(*args, timeout: float = 60, cwd: str = ROOT, input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``walctl ARGS`` to completion (text output); a traceback fails the test."""
    p = subprocess.run(WALCTL + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       input=input, env=dict(os.environ, PYTHONPATH=ROOT))
    assert_no_traceback(p.stderr, args)
    return p


def error_line(p: subprocess.CompletedProcess, status: int = 1) -> str:
    """The one ``Error:`` line of a failed command, after checking its exit status."""
    assert p.returncode == status, f"exit {p.returncode}, wanted {status}:\n{p.stdout}\n{p.stderr}"
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, f"wanted exactly one Error: line on stderr:\n{p.stderr}"
    return errors[0]


def init_node(path, *args) -> str:
    p = walctl("init", path, *args)
    assert p.returncode == 0, p.stderr
    return str(path)


# -- the general guard -------------------------------------------------------------


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    node = init_node(tmp_path / "a")
    with open(os.path.join(node, "store.sqlite"), "wb") as f:
        f.write(b"this is not an SQLite database" * 10)
    line = error_line(walctl("digest", node))
    assert "file is not a database" in line and "run with --debug for the traceback" in line
    p = walctl("--debug", "digest", node)
    assert p.returncode == 1 and "Traceback (most recent call last)" in p.stderr


def test_usage_errors_keep_exit_status_2(tmp_path):
    line = error_line(walctl("verify", tmp_path / "missing"), 2)
    assert "does not exist" in line
    error_line(walctl("status", "--bogus-option"), 2)
