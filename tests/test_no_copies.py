"""One definition each: the writer lock (LOG-14) lives in wal/lock.py only.

An AST walk over every module of wal/, engine/, tools/ and tests/: a new
hand-written ``flock`` fails here and names its file and line. Take the lock
with :class:`wal.LogLock`, test it with :func:`wal.log_in_use`.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("wal", "engine", "tools", "tests")

LOCK_HELPER = "wal/lock.py"


def _modules():
    for package in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    yield os.path.relpath(path, ROOT), open(path, encoding="utf-8").read()


def flock_calls(source: str, filename: str = "<source>") -> list[int]:
    """Line numbers of calls to ``fcntl.flock`` / ``fcntl.lockf``, however ``fcntl`` was imported."""
    tree = ast.parse(source, filename)
    modules, functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(a.asname or a.name for a in node.names if a.name == "fcntl")
        elif isinstance(node, ast.ImportFrom) and node.module == "fcntl":
            functions.update(a.asname or a.name for a in node.names if a.name in ("flock", "lockf"))
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr in ("flock", "lockf")
                and isinstance(f.value, ast.Name) and f.value.id in modules):
            lines.append(node.lineno)
        elif isinstance(f, ast.Name) and f.id in functions:
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("source", [
    "import fcntl\nfcntl.flock(fd, fcntl.LOCK_EX)",
    "import fcntl as f\nf.lockf(fd, f.LOCK_EX)",
    "from fcntl import flock\nflock(fd, 2)",
    "from fcntl import flock as grab\ngrab(fd, 2)",
])
def test_the_detector_finds_each_spelling_of_flock(source):
    assert flock_calls(source) == [2]


def test_LOG_14_only_the_lock_helper_calls_flock():
    found = {path: flock_calls(text, path) for path, text in _modules()}
    copies = {path: lines for path, lines in found.items() if lines and path != LOCK_HELPER}
    assert copies == {}, "take the writer lock with wal.LogLock / wal.log_in_use, not by hand"
    assert found[LOCK_HELPER], "the helper itself takes the lock"
