"""specs/imap.md agrees with the code: rule citations, the state table, purity (IMAP-27) and durable
answers (IMAP-10)."""

from __future__ import annotations

import ast
import glob
import inspect
import os
import re
import types

import pytest

from engine.imap import backend as backend_module
from engine.imap.memory import MemoryBackend
from engine.imap.parser import Frame, parse_command
from engine.imap.session import state_table_markdown
from tests.support.imap import MESSAGE, PureSession, memory_backend, run_now
from tests.support import ROOT
from tests.support import find_tests

SPEC = os.path.join(ROOT, "specs", "imap.md")
PACKAGE = os.path.join(ROOT, "engine", "imap")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_every_rule_is_named_by_a_test():
    """STYLE: every rule ID in specs/imap.md has at least one test that names it."""
    rules = set(re.findall(r"\bIMAP-\d+\b", _read(SPEC)))
    assert rules == {f"IMAP-{i}" for i in range(1, 28)}
    tests = "".join(_read(p) for p in find_tests("test_imap_*.py"))
    tests = tests.replace(inspect.getsource(test_every_rule_is_named_by_a_test), "")
    assert sorted(r for r in rules if not re.search(rf"\b{r}\b", tests)) == []


def test_the_spec_quotes_the_state_table_of_the_code():
    """IMAP-2"""
    assert state_table_markdown() in _read(SPEC)


def _imports(path: str) -> set[str]:
    tree = ast.parse(_read(path), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(("." * node.level) + node.module)
    return names


IMPURE = {"anyio", "socket", "ssl", "os", "time", "asyncio", "threading", "selectors", "sqlite3", "sqlite_utils"}


@pytest.mark.parametrize("module", sorted(os.path.basename(p) for p in glob.glob(os.path.join(PACKAGE, "*.py"))))
def test_only_the_edge_does_io_and_the_package_stands_alone(module):
    """IMAP-27"""
    names = _imports(os.path.join(PACKAGE, module))
    roots = {n.split(".")[0] for n in names if not n.startswith(".")}
    assert not any(n.startswith("engine") or n.startswith("wal") or n.startswith("tools") for n in names), names
    outside = {n for n in names if n.startswith("..")}
    if module == "node_backend.py":  # the adapter to the node
        assert outside <= {"..node", "..store.errors", "..store.events"}, outside
    else:
        assert outside <= {"..store.structure", "..store.imap_values"}, outside
    if module not in ("server.py", "node_backend.py"):
        assert not (roots & IMPURE), f"{module} imports {roots & IMPURE}"
    if module == "node_backend.py":  # its kept snapshots are shared by the node's worker threads: a lock
        assert not (roots & (IMPURE - {"anyio", "threading"})), f"{module} imports {roots & IMPURE}"


def test_the_store_structure_the_front_reads_is_pure():
    """IMAP-27, MS-24: the structure module and its values import no I/O and nothing of the engine."""
    for path in ("engine/store/structure.py", "engine/store/imap_values.py"):
        names = _imports(os.path.join(ROOT, path))
        assert not ({n.split(".")[0] for n in names} & IMPURE), path
        assert not any(n.startswith("..") or n.startswith("engine") for n in names), (path, names)


class _Gate:
    """An awaitable that suspends once: the stand-in for waiting on fdatasync."""

    def __await__(self):
        yield "waiting for the disk"


class GatedBackend(MemoryBackend):
    """Every write waits at a gate before it applies (fault injection: a slow disk)."""

    WRITES = ("create", "delete", "rename", "set_subscribed", "append", "store", "copy", "move", "expunge")

    def __init__(self):
        super().__init__()
        for name in self.WRITES:
            inner = getattr(MemoryBackend, name)

            async def gated(self, *args, _inner=inner, **kw):
                await _Gate()
                return await _inner(self, *args, **kw)
            setattr(self, name, types.MethodType(gated, self))


@pytest.mark.parametrize("line,applied", [
    (b"t STORE 1 +FLAGS (\\Seen)", lambda b: "\\Seen" in b.mailboxes["user/alice/INBOX"].messages[1].info.flags),
    (b"t APPEND INBOX {1+}\r\nx", lambda b: len(b.mailboxes["user/alice/INBOX"].messages) == 3),
    (b"t COPY 1 Archive", lambda b: len(b.mailboxes["user/alice/Archive"].messages) == 1),
    (b"t MOVE 1 Archive", lambda b: len(b.mailboxes["user/alice/Archive"].messages) == 1),
    (b"t EXPUNGE", lambda b: 2 not in b.mailboxes["user/alice/INBOX"].messages),
    (b"t CLOSE", lambda b: 2 not in b.mailboxes["user/alice/INBOX"].messages),
    (b"t CREATE New", lambda b: "user/alice/New" in b.mailboxes),
    (b"t DELETE Archive", lambda b: "user/alice/Archive" not in b.mailboxes),
    (b"t RENAME Archive Old", lambda b: "user/alice/Old" in b.mailboxes),
    (b"t SUBSCRIBE Archive", lambda b: "user/alice/Archive" in b.subscribed["alice"]),
    (b"t UNSUBSCRIBE INBOX", lambda b: "user/alice/INBOX" not in b.subscribed["alice"]),
    (b"t FETCH 1 BODY[]", lambda b: "\\Seen" in b.mailboxes["user/alice/INBOX"].messages[1].info.flags),
], ids=lambda x: x.split()[1].decode() if isinstance(x, bytes) else "")
def test_no_tagged_ok_before_the_write_is_durable(line, applied):
    """IMAP-10: while the backend's write waits for the disk the executor has answered nothing; the tagged OK
    comes only once the write returned, and the change is applied then."""
    b = GatedBackend()
    b.add_user("alice", "apw")
    b.subscribed["alice"].add("user/alice/INBOX")
    b.deliver("user/alice/INBOX", MESSAGE)
    b.deliver("user/alice/INBOX", MESSAGE, flags=["\\Deleted"])
    run_now(MemoryBackend.create(b, "user/alice/Archive"))
    s = PureSession(b).login("alice", "apw")
    if not line.startswith((b"t CREATE", b"t DELETE", b"t RENAME", b"t SUBSCRIBE", b"t UNSUBSCRIBE",
                            b"t APPEND")):
        s.cmd("s SELECT INBOX")
    frame_lines = line.split(b"\r\n")
    literals = tuple(frame_lines[1:])
    cmd = parse_command(Frame((frame_lines[0],) + (b"",) * len(literals), literals))
    coro = s.ex.execute(cmd)
    assert coro.send(None) == "waiting for the disk"
    assert not applied(b)  # nothing applied, and the executor has returned no response yet
    try:
        coro.send(None)
    except StopIteration as done:
        responses = done.value
    else:
        raise AssertionError("the command waited twice")
    assert applied(b)
    last = responses[-1]
    assert last.tagged and last.status == "OK", last


def test_backend_protocol_is_implemented_by_the_memory_backend():
    """The memory backend is a Backend (the engine's adapter implements the same protocol)."""
    assert isinstance(memory_backend(), backend_module.Backend)
    for name in ("authenticate", "read_only", "list_mailboxes", "subscriptions", "set_subscribed", "create",
                 "delete", "rename", "status", "snapshot", "changes", "fetch_bodies", "append", "store", "copy",
                 "move", "expunge", "watch"):
        assert callable(getattr(MemoryBackend, name))
