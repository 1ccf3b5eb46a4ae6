"""Model-based test: random IMAP sessions against a real node and against the in-memory model agree.

Two clients of one user run random commands (SELECT, APPEND, STORE, COPY, MOVE, EXPUNGE, UID
EXPUNGE, FETCH, SEARCH, STATUS, CREATE, DELETE, NOOP, IDLE polls) against ``NodeBackend`` over a
node (fsynced log, SQLite store) and against ``MemoryBackend`` (the model). After every step the
answers must be the same, line for line: UIDs, flags, EXISTS/EXPUNGE/VANISHED, response codes.
What the two may number differently is normalised: UIDVALIDITY (a clock on the node) and the
MODSEQ values, whose *order* must agree instead (the node gives one MODSEQ to all messages of one
flag change, the model one each: a tie on the node may be an order in the model, never the reverse).
Error texts are compared by status and response code.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.support.imap_node import MemoryHarness, NodeHarness
from tests.support.imap import MESSAGE

FLAGS = st.sampled_from(["\\Seen", "\\Flagged", "\\Deleted", "\\Answered", "$Work"])
SETS = st.sampled_from(["1", "2", "1:2", "2:*", "1:*", "3", "*", "1,3"])
BOXES = st.sampled_from(["INBOX", "Archive", "Scratch"])
_CODE = re.compile(rb"^(\S+ (?:NO|BAD)(?: \[[A-Z-]+)?)")


def _normal(lines: list[bytes]) -> list[bytes]:
    out = []
    for line in lines:
        m = _CODE.match(line)
        if m:  # the backend's words differ; status and code must not
            out.append(m.group(1))
            continue
        line = re.sub(rb"(UIDVALIDITY|APPENDUID|COPYUID) \d+", rb"\1 V", line)
        line = re.sub(rb"(HIGHESTMODSEQ|MODSEQ) \(?\d+\)?", rb"\1 M", line)
        out.append(line)
    return out


class NodeAgreesWithModel(RuleBasedStateMachine):
    """Each rule sends one command line to the same session of both backends and compares the answers."""

    def __init__(self):
        super().__init__()
        self.model = MemoryHarness()
        self.node = None
        self.tag = 0

    @initialize()
    def start(self):
        import tempfile

        self._dir = tempfile.TemporaryDirectory()
        self.node = NodeHarness(self._dir.name)
        for h in (self.model, self.node):
            h.create("user/alice/Archive")
            for i in range(3):
                h.deliver("user/alice/INBOX", MESSAGE.replace(b"hello", b"message %d" % i))
        self.sessions = {k: [h.session().login("alice", "apw") for h in (self.model, self.node)]
                         for k in ("one", "two")}
        self.selected = {"one": None, "two": None}
        for k in self.sessions:
            self._both(k, "SELECT INBOX")
            self.selected[k] = "INBOX"

    def teardown(self):
        if self.node is not None:
            self.node.close()
            self._dir.cleanup()

    def _both(self, session: str, line: str) -> list[bytes]:
        self.tag += 1
        model, node = self.sessions[session]
        text = f"t{self.tag} {line}"
        got_model = _normal(model.cmd(text))
        got_node = _normal(node.cmd(text))
        assert got_node == got_model, (line, got_model, got_node)
        return got_model

    @rule(session=st.sampled_from(["one", "two"]), box=BOXES, examine=st.booleans())
    def select(self, session, box, examine):
        out = self._both(session, f"{'EXAMINE' if examine else 'SELECT'} {box}")
        self.selected[session] = box if out[-1].split()[1] == b"OK" else None

    @rule(session=st.sampled_from(["one", "two"]), box=BOXES, flags=st.lists(FLAGS, max_size=2, unique=True),
          n=st.integers(1, 2))
    def append(self, session, box, flags, n):
        body = MESSAGE.replace(b"hello", b"appended %d" % self.tag)
        literals = " ".join(f"({' '.join(flags)}) {{{len(body)}+}}\r\n{body.decode()}" for _ in range(n))
        self._both(session, f"APPEND {box} {literals}")

    @precondition(lambda self: self.selected["one"] is not None)
    @rule(uid=st.booleans(), seq=SETS, mode=st.sampled_from(["+", "-", ""]), silent=st.booleans(),
          flags=st.lists(FLAGS, min_size=1, max_size=2, unique=True))
    def store(self, uid, seq, mode, silent, flags):
        self._both("one", f"{'UID ' if uid else ''}STORE {seq} {mode}FLAGS{'.SILENT' if silent else ''} "
                          f"({' '.join(flags)})")

    @precondition(lambda self: self.selected["one"] is not None)
    @rule(uid=st.booleans(), seq=SETS, box=BOXES, move=st.booleans())
    def copy(self, uid, seq, box, move):
        self._both("one", f"{'UID ' if uid else ''}{'MOVE' if move else 'COPY'} {seq} {box}")

    @precondition(lambda self: self.selected["one"] is not None)
    @rule(uids=st.one_of(st.none(), SETS))
    def expunge(self, uids):
        self._both("one", "EXPUNGE" if uids is None else f"UID EXPUNGE {uids}")

    @rule(session=st.sampled_from(["one", "two"]),
          items=st.sampled_from(["(UID FLAGS)", "(FLAGS MODSEQ)", "(UID RFC822.SIZE ENVELOPE)", "(BODY.PEEK[HEADER])",
                                 "(UID BODY[TEXT])", "(BODYSTRUCTURE)"]), uid=st.booleans())
    def fetch(self, session, items, uid):
        if self.selected[session] is not None:
            self._both(session, f"{'UID ' if uid else ''}FETCH 1:* {items}")

    @rule(session=st.sampled_from(["one", "two"]),
          key=st.sampled_from(["ALL", "UNSEEN", "FLAGGED", "DELETED", "KEYWORD $Work", "SUBJECT appended",
                               "BODY Bob", "NOT SEEN"]))
    def search(self, session, key):
        if self.selected[session] is not None:
            self._both(session, f"UID SEARCH {key}")

    @rule(session=st.sampled_from(["one", "two"]), box=BOXES)
    def status(self, session, box):
        self._both(session, f"STATUS {box} (MESSAGES UIDNEXT UNSEEN DELETED)")

    @rule(create=st.booleans())
    def scratch(self, create):
        out = self._both("two", f"{'CREATE' if create else 'DELETE'} Scratch")
        if not create and self.selected["two"] == "Scratch" and out[-1].split()[1] == b"OK":
            self.selected["two"] = None  # OK [CLOSED]: no mailbox is selected any more

    @rule(session=st.sampled_from(["one", "two"]))
    def noop(self, session):
        self._both(session, "NOOP")

    @invariant()
    def modseqs_are_in_the_same_order(self):
        if self.node is None or self.selected["two"] is None:
            return
        self.tag += 1
        model, node = self.sessions["two"]
        pairs = []
        for s in (model, node):
            out = s.cmd(f"m{self.tag} UID FETCH 1:* (MODSEQ)")
            pairs.append({int(u): int(m) for u, m in re.findall(rb"UID (\d+) MODSEQ \((\d+)\)", b"\n".join(out))})
        m, n = pairs
        assert set(m) == set(n)
        for a in m:
            for b in m:
                if n[a] < n[b]:
                    assert m[a] < m[b], (a, b, m, n)
                if m[a] < m[b]:
                    assert n[a] <= n[b], (a, b, m, n)


NodeAgreesWithModel.TestCase.settings = settings(max_examples=12, stateful_step_count=20, deadline=None,
                                                 suppress_health_check=[HealthCheck.too_slow])
test_a_node_answers_like_the_model = pytest.mark.heavy(NodeAgreesWithModel.TestCase)
