"""Status read while a diverged tail is cut (engine.node.Node.status, Cluster's status op).

Found by tests/cluster/test_cluster_tails.py under load: a former master restarted
with ``walctl follow`` cuts its tail aside and rebuilds its store (closes the
old one, removes its files, opens a new one). A ``walctl status`` answered in
that window read the quarantine table of the closed store and the control
call failed with "Cannot operate on a closed database" (the torture harness
then saw a node that did not answer).
"""

from __future__ import annotations

import threading

import anyio
import pytest

import engine.node.core
from engine.cluster import Cluster, ClusterConfig
from engine.node import Node


def _message(i: int) -> bytes:
    return b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i)


@pytest.fixture
def node(tmp_path):
    n = Node.init(str(tmp_path / "n"), name="n")
    for i in range(10):
        n.deliver("user/bob/INBOX", _message(i), create=True)
    assert n.wait_applied(n.log.last_lsn)
    yield n
    n.close()


def _cut_with_a_reader_in_the_store_swap(monkeypatch, node: Node, read) -> list:
    """Cut the tail; while the old store is closed and the new one not open yet
    (fault injection: the file removal in between), run ``read`` in another thread.
    Returns what the reader got: [result] or [exception]."""
    got: list = []
    reader_started = threading.Event()
    remove = engine.node.core.remove_store_files

    def reader():
        reader_started.set()
        try:
            got.append(read())
        except Exception as exc:  # the assertion below reports it
            got.append(exc)

    t = threading.Thread(target=reader)

    def remove_with_a_reader(path):
        t.start()
        reader_started.wait(5)
        t.join(0.5)  # a reader that does not wait for the swap has failed by now
        remove(path)

    monkeypatch.setattr(engine.node.core, "remove_store_files", remove_with_a_reader)
    fork = node.log.last_lsn - 4
    node.cut_diverged(fork)
    t.join(10)
    assert not t.is_alive()
    assert node.log.last_lsn == fork
    return got


def test_status_during_the_store_swap_of_a_cut_waits_for_the_new_store(monkeypatch, node):
    got = _cut_with_a_reader_in_the_store_swap(monkeypatch, node, node.status)
    assert len(got) == 1 and isinstance(got[0], dict), got
    assert got[0]["quarantined"] == 0


def test_the_status_control_operation_answers_during_a_cut(monkeypatch, node):
    cluster = Cluster(ClusterConfig(name="n"))
    cluster.node = node

    def control_status():
        return anyio.run(cluster._control, "status", {})

    got = _cut_with_a_reader_in_the_store_swap(monkeypatch, node, control_status)
    assert len(got) == 1 and isinstance(got[0], dict), got
    assert got[0]["role"] == "master" and got[0]["last_lsn"] == node.log.last_lsn
