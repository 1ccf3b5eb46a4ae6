"""A mail node: the log, the decision state and the SQLite store, wired.

Lifecycle
---------
``Node.init(path)`` creates a node directory (:mod:`.layout` says what lives
where). ``Node.open(path)`` opens it: the log recovers, the store catches up
from its applied LSN (MS-5), the decision state is loaded from the store, and
an applier thread keeps applying new durable records.

Writes (deliveries, flag changes, expunges, mailbox, user and subscription
operations) are planned and enqueued under one state lock, so LSN order is
decision order, then wait for the log's group-committed fdatasync *outside*
that lock: a method returns (with a receipt, :mod:`.receipts`) only once its
record is durable (MS-2). Reads go to the store after it has applied
everything durable at the time of the call (read-your-writes). A replica
node refuses writes with ``ReadOnlyNodeError``; its log is fed by
replication and its applier applies whatever arrives.

Modules: :mod:`.core` (:class:`Node`, blocking, thread-safe), :mod:`.aio`
(:class:`AsyncNode`, the anyio face), :mod:`.layout` (the node directory and
``node.json``), :mod:`.diverged` (the registry of tails cut aside after a
fork), :mod:`.receipts`, :mod:`.admin` (operator requests: users, mailboxes,
flags and expunges, the same on a running node's control channel and on a
stopped node, CTL-10). The node imports :mod:`engine.store` and :mod:`wal`.
"""

from .aio import AsyncNode
from .core import Node, rebuild_store
from .diverged import mark_tail_reconciled
from .layout import (
    CONFIG_FILE,
    CUT_INTENT_FILE,
    DIVERGED_FILE,
    LOG_DIR,
    STORE_FILE,
    NodeConfig,
    read_config,
    write_config,
)
from .receipts import AppendReceipt, CopyReceipt, FlagsReceipt, PlannedDeliveries, Receipt

__all__ = [
    "Node", "AsyncNode", "rebuild_store", "NodeConfig", "read_config", "write_config",
    "Receipt", "AppendReceipt", "CopyReceipt", "FlagsReceipt", "PlannedDeliveries",
    "LOG_DIR", "STORE_FILE", "CONFIG_FILE", "DIVERGED_FILE", "CUT_INTENT_FILE", "mark_tail_reconciled",
]
