"""Cutting a diverged tail while the node's applier runs (engine.node.Node.cut_diverged).

Found by ``make demo``: a former master restarted with ``walctl follow``
cuts its tail aside and rebuilds its store; the applier thread, busy in its
quarantine-retry pass on the old store at that moment, met a closed database
and stopped for good ("Cannot operate on a closed database"), so the replica
never applied another record.
"""

from __future__ import annotations

import threading

from engine.node import Node


def _message(i: int) -> bytes:
    return b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i)


def test_cut_diverged_waits_for_the_applier_and_it_keeps_applying(tmp_path):
    node = Node.init(str(tmp_path / "n"))
    try:
        for i in range(10):
            node.deliver("user/bob/INBOX", _message(i), create=True)
        assert node.wait_applied(node.log.last_lsn)
        fork = node.log.last_lsn - 4

        # Fault injection: hold the applier inside its quarantine-retry pass over the store
        # until cut_diverged has had every chance to swap the store underneath it.
        inside, release = threading.Event(), threading.Event()
        store = node.store
        original = store.retries_due

        def slow_retries_due(now_ms):
            if threading.current_thread().name == "mailwal-applier" and not release.is_set():
                inside.set()
                release.wait(5)
            return original(now_ms)

        store.retries_due = slow_retries_due
        assert inside.wait(5), "the applier never ran its retry pass"
        cutter = threading.Thread(target=lambda: node.cut_diverged(fork))
        cutter.start()
        cutter.join(0.5)
        release.set()
        cutter.join(10)
        assert not cutter.is_alive()

        assert node.log.last_lsn == fork
        assert len(node.diverged_tails()) == 1
        for i in range(10, 15):  # a replica would now append the master's records; deliveries do the same here
            node.deliver("user/bob/INBOX", _message(i))
        assert node.wait_applied(node.log.last_lsn), f"applier stopped: {node.applier_error!r}"
        assert node.applier_error is None
        assert node.status()["applied_lsn"] == node.log.last_lsn
    finally:
        node.close()
