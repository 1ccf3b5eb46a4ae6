"""NodeBackend's kept snapshots (engine/imap/node_backend.py): a SELECT after changes equals a fresh read.

The backend keeps the last snapshot of a mailbox and brings it up to date from ``changes`` (MS-23);
whatever happened in between (flag changes, expunges, appends, moves, the mailbox deleted and made
again under its name, a renumbering, expunges older than the store remembers), the snapshot must
be exactly what reading the whole mailbox gives.
"""

from __future__ import annotations

import anyio
import pytest

from engine.node import AsyncNode
from engine.imap.node_backend import NodeBackend
from engine.node import Node
from engine.store import database

INBOX = "user/alice/INBOX"


def body(n: int) -> bytes:
    return b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n)


@pytest.fixture
def node(tmp_path):
    n = Node.init(str(tmp_path / "n"))
    n.create_mailbox(INBOX)
    n.create_mailbox("user/alice/Archive")
    n.append_messages(INBOX, [(body(i), (), None) for i in range(6)])
    yield n
    n.close()


def _fresh(node: Node, name: str):
    info, rows = node.imap_snapshot(name)
    return info.uidvalidity, info.uidnext, info.highestmodseq, [(r.uid, frozenset(r.flags), r.modseq) for r in rows]


def _kept(backend: NodeBackend, name: str):
    s = anyio.run(backend.snapshot, name)
    return s.uidvalidity, s.uidnext, s.highestmodseq, [(m.uid, m.flags, m.modseq) for m in s.messages]


def test_a_kept_snapshot_brought_up_to_date_equals_a_fresh_read(node, monkeypatch):
    backend = NodeBackend(AsyncNode(node))
    assert _kept(backend, INBOX) == _fresh(node, INBOX)
    steps = [
        lambda: node.change_flags(INBOX, [1, 3], "add", ["\\Seen"]),
        lambda: node.expunge_present(INBOX, [2]),
        lambda: node.append_messages(INBOX, [(body(10), ("\\Flagged",), None)]),
        lambda: node.copy_messages(INBOX, [4], "user/alice/Archive", move=True),
        lambda: node.copy_messages(INBOX, [1], INBOX),
        lambda: (node.delete_mailbox(INBOX), node.create_mailbox(INBOX),
                 node.append_messages(INBOX, [(body(20), (), None)])),
    ]
    for step in steps:
        step()
        assert _kept(backend, INBOX) == _fresh(node, INBOX)
    # expunges older than the store remembers: the snapshot is read whole again
    monkeypatch.setattr(database, "EXPUNGED_KEEP", 1)
    monkeypatch.setattr(database, "EXPUNGED_PRUNE_AT", 2)
    node.append_messages(INBOX, [(body(30 + i), (), None) for i in range(4)])
    assert _kept(backend, INBOX) == _fresh(node, INBOX)
    for uid in _fresh(node, INBOX)[3][:4]:
        node.expunge_present(INBOX, [uid[0]])
    assert _kept(backend, INBOX) == _fresh(node, INBOX)
