"""One end of one replication connection, as a state machine over bytes (sans I/O).

This module contains no networking, no clock, no disk and no concurrency:
it never opens a socket, reads a file, looks at the time or starts a task.
Bytes go in (:meth:`ReplicationSession.receive_data`), typed messages come
out (:meth:`ReplicationSession.next_event`); messages go in
(:meth:`ReplicationSession.send`), bytes come out. The drivers in
``engine/sender.py`` and ``engine/receiver.py`` own every read, write, timer,
task and fsync. ``specs/replication.md`` is the normative description; rule
IDs (``REP-n``) and invariant names (``INV-...``) cited here are defined there.

Theory of operation
-------------------
A connection joins one *master* (which owns a log and accepts connections)
and one *replica* (which copies that log and connects). Both ends run the
same :class:`ReplicationSession`, parametrised by :class:`Role`, over the
same transition table, :data:`TRANSITIONS`::

    state -> {(sender role, message type) -> next state}

Rule 1: everything that moves the connection from state to state is in that
one dict (the spec quotes it, and a test checks the quote). Rule 2: the table
does not know which end is reading it: the master's session applies
``(MASTER, Accept)`` when it *sends* an Accept, the replica's session when it
*receives* one. A pair missing from the table is illegal: sending it raises
:class:`~engine.errors.LocalProtocolError`, receiving it raises
:class:`~engine.errors.RemoteProtocolError`, and either way the session enters
``State.ERROR`` for good (sticky).

Besides the table, each message is checked against what the session already
knows (the *context*): a batch must start at the next LSN, an Ack cannot
cover records never sent, an Accept must start right after the replica's
last record, and so on. The ``_apply_*`` methods below, one per message,
check it against the context (citing the rule) and then record what it
tells the session (nonces, positions, the last LSN sent or acknowledged).

Messages are frozen dataclasses that validate themselves when built, so an
invalid message cannot exist. On the wire every message is one frame (REP-2)
of a length, a type byte and a canonical CBOR map; the very first bytes in
each direction are an 8-byte preamble naming the protocol and its version
(REP-1). Frames are tiny (at most :data:`PREAUTH_MAX_FRAME_BYTES`) until the
peer has proved it knows the shared secret (REP-3, INV-AuthFirst).
"""

from __future__ import annotations

import hmac
import struct
from typing import Any

import blake3

from wal import ZERO_HASH

from ..errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from .auth import _mac
from .codec import decode_body, encode_message
from .messages import (
    _FRAME_HEADER,
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    MESSAGE_TYPES,
    MIN_SECRET_BYTES,
    PREAMBLE,
    PREAUTH_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Accept,
    Ack,
    AppendBatch,
    AuthFailed,
    Challenge,
    ConnectionClosed,
    Drained,
    Event,
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
    SnapshotEnd,
    _Sentinel,
)
from .transitions import TRANSITIONS, State

#: Returned by :meth:`ReplicationSession.next_event` when a whole frame is not buffered yet.
NEED_DATA = _Sentinel("NEED_DATA")


# -- the session -------------------------------------------------------------------


class ReplicationSession:
    """One end of one replication connection, as a state machine over bytes.

    Args:
        role: which end this is.
        secret: the shared replication secret (at least 16 bytes).

    Usage (both roles): feed received bytes with :meth:`receive_data`, then
    call :meth:`next_event` until it returns :data:`NEED_DATA`; turn messages
    into bytes with :meth:`send` and write them out. If a write fails, call
    :meth:`send_failed`. After any error the session is in ``State.ERROR``
    and every later call raises (sticky).
    """

    def __init__(self, role: Role, secret: bytes):
        if not isinstance(role, Role):
            raise LocalProtocolError(f"role must be a Role, got {role!r}")
        if type(secret) is not bytes or len(secret) < MIN_SECRET_BYTES:
            raise LocalProtocolError(f"the replication secret must be at least {MIN_SECRET_BYTES} bytes")
        self.role = role
        self._secret = secret
        self._state = State.HELLO
        self._error: BaseException | None = None
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._preamble_in = False
        self._preamble_out = False
        # context
        self.replica_nonce: bytes | None = None
        self.master_nonce: bytes | None = None
        self.authenticated = False
        self.position: Position | None = None
        self.seed_request: SeedRequest | None = None
        self.probe: Probe | None = None
        self.accept: Accept | None = None
        self.snapshot: SnapshotBegin | None = None
        self._snap_chunks = 0
        self._snap_size = 0
        self._snap_hasher: Any = None
        self.next_lsn = 0          # the LSN the next batch must start with (0 before Accept)
        self.acked_lsn = 0         # the highest durable LSN acked
        self.fence: Fence | None = None
        self.promote: Promote | None = None
        self.peer_goodbye: Goodbye | None = None

    # -- introspection ----------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def max_frame_bytes(self) -> int:
        """REP-3: the size limit for the next incoming frame."""
        return MAX_FRAME_BYTES if self.authenticated else PREAUTH_MAX_FRAME_BYTES

    @property
    def last_lsn(self) -> int:
        """The last LSN sent (master) or received (replica) in a batch; ``start_lsn - 1`` before any."""
        return self.next_lsn - 1

    # -- helpers that build messages only the session can fill in -------------

    def proof(self) -> Proof:
        """This side's Proof over both nonces (REP-4).

        Raises:
            LocalProtocolError: the nonces are not both known yet.
        """
        if self.replica_nonce is None or self.master_nonce is None:
            raise LocalProtocolError("a Proof needs both nonces: send/receive Hello and Challenge first")
        return Proof(_mac(self._secret, self.role, self.replica_nonce, self.master_nonce))

    def snapshot_end(self) -> SnapshotEnd:
        """The SnapshotEnd matching the chunks sent so far (master side)."""
        if self._snap_hasher is None:
            raise LocalProtocolError("no snapshot in progress")
        return SnapshotEnd(self._snap_chunks, self._snap_size, self._snap_hasher.digest())

    # -- sending ----------------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """Apply ``msg`` as sent by this side and return the bytes to write.

        The first call also returns the preamble (REP-1).

        Raises:
            LocalProtocolError: the state does not allow this role to send this
                message now, or the message contradicts the context (the
                session is then in ERROR).
        """
        if self._state is State.ERROR:
            raise LocalProtocolError("the session is in ERROR; it can send nothing more") from self._error
        if not isinstance(msg, Message):
            raise LocalProtocolError(f"send() takes a Message, got {type(msg).__name__}")
        try:
            self._apply(self.role, msg)
        except LocalProtocolError as exc:
            self._set_error(exc)
            raise
        out = encode_message(msg)
        if not self._preamble_out:
            self._preamble_out = True
            out = PREAMBLE + out
        return out

    def send_failed(self) -> None:
        """Tell the session that bytes it returned were not delivered: ERROR (sticky)."""
        self._set_error(LocalProtocolError("a send failed; the peer's view of the connection is unknown"))

    # -- receiving --------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed (EOF).

        Only buffers: parsing happens in :meth:`next_event`.

        Raises:
            LocalProtocolError: data after EOF (a driver bug).
        """
        if data:
            if self._eof:
                raise LocalProtocolError("receive_data() after EOF")
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Message | Event | _Sentinel:
        """Parse and apply the next message from the peer.

        Returns:
            A :class:`Message` the peer sent, :class:`AuthFailed` (master side,
            REP-5), :class:`ConnectionClosed` (EOF at a frame boundary), or
            :data:`NEED_DATA` when a whole frame is not buffered yet.
        Raises:
            RemoteProtocolError: the peer broke the protocol (bad preamble,
                oversized/junk frame, a message its state does not allow, or
                one that contradicts the context). Sticky.
            AuthenticationError: (replica side) the master's Proof is wrong.
        """
        if self._state is State.ERROR:
            raise RemoteProtocolError("the session is in ERROR; no more events") from self._error
        try:
            return self._next_event()
        except LocalProtocolError as exc:
            err = RemoteProtocolError(str(exc))
            self._set_error(err)
            raise err from None
        except RemoteProtocolError as exc:
            self._set_error(exc)
            raise

    def _next_event(self) -> Message | Event | _Sentinel:
        avail = len(self._buf) - self._pos
        if not self._preamble_in:
            n = min(avail, len(PREAMBLE))
            got = bytes(self._buf[self._pos : self._pos + n])
            if got[:6] != PREAMBLE[:6][: len(got[:6])]:
                raise RemoteProtocolError("the peer is not speaking the mailwal replication protocol (bad preamble)")
            if n < len(PREAMBLE):
                return self._at_eof(partial=avail > 0)
            if got != PREAMBLE:
                (version,) = struct.unpack(">H", got[6:8])
                raise RemoteProtocolError(
                    f"the peer speaks replication protocol version {version}; this side speaks {PROTOCOL_VERSION}: "
                    f"upgrade the older node"
                )
            self._preamble_in = True
            self._consume(len(PREAMBLE))
            avail -= len(PREAMBLE)
        if avail < FRAME_HEADER_BYTES:
            return self._at_eof(partial=avail > 0)
        length, type_code = _FRAME_HEADER.unpack_from(self._buf, self._pos)
        limit = self.max_frame_bytes
        if length == 0:
            raise RemoteProtocolError("empty frame body")
        if FRAME_HEADER_BYTES + length > limit:
            raise RemoteProtocolError(
                f"frame of {FRAME_HEADER_BYTES + length} bytes exceeds the {limit}-byte limit"
                + ("" if self.authenticated else " before authentication")
            )
        if type_code not in MESSAGE_TYPES:
            raise RemoteProtocolError(f"unknown message type {type_code}")
        if avail < FRAME_HEADER_BYTES + length:
            return self._at_eof(partial=True)
        start = self._pos + FRAME_HEADER_BYTES
        with memoryview(self._buf) as view:  # one copy (slicing the bytearray first would make two)
            body = view[start : start + length].tobytes()
        self._consume(FRAME_HEADER_BYTES + length)
        msg = decode_body(type_code, body)
        if isinstance(msg, Proof) and self.role is Role.MASTER and self._state is State.REPLICA_PROOF:
            if not self._proof_ok(msg, Role.REPLICA):
                event = AuthFailed("the replica's proof does not match the shared secret")
                self._apply(Role.REPLICA, event)
                return event
        self._apply(self.role.peer, msg)
        return msg

    def _at_eof(self, partial: bool) -> Message | Event | _Sentinel:
        if not self._eof:
            return NEED_DATA
        if partial:
            raise RemoteProtocolError("the peer closed the connection in the middle of a frame")
        self._state = State.CLOSED  # REP-17
        return ConnectionClosed()

    def _consume(self, n: int) -> None:
        self._pos += n
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def _set_error(self, exc: BaseException) -> None:
        self._state = State.ERROR
        if self._error is None:
            self._error = exc

    def _proof_ok(self, proof: Proof, prover: Role) -> bool:
        assert self.replica_nonce is not None and self.master_nonce is not None
        return hmac.compare_digest(proof.mac, _mac(self._secret, prover, self.replica_nonce, self.master_nonce))

    # -- the one place where state changes ------------------------------------

    def _apply(self, sender: Role, item: Message | Event) -> None:
        key = (sender, type(item))
        allowed = TRANSITIONS[self._state]
        if key not in allowed:
            raise LocalProtocolError(
                f"{sender.value} may not send {type(item).__name__} in state {self._state.value}"
            )
        apply_message = getattr(self, "_apply_" + type(item).__name__)
        apply_message(sender, item)
        self._state = allowed[key]

    # One per input: check the message against the context, then record what it
    # tells. They run before the state changes and raise LocalProtocolError
    # (re-raised as RemoteProtocolError on receive) without recording anything.

    def _apply_Hello(self, sender: Role, m: Hello) -> None:
        self.replica_nonce = m.nonce

    def _apply_Challenge(self, sender: Role, m: Challenge) -> None:
        if m.nonce == self.replica_nonce:
            raise LocalProtocolError("the master's nonce equals the replica's (reflection)")
        self.master_nonce = m.nonce

    def _apply_Proof(self, sender: Role, m: Proof) -> None:
        if sender is self.role:
            if m != self.proof():
                raise LocalProtocolError("this Proof was not made by proof()")
            return
        # REP-5: receiving. The master's bad-proof path is AuthFailed (see next_event).
        if not self._proof_ok(m, sender):
            raise AuthenticationError(
                "the master's proof does not match the shared secret: it is not the master "
                "you think, or the secrets differ"
            )
        self.authenticated = True

    def _apply_AuthFailed(self, sender: Role, m: AuthFailed) -> None:
        pass

    def _apply_Refuse(self, sender: Role, m: Refuse) -> None:
        pre_auth = self._state in (State.AUTH_FAILED, State.MASTER_PROOF)
        if pre_auth and m.code != "auth":
            raise LocalProtocolError("before authentication only Refuse('auth') is allowed (INV-AuthFirst)")
        if not pre_auth and m.code == "auth":
            raise LocalProtocolError("Refuse('auth') after authentication succeeded")

    def _apply_Position(self, sender: Role, m: Position) -> None:
        self.position = m

    def _apply_SeedRequest(self, sender: Role, m: SeedRequest) -> None:
        self.seed_request = m

    def _apply_Probe(self, sender: Role, m: Probe) -> None:
        assert self.position is not None
        if m.lsns[-1] > self.position.last_lsn:
            raise LocalProtocolError(
                f"probe for LSN {m.lsns[-1]} beyond the replica's last LSN {self.position.last_lsn} (REP-8)"
            )
        self.probe = m

    def _apply_ProbeReply(self, sender: Role, m: ProbeReply) -> None:
        assert self.probe is not None
        if len(m.hashes) != len(self.probe.lsns):
            raise LocalProtocolError(f"{len(m.hashes)} hashes answer {len(self.probe.lsns)} probes (REP-8)")
        self.probe = None

    def _apply_Accept(self, sender: Role, m: Accept) -> None:
        # REP-7 / INV-NoSilentTruncate: the master may only start the replica
        # right after the record the replica (or its snapshot) ends with.
        if self._state is State.DECIDE:
            p = self.position
            assert p is not None
            if (m.log_id, m.start_lsn, m.prev_hash) != (p.log_id, p.last_lsn + 1, p.last_hash):
                raise LocalProtocolError(
                    f"Accept must continue the replica's log at LSN {p.last_lsn + 1} after its last hash "
                    f"(got start {m.start_lsn}) (REP-7, INV-NoSilentTruncate)"
                )
        elif self._state is State.SEED:
            if (m.start_lsn, m.prev_hash) != (1, ZERO_HASH):
                raise LocalProtocolError("a seed without snapshot starts at LSN 1 after the zero hash (REP-10)")
        else:  # SNAPSHOT_DONE
            b = self.snapshot
            assert b is not None
            if (m.log_id, m.start_lsn, m.prev_hash) != (b.log_id, b.lsn + 1, b.hash):
                raise LocalProtocolError("Accept after a snapshot must start right after the snapshot's LSN and hash (REP-10)")
        self.accept = m
        self.next_lsn = m.start_lsn
        self.acked_lsn = m.start_lsn - 1

    def _apply_SnapshotBegin(self, sender: Role, m: SnapshotBegin) -> None:
        assert self.seed_request is not None
        if not self.seed_request.accepts_snapshot:
            raise LocalProtocolError("the replica said it cannot take a snapshot (REP-10)")
        self.snapshot = m
        self._snap_chunks = 0
        self._snap_size = 0
        self._snap_hasher = blake3.blake3()

    def _apply_SnapshotChunk(self, sender: Role, m: SnapshotChunk) -> None:
        self._snap_chunks += 1
        self._snap_size += len(m.data)
        self._snap_hasher.update(m.data)

    def _apply_SnapshotEnd(self, sender: Role, m: SnapshotEnd) -> None:
        if m != self.snapshot_end():
            raise LocalProtocolError(
                f"SnapshotEnd says {m.chunks} chunks/{m.size} bytes/digest {m.digest.hex()[:16]}.., but "
                f"{self._snap_chunks} chunks/{self._snap_size} bytes/{self._snap_hasher.digest().hex()[:16]}.. were sent"
            )

    def _apply_AppendBatch(self, sender: Role, m: AppendBatch) -> None:
        # REP-11: batches are gapless and never repeat (no gaps, no duplicates).
        if m.first_lsn != self.next_lsn:
            raise LocalProtocolError(f"batch starts at LSN {m.first_lsn}; LSN {self.next_lsn} is next (REP-11)")
        if self.fence is not None and m.last_lsn > self.fence.last_lsn:
            raise LocalProtocolError(f"batch goes past the fence at LSN {self.fence.last_lsn} (REP-14)")
        self.next_lsn = m.last_lsn + 1

    def _apply_Heartbeat(self, sender: Role, m: Heartbeat) -> None:
        if self.accept is not None and m.master_lsn < self.last_lsn:
            raise LocalProtocolError(f"heartbeat says the master is at LSN {m.master_lsn}, but it sent {self.last_lsn} (REP-12)")

    def _apply_Ack(self, sender: Role, m: Ack) -> None:
        # INV-NoAckBeforeDurable (protocol half): nothing beyond what was received.
        if m.durable_lsn > self.last_lsn:
            raise LocalProtocolError(f"ack for LSN {m.durable_lsn}, but only up to {self.last_lsn} was sent (REP-12)")
        if m.durable_lsn < self.acked_lsn:
            raise LocalProtocolError(f"ack goes back from LSN {self.acked_lsn} to {m.durable_lsn} (INV-CursorMonotonic)")
        self.acked_lsn = m.durable_lsn

    def _apply_Fence(self, sender: Role, m: Fence) -> None:
        assert self.accept is not None
        if m.last_lsn < self.last_lsn:
            raise LocalProtocolError(f"fence at LSN {m.last_lsn} is below LSN {self.last_lsn} already sent (REP-14)")
        if m.epoch < self.accept.epoch:
            raise LocalProtocolError("fence epoch is below the accepted epoch")
        self.fence = m

    def _apply_Drained(self, sender: Role, m: Drained) -> None:
        assert self.fence is not None
        if m.lsn != self.fence.last_lsn or self.acked_lsn < m.lsn:
            raise LocalProtocolError(
                f"Drained at LSN {m.lsn} needs an Ack covering the fence LSN {self.fence.last_lsn} first (REP-14)"
            )

    def _apply_Promote(self, sender: Role, m: Promote) -> None:
        assert self.accept is not None
        floor = max(self.accept.epoch, self.fence.epoch if self.fence else 0)
        if m.new_epoch <= floor:
            raise LocalProtocolError(f"new epoch {m.new_epoch} must exceed epoch {floor} (REP-15)")
        self.promote = m

    def _apply_Promoted(self, sender: Role, m: Promoted) -> None:
        assert self.promote is not None
        if m.epoch != self.promote.new_epoch or m.last_lsn != self.last_lsn:
            raise LocalProtocolError(
                f"Promoted(epoch {m.epoch}, LSN {m.last_lsn}) must name epoch {self.promote.new_epoch} "
                f"and LSN {self.last_lsn} (REP-15)"
            )

    def _apply_Goodbye(self, sender: Role, m: Goodbye) -> None:
        if sender is not self.role:
            self.peer_goodbye = m


