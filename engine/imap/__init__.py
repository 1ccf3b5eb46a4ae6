"""The IMAP front (RFC 9051 IMAP4rev2, RFC 3501 IMAP4rev1): see ``specs/imap.md``.

Lifecycle
---------
1. The store implements :class:`Backend` (``engine/imap/backend.py``): store
   names, durable writes, MODSEQs, a change hook. :class:`MemoryBackend` is
   the in-memory one (tests, the pure model);
   ``engine.imap.node_backend.NodeBackend`` is the engine's (imported from
   there: it brings in the node, which the pure parts never need).
2. :class:`ImapServer` (``engine/imap/server.py``) listens; per connection it
   runs an :class:`ImapConnection` (sans-I/O: bytes in, command values out;
   responses in, bytes out) and an :class:`Executor` (commands in, responses
   out, over the backend).
3. Everything but ``server.py`` is pure and can be driven without sockets:
   feed bytes with ``ImapConnection.receive_data``, take commands from
   ``next_event``, run them with ``await Executor.execute``, give the
   responses to ``ImapConnection.send``, write ``data_to_send()``.

This module's ``__all__`` is the package's contract; the rest is internal.
"""

from .backend import (
    AlreadyExists,
    AppendResult,
    Backend,
    BackendError,
    Cannot,
    Changes,
    CopyResult,
    InUse,
    LimitExceeded,
    MailboxEntry,
    MailboxStatus,
    MessageInfo,
    NewMessage,
    NoSuchMailbox,
    OverQuota,
    ReadOnly,
    Snapshot,
    StoreResult,
    TooBig,
    Unavailable,
)
from .executor import Executor
from .memory import MemoryBackend
from .names import store_name, client_name
from .session import ConnectionClosed, IdleDone, ImapConnection, LocalProtocolError, NEED_DATA, PAUSED, State
from ..store.structure import analyze

__all__ = [
    "Backend", "BackendError", "Unavailable", "ReadOnly", "NoSuchMailbox", "AlreadyExists", "OverQuota",
    "LimitExceeded", "TooBig", "Cannot", "InUse", "MessageInfo", "Snapshot", "Changes", "MailboxStatus",
    "MailboxEntry", "NewMessage", "AppendResult", "CopyResult", "StoreResult",
    "Executor", "MemoryBackend", "ImapConnection", "State", "IdleDone", "ConnectionClosed", "LocalProtocolError",
    "NEED_DATA", "PAUSED", "analyze", "store_name", "client_name",
]
