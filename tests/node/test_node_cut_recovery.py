"""A diverged tail's cut interrupted part-way (a full disk, a crash) is finished or undone
on the next open (CTL-6, NODE/cut.json).

walctl torture seed 42: the disk filled while a replica cut its tail; the records were
copied aside and the log truncated, then writing the epoch history failed. The node
exited, and every restart refused to open ("store has applied LSN 21219 but the log
ends at 21215: the log lost records"), and the tail was never listed for reconcile.
Faults are injected with monkeypatch (OSError ENOSPC); everything else is real.
"""

import errno
import json
import os

import pytest

import wal.history
from engine.node import CUT_INTENT_FILE, DIVERGED_FILE, Node
from wal import Log, LogReader

MAILBOX = "user/u/INBOX"


def _node(tmp_path, n=12):
    node = Node.init(str(tmp_path / "n"), name="n")
    bodies = [b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(n)]
    for b in bodies:
        node.deliver(MAILBOX, b, create=True)
    node.wait_applied(node.log.last_lsn)
    return node, bodies


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _reopen(node):
    path = node.path
    try:
        node.close()
    except Exception:
        pass  # the failed cut may leave the old objects unusable: a crash, as far as the disk knows
    return Node.open(path)


def test_a_cut_that_fails_after_truncating_is_finished_on_open(tmp_path, monkeypatch):
    node, bodies = _node(tmp_path)
    last = node.log.last_lsn
    fork = last - 5
    monkeypatch.setattr(wal.history, "write_history", _enospc)
    with pytest.raises(OSError):
        node.cut_diverged(fork)
    monkeypatch.undo()
    assert os.path.exists(os.path.join(node.path, CUT_INTENT_FILE))
    node = _reopen(node)
    try:
        assert node.log.last_lsn == fork
        assert node.store.applied_lsn == fork  # rebuilt from the cut log
        tails = node.diverged_tails()
        assert len(tails) == 1 and tails[0]["fork_lsn"] == fork and tails[0]["last_lsn"] == last
        assert tails[0]["records"] == 5 and not tails[0]["reconciled"]
        aside = [r.lsn for r in LogReader(tails[0]["path"]).records(fork + 1)]
        assert aside == list(range(fork + 1, last + 1))  # every cut record is in the tail
        assert not os.path.exists(os.path.join(node.path, CUT_INTENT_FILE))
        assert len(node.list_messages(MAILBOX)) == len(bodies) - 5
    finally:
        node.close()


def test_a_cut_that_fails_while_copying_aside_is_undone_on_open(tmp_path, monkeypatch):
    node, bodies = _node(tmp_path)
    last, digest = node.log.last_lsn, node.digest()
    real = Log.append_records

    def append_records(self, records):
        if os.sep + "diverged" + os.sep in self.path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, records)

    monkeypatch.setattr(Log, "append_records", append_records)
    with pytest.raises(OSError):
        node.cut_diverged(last - 5)
    monkeypatch.undo()
    node = _reopen(node)
    try:
        assert node.log.last_lsn == last and node.digest() == digest  # nothing was cut
        assert node.diverged_tails() == []
        assert os.listdir(os.path.join(node.path, "diverged")) == []  # the partial copy is gone
        assert not os.path.exists(os.path.join(node.path, CUT_INTENT_FILE))
        tail = node.cut_diverged(last - 5)  # and the cut can be made again
        assert [r.lsn for r in LogReader(tail).records(last - 4)] == list(range(last - 4, last + 1))
    finally:
        node.close()


def test_a_cut_whose_intent_cannot_be_written_changes_nothing(tmp_path, monkeypatch):
    import engine.node.core

    node, _ = _node(tmp_path)
    last, digest = node.log.last_lsn, node.digest()
    monkeypatch.setattr(engine.node.core, "write_json_atomic", _enospc)
    with pytest.raises(OSError):
        node.cut_diverged(last - 5)
    monkeypatch.undo()
    try:
        assert node.log.last_lsn == last and node.digest() == digest
        assert not os.path.exists(os.path.join(node.path, CUT_INTENT_FILE))
        assert not os.path.exists(os.path.join(node.path, DIVERGED_FILE))
    finally:
        node.close()


def test_an_intent_that_matches_neither_state_refuses_to_open(tmp_path):
    node, _ = _node(tmp_path)
    path, last = node.path, node.log.last_lsn
    node.close()
    with open(os.path.join(path, CUT_INTENT_FILE), "w") as f:
        json.dump({"path": os.path.join(path, "diverged", "x-after-%d.wal" % last), "fork_lsn": last,
                   "last_lsn": last + 3, "cut_at": "x"}, f)
    with pytest.raises(wal.WalError, match="neither finished nor undoable"):
        Node.open(path)
    assert os.path.exists(os.path.join(path, CUT_INTENT_FILE))  # kept for the operator
