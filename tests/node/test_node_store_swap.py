"""Store users across the store swap of a diverged tail's cut (Node.cut_diverged, CTL-6).

Found by ``walctl torture --seed 17``: n2, master, took a tail n1 shipped to its
``reconcile_tail`` operation; the apply waited for the cluster's apply lock
while n2 handed over to n0 and then found its own log diverged. n2 cut its
tail and rebuilt its store (closed it, removed its files, opened a new one)
just as the apply started reading the store (``store_names`` ->
``node.store.tombstones()``): the apply had taken the old Store object and
read it after it was closed ("Cannot operate on a closed database",
sqlite3.ProgrammingError), so n1 logged ``reconcile-failed`` and its tail
stayed unreconciled.

The store is now emptied in place (``Store.reset``): the Store object never
changes, so any reference held anywhere (reconcile apply, control operations,
the LMTP front, the applier) waits for the swap under the store's own locks and
then reads the new database. Node's reads also wait for the rebuild to catch
up instead of returning the half-built store.

Interleavings are driven with events: a reader thread is held at the door of
the store's connection lock (fault injection) while the cut runs.
"""

from __future__ import annotations

import threading

import anyio
import pytest

from engine.cluster import Cluster, ClusterConfig
from engine.node import Node
from engine.reconcile import StoreView
from engine.reconcile.read import store_names

MAILBOX = "user/bob/INBOX"


def _message(i: int) -> bytes:
    return b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i)


def _make_node(path, *, start_applier: bool = True) -> Node:
    n = Node.init(path, name="n")
    for i in range(10):
        n.deliver(MAILBOX, _message(i), create=True)
    n.deliver("user/carol/INBOX", _message(100), create=True)
    n.delete_mailbox("user/carol/INBOX")  # a tombstone before the fork: store_names reads it
    for i in range(10, 14):
        n.deliver(MAILBOX, _message(i))
    assert n.wait_applied(n.log.last_lsn)
    if start_applier:
        return n
    path = n.path
    n.close()
    return Node.open(path, start_applier=False)


@pytest.fixture
def node(tmp_path):
    n = _make_node(str(tmp_path / "n"))
    yield n
    n.close()


class _Door:
    """Fault injection: wraps one of the store's locks; the first time a reader
    comes to it, the reader stops *before* taking it until ``go`` is set.

    A reader is ``thread`` or a worker thread it runs a call in (control
    operations run node calls in anyio's worker threads): any thread but the
    test's own and the node's applier and checkpointer."""

    def __init__(self, inner):
        self.inner = inner
        self.thread: threading.Thread | None = None
        self.arrived = threading.Event()
        self.go = threading.Event()
        self._test_thread = threading.current_thread()

    def _is_reader(self) -> bool:
        t = threading.current_thread()
        return (self.thread is not None and t is not self._test_thread
                and not t.name.startswith(("mailwal-", "cutter")))

    def __enter__(self):
        if self._is_reader() and not self.arrived.is_set():
            self.arrived.set()
            assert self.go.wait(10), "the test never let the reader in"
        return self.inner.__enter__()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


def _read_across_a_cut(node: Node, read, lock_name: str = "_read_lock"):
    """Start ``read()`` in a thread, hold it at the store's ``lock_name`` (it already
    holds the Store object), cut the log's last 4 records aside (the store applied
    past the fork, so it is rebuilt), then let it go. Returns what it got."""
    store = node.store
    door = _Door(getattr(store, lock_name))
    setattr(store, lock_name, door)
    got: list = []

    def reader():
        try:
            got.append(read())
        except Exception as exc:  # the caller's assertion shows it
            got.append(exc)

    t = threading.Thread(target=reader, name="store-reader")
    door.thread = t
    t.start()
    try:
        assert door.arrived.wait(10), "the reader never came to the store"
        fork = node.log.last_lsn - 4
        node.cut_diverged(fork)  # the reader holds no node lock: the cut does not wait for it
        assert node.log.last_lsn == fork
    finally:
        door.go.set()
        t.join(10)
    assert not t.is_alive()
    setattr(store, lock_name, door.inner)
    assert len(got) == 1
    return got[0]


def _control(cluster: Cluster, op: str, **args):
    return anyio.run(cluster._control, op, args)


READERS = {
    # What the reconcile apply reads first (the torture's failing call), then its view of the survivor.
    "reconcile _store_names": lambda n: store_names(n),
    "reconcile StoreView": lambda n: StoreView(n).by_name(MAILBOX),
    "list_mailboxes": lambda n: n.list_mailboxes(),
    "list_messages": lambda n: n.list_messages(MAILBOX),
    "fetch": lambda n: n.fetch(MAILBOX, 3),
    "digest": lambda n: n.digest(),
    "status": lambda n: n.status(),
    "quarantined": lambda n: n.quarantined(),
    "mailbox_snapshot": lambda n: n.store.mailbox_snapshot(MAILBOX),
    # Control operations: mailbox_snapshot and mailboxes read through the node, in a worker thread.
    "control mailbox_snapshot": lambda n: _control(_cluster(n), "mailbox_snapshot", mailbox=MAILBOX),
    "control mailboxes": lambda n: _control(_cluster(n), "mailboxes"),
    "control status": lambda n: _control(_cluster(n), "status"),
}


def _cluster(n: Node) -> Cluster:
    c = Cluster(ClusterConfig(name="n"))
    c.node = n
    return c


@pytest.mark.parametrize("name", sorted(READERS))
def test_a_reader_holding_the_store_during_the_swap_reads_the_new_store(node, name):
    read = READERS[name]
    got = _read_across_a_cut(node, lambda: read(node))
    assert not isinstance(got, BaseException), f"{name}: {got!r}"
    # The store the reader met is the cut log's: the same answer as a read made after the cut.
    assert got == read(node)


def test_verify_store_waits_for_the_swap(node):
    got = _read_across_a_cut(node, node.verify_store, lock_name="_lock")
    assert got == {}, got


def test_a_store_reference_kept_across_a_cut_reads_the_rebuilt_store(node):
    store = node.store  # e.g. held by a reconcile apply, a control operation or the LMTP front
    before = {m.name: m.messages for m in store.mailboxes()}
    assert before == {MAILBOX: 14}
    node.cut_diverged(node.log.last_lsn - 4)  # the deliveries of messages 10..13 go aside
    assert {m.name: m.messages for m in store.mailboxes()} == {MAILBOX: 10}
    assert store.tombstones() and store.applied_lsn == node.log.last_lsn
    assert [m.uid for m in store.messages(store.mailbox(MAILBOX).mailbox_id)] == list(range(1, 11))


def test_a_node_read_during_the_rebuild_waits_for_the_rebuilt_store(tmp_path):
    """The reader has checked freshness on the old store; the swap happens; the
    rebuild has not caught up yet when the reader reads. It must not return the
    half-built (here: empty) store."""
    node = _make_node(str(tmp_path / "n"), start_applier=False)  # only the cut's own catch-up rebuilds
    try:
        expected = node.list_messages(MAILBOX)[:10]
        swapped, release_cut = threading.Event(), threading.Event()
        waiting_for_rebuild = threading.Event()
        catch_up, wait_applied = node.catch_up, node.wait_applied
        cutter = threading.Thread(target=lambda: node.cut_diverged(node.log.last_lsn - 4), name="cutter")

        def held_catch_up(*a, **kw):  # fault injection: the cut's rebuild starts only when released
            if threading.current_thread() is cutter:
                swapped.set()
                assert release_cut.wait(10)
            return catch_up(*a, **kw)

        def observed_wait_applied(lsn, timeout=10.0):
            if threading.current_thread() is reader and swapped.is_set():
                waiting_for_rebuild.set()
            return wait_applied(lsn, timeout)

        node.catch_up, node.wait_applied = held_catch_up, observed_wait_applied
        got: list = []
        door = _Door(node.store._read_lock)
        node.store._read_lock = door

        def read():
            try:
                got.append(node.list_messages(MAILBOX))
            except Exception as exc:
                got.append(exc)

        reader = threading.Thread(target=read, name="store-reader")
        door.thread = reader
        reader.start()
        assert door.arrived.wait(10)  # freshness checked on the old store, now at its connection
        cutter.start()
        assert swapped.wait(10)  # the store is swapped and empty; the rebuild is held
        door.go.set()
        # The reader either returns (what it read is checked below) or waits for the rebuild.
        while reader.is_alive() and not waiting_for_rebuild.wait(0.01):
            pass
        release_cut.set()
        cutter.join(10)
        reader.join(10)
        assert not cutter.is_alive() and not reader.is_alive()
        assert got == [expected], got
    finally:
        release_cut.set()
        node.close()
