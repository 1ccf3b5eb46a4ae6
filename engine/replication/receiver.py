"""Replica side of log shipping: :func:`run_replica` and :class:`ReplicaLink`.

Theory of operation
-------------------
:func:`run_replica` keeps one replica log a copy of its master's, forever:

1. Connect (``connect_timeout_s``), authenticate (REP-4, under
   ``handshake_timeout_s``), then present the log's position (REP-6), or ask
   to be seeded when there is no log yet (REP-10).
2. Answer the master's probes (REP-8). A refusal (diverged, ahead, wrong log,
   behind retention, no seed, bad secret) raises the matching typed error and
   stops the replica; its log is left exactly as it was (INV-NoSilentTruncate).
3. Stream (REP-11, REP-12): two tasks. The receiving task reads and decodes
   frames and queues AppendBatches (a bounded queue: backpressure on the
   master); the appending task appends everything queued at that moment with
   one ``Log.append_records`` call in a worker thread (it checks LSN
   continuity and the hash chain and returns only once fdatasynced: one fsync
   for all of it), calls ``on_records_durable(records)``, then sends an Ack
   with ``durable_lsn`` and ``applied_lsn()`` (INV-NoAckBeforeDurable). So
   receiving the next batches overlaps writing and syncing the last ones.
   Heartbeats are answered with an Ack at once, so acks flow even when idle;
   acks never go back (one lock computes and sends them).
4. If the connection breaks, times out (no message for ``idle_timeout_s``) or
   the master misbehaves, reconnect with exponential backoff and jitter and
   resume at the durable LSN: no gaps, no duplicates (REP-11).

The replica's connection state for ``walctl status`` is a :class:`ReplicaLink`.
"""

from __future__ import annotations

import inspect
import os
import random
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence

import anyio
import anyio.abc

from wal import Log, LogClosedError, LogFailedError, OutOfOrderError, Record
from wal import start_epoch

from ..errors import (
    AuthenticationError,
    ConnectionLostError,
    MasterUnavailableError,
    RemoteProtocolError,
    ReplicationRefusedError,
)
from .channel import Channel, logger
from .decisions import answer_probe, refusal_error
from .messages import (
    BATCH_SOFT_MAX_BYTES,
    Accept,
    Ack,
    AppendBatch,
    Challenge,
    ConnectionClosed,
    Drained,
    Fence,
    Goodbye,
    Heartbeat,
    Hello,
    Position,
    Probe,
    Promote,
    Promoted,
    Proof,
    Refuse,
    Role,
    SeedRequest,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    valid_replica_name,
)
from .session import ReplicationSession
from .transitions import State

__all__ = ["run_replica", "ReplicaSettings", "ReplicaHooks", "ReplicaLink", "SnapshotMeta", "SnapshotSink"]

#: Batches already received are appended together up to this many payload bytes (one fsync).
COALESCE_MAX_BYTES = 4 * BATCH_SOFT_MAX_BYTES
#: Received batches waiting for the appending task (each at most BATCH_SOFT_MAX_BYTES of payload).
APPEND_QUEUE_BATCHES = 4  # while up to COALESCE_MAX_BYTES are being appended


@dataclass(frozen=True)
class SnapshotMeta:
    """What a snapshot is of: the state after record ``lsn`` (hash ``hash``) of log ``log_id``."""

    log_id: uuid.UUID
    epoch: int
    lsn: int
    hash: bytes


class SnapshotSink(Protocol):
    """Consumes one snapshot on a new replica. Methods run in worker threads.

    ``commit`` MUST make the snapshot durable before it returns: the replica's
    log is created right after it, starting at ``lsn + 1``. ``abort`` discards
    a partial snapshot (the connection broke or the master gave up). A later
    seeding attempt may start a new snapshot over an aborted or committed one
    whose log was never created.
    """

    def write(self, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class ReplicaLink:
    """A replica's view of its master connection (for ``walctl status``).

    Attributes:
        name: the replica's name (cursor ``replica.<name>`` on the master).
        master: ``host:port``.
        state: ``starting``, ``connecting``, ``authenticating``, ``placing``,
            ``seeding``, ``streaming``, ``fenced``, ``backoff``, ``refused``,
            ``promoted``, ``failed`` or ``stopped``.
        connected: True while streaming; ``since`` (wall clock) is when that last changed.
        durable_lsn / applied_lsn: what the last Ack said (durable is the log's last LSN).
        master_lsn: the master's last LSN as of the last Accept or Heartbeat.
        last_error: why the last connection (attempt) ended; kept after a
            successful reconnect (None while none has ended).
        connects: successful handshakes so far.
        log: the replica's :class:`wal.Log` once it exists.
        promoted: the Promoted reply if this replica was promoted.
    """

    def __init__(self, name: str, master: str):
        self.name = name
        self.master = master
        self.state = "starting"
        self.connected = False
        self.since: float | None = None
        self.durable_lsn = 0
        self.applied_lsn = 0
        self.master_lsn: int | None = None
        self.last_error: str | None = None
        self.connects = 0
        self.log: Log | None = None
        self.promoted: Promoted | None = None
        self._changed = anyio.Event()

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "name", "master", "state", "connected", "since", "durable_lsn", "applied_lsn",
            "master_lsn", "last_error", "connects")}

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_durable(self, lsn: int) -> None:
        """Wait until this replica's log holds ``lsn`` durably."""
        while self.durable_lsn < lsn:
            await self._changed.wait()

    async def wait_state(self, *states: str) -> None:
        """Wait until ``state`` is one of ``states``."""
        while self.state not in states:
            await self._changed.wait()

    def _set(self, **changes: Any) -> None:
        for k, v in changes.items():
            if k == "connected" and v != self.connected:
                self.since = time.time()
            setattr(self, k, v)
        self._notify()


@dataclass(frozen=True)
class ReplicaSettings:
    """How a replica talks to its master: timeouts and the reconnect backoff."""

    idle_timeout_s: float = 5.0  # a master silent this long is presumed gone (reconnect)
    handshake_timeout_s: float = 5.0  # authentication and position exchange
    connect_timeout_s: float = 5.0
    backoff_initial_s: float = 0.05  # first reconnect delay; doubled per failed attempt, with jitter
    backoff_max_s: float = 5.0
    segment_max_bytes: int | None = None  # segments of a log this replica creates (None: the log's default)


@dataclass(frozen=True)
class ReplicaHooks:
    """What the replica's owner is told, and what it supplies (all optional).

    ``on_records_durable(records)``: each appended list of records once it is
    durable, before the Ack (sync or async; e.g. wakes the applier).
    ``applied_lsn()``: the store's applied LSN for Acks (cheap; called in the
    event loop); default: the durable LSN. ``snapshot_sink(meta)``: accepts
    snapshot seeding (returns a :class:`SnapshotSink`); without it only
    seeding from LSN 1 is possible. ``on_promote(epoch)``: the master promoted
    this replica (after ``wal.history.start_epoch`` raised the log's epoch,
    before Promoted is sent; it may append, e.g. an EpochStarted record).
    """

    on_records_durable: Callable[[Sequence[Record]], Awaitable[None] | None] | None = None
    applied_lsn: Callable[[], int] | None = None
    snapshot_sink: Callable[[SnapshotMeta], SnapshotSink] | None = None
    on_promote: Callable[[int], Awaitable[None] | None] | None = None


async def run_replica(
    log_or_path: Log | str | os.PathLike,
    master_host: str,
    master_port: int,
    secret: bytes,
    name: str,
    *,
    hooks: ReplicaHooks = ReplicaHooks(),
    settings: ReplicaSettings = ReplicaSettings(),
    link: ReplicaLink | None = None,
    alternates: Sequence[tuple[str, int]] = (),
    task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED,
) -> ReplicaLink:
    """Follow the master at ``master_host:master_port`` into a replica log.

    Args:
        log_or_path: an open :class:`wal.Log` (never closed here), or a path: an
            existing log there is opened; with none, the replica asks to be
            seeded and creates it (REP-10). A log opened here is closed when
            this function raises or is cancelled; after a promotion it stays
            open and belongs to the caller (``link.log``).
        secret: the shared replication secret.
        name: this replica's name (1-48 of ``[A-Za-z0-9._-]``).
        hooks: what this replica tells its owner and asks of it (:class:`ReplicaHooks`).
        settings: timeouts and backoff (:class:`ReplicaSettings`).
        link: a :class:`ReplicaLink` to update (one is made if None).
        alternates: other addresses where the master may be (the cluster's
            peers). A connection attempt that fails before streaming moves on
            to the next address, so after a failover the replica finds the
            new master by itself; a node that is not serving refuses the TCP
            connection, and a master whose history this log is not a prefix
            of refuses the position (diverged/ahead), which stops the replica.
        task_status: receives the :class:`ReplicaLink` once the replica is
            streaming for the first time (so ``await tg.start(run_replica, ...)``
            returns when it is following, and raises if it is refused).

    Returns:
        The link, when this replica was promoted (``link.state == "promoted"``).
    Raises:
        DivergedError, ReplicaAheadError, WrongLogError, BehindRetentionError,
        SeedUnavailableError, AuthenticationError: refused; nothing was changed.
        LogFailedError, LogClosedError: the replica's own log failed or was closed.
    """
    if not valid_replica_name(name):
        raise ValueError(f"invalid replica name {name!r}: use 1-48 letters, digits, '.', '_' or '-'")
    ReplicationSession(Role.REPLICA, secret)  # validates the secret now, not at first connect
    runner = _Replica(log_or_path, master_host, master_port, secret, name, hooks, settings,
                      link or ReplicaLink(name, f"{master_host}:{master_port}"), task_status)
    runner.masters += [tuple(a) for a in alternates if tuple(a) != (master_host, master_port)]
    return await runner.run()


class _Promoted(Exception):
    pass


class _Replica:
    def __init__(self, log_or_path, host, port, secret, name, hooks: ReplicaHooks, settings: ReplicaSettings,
                 link: ReplicaLink, task_status):
        self.owns_log = not isinstance(log_or_path, Log)
        self.path = None if not self.owns_log else os.fspath(log_or_path)
        self.log: Log | None = None if self.owns_log else log_or_path
        self.host, self.port, self.secret, self.name = host, port, secret, name
        self.masters: list[tuple[str, int]] = [(host, port)]
        self.hooks = hooks
        self.settings = settings
        self.link: ReplicaLink = link
        self.log_kwargs = {} if settings.segment_max_bytes is None else {"segment_max_bytes": settings.segment_max_bytes}
        self.task_status = task_status
        self.started = False
        self.reached_streaming = False

    async def run(self) -> ReplicaLink:
        link = self.link
        promoted = False
        try:
            if self.owns_log and os.path.exists(self.path):
                self.log = await anyio.to_thread.run_sync(lambda: Log.open(self.path, **self.log_kwargs))
            if self.log is not None:
                link._set(log=self.log, durable_lsn=self.log.last_lsn)
            attempt = 0
            while True:
                self.reached_streaming = False
                try:
                    link._set(state="connecting")
                    await self._connect_once()
                except _Promoted:
                    promoted = True
                    return link
                except anyio.get_cancelled_exc_class():
                    raise
                except (AuthenticationError, ReplicationRefusedError) as exc:
                    if isinstance(exc, MasterUnavailableError):
                        self._transient(exc)
                    else:
                        link._set(state="refused", connected=False, last_error=str(exc))
                        logger.error("replica %s: %s", self.name, exc)
                        raise
                except (LogFailedError, LogClosedError) as exc:
                    link._set(state="failed", connected=False, last_error=str(exc))
                    raise
                except (ConnectionLostError, RemoteProtocolError, OutOfOrderError, OSError, TimeoutError,
                        anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                    self._transient(exc)
                except Exception as exc:  # the replica's own log, a hook, or a bug: stop and say why
                    link._set(state="failed", connected=False, last_error=f"{type(exc).__name__}: {exc}")
                    raise
                if self.link.connected:
                    link._set(connected=False)
                if self.reached_streaming:
                    attempt = 0
                elif len(self.masters) > 1:  # try the next candidate master
                    self.masters.append(self.masters.pop(0))
                    self.host, self.port = self.masters[0]
                    link._set(master=f"{self.host}:{self.port}")
                delay = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * (2 ** attempt)) * random.uniform(0.5, 1.0)
                attempt = min(attempt + 1, 30)
                link._set(state="backoff")
                await anyio.sleep(delay)
        finally:
            if not promoted:
                if link.state not in ("refused", "failed"):
                    link._set(state="stopped", connected=False)
                if self.owns_log and self.log is not None:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(self.log.close)

    def _transient(self, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError):
            text = f"no message from the master for {self.settings.idle_timeout_s:g} s, or it did not answer in time"
        else:
            text = str(exc) or type(exc).__name__
        if isinstance(exc, RemoteProtocolError):
            logger.warning("replica %s: master %s broke the protocol: %s", self.name, self.link.master, text)
        else:
            logger.info("replica %s: connection to %s ended: %s", self.name, self.link.master, text)
        self.link._set(connected=False, last_error=text)

    async def _connect_once(self) -> None:
        """One connection's life; it ends by raising (or by a promotion)."""
        # The link names the address this connection goes to: a link passed in again after a
        # divergence still named the master of the previous run, and the cluster sent its
        # diverged tail there (to a node that was no longer master) on every retry.
        self.link._set(master=f"{self.host}:{self.port}")
        with anyio.fail_after(self.settings.connect_timeout_s):
            stream = await anyio.connect_tcp(self.host, self.port)
        chan = Channel(stream, ReplicationSession(Role.REPLICA, self.secret), write_timeout_s=self.settings.idle_timeout_s)
        try:
            self.link._set(state="authenticating")
            with anyio.fail_after(self.settings.handshake_timeout_s):
                await self._authenticate(chan)
            self.link._set(state="placing")
            await self._place(chan)
            await self._stream(chan)
        finally:
            await chan.aclose()

    async def _recv(self, chan: Channel):
        with anyio.fail_after(self.settings.idle_timeout_s):
            ev = await chan.receive()
        return self._check_end(ev)

    def _check_end(self, ev):
        if isinstance(ev, ConnectionClosed):
            raise ConnectionLostError("the master closed the connection")
        if isinstance(ev, Goodbye):
            raise ConnectionLostError(f"the master said goodbye: {ev.reason}")
        return ev

    async def _authenticate(self, chan: Channel) -> None:
        """REP-4: prove we know the secret, and check that the master does too."""
        await chan.send(Hello(secrets.token_bytes(32)))
        ev = await chan.receive()
        if isinstance(ev, ConnectionClosed):
            raise ConnectionLostError("the master closed the connection before authenticating")
        assert isinstance(ev, Challenge)
        await chan.send(chan.session.proof())
        ev = await chan.receive()
        if isinstance(ev, Refuse):
            raise refusal_error(ev)
        if isinstance(ev, ConnectionClosed):
            raise ConnectionLostError("the master closed the connection during authentication")
        assert isinstance(ev, Proof)  # verified by the session (AuthenticationError otherwise)

    async def _place(self, chan: Channel) -> Accept:
        """REP-6..REP-10: present our position (or ask for a seed) until accepted."""
        lg = self.log
        pos: Position | None = None
        if lg is None:
            await chan.send(SeedRequest(self.name, self.hooks.snapshot_sink is not None))
        else:
            first = await anyio.to_thread.run_sync(lambda: lg.first_lsn)
            pos = Position(self.name, lg.log_id.bytes, lg.epoch, first, lg.last_lsn, lg.last_hash)
            await chan.send(pos)
        while True:
            ev = await self._recv(chan)
            if isinstance(ev, Probe):
                assert pos is not None and lg is not None
                p = pos
                reply = await anyio.to_thread.run_sync(
                    lambda: answer_probe(ev, first_lsn=p.first_lsn, last_lsn=p.last_lsn, hash_at=lg.hash_at))
                await chan.send(reply)
            elif isinstance(ev, Refuse):
                raise refusal_error(ev, position=pos)
            elif isinstance(ev, Heartbeat):
                self.link._set(master_lsn=ev.master_lsn)
            elif isinstance(ev, SnapshotBegin):
                await self._receive_snapshot(chan, ev)
            elif isinstance(ev, Accept):
                if self.log is None:
                    await self._create_log(ev)
                self.link._set(master_lsn=ev.master_lsn)
                return ev

    async def _receive_snapshot(self, chan: Channel, begin: SnapshotBegin) -> None:
        assert self.hooks.snapshot_sink is not None  # the session refuses snapshots we did not ask for
        self.link._set(state="seeding")
        meta = SnapshotMeta(uuid.UUID(bytes=begin.log_id), begin.epoch, begin.lsn, begin.hash)
        sink = await anyio.to_thread.run_sync(self.hooks.snapshot_sink, meta)
        done = False
        try:
            while True:
                ev = await self._recv(chan)
                if isinstance(ev, SnapshotChunk):
                    await anyio.to_thread.run_sync(sink.write, ev.data)
                elif isinstance(ev, SnapshotEnd):  # counts and digest verified by the session
                    await anyio.to_thread.run_sync(sink.commit)
                    done = True
                    logger.info("replica %s: snapshot at LSN %d received (%d bytes)", self.name, begin.lsn, ev.size)
                    return
                elif isinstance(ev, Refuse):
                    raise refusal_error(ev)
                # Heartbeat: keeps the idle timer fed while the master works
        finally:
            if not done:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(sink.abort)

    async def _create_log(self, accept: Accept) -> None:
        """REP-10: the new log starts right after the seed point, with the master's log id."""
        path = self.path
        assert path is not None

        def create() -> Log:
            return Log.create(path, log_id=uuid.UUID(bytes=accept.log_id), first_lsn=accept.start_lsn,
                              prev_hash=accept.prev_hash, epoch=accept.epoch, **self.log_kwargs)

        with anyio.CancelScope(shield=True):
            self.log = await anyio.to_thread.run_sync(create)
        logger.info("replica %s: created log %s at %s starting at LSN %d", self.name,
                 uuid.UUID(bytes=accept.log_id), path, accept.start_lsn)
        self.link._set(log=self.log, durable_lsn=self.log.last_lsn)

    async def _ack(self, chan: Channel) -> None:
        lg = self.log
        assert lg is not None
        async with self._ack_lock:  # computed and sent under one lock: acks never go back
            durable = min(lg.last_lsn, chan.session.last_lsn)
            applied = durable if self.hooks.applied_lsn is None else max(0, min(int(self.hooks.applied_lsn()), durable))
            await chan.send(Ack(durable, applied))
        self.link._set(durable_lsn=durable, applied_lsn=applied)

    async def _stream(self, chan: Channel) -> None:
        lg = self.log
        assert lg is not None
        self.reached_streaming = True
        self.link.connects += 1
        self.link._set(state="streaming", connected=True, durable_lsn=lg.last_lsn)
        if not self.started:
            self.started = True
            self.task_status.started(self.link)
        self._ack_lock = anyio.Lock()
        self._drain_lock = anyio.Lock()
        await self._ack(chan)  # tells the master where we are, and our applied LSN
        send_q, recv_q = anyio.create_memory_object_stream[AppendBatch](APPEND_QUEUE_BATCHES)
        errors: list[BaseException] = []
        async with send_q, recv_q, anyio.create_task_group() as tg:

            async def guarded(fn, *args) -> None:
                try:
                    await fn(*args)
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:  # the first failure ends the connection, as itself
                    errors.append(exc)
                    tg.cancel_scope.cancel()

            tg.start_soon(guarded, self._append_loop, chan, recv_q)
            tg.start_soon(guarded, self._receive_loop, chan, send_q)
        if errors:
            raise errors[0]

    async def _receive_loop(self, chan: Channel, queue: Any) -> None:
        """Decode frames; batches go to the appending task, the rest is answered here."""
        while True:
            ev = await self._recv(chan)
            if isinstance(ev, AppendBatch):
                await queue.send(ev)
            elif isinstance(ev, Heartbeat):
                self.link._set(master_lsn=ev.master_lsn)
                await self._ack(chan)
            elif isinstance(ev, Fence):
                self.link._set(state="fenced", master_lsn=ev.last_lsn)
                await self._maybe_drained(chan)
            elif isinstance(ev, Promote):
                # Promoted names the last record received: wait until it is appended.
                await self.link.wait_durable(chan.session.last_lsn)
                await self._promote(chan, ev)

    async def _append_loop(self, chan: Channel, queue: Any) -> None:
        """Append what is queued, one fsync for all of it; then ack (INV-NoAckBeforeDurable)."""
        lg = self.log
        assert lg is not None
        while True:
            batch = await queue.receive()
            records = list(batch.records)
            size = batch.payload_bytes
            while size < COALESCE_MAX_BYTES:
                try:
                    nxt = queue.receive_nowait()
                except anyio.WouldBlock:
                    break
                records.extend(nxt.records)
                size += nxt.payload_bytes
            try:
                # INV-NoAckBeforeDurable: append_records returns after fdatasync.
                await anyio.to_thread.run_sync(lg.append_records, records)
            except OutOfOrderError as exc:
                logger.error("replica %s: the master's records %d..%d do not extend this log (%s); "
                          "nothing was appended, reconnecting", self.name, records[0].lsn, records[-1].lsn, exc)
                raise
            self.link._set(durable_lsn=lg.last_lsn, master_lsn=max(self.link.master_lsn or 0, lg.last_lsn))
            if self.hooks.on_records_durable is not None:
                result = self.hooks.on_records_durable(records)
                if inspect.isawaitable(result):
                    await result
            await self._ack(chan)
            await self._maybe_drained(chan)

    async def _maybe_drained(self, chan: Channel) -> None:
        session = chan.session
        lg = self.log
        assert lg is not None
        async with self._drain_lock:  # both tasks call this: one Drained
            if session.state is State.FENCING and session.fence is not None and lg.last_lsn == session.fence.last_lsn:
                if session.acked_lsn < lg.last_lsn:
                    await self._ack(chan)
                await chan.send(Drained(lg.last_lsn, lg.last_hash))

    async def _promote(self, chan: Channel, ev: Promote) -> None:
        """REP-15 (minimal): start the new epoch, run the hook, answer Promoted.

        The epoch is started with :func:`wal.history.start_epoch` (``EPOCH``
        then ``EPOCHS``), so the epoch history stays complete. Promoted names
        the last replicated record, captured before the hook runs (the hook
        may append, e.g. an EpochStarted record).
        """
        lg = self.log
        assert lg is not None
        if ev.new_epoch <= lg.epoch:
            # This log already saw that epoch (on another branch): refuse, and stay a replica,
            # rather than fail the whole node; the master's failover then does not complete.
            raise RemoteProtocolError(f"Promote to epoch {ev.new_epoch} is not above this log's epoch {lg.epoch}")
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(start_epoch, lg, ev.new_epoch)
        reply = Promoted(ev.new_epoch, lg.last_lsn, lg.last_hash)
        if self.hooks.on_promote is not None:
            result = self.hooks.on_promote(ev.new_epoch)
            if inspect.isawaitable(result):
                await result
        await chan.send(reply)
        logger.warning("replica %s: promoted to master in epoch %d at LSN %d", self.name, ev.new_epoch, reply.last_lsn)
        self.link._set(state="promoted", connected=False, promoted=reply)
        raise _Promoted()
