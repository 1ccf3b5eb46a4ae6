"""Master side of log shipping: :func:`serve_replication` and :class:`ReplicationHub`.

Theory of operation
-------------------
:func:`serve_replication` listens on TCP (default 127.0.0.1) and serves every
replica connection in its own task, which owns one
:class:`~engine.replication.ReplicationSession` (role MASTER):

1. *Authenticate* (REP-4, under ``handshake_timeout_s``): nothing about the
   log is sent before the replica has proved it knows the secret
   (INV-AuthFirst). A wrong proof gets ``Refuse("auth")`` and a close.
2. *Place* the replica: a Position is checked against this log with
   :class:`~engine.replication.PositionCheck` (hash comparisons, probes for the
   last common LSN) and answered with Accept or Refuse; a SeedRequest is
   answered with Accept from LSN 1, a snapshot from ``make_snapshot``, or
   Refuse (REP-7..REP-10).
3. *Stream* (REP-11, REP-12, REP-20): a reader task feeds a small bounded
   outbox; a writer task sends its AppendBatch frames, or a Heartbeat when
   idle; an ack task reads Acks and updates the hub. A replica that has
   caught up is fed from the hub's :class:`~engine.replication.tail.TailBuffer`:
   the newest durable records, read from disk once by whichever stream needs
   them first (one worker-thread hop that waits with ``Log.wait_for`` and
   reads), verified and encoded once, shared by every replica. A replica
   behind the buffer reads from disk on its own until it reaches it. A slow
   or stalled replica fills its own TCP buffer and its own two-batch outbox
   and then simply stops being read for: it never slows the master's appends
   or other replicas, and costs bounded memory (the buffer drops its oldest
   batches whoever still wants them).

:class:`ReplicationHub` is the master's view of its replicas for status,
synchronous replication (:meth:`ReplicationHub.wait_replicated`) and
failover (:meth:`ReplicationHub.fence`, :meth:`ReplicationHub.promote`). It
persists each replica's durably-acked LSN as the log cursor
``replica.<name>`` (throttled), so status survives restarts and retention
keeps what a replica still needs. A cursor never runs ahead of what the
replica acknowledged as durable, and never moves back (INV-CursorMonotonic).

All hub methods must be called from the event loop thread that runs
:func:`serve_replication`.
"""

from __future__ import annotations

import collections
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import anyio
import anyio.abc

from wal import Log, Record, WalError
from wal.errors import CursorError

from ..errors import (
    ConnectionLostError,
    EngineError,
    RemoteProtocolError,
    ReplicationTimeoutError,
)
from .channel import Channel, logger
from .decisions import (
    SEED_WITH_SNAPSHOT,
    NeedMasterHashes,
    PositionCheck,
    batch_records,
    decide_seed,
)
from .messages import (
    BATCH_SOFT_MAX_BYTES,
    MAX_BATCH_RECORDS,
    SNAPSHOT_CHUNK_MAX_BYTES,
    Accept,
    Ack,
    AppendBatch,
    AuthFailed,
    Challenge,
    ConnectionClosed,
    Drained,
    Fence,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    Position,
    Probe,
    ProbeReply,
    Promote,
    Promoted,
    Proof,
    Refuse,
    Role,
    SeedRequest,
    SnapshotBegin,
    SnapshotChunk,
)
from .session import ReplicationSession
from .tail import TailBuffer
from .transitions import State

__all__ = ["serve_replication", "replication_handler", "ReplicationHub", "ReplicaStatus", "SnapshotSource", "cursor_name"]

#: ``make_snapshot() -> (lsn, hash, log_id, epoch, chunks)``: the state after record ``lsn``.
SnapshotSource = Callable[[], "tuple[int, bytes, uuid.UUID | bytes, int, Iterable[bytes]]"]

OUTBOX_ITEMS = 2  # batches (or commands) queued per replica between reader and writer
#: The shared buffer of recent durable records (payload and encoded frames counted).
TAIL_MAX_BYTES = 32 * 1024 * 1024
#: A fill of the shared buffer reads at most this many payload bytes at once.
TAIL_READ_MAX_BYTES = BATCH_SOFT_MAX_BYTES


def cursor_name(replica: str) -> str:
    """The master log cursor that stores ``replica``'s durably acked LSN."""
    return f"replica.{replica}"


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica as the master sees it (for ``walctl status``).

    ``durable_lsn`` is the highest LSN the replica acknowledged as fsynced
    (from this or an earlier connection, or the persisted cursor after a
    restart); ``cursor_lsn`` what is persisted on the master. ``lag_records``
    is the master's last LSN minus ``durable_lsn``; ``lag_bytes`` the payload
    bytes shipped but not yet acknowledged; ``lag_seconds`` the age of the
    oldest shipped-but-unacknowledged batch (0 when none).
    ``since`` is the wall-clock time of the last connect (or disconnect).
    """

    name: str
    connected: bool
    peer: str | None
    since: float | None
    state: str
    durable_lsn: int
    applied_lsn: int | None
    cursor_lsn: int | None
    lag_records: int
    lag_bytes: int
    lag_seconds: float
    last_error: str | None
    connects: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Replica:
    name: str
    durable_lsn: int = 0
    applied_lsn: int | None = None
    cursor_lsn: int | None = None
    peer: str | None = None
    since: float | None = None
    last_error: str | None = None
    connects: int = 0
    conn: "_Connection | None" = None
    inflight: collections.deque = field(default_factory=collections.deque)  # (last_lsn, bytes, t)


class _Connection:
    """The per-connection state the hub and the driver tasks share."""

    def __init__(self, chan: Channel, name: str):
        self.chan = chan
        self.name = name
        self.scope = anyio.CancelScope()
        self.outbox: Any = None
        self.error: BaseException | None = None
        self.task_group: Any = None
        self.fence_lsn: int | None = None
        self.drained: Drained | None = None
        self.promoted: Promoted | None = None
        self.cursor_dirty = anyio.Event()
        self.cursor_urgent = anyio.Event()
        self.streaming = False

    @property
    def state(self) -> State:
        return self.chan.session.state


class ReplicationHub:
    """The master's replicas: status, synchronous-replication waits, failover.

    Args:
        log: the master's log.
        cursor_interval_s: persist a replica's cursor at most this often...
        cursor_every_records: ...unless it moved by at least this many records.
        tail_max_bytes: memory bound of the shared buffer of recent records.
        clock: monotonic clock (seconds) for lag ages.
        wall_clock: wall-clock time for ``since`` stamps.
    """

    def __init__(self, log: Log, *, cursor_interval_s: float = 1.0, cursor_every_records: int = 100_000,
                 tail_max_bytes: int = TAIL_MAX_BYTES,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        self.log = log
        self.tail = TailBuffer(tail_max_bytes)
        self._tail_lock = anyio.Lock()
        self._tail_limiter = anyio.CapacityLimiter(1)
        # Counters (tests, metrics): fills of the shared buffer and the records they read (each once,
        # whatever the number of replicas); batches read from disk by one stream for itself; batches sent.
        self.tail_reads = 0
        self.tail_records = 0
        self.disk_batches = 0
        self.batches_sent = 0
        self.cursor_interval_s = cursor_interval_s
        self.cursor_every_records = cursor_every_records
        self._clock = clock
        self._wall = wall_clock
        self._replicas: dict[str, _Replica] = {}
        self._changed = anyio.Event()
        for cname, lsn in log.cursors.list().items():
            if cname.startswith("replica."):
                name = cname[len("replica."):]
                self._replicas[name] = _Replica(name, durable_lsn=lsn, cursor_lsn=lsn)

    # -- queries ------------------------------------------------------------------

    def status(self) -> list[ReplicaStatus]:
        """Every replica known (connected now, seen since start, or with a cursor), by name."""
        return [self._status(r) for _, r in sorted(self._replicas.items())]

    def replica(self, name: str) -> ReplicaStatus:
        """One replica's status. Raises KeyError for an unknown name."""
        return self._status(self._replicas[name])

    def _status(self, r: _Replica) -> ReplicaStatus:
        now = self._clock()
        conn = r.conn
        master_lsn = self.log.last_lsn
        return ReplicaStatus(
            name=r.name,
            connected=conn is not None and conn.streaming,
            peer=r.peer,
            since=r.since,
            state=conn.state.value if conn is not None else "disconnected",
            durable_lsn=r.durable_lsn,
            applied_lsn=r.applied_lsn,
            cursor_lsn=r.cursor_lsn,
            lag_records=max(0, master_lsn - r.durable_lsn),
            lag_bytes=sum(b for _, b, _ in r.inflight),
            lag_seconds=(now - r.inflight[0][2]) if r.inflight else 0.0,
            last_error=r.last_error,
            connects=r.connects,
        )

    def replicas_at(self, lsn: int) -> list[str]:
        """Names of replicas that durably acknowledged ``lsn`` (or later)."""
        return sorted(n for n, r in self._replicas.items() if r.durable_lsn >= lsn)

    async def wait_changed(self) -> None:
        """Wait for the next change to any replica's state (an ack, a connect, a disconnect)."""
        await self._changed.wait()

    async def wait_replicated(self, lsn: int, k: int, timeout: float | None) -> list[str]:
        """Wait until at least ``k`` replicas durably acknowledged ``lsn``.

        Returns:
            The names of the replicas that have it (at least ``k``).
        Raises:
            ReplicationTimeoutError: not enough replicas within ``timeout`` seconds.
        """
        if k <= 0:
            return self.replicas_at(lsn)
        with anyio.move_on_after(timeout):
            while True:
                have = self.replicas_at(lsn)
                if len(have) >= k:
                    return have
                await self._changed.wait()
        raise ReplicationTimeoutError(lsn, k, self.replicas_at(lsn))

    # -- failover (minimal; REP-14, REP-15) ----------------------------------------

    def replica_epochs(self) -> list[int]:
        """The epoch each connected replica's log is at (its Position). A replica can
        have seen a higher epoch than this master, on a branch this master never had
        (it lagged when that branch's master was promoted): a new epoch must exceed it."""
        out = []
        for r in self._replicas.values():
            pos = getattr(r.conn.chan.session, "position", None) if r.conn is not None else None
            if pos is not None:
                out.append(pos.epoch)
        return out

    async def fence(self, timeout: float) -> dict[str, int]:
        """Tell every streaming replica that the log ends at its current last LSN
        and wait for their Drained replies.

        The caller MUST have stopped appending first (the master is fenced).
        Returns ``{name: drained LSN}`` for the replicas that drained in time.
        """
        lsn, epoch = self.log.last_lsn, self.log.epoch
        conns = [r.conn for r in self._replicas.values() if r.conn is not None and r.conn.state is State.STREAMING]
        out: dict[str, int] = {}
        with anyio.move_on_after(timeout):
            for c in conns:
                c.fence_lsn = lsn
                try:
                    await c.outbox.send(Fence(epoch, lsn))
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    pass  # that connection just ended
            for c in conns:
                with anyio.move_on_after(timeout):  # a dead connection must not hide the others
                    while c.drained is None and self._replicas[c.name].conn is c:
                        await self._changed.wait()
                if c.drained is not None:
                    out[c.name] = c.drained.lsn
        return out

    async def promote(self, name: str, new_epoch: int, timeout: float) -> Promoted:
        """Ask replica ``name`` to become master in ``new_epoch``; returns its Promoted.

        Raises:
            KeyError: no such connected replica.
            TimeoutError: no reply in time, or the connection ended first.
        """
        r = self._replicas.get(name)
        if r is None or r.conn is None or not r.conn.streaming:
            raise KeyError(f"replica {name!r} is not connected")
        c = r.conn
        with anyio.fail_after(timeout):
            try:
                await c.outbox.send(Promote(new_epoch))
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                raise TimeoutError(f"replica {name!r} disconnected before it could be promoted") from None
            while c.promoted is None:
                if r.conn is not c:
                    raise TimeoutError(f"replica {name!r} disconnected before confirming its promotion")
                await self._changed.wait()
        return c.promoted

    # -- bookkeeping called by the connection tasks ----------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _attach(self, conn: _Connection) -> _Replica:
        r = self._replicas.get(conn.name)
        if r is None:
            r = self._replicas[conn.name] = _Replica(conn.name)
        old = r.conn
        if old is not None:
            logger.warning("replica %s reconnected from %s: closing its older connection from %s",
                        conn.name, conn.chan.peer, old.chan.peer)
            old.error = ConnectionLostError(f"superseded by a newer connection from {conn.chan.peer}")
            old.scope.cancel()
        r.conn = conn
        r.peer = conn.chan.peer
        r.inflight.clear()
        return r

    def _streaming(self, conn: _Connection, durable_lsn: int | None) -> None:
        r = self._replicas[conn.name]
        conn.streaming = True
        r.since = self._wall()
        r.connects += 1
        if durable_lsn is not None and durable_lsn > r.durable_lsn:
            r.durable_lsn = durable_lsn
        self._notify()

    def _detach(self, conn: _Connection, error: str | None) -> None:
        r = self._replicas.get(conn.name)
        if r is None or r.conn is not conn:
            return
        r.conn = None
        r.since = self._wall()
        r.inflight.clear()
        if error:
            r.last_error = error
        self._notify()

    def _refused(self, name: str, refuse: Refuse) -> None:
        r = self._replicas.get(name)
        if r is not None:
            r.last_error = f"refused ({refuse.code}): {refuse.detail}"

    def _sent(self, conn: _Connection, batch: AppendBatch) -> None:
        r = self._replicas[conn.name]
        r.inflight.append((batch.last_lsn, batch.payload_bytes, self._clock()))
        self.batches_sent += 1
        self._notify()

    async def _tail_fetch(self, lsn: int, poll_s: float) -> None:
        """Make the shared buffer hold ``lsn`` once it is durable, waiting up to ``poll_s``.

        One caller at a time reads (in one worker-thread hop: wait, then read
        and verify); the others wait for the lock and then find the records
        already there. Returns early when ``lsn`` is held; returning without
        it means nothing new within ``poll_s`` (or the log closed or failed:
        the caller checks).
        """
        tail = self.tail
        async with self._tail_lock:
            end = tail.end_lsn
            if end is not None and end >= lsn:
                return
            if end is not None and end != lsn - 1:
                tail.clear()  # this stream went past a stale buffer (read from disk): restart it here
            prev_hash = tail.last_hash
            batches = await anyio.to_thread.run_sync(self._fill_tail, lsn, prev_hash, poll_s,
                                                     abandon_on_cancel=True, limiter=self._tail_limiter)
            if batches is None:  # the log does not continue the buffer: it was rewritten under it
                logger.error("replication: the master's log no longer continues the buffered records at LSN %d; "
                          "dropping the buffer", lsn - 1)
                tail.clear()
            elif batches and tail.end_lsn == (None if prev_hash is None else lsn - 1):
                tail.extend(batches)
                self.tail_reads += 1
                self.tail_records += sum(len(b.records) for b in batches)

    def _fill_tail(self, lsn: int, prev_hash: bytes | None, poll_s: float) -> list[AppendBatch] | None:
        """Worker thread: wait for ``lsn`` to be durable, then read what is durable from it.

        With ``prev_hash`` (the buffer's last record), the read starts one
        record earlier and checks that record's hash: None if it differs.
        """
        lg = self.log
        if lg.last_lsn < lsn:
            lg.wait_for(lsn, poll_s)
            if lg.last_lsn < lsn:
                return []
        first = lsn - 1 if prev_hash is not None and lsn > 1 else lsn
        records: list[Record] = []
        size = 0
        for rec in lg.read(first, lg.last_lsn):
            if rec.lsn < lsn:
                if rec.hash != prev_hash:
                    return None
                continue
            records.append(rec)
            size += len(rec.payload)
            if size >= TAIL_READ_MAX_BYTES:
                break
        return batch_records(records) if records else []

    def _acked(self, conn: _Connection, ack: Ack) -> None:
        r = self._replicas[conn.name]
        while r.inflight and r.inflight[0][0] <= ack.durable_lsn:
            r.inflight.popleft()
        r.applied_lsn = ack.applied_lsn
        if ack.durable_lsn > r.durable_lsn:
            r.durable_lsn = ack.durable_lsn
        self._notify()
        if r.cursor_lsn is None or r.durable_lsn > r.cursor_lsn:
            conn.cursor_dirty.set()
            if r.durable_lsn - (r.cursor_lsn or 0) >= self.cursor_every_records:
                conn.cursor_urgent.set()

    async def _persist_cursor(self, name: str, *, rewind_to: int | None = None) -> None:
        """Store the replica's durable LSN as its cursor (INV-CursorMonotonic:
        only forward, unless ``rewind_to`` seeds a brand-new replica)."""
        r = self._replicas[name]
        if rewind_to is not None:
            await anyio.to_thread.run_sync(lambda: self.log.cursors.set(cursor_name(name), rewind_to, allow_backwards=True))
            r.cursor_lsn = rewind_to
            r.durable_lsn = rewind_to
            return
        lsn = r.durable_lsn
        if r.cursor_lsn is not None and lsn <= r.cursor_lsn:
            return
        try:
            await anyio.to_thread.run_sync(self.log.cursors.set, cursor_name(name), lsn)
        except CursorError as exc:  # a same-named replica moved it further: keep the higher value
            logger.warning("replica %s: cursor not moved: %s", name, exc)
            return
        except (WalError, OSError) as exc:  # the master's disk: streaming goes on, status shows the old cursor
            logger.error("replica %s: could not persist its cursor at LSN %d: %s", name, lsn, exc)
            return
        if r.cursor_lsn is None or lsn > r.cursor_lsn:
            r.cursor_lsn = lsn


# -- the server -------------------------------------------------------------------


async def serve_replication(
    log: Log,
    hub: ReplicationHub,
    host: str = "127.0.0.1",
    port: int = 0,
    secret: bytes = b"",
    *,
    make_snapshot: SnapshotSource | None = None,
    heartbeat_interval_s: float = 1.0,
    idle_timeout_s: float = 5.0,
    handshake_timeout_s: float = 5.0,
    max_unauthenticated: int = 64,
    poll_interval_s: float = 0.25,
    task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``log`` to replicas over TCP until cancelled.

    Args:
        log: the master's log (the hub's log).
        hub: where replica state is kept and queried.
        host, port: where to listen (default loopback; port 0 picks a free port).
        secret: the shared replication secret (:func:`engine.replication.secret.load_secret`).
        make_snapshot: optional ``() -> (lsn, hash, log_id, epoch, chunks)`` run
            in a worker thread to seed replicas when LSN 1 is no longer held.
        heartbeat_interval_s: idle time after which a Heartbeat is sent.
        idle_timeout_s: a replica silent this long is dropped; also bounds each write.
        handshake_timeout_s: the whole authentication must fit in this.
        max_unauthenticated: connections beyond this many still authenticating
            are closed at once.
        poll_interval_s: how long a reader thread waits for new records at a time.
        task_status: receives ``(host, port)`` once listening.
    """
    if hub.log is not log:
        raise ValueError("the hub must be built on the same Log that is served")
    ReplicationSession(Role.MASTER, secret)  # validates the secret before listening
    server = _Server(log, hub, secret, make_snapshot, heartbeat_interval_s, idle_timeout_s,
                     handshake_timeout_s, max_unauthenticated, poll_interval_s)
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener, anyio.create_task_group() as tg:
        bound = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_address)
        for sub in listener.listeners:
            tg.start_soon(server.accept_loop, sub, tg)
        logger.info("replication: serving log %s on %s:%s", log.log_id, bound[0], bound[1])
        task_status.started((bound[0], bound[1]))


def replication_handler(
    log: Log,
    hub: ReplicationHub,
    secret: bytes,
    *,
    make_snapshot: SnapshotSource | None = None,
    heartbeat_interval_s: float = 1.0,
    idle_timeout_s: float = 5.0,
    handshake_timeout_s: float = 5.0,
    max_unauthenticated: int = 64,
    poll_interval_s: float = 0.25,
) -> Callable[[anyio.abc.ByteStream], Any]:
    """``async handle(stream)`` serving one replica connection, for callers that
    own the listener (a node multiplexing replication and control on one port).
    Same arguments and behaviour as :func:`serve_replication`."""
    if hub.log is not log:
        raise ValueError("the hub must be built on the same Log that is served")
    ReplicationSession(Role.MASTER, secret)  # validates the secret
    return _Server(log, hub, secret, make_snapshot, heartbeat_interval_s, idle_timeout_s,
                   handshake_timeout_s, max_unauthenticated, poll_interval_s).handle


class _Server:
    def __init__(self, log: Log, hub: ReplicationHub, secret: bytes, make_snapshot: SnapshotSource | None,
                 heartbeat_interval_s: float, idle_timeout_s: float, handshake_timeout_s: float,
                 max_unauthenticated: int, poll_interval_s: float):
        self.log = log
        self.hub = hub
        self.secret = secret
        self.make_snapshot = make_snapshot
        self.hb = heartbeat_interval_s
        self.idle = idle_timeout_s
        self.handshake = handshake_timeout_s
        self.max_unauth = max_unauthenticated
        self.poll = poll_interval_s
        self.unauthenticated = 0

    async def accept_loop(self, listener: anyio.abc.Listener, tg: anyio.abc.TaskGroup) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # e.g. EMFILE: keep serving the connections we have
                logger.error("replication: accept failed: %s", exc)
                await anyio.sleep(0.1)
                continue
            tg.start_soon(self.handle, stream)

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        """Serve one connection; every failure stays inside it (logged)."""
        chan = Channel(stream, ReplicationSession(Role.MASTER, self.secret), write_timeout_s=self.idle)
        conn: _Connection | None = None
        error: str | None = None
        try:
            if self.unauthenticated >= self.max_unauth:
                logger.warning("replication: too many unauthenticated connections; closing %s", chan.peer)
                return
            self.unauthenticated += 1
            try:
                with anyio.fail_after(self.handshake):
                    request = await self._authenticate(chan)
            finally:
                self.unauthenticated -= 1
            if request is None:
                return
            conn = _Connection(chan, request.name)
            self.hub._attach(conn)
            with conn.scope:
                await self._serve(conn, request)
            if conn.error is not None:
                error = str(conn.error)
        except anyio.get_cancelled_exc_class():
            raise
        except RemoteProtocolError as exc:
            error = f"protocol error: {exc}"
            logger.warning("replication: closing connection from %s: %s", chan.peer, error)
        except (ConnectionLostError, TimeoutError, OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            error = _describe(exc, self.idle)
            logger.info("replication: connection from %s ended: %s", chan.peer, error)
        except WalError as exc:
            error = f"master log error: {exc}"
            logger.error("replication: %s (serving %s)", error, chan.peer)
        except EngineError as exc:
            error = str(exc)
            logger.error("replication: %s (serving %s)", error, chan.peer)
        except Exception as exc:  # a bug: keep serving the other replicas, but say so loudly
            error = f"internal error: {exc!r}"
            logger.exception("replication: internal error serving %s", chan.peer)
        finally:
            if conn is not None and conn.streaming:  # a refused replica gets no cursor
                with anyio.move_on_after(5, shield=True):
                    await self.hub._persist_cursor(conn.name)
            if conn is not None:
                self.hub._detach(conn, error)
            await chan.aclose()

    async def _authenticate(self, chan: Channel) -> Position | SeedRequest | None:
        """REP-4/REP-5. Returns the replica's request, or None if it left or failed."""
        ev = await chan.receive()
        if not isinstance(ev, Hello):
            return None  # ConnectionClosed (anything else raised already)
        await chan.send(Challenge(secrets.token_bytes(32)))
        ev = await chan.receive()
        if isinstance(ev, AuthFailed):
            logger.warning("replication: %s failed authentication (wrong shared secret?)", chan.peer)
            await chan.send(Refuse("auth", "authentication failed"))
            return None
        if not isinstance(ev, Proof):
            return None
        await chan.send(chan.session.proof())
        ev = await chan.receive()
        if isinstance(ev, (Position, SeedRequest)):
            return ev
        return None

    async def _serve(self, conn: _Connection, request: Position | SeedRequest) -> None:
        if isinstance(request, Position):
            accept = await self._place(conn, request)
            durable = request.last_lsn
        else:
            accept = await self._seed(conn, request)
            durable = None
        if accept is None:
            return
        await conn.chan.send(accept)
        self.hub._streaming(conn, durable)
        logger.info("replication: streaming to %s (%s) from LSN %d", conn.name, conn.chan.peer, accept.start_lsn)
        await self._stream(conn, accept.start_lsn)

    async def _recv(self, conn: _Connection) -> Message | None:
        with anyio.fail_after(self.idle):
            ev = await conn.chan.receive()
        if isinstance(ev, ConnectionClosed):
            raise ConnectionLostError("the replica closed the connection")
        if isinstance(ev, Goodbye):
            raise ConnectionLostError(f"the replica said goodbye: {ev.reason}")
        return ev  # type: ignore[return-value]

    async def _refuse(self, conn: _Connection, refuse: Refuse) -> None:
        logger.warning("replication: refusing %s (%s): %s", conn.name, conn.chan.peer, refuse.detail)
        self.hub._refused(conn.name, refuse)
        await conn.chan.send(refuse)

    async def _place(self, conn: _Connection, pos: Position) -> Accept | None:
        """REP-7..REP-9: accept the replica where it is, or refuse it."""
        lg = self.log
        first, last, epoch = await anyio.to_thread.run_sync(lambda: (lg.first_lsn, lg.last_lsn, lg.epoch))
        check = PositionCheck(pos, log_id=lg.log_id.bytes, first_lsn=first, last_lsn=last, epoch=epoch)
        while True:
            action = check.next_action()
            if isinstance(action, NeedMasterHashes):
                lsns = action.lsns
                hashes = await anyio.to_thread.run_sync(lambda: {n: lg.hash_at(n) for n in lsns})
                check.add_master_hashes(hashes)
            elif isinstance(action, Probe):
                await conn.chan.send(action)
                reply = await self._recv(conn)
                assert isinstance(reply, ProbeReply)  # the session allows nothing else here
                check.add_reply(reply)
            elif isinstance(action, Refuse):
                await self._refuse(conn, action)
                return None
            else:
                return action

    async def _seed(self, conn: _Connection, req: SeedRequest) -> Accept | None:
        """REP-10: seed a replica that has no log."""
        lg = self.log
        first, last, epoch = await anyio.to_thread.run_sync(lambda: (lg.first_lsn, lg.last_lsn, lg.epoch))
        before = await anyio.to_thread.run_sync(lg.hash_at, first - 1)
        decision = decide_seed(req, log_id=lg.log_id.bytes, first_lsn=first, last_lsn=last, epoch=epoch,
                               hash_before_first=before, has_snapshot=self.make_snapshot is not None)
        if isinstance(decision, Refuse):
            await self._refuse(conn, decision)
            return None
        if isinstance(decision, Accept):
            # Keep every record for the new replica (retention honours cursors).
            await self.hub._persist_cursor(conn.name, rewind_to=0)
            return decision
        assert decision is SEED_WITH_SNAPSHOT
        return await self._send_snapshot(conn)

    async def _send_snapshot(self, conn: _Connection) -> Accept | None:
        lg = self.log
        assert self.make_snapshot is not None
        async with anyio.create_task_group() as keepalive:
            keepalive.start_soon(self._heartbeats, conn)
            lsn, hash_, log_id, s_epoch, chunks = await anyio.to_thread.run_sync(self.make_snapshot)
            log_id_bytes = log_id.bytes if isinstance(log_id, uuid.UUID) else bytes(log_id)
            first = await anyio.to_thread.run_sync(lambda: lg.first_lsn)
            problem = None
            if log_id_bytes != lg.log_id.bytes:
                problem = "the snapshot is of another log"
            elif not first - 1 <= lsn <= lg.last_lsn:
                problem = f"the snapshot's LSN {lsn} is outside the log's {first - 1}..{lg.last_lsn}"
            elif await anyio.to_thread.run_sync(lg.hash_at, lsn) != hash_:
                problem = f"the snapshot's hash does not match the log at LSN {lsn}"
            if problem is not None:
                keepalive.cancel_scope.cancel()
                logger.error("replication: make_snapshot() is inconsistent: %s", problem)
                await self._refuse(conn, Refuse("unavailable", f"the master cannot seed right now: {problem}"))
                return None
            # The new replica needs everything after the snapshot: pin it first.
            await self.hub._persist_cursor(conn.name, rewind_to=lsn)
            await conn.chan.send(SnapshotBegin(log_id_bytes, s_epoch, lsn, hash_))
            it: Iterator[bytes] = iter(chunks)
            try:
                while True:
                    chunk = await anyio.to_thread.run_sync(next, it, None)
                    if chunk is None:
                        break
                    for i in range(0, len(chunk), SNAPSHOT_CHUNK_MAX_BYTES):
                        await conn.chan.send(SnapshotChunk(bytes(chunk[i : i + SNAPSHOT_CHUNK_MAX_BYTES])))
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            keepalive.cancel_scope.cancel()
        await conn.chan.send(conn.chan.session.snapshot_end())
        return Accept(log_id_bytes, lg.epoch, lsn + 1, hash_, lg.last_lsn)

    async def _heartbeats(self, conn: _Connection) -> None:
        """Keep the replica's idle timer fed while a snapshot is being made."""
        try:
            while True:
                await anyio.sleep(self.hb)
                await conn.chan.send(Heartbeat(self.log.last_lsn))
        except ConnectionLostError:
            return  # the next send of the main flow reports it

    # -- streaming ------------------------------------------------------------------

    async def _stream(self, conn: _Connection, start_lsn: int) -> None:
        send_out, recv_out = anyio.create_memory_object_stream[Any](OUTBOX_ITEMS)
        conn.outbox = send_out
        async with send_out, recv_out, anyio.create_task_group() as tg:
            conn.task_group = tg
            tg.start_soon(self._guard, conn, self._read_log, conn, send_out, start_lsn)
            tg.start_soon(self._guard, conn, self._write_loop, conn, recv_out)
            tg.start_soon(self._guard, conn, self._cursor_loop, conn)
            tg.start_soon(self._guard, conn, self._ack_loop, conn)
        if conn.error is not None and not isinstance(conn.error, _Finished):
            raise conn.error

    async def _guard(self, conn: _Connection, fn: Callable[..., Any], *args: Any) -> None:
        """Run one streaming task; its first failure ends the whole connection."""
        try:
            await fn(*args)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            if conn.error is None:
                conn.error = exc
            conn.task_group.cancel_scope.cancel()

    async def _read_log(self, conn: _Connection, out: Any, start_lsn: int) -> None:
        """Feed batches into the bounded outbox (backpressure): from the shared
        buffer once this replica has reached it, from disk while it is behind."""
        lg = self.log
        hub = self.hub
        tail = hub.tail
        limiter = anyio.CapacityLimiter(1)
        next_lsn = start_lsn
        while True:
            fence = conn.fence_lsn
            if fence is not None and next_lsn > fence:
                return  # REP-14: nothing past the fence
            got = tail.take(next_lsn, BATCH_SOFT_MAX_BYTES)
            if got is None:  # before the buffer (or it is empty): from disk, up to where it starts
                last = lg.last_lsn
                start = tail.start_lsn
                if start is not None and start > next_lsn:
                    last = min(last, start - 1)
                if fence is not None:
                    last = min(last, fence)
                if last >= next_lsn:
                    batch = await anyio.to_thread.run_sync(self._read_batch, next_lsn, last, limiter=limiter)
                    if not batch:
                        await anyio.sleep(self.poll)
                        continue
                    msg = AppendBatch(tuple(batch))
                    hub.disk_batches += 1
                    await out.send(msg)
                    next_lsn = msg.last_lsn + 1
                    continue
                got = []
            if not got:
                t0 = time.monotonic()
                await hub._tail_fetch(next_lsn, self.poll)
                if tail.end_lsn is None or tail.end_lsn < next_lsn:
                    if lg.failed is not None:
                        raise lg.failed
                    if time.monotonic() - t0 < self.poll / 2 and lg.last_lsn < next_lsn:
                        await anyio.sleep(self.poll)  # a closed log: wait_for returns at once
                continue
            for msg in got:
                await out.send(msg)
                next_lsn = msg.last_lsn + 1

    def _read_batch(self, first: int, last: int) -> list[Record]:
        """Runs in a worker thread: records first..last, within REP-11's bounds."""
        out: list[Record] = []
        size = 0
        for rec in self.log.read(first, last):
            if out and (size + len(rec.payload) > BATCH_SOFT_MAX_BYTES or len(out) >= MAX_BATCH_RECORDS):
                break
            out.append(rec)
            size += len(rec.payload)
        return out

    async def _write_loop(self, conn: _Connection, inbox: Any) -> None:
        chan = conn.chan
        while True:
            item = None
            with anyio.move_on_after(self.hb):
                item = await inbox.receive()
            state = conn.state
            if item is None:
                if state in (State.STREAMING, State.FENCING, State.DRAINED):
                    await chan.send(Heartbeat(self.log.last_lsn))
            elif isinstance(item, AppendBatch):
                fence = conn.fence_lsn
                if fence is not None and item.last_lsn > fence:  # read before the fence was set: never ship past it
                    item = item.until(fence) if item.first_lsn <= fence else None
                if item is not None and state in (State.STREAMING, State.FENCING):
                    self.hub._sent(conn, item)
                    await chan.send(item)
                # else PROMOTING: the replica became master at what it has
            else:
                await chan.send(item)  # Fence / Promote from the hub

    async def _ack_loop(self, conn: _Connection) -> None:
        while True:
            ev = await self._recv(conn)
            if isinstance(ev, Ack):
                self.hub._acked(conn, ev)
            elif isinstance(ev, Drained):
                conn.drained = ev
                self.hub._notify()
            elif isinstance(ev, Promoted):
                conn.promoted = ev
                self.hub._notify()
                logger.warning("replication: replica %s promoted itself to master in epoch %d at LSN %d",
                            conn.name, ev.epoch, ev.last_lsn)
                raise _Finished("the replica was promoted")

    async def _cursor_loop(self, conn: _Connection) -> None:
        """Persist the replica's cursor: at most every cursor_interval_s, sooner
        when it moved by cursor_every_records (always only acked-durable LSNs)."""
        while True:
            await conn.cursor_dirty.wait()
            conn.cursor_dirty = anyio.Event()
            with anyio.CancelScope(shield=True):
                await self.hub._persist_cursor(conn.name)
            with anyio.move_on_after(self.hub.cursor_interval_s):
                await conn.cursor_urgent.wait()
            conn.cursor_urgent = anyio.Event()


class _Finished(Exception):
    """A connection ended on purpose (e.g. after Promoted)."""


def _describe(exc: BaseException, idle: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no message from the peer for {idle:g} s (timed out)"
    return str(exc) or type(exc).__name__

