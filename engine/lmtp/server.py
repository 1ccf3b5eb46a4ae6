"""The LMTP front on sockets: :class:`LmtpServer` (asyncio transports around the sans-I/O session).

Pieces
------
* :class:`LmtpServer` puts :class:`engine.lmtp.LmtpSession` (the sans-I/O
  protocol) on asyncio transports: one ``asyncio.Protocol`` per connection
  feeds bytes in and writes replies out. RCPT is answered in the event loop
  (routing is a dict lookup); a complete message goes to the delivery
  backend (``AsyncNode.deliver_many``: one log batch and one shared fsync
  for all its recipients, in a worker thread), and the per-recipient
  replies are written only when that call returned, i.e. once the records
  are durable. The backend is anything with ``role``,
  ``mailbox_exists(name)`` and ``async deliver_many(targets, body, create=)``
  (the benchmark puts a Maildir writer behind the same front).

Replies (the MTA's retry decision depends on them):

==========================================  ===========================
result                                       reply
==========================================  ===========================
durable receipt                              ``250 2.1.5``
duplicate of a recent delivery (MS-6)        ``250 2.0.0`` (logged "duplicate")
unknown user, policy ``reject``              ``550 5.1.1`` (at RCPT)
address that cannot name a mailbox           ``550 5.1.3``
message too large                            ``552 5.3.4``
replica / writes paused                      ``451 4.3.2``
log failed: disk full (ENOSPC, EDQUOT)       ``452 4.3.1``
log failed, store error, anything unexpected ``451 4.3.0``
==========================================  ===========================
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable


from ..errors import listen_error
from ..store.events import validate_mailbox_name
from .session import (
    DEFAULT_MAX_RECIPIENTS,
    NEED_DATA,
    PAUSED,
    AddressError,
    ConnectionClosed,
    LmtpSession,
    MessageReceived,
    MessageRefused,
    RecipientRequested,
    Reply,
    route_recipient,
)
from ..store.errors import (
    BadMailboxNameError,
    MessageTooLargeError,
    ReadOnlyNodeError,
    RequestError,
    TemporaryFailure,
    UnknownMailboxError,
)
from ..node import Receipt

__all__ = ["LmtpConfig", "LmtpServer", "reply_for", "UNKNOWN_RECIPIENT_POLICIES"]

UNKNOWN_RECIPIENT_POLICIES = ("create", "reject")
PAUSE_READING_BYTES = 1 << 20  # stop reading a connection whose unprocessed input passes this

log = logging.getLogger("mailwal.lmtp")


@dataclass
class LmtpConfig:
    """How the LMTP front behaves (``walctl serve`` options)."""

    host: str = "127.0.0.1"
    port: int = 2424
    unknown_recipients: str = "create"  # "create": make user/<local>/INBOX on first delivery; "reject": 550 5.1.1
    max_message_bytes: int | None = None  # None: the node's own limit
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    hostname: str | None = None
    idle_timeout_s: float = 300.0  # RFC 5321 4.5.3.2.7: at least 5 minutes
    shutdown_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if self.unknown_recipients not in UNKNOWN_RECIPIENT_POLICIES:
            raise ValueError(f"unknown_recipients must be one of {', '.join(UNKNOWN_RECIPIENT_POLICIES)}")


def _disk_full(exc: BaseException) -> bool:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def reply_for(result: Receipt | BaseException, address: str) -> Reply:
    """The per-recipient LMTP reply for one delivery result (see the module table)."""
    if isinstance(result, Receipt):
        if result.duplicate:
            return Reply(250, "2.0.0", f"<{address}> already delivered as UID {result.uid}; not stored again")
        return Reply(250, "2.1.5", f"<{address}> delivered, UID {result.uid}")
    if isinstance(result, UnknownMailboxError):
        return Reply(550, "5.1.1", f"<{address}>: no such mailbox")
    if isinstance(result, BadMailboxNameError):
        return Reply(550, "5.1.3", f"<{address}>: {result}")
    if isinstance(result, MessageTooLargeError):
        return Reply(552, "5.3.4", str(result))
    if isinstance(result, RequestError):
        return Reply(554, "5.0.0", f"<{address}>: {result}")
    if isinstance(result, ReadOnlyNodeError):
        return Reply(451, "4.3.2", f"read-only: {result}; try again later")
    if _disk_full(result):
        return Reply(452, "4.3.1", "insufficient system storage (the log failed: disk full); try again later")
    if isinstance(result, TemporaryFailure):
        return Reply(451, "4.3.0", f"temporary failure: {result}; try again later")
    return Reply(451, "4.3.0", "temporary local error; try again later")


def _outcome(reply: Reply) -> str:
    if reply.positive:
        return "duplicate" if reply.status == "2.0.0" else "delivered"
    return "deferred" if reply.code < 500 else "rejected"


class _Connection(asyncio.Protocol):
    """One LMTP connection: bytes <-> LmtpSession <-> the delivery backend."""

    def __init__(self, server: "LmtpServer"):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.session: LmtpSession | None = None
        self.lost = False
        self.paused = False
        self.delivering = False
        self.last_activity = 0.0
        self.peer = "?"

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport) -> None:
        srv = self.server
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.last_activity = srv.loop.time()
        self.session = LmtpSession(srv.hostname, max_message_bytes=srv.max_message_bytes,
                                   max_recipients=srv.config.max_recipients)
        srv.connections.add(self)
        self._pump()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.server.loop.time()
        self.session.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        self.session.receive_data(b"")
        self._pump()
        return True  # keep our side open: replies for an in-flight delivery still go out

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.server.connections.discard(self)
        self.server.changed()

    # -- the pump ------------------------------------------------------------------

    def _pump(self) -> None:
        session = self.session
        srv = self.server
        while True:
            if srv.draining and session.at_boundary and not session.closed:
                session.close(Reply(421, "4.3.2", f"{srv.hostname} shutting down; try again later"), "shutdown")
            ev = session.next_event()
            if ev is NEED_DATA or ev is PAUSED:
                break
            if isinstance(ev, RecipientRequested):
                reply, info = srv.check_recipient(ev.address)
                session.answer_recipient(reply, info)
            elif isinstance(ev, MessageReceived):
                self.delivering = True
                srv.spawn(self._deliver(ev))
                break
            elif isinstance(ev, MessageRefused):
                for r in ev.recipients:
                    log.info("rejected rcpt=<%s> size=%d reply=%r", r.address, ev.size, str(ev.reply))
            elif isinstance(ev, ConnectionClosed):
                pass
        out = session.data_to_send()
        if self.lost:
            return
        if out:
            self.transport.write(out)
        if session.closed:
            self.transport.close()
            return
        want_pause = session.awaiting is not None and session.buffered > PAUSE_READING_BYTES
        if want_pause != self.paused:
            self.paused = want_pause
            (self.transport.pause_reading if want_pause else self.transport.resume_reading)()

    async def _deliver(self, ev: MessageReceived) -> None:
        srv = self.server
        started = time.perf_counter()
        try:
            replies, results, mailboxes = await srv.deliver(ev)
        finally:
            self.delivering = False
        latency_ms = (time.perf_counter() - started) * 1000
        for r, reply, result, mailbox in zip(ev.recipients, replies, results, mailboxes):
            srv.record(r.address, mailbox, reply, result, latency_ms)
        self.session.answer_message(replies)
        if not self.lost:
            self._pump()
        srv.changed()

    def idle_for(self, now: float) -> float:
        return now - self.last_activity

    def kick(self) -> None:
        """Re-run the pump (shutdown began: idle sessions say 421 and close)."""
        if not self.lost and not self.delivering:
            self._pump()

    def abort(self) -> None:
        if not self.lost and self.transport is not None:
            self.transport.abort()


class LmtpServer:
    """The LMTP listener over a delivery backend (an :class:`AsyncNode` normally)."""

    def __init__(self, backend: Any, config: LmtpConfig, *, on_delivery: Callable[[dict], None] | None = None):
        self.backend = backend
        self.config = config
        self.hostname = config.hostname or socket.gethostname()
        node_limit = getattr(getattr(getattr(backend, "node", None), "config", None), "max_message_bytes", None)
        self.max_message_bytes = config.max_message_bytes or node_limit or 50 * 1024 * 1024
        self.on_delivery = on_delivery
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.draining = False
        self.counts = {"delivered": 0, "duplicate": 0, "deferred": 0, "rejected": 0}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._changed: asyncio.Event | None = None
        self._idle_task: asyncio.Task | None = None

    async def bind(self) -> None:
        """Bind the listening socket without accepting yet (idempotent).

        A node binds first, so an address it cannot have stops it before
        any service starts; :meth:`start` then begins accepting.

        Raises:
            ListenError: the address cannot be bound (in use, not local).
        """
        if self._server is not None:
            return
        self.loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        try:
            self._server = await self.loop.create_server(lambda: _Connection(self), self.config.host,
                                                         self.config.port, reuse_address=True, start_serving=False)
        except OSError as exc:
            raise listen_error("LMTP", (self.config.host, self.config.port), exc) from exc

    async def start(self) -> tuple[str, int]:
        """Listen (binding first if :meth:`bind` was not called); returns the bound
        (host, port) (port 0 picks a free one).

        Raises:
            ListenError: the address cannot be bound (in use, not local).
        """
        await self.bind()
        await self._server.start_serving()
        self._idle_task = self.loop.create_task(self._reap_idle())
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    # -- called by connections ---------------------------------------------------------

    def spawn(self, coro: Awaitable) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed: %r", task.exception(), exc_info=task.exception())
        self.changed()

    def changed(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def check_recipient(self, address: str) -> tuple[Reply, Any]:
        """Answer RCPT TO (in the event loop: routing is a dict lookup)."""
        backend = self.backend
        if backend.role != "master":
            return Reply(451, "4.3.2", f"<{address}>: this node is a read-only replica until promoted; "
                                       f"try again later"), None
        try:
            route = route_recipient(address, backend.mailbox_exists)
            validate_mailbox_name(route.inbox)
        except (AddressError, BadMailboxNameError) as exc:
            return Reply(550, "5.1.3", f"<{address}>: {exc}"), None
        if self.config.unknown_recipients == "reject" and not backend.mailbox_exists(route.inbox):
            return Reply(550, "5.1.1", f"<{address}>: no such user (no mailbox {route.inbox})"), None
        return Reply(250, "2.1.5", f"<{address}> OK"), route

    async def deliver(self, ev: MessageReceived) -> tuple[list[Reply], list[Any], list[str]]:
        """Deliver one message to its recipients: one backend call, one reply each."""
        exists = self.backend.mailbox_exists
        mailboxes = []
        for r in ev.recipients:
            try:  # route again: a +detail mailbox may have appeared or gone since RCPT
                mailboxes.append(route_recipient(r.address, exists).mailbox)
            except AddressError:
                mailboxes.append(r.info.mailbox)
        try:
            results = await self.backend.deliver_many([(m, ()) for m in mailboxes], ev.body,
                                                      create=self.config.unknown_recipients == "create")
        except (RequestError, TemporaryFailure) as exc:
            results = [exc] * len(mailboxes)
        except Exception as exc:  # a bug or an unexpected store error: defer, never acknowledge
            log.exception("delivery failed unexpectedly")
            results = [exc] * len(mailboxes)
        replies = [reply_for(res, r.address) for res, r in zip(results, ev.recipients)]
        return replies, results, mailboxes

    def record(self, address: str, mailbox: str, reply: Reply, result: Any, latency_ms: float) -> None:
        """One log line per recipient delivery (and the optional callback)."""
        outcome = _outcome(reply)
        self.counts[outcome] += 1
        if isinstance(result, Receipt):
            log.info("%s rcpt=<%s> mailbox=%s uid=%d guid=%s lsn=%d latency_ms=%.2f", outcome, address, mailbox,
                     result.uid, result.guid, result.lsn, latency_ms)
        else:
            log.info("%s rcpt=<%s> mailbox=%s reply=%r latency_ms=%.2f", outcome, address, mailbox, str(reply),
                     latency_ms)
        if self.on_delivery is not None:
            self.on_delivery({"outcome": outcome, "rcpt": address, "mailbox": mailbox, "reply": str(reply),
                              "receipt": result.to_dict() if isinstance(result, Receipt) else None,
                              "latency_ms": latency_ms})

    # -- idle timeout and shutdown ---------------------------------------------------------

    async def _reap_idle(self) -> None:
        period = max(0.05, min(10.0, self.config.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            for conn in list(self.connections):
                if not conn.delivering and conn.idle_for(now) > self.config.idle_timeout_s:
                    log.info("closing idle connection from %s", conn.peer)
                    if conn.session is not None and not conn.session.closed:
                        conn.session.close(Reply(421, "4.4.2", f"{self.hostname} idle too long; closing"), "idle")
                    conn.kick()
                    if not conn.lost:
                        conn.transport.close()

    def close_now(self) -> None:
        """Stop listening and cut every connection at once (idempotent; after drain it finds none)."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        if self._idle_task is not None:
            self._idle_task.cancel()
        for conn in list(self.connections):
            conn.abort()

    async def drain(self, grace_s: float | None = None) -> bool:
        """Stop accepting; finish in-flight transactions; close every connection.

        Returns True when everything finished within the grace period.
        """
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        self.draining = True
        if self._server is not None:
            self._server.close()
        if self._idle_task is not None:
            self._idle_task.cancel()
        deadline = self.loop.time() + grace_s
        clean = True
        while self.connections or self.tasks:
            for conn in list(self.connections):
                conn.kick()
            if not (self.connections or self.tasks):
                break
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                clean = not self.tasks
                for conn in list(self.connections):
                    log.warning("shutdown: cutting connection from %s mid-transaction (nothing acknowledged)",
                                conn.peer)
                    conn.abort()
                if self.tasks:  # deliveries already handed to the node: let them finish
                    await asyncio.wait(list(self.tasks))
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass
        if self._server is not None:
            await self._server.wait_closed()
        return clean
