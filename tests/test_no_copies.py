"""One definition each: the writer lock (LOG-14) lives in wal/lock.py only.

An AST walk over every module of wal/, engine/, tools/ and tests/: a new
hand-written ``flock`` fails here and names its file and line. Take the lock
with :class:`wal.LogLock`, test it with :func:`wal.log_in_use`.
"""

import ast
import os

import pytest
from tests.support import ROOT

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


# ---------------------------------------------------------------------------
# Rename into place: only the atomic-write helper


def rename_calls(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """``(line, enclosing function)`` of every rename: ``os.rename``/``os.replace``/``os.renames``,
    ``shutil.move``, and ``rename``/``replace`` called on a FileOps (a name ending in ``ops``)."""
    tree = ast.parse(source, filename)
    aliases = {"os": set(), "shutil": set()}
    functions = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in aliases:
                    aliases[a.name].add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module in aliases:
            wanted = ("move",) if node.module == "shutil" else ("rename", "replace", "renames")
            functions.update(a.asname or a.name for a in node.names if a.name in wanted)
    found = []

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, scope + [child.name])
                continue
            if isinstance(child, ast.Call):
                f = child.func
                hit = False
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                    owner = f.value.id
                    hit = ((owner in aliases["os"] and f.attr in ("rename", "replace", "renames"))
                           or (owner in aliases["shutil"] and f.attr == "move")
                           or (owner.lower().endswith("ops") and f.attr in ("rename", "replace")))
                elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Attribute):
                    hit = f.value.attr.lower().endswith("ops") and f.attr in ("rename", "replace")
                elif isinstance(f, ast.Name):
                    hit = f.id in functions
                if hit:
                    found.append((child.lineno, ".".join(scope) or "<module>"))
            visit(child, scope)

    visit(tree, [])
    return found


ATOMIC_HELPER = {
    ("wal/fileops.py", "FileOps.rename"): "the primitive, for FileOps doubles",
    ("wal/fileops.py", "AtomicFile.commit"): "the atomic replace: FileOps.open_atomic / write_file_atomic",
}

# Renames that move a finished thing (a directory, a Maildir message) rather
# than write a file: allowed where listed (file, function), each with what it
# moves. An entry whose rename moved elsewhere is harmless; add the new place.
MOVES = {
    ("wal/writer.py", "Log.create"): "a log directory built under .NAME.creating-PID (LOG-2)",
    ("engine/cluster/roles.py", "Cluster._reconcile_tail"): "a received tail's log directory into reconcile/tails/",
    ("engine/node/diverged.py", "_requeue"): "a kept tail's log directory into diverged/",
    ("engine/store/maildir.py", "FolderWriter.add"): "a Maildir message tmp/ -> cur/ (cur/ fsynced in finish())",
    ("tools/bench_lmtp.py", "MaildirBackend._deliver"): "a Maildir message tmp/ -> new/ (the bench's baseline)",
    ("tools/cmd_cluster.py", "follow"): "the old log and store moved aside before a reseed",
    ("tools/torture/nodes.py", "SmallDisk.unmount"): "a run directory copied off a tmpfs, put back",
}

# Hand-written atomic writes in files being changed by others: each is to call
# FileOps.open_atomic / write_file_atomic, and then leaves this list (the test
# fails while a listed copy no longer exists, so the list only shrinks).
PENDING: dict = {}

RENAME_SCOPE = ("wal", "engine", "tools")  # tests/ builds fixtures and a FUSE file system with raw renames


@pytest.mark.parametrize("source, where", [
    ("import os\ndef f():\n    os.rename(a, b)", "f"),
    ("import os as o\nclass C:\n    def m(self):\n        o.replace(a, b)", "C.m"),
    ("from os import replace\nreplace(a, b)", "<module>"),
    ("import shutil\ndef f():\n    def g():\n        shutil.move(a, b)", "f.g"),
    ("def f(ops):\n    ops.rename(a, b)", "f"),
    ("def f():\n    OS_FILEOPS.rename(a, b)", "f"),
    ("class L:\n    def m(self):\n        self._ops.rename(a, b)", "L.m"),
])
def test_the_detector_finds_each_spelling_of_a_rename(source, where):
    assert [w for _, w in rename_calls(source)] == [where]


def test_the_detector_leaves_other_renames_alone():
    assert rename_calls("async def f(backend, s):\n    await backend.rename(a, b)\n    s.replace('a', 'b')") == []


def test_only_the_atomic_write_helper_renames_a_file_into_place():
    found = {}
    for path, text in _modules():
        if path.split(os.sep)[0] in RENAME_SCOPE:
            for line, where in rename_calls(text, path):
                found.setdefault((path, where), []).append(line)
    copies = {key: lines for key, lines in found.items() if key not in ATOMIC_HELPER | MOVES | PENDING}
    assert copies == {}, "write files with wal.FileOps.write_file_atomic / open_atomic (mode= for secrets)"
    done = [key for key in PENDING if key not in found]
    assert done == [], "these copies call the helper now: remove them from PENDING"
    assert set(ATOMIC_HELPER) <= set(found)
