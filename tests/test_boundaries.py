"""Import boundaries between packages (STYLE.md, 'Boundaries')."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(package: str):
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                tree = ast.parse(open(path).read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        for alias in node.names:
                            yield path, alias.name
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        yield path, node.module


@pytest.mark.parametrize("forbidden", ["engine", "tools", "anyio"])
def test_wal_imports_nothing_from_engine_tools_or_anyio(forbidden):
    bad = [(p, m) for p, m in _imports("wal") if m == forbidden or m.startswith(forbidden + ".")]
    assert bad == []


def test_nothing_imports_tools():
    bad = [(p, m) for pkg in ("wal", "engine") for p, m in _imports(pkg) if m == "tools" or m.startswith("tools.")]
    assert bad == []


PURE = ["engine/replication/messages.py", "engine/replication/transitions.py", "engine/replication/codec.py", "engine/replication/auth.py", "engine/replication/session.py", "engine/replication/decisions.py", "engine/store/decisions.py"]
IMPURE_MODULES = {"anyio", "socket", "os", "time", "sqlite_utils", "wal.writer", "asyncio", "threading"}


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_no_io(module):
    path = os.path.join(ROOT, module)
    if not os.path.exists(path):
        pytest.skip(f"{module} does not exist yet")
    tree = ast.parse(open(path).read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    assert not (names & IMPURE_MODULES), f"{module} imports {names & IMPURE_MODULES}"
