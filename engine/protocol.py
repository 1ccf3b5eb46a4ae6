"""The log-shipping replication protocol, sans I/O.

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
last record, and so on. Those checks are the ``_check_*`` methods below, one
per message, each citing its rule.

Messages are frozen dataclasses that validate themselves when built, so an
invalid message cannot exist. On the wire every message is one frame (REP-2)
of a length, a type byte and a canonical CBOR map; the very first bytes in
each direction are an 8-byte preamble naming the protocol and its version
(REP-1). Frames are tiny (at most :data:`PREAUTH_MAX_FRAME_BYTES`) until the
peer has proved it knows the shared secret (REP-3, INV-AuthFirst).
"""

from __future__ import annotations

import enum
import hmac
import re
import struct
from dataclasses import dataclass, field, fields
from hashlib import sha256
from typing import Any, ClassVar, Iterable, Union

import blake3
import cbor2

from wal import FRAME_HEADER_SIZE as LOG_FRAME_HEADER_BYTES
from wal import (
    HASH_SIZE,
    MAX_PAYLOAD_BYTES,
    ZERO_HASH,
    FrameScan,
    Record,
    decode_frames,
    encode_frames,
    unpack_frame_header,
)

from .errors import (
    AuthenticationError,
    BehindRetentionError,
    DivergedError,
    EngineError,
    LocalProtocolError,
    MasterUnavailableError,
    RemoteProtocolError,
    ReplicaAheadError,
    ReplicationRefusedError,
    SeedUnavailableError,
    WrongLogError,
)

__all__ = [
    "PROTOCOL_VERSION", "PREAMBLE", "PREAUTH_MAX_FRAME_BYTES", "MAX_FRAME_BYTES", "BATCH_SOFT_MAX_BYTES",
    "MAX_BATCH_RECORDS", "SNAPSHOT_CHUNK_MAX_BYTES", "MAX_PROBES", "NONCE_BYTES", "MIN_SECRET_BYTES",
    "Role", "State", "NEED_DATA", "REFUSE_CODES",
    "Message", "Hello", "Challenge", "Proof", "Position", "SeedRequest", "Probe", "ProbeReply", "Accept",
    "Refuse", "SnapshotBegin", "SnapshotChunk", "SnapshotEnd", "AppendBatch", "Heartbeat", "Ack", "Fence",
    "Drained", "Promote", "Promoted", "Goodbye", "MESSAGE_TYPES",
    "Event", "AuthFailed", "ConnectionClosed",
    "TRANSITIONS", "ReplicationSession", "encode_message", "decode_body",
    "PositionCheck", "NeedMasterHashes", "decide_seed", "SEED_WITH_SNAPSHOT", "answer_probe",
    "refusal_error", "auth_transcript", "valid_replica_name", "batch_records",
    "render_transition_table", "render_state_diagram",
]

# -- constants (REP-1, REP-2, REP-3) ------------------------------------------

PROTOCOL_VERSION = 2
#: REP-1: the first 8 bytes each side sends: magic "MWREPL" then the version (u16, big-endian).
PREAMBLE = b"MWREPL" + struct.pack(">H", PROTOCOL_VERSION)
_FRAME_HEADER = struct.Struct(">IB")  # REP-2: body length (u32 BE), message type (u8)
FRAME_HEADER_BYTES = _FRAME_HEADER.size
#: REP-3: the largest frame (header included) accepted before the peer is authenticated.
PREAUTH_MAX_FRAME_BYTES = 4096
#: REP-2: the largest frame after authentication: one maximal record plus room for its envelope.
MAX_FRAME_BYTES = MAX_PAYLOAD_BYTES + 64 * 1024
#: REP-11: a batch carries at most this many payload bytes, unless it holds a single record.
BATCH_SOFT_MAX_BYTES = 8 * 1024 * 1024
MAX_BATCH_RECORDS = 16384
SNAPSHOT_CHUNK_MAX_BYTES = 4 * 1024 * 1024
MAX_PROBES = 64
NONCE_BYTES = 32
MAC_BYTES = 32
MIN_SECRET_BYTES = 16
MAX_TEXT_CHARS = 1024
MAX_U64 = 2**64 - 1
_AUTH_DOMAIN = b"mailwal-replication-v1\x00"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")


class Role(enum.Enum):
    """Which end of a connection a session is."""

    MASTER = "master"
    REPLICA = "replica"

    @property
    def peer(self) -> "Role":
        return Role.REPLICA if self is Role.MASTER else Role.MASTER


class State(enum.Enum):
    """Connection states (specs/replication.md, "States")."""

    HELLO = "HELLO"                  # replica's Hello is due
    CHALLENGE = "CHALLENGE"          # master's Challenge is due
    REPLICA_PROOF = "REPLICA_PROOF"  # replica's Proof is due
    AUTH_FAILED = "AUTH_FAILED"      # master saw a bad Proof; only Refuse(auth) may follow
    MASTER_PROOF = "MASTER_PROOF"    # master's Proof (or Refuse(auth)) is due
    REQUEST = "REQUEST"              # authenticated; replica's Position or SeedRequest is due
    DECIDE = "DECIDE"                # master decides on a Position: Accept, Refuse or Probe
    PROBE = "PROBE"                  # replica's ProbeReply is due
    SEED = "SEED"                    # master decides on a SeedRequest
    SNAPSHOT = "SNAPSHOT"            # master is sending snapshot chunks
    SNAPSHOT_DONE = "SNAPSHOT_DONE"  # snapshot complete; Accept is due
    STREAMING = "STREAMING"          # batches down, acks up
    FENCING = "FENCING"              # master stopped at Fence.last_lsn; replica catching up
    DRAINED = "DRAINED"              # replica holds everything up to Fence.last_lsn durably
    PROMOTING = "PROMOTING"          # replica asked to become master; Promoted is due
    CLOSED = "CLOSED"                # no more messages except Goodbye; close the connection
    ERROR = "ERROR"                  # sticky: a protocol error happened


class _Sentinel:
    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: Returned by :meth:`ReplicationSession.next_event` when a whole frame is not buffered yet.
NEED_DATA = _Sentinel("NEED_DATA")

#: REP-9: refusal codes and what the replica does about them.
REFUSE_CODES = ("auth", "diverged", "ahead", "wrong-log", "behind-retention", "no-seed", "unavailable")


# -- field validation helpers (raise LocalProtocolError: h11 style) -----------


def _fail(cls: type, msg: str) -> None:
    raise LocalProtocolError(f"invalid {cls.__name__}: {msg}")


def _uint(cls: type, name: str, v: Any, lo: int = 0, hi: int = MAX_U64) -> None:
    if type(v) is not int:
        _fail(cls, f"{name} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        _fail(cls, f"{name}={v} is outside {lo}..{hi}")


def _opt_uint(cls: type, name: str, v: Any) -> None:
    if v is not None:
        _uint(cls, name, v)


def _bytes(cls: type, name: str, v: Any, size: int | None = None, max_size: int | None = None) -> None:
    if type(v) is not bytes:
        _fail(cls, f"{name} must be bytes, got {type(v).__name__}")
    if size is not None and len(v) != size:
        _fail(cls, f"{name} must be {size} bytes, got {len(v)}")
    if max_size is not None and len(v) > max_size:
        _fail(cls, f"{name} of {len(v)} bytes exceeds {max_size}")


def _text(cls: type, name: str, v: Any, max_chars: int = MAX_TEXT_CHARS) -> None:
    if type(v) is not str:
        _fail(cls, f"{name} must be a str, got {type(v).__name__}")
    if len(v) > max_chars:
        _fail(cls, f"{name} is longer than {max_chars} characters")


def _name(cls: type, v: Any) -> None:
    _text(cls, "name", v, 48)
    if not _NAME.match(v):
        _fail(cls, f"replica name {v!r} must be 1-48 letters, digits, '.', '_' or '-', starting with a letter or digit")


def valid_replica_name(name: str) -> bool:
    """Whether ``name`` may name a replica (REP-6; it becomes cursor ``replica.<name>``)."""
    return isinstance(name, str) and bool(_NAME.match(name))


# -- messages -----------------------------------------------------------------


class Message:
    """Base of wire messages. Subclasses are frozen dataclasses with a type code."""

    __slots__ = ()
    TYPE: ClassVar[int]

    def _wire(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def _from_wire(cls, body: dict[str, Any]) -> "Message":
        return cls(**body)


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Replica -> master, first: the replica's fresh random nonce (REP-4)."""

    TYPE: ClassVar[int] = 1
    nonce: bytes

    def __post_init__(self) -> None:
        _bytes(Hello, "nonce", self.nonce, NONCE_BYTES)


@dataclass(frozen=True, slots=True)
class Challenge(Message):
    """Master -> replica: the master's fresh random nonce (REP-4)."""

    TYPE: ClassVar[int] = 2
    nonce: bytes

    def __post_init__(self) -> None:
        _bytes(Challenge, "nonce", self.nonce, NONCE_BYTES)


@dataclass(frozen=True, slots=True)
class Proof(Message):
    """HMAC-SHA256 of the role-tagged transcript (REP-4); the replica proves first."""

    TYPE: ClassVar[int] = 3
    mac: bytes

    def __post_init__(self) -> None:
        _bytes(Proof, "mac", self.mac, MAC_BYTES)


@dataclass(frozen=True, slots=True)
class Position(Message):
    """Replica -> master: "my log is this one, and it ends here" (REP-6).

    ``first_lsn`` is the replica's first retained LSN, ``last_lsn`` its last
    durable LSN (``first_lsn - 1`` when it holds no record yet) and
    ``last_hash`` the hash at ``last_lsn``.
    """

    TYPE: ClassVar[int] = 4
    name: str
    log_id: bytes
    epoch: int
    first_lsn: int
    last_lsn: int
    last_hash: bytes

    def __post_init__(self) -> None:
        _name(Position, self.name)
        _bytes(Position, "log_id", self.log_id, 16)
        _uint(Position, "epoch", self.epoch, 1)
        _uint(Position, "first_lsn", self.first_lsn, 1)
        _uint(Position, "last_lsn", self.last_lsn, self.first_lsn - 1)
        _bytes(Position, "last_hash", self.last_hash, HASH_SIZE)


@dataclass(frozen=True, slots=True)
class SeedRequest(Message):
    """Replica -> master: "I have no log; seed me" (REP-10)."""

    TYPE: ClassVar[int] = 5
    name: str
    accepts_snapshot: bool

    def __post_init__(self) -> None:
        _name(SeedRequest, self.name)
        if type(self.accepts_snapshot) is not bool:
            _fail(SeedRequest, "accepts_snapshot must be a bool")


@dataclass(frozen=True, slots=True)
class Probe(Message):
    """Master -> replica: "what are your hashes at these LSNs?" (REP-8)."""

    TYPE: ClassVar[int] = 6
    lsns: tuple[int, ...]

    def __post_init__(self) -> None:
        if type(self.lsns) is not tuple or not 1 <= len(self.lsns) <= MAX_PROBES:
            _fail(Probe, f"lsns must be a tuple of 1..{MAX_PROBES} LSNs")
        for v in self.lsns:
            _uint(Probe, "lsn", v)
        if any(a >= b for a, b in zip(self.lsns, self.lsns[1:])):
            _fail(Probe, "lsns must be strictly increasing")

    def _wire(self) -> dict[str, Any]:
        return {"lsns": list(self.lsns)}

    @classmethod
    def _from_wire(cls, body: dict[str, Any]) -> "Probe":
        if type(body["lsns"]) is not list:
            _fail(cls, "lsns must be an array")
        return cls(tuple(body["lsns"]))


@dataclass(frozen=True, slots=True)
class ProbeReply(Message):
    """Replica -> master: one hash per probed LSN, None where it has none (REP-8)."""

    TYPE: ClassVar[int] = 7
    hashes: tuple[bytes | None, ...]

    def __post_init__(self) -> None:
        if type(self.hashes) is not tuple or not 1 <= len(self.hashes) <= MAX_PROBES:
            _fail(ProbeReply, f"hashes must be a tuple of 1..{MAX_PROBES} entries")
        for h in self.hashes:
            if h is not None:
                _bytes(ProbeReply, "hash", h, HASH_SIZE)

    def _wire(self) -> dict[str, Any]:
        return {"hashes": list(self.hashes)}

    @classmethod
    def _from_wire(cls, body: dict[str, Any]) -> "ProbeReply":
        if type(body["hashes"]) is not list:
            _fail(cls, "hashes must be an array")
        return cls(tuple(body["hashes"]))


@dataclass(frozen=True, slots=True)
class Accept(Message):
    """Master -> replica: "I will stream from ``start_lsn``, which follows ``prev_hash``" (REP-7)."""

    TYPE: ClassVar[int] = 8
    log_id: bytes
    epoch: int
    start_lsn: int
    prev_hash: bytes
    master_lsn: int

    def __post_init__(self) -> None:
        _bytes(Accept, "log_id", self.log_id, 16)
        _uint(Accept, "epoch", self.epoch, 1)
        _uint(Accept, "start_lsn", self.start_lsn, 1)
        _bytes(Accept, "prev_hash", self.prev_hash, HASH_SIZE)
        _uint(Accept, "master_lsn", self.master_lsn, self.start_lsn - 1)


@dataclass(frozen=True, slots=True)
class Refuse(Message):
    """Master -> replica: "I will not serve you", with a code from :data:`REFUSE_CODES` (REP-9).

    ``last_common_lsn`` is set for ``diverged`` (None: no common record in
    the retained range); ``master_lsn`` for ``ahead`` and ``behind-retention``.
    """

    TYPE: ClassVar[int] = 9
    code: str
    detail: str
    last_common_lsn: int | None = None
    master_lsn: int | None = None

    def __post_init__(self) -> None:
        _text(Refuse, "code", self.code, 32)
        if self.code not in REFUSE_CODES:
            _fail(Refuse, f"unknown refusal code {self.code!r}")
        _text(Refuse, "detail", self.detail)
        _opt_uint(Refuse, "last_common_lsn", self.last_common_lsn)
        _opt_uint(Refuse, "master_lsn", self.master_lsn)
        if self.code == "auth" and (self.last_common_lsn is not None or self.master_lsn is not None):
            _fail(Refuse, "an auth refusal carries no log information (INV-AuthFirst)")


@dataclass(frozen=True, slots=True)
class SnapshotBegin(Message):
    """Master -> new replica: a snapshot of the state after ``lsn`` (hash ``hash``) follows (REP-10)."""

    TYPE: ClassVar[int] = 10
    log_id: bytes
    epoch: int
    lsn: int
    hash: bytes

    def __post_init__(self) -> None:
        _bytes(SnapshotBegin, "log_id", self.log_id, 16)
        _uint(SnapshotBegin, "epoch", self.epoch, 1)
        _uint(SnapshotBegin, "lsn", self.lsn)
        _bytes(SnapshotBegin, "hash", self.hash, HASH_SIZE)


@dataclass(frozen=True, slots=True)
class SnapshotChunk(Message):
    """Master -> new replica: the next piece of the opaque snapshot blob."""

    TYPE: ClassVar[int] = 11
    data: bytes

    def __post_init__(self) -> None:
        _bytes(SnapshotChunk, "data", self.data, max_size=SNAPSHOT_CHUNK_MAX_BYTES)
        if not self.data:
            _fail(SnapshotChunk, "data must not be empty")


@dataclass(frozen=True, slots=True)
class SnapshotEnd(Message):
    """Master -> new replica: the snapshot is complete; counts and blake3 digest of all chunks."""

    TYPE: ClassVar[int] = 12
    chunks: int
    size: int
    digest: bytes

    def __post_init__(self) -> None:
        _uint(SnapshotEnd, "chunks", self.chunks)
        _uint(SnapshotEnd, "size", self.size)
        _bytes(SnapshotEnd, "digest", self.digest, HASH_SIZE)


@dataclass(frozen=True, slots=True)
class AppendBatch(Message):
    """Master -> replica: consecutive records to append (REP-11).

    At most :data:`MAX_BATCH_RECORDS` records and :data:`BATCH_SOFT_MAX_BYTES`
    payload bytes, except that a single record may be as large as a record
    can be. LSNs are consecutive; epochs never decrease.

    On the wire (REP-11) the body is ``{"frames": bytes}``: the records as
    LOG-4 frames (specs/log-format.md), one after the other, each with
    ``flags = 0`` and ``batch_back = lsn - first LSN of the batch``, so the
    encoding is unique. The encoded frame is computed once and cached
    (:meth:`encoded`): a master sends the same batch object to every replica
    that needs it and encodes it once.
    """

    TYPE: ClassVar[int] = 13
    #: The body's field names (the dataclass holds the decoded records instead).
    WIRE_FIELDS: ClassVar[frozenset[str]] = frozenset({"frames"})
    records: tuple[Record, ...]
    _payload_bytes: int = field(default=0, init=False, compare=False, repr=False)
    _frames: bytes | memoryview | None = field(default=None, init=False, compare=False, repr=False)
    _encoded: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        recs = self.records
        if type(recs) is not tuple or not 1 <= len(recs) <= MAX_BATCH_RECORDS:
            _fail(AppendBatch, f"records must be a tuple of 1..{MAX_BATCH_RECORDS} records")
        total = 0
        prev: Record | None = None
        for r in recs:
            if type(r) is not Record:
                _fail(AppendBatch, "records must be wal.Record values")
            _uint(AppendBatch, "lsn", r.lsn, 1)
            _uint(AppendBatch, "epoch", r.epoch, 1)
            _uint(AppendBatch, "type", r.type, 0, 0xFFFF)
            _bytes(AppendBatch, "payload", r.payload, max_size=MAX_PAYLOAD_BYTES)
            _bytes(AppendBatch, "hash", r.hash, HASH_SIZE)
            if prev is not None:
                if r.lsn != prev.lsn + 1:
                    _fail(AppendBatch, f"LSNs are not consecutive ({prev.lsn} then {r.lsn})")
                if r.epoch < prev.epoch:
                    _fail(AppendBatch, f"epoch goes back from {prev.epoch} to {r.epoch} at LSN {r.lsn}")
            total += len(r.payload)
            prev = r
        if len(recs) > 1 and total > BATCH_SOFT_MAX_BYTES:
            _fail(AppendBatch, f"{total} payload bytes in {len(recs)} records exceeds {BATCH_SOFT_MAX_BYTES}")
        object.__setattr__(self, "_payload_bytes", total)

    @classmethod
    def _checked(cls, records: tuple[Record, ...], payload_bytes: int, frames: bytes | None) -> "AppendBatch":
        """A batch whose records the caller has already checked against every
        rule of ``__post_init__`` (the wire parser does, field by field)."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "records", records)
        object.__setattr__(obj, "_payload_bytes", payload_bytes)
        object.__setattr__(obj, "_frames", frames)
        object.__setattr__(obj, "_encoded", None)
        return obj

    @property
    def first_lsn(self) -> int:
        return self.records[0].lsn

    @property
    def last_lsn(self) -> int:
        return self.records[-1].lsn

    @property
    def payload_bytes(self) -> int:
        """The sum of the records' payload sizes."""
        return self._payload_bytes

    def since(self, lsn: int) -> "AppendBatch":
        """The records from ``lsn`` on (``first_lsn < lsn <= last_lsn``) as a batch of their own."""
        i = lsn - self.first_lsn
        if not 0 < i < len(self.records):
            raise LocalProtocolError(f"LSN {lsn} is not inside batch {self.first_lsn}..{self.last_lsn}")
        rest = self.records[i:]
        return AppendBatch._checked(rest, sum(len(r.payload) for r in rest), None)

    def until(self, lsn: int) -> "AppendBatch":
        """The records up to ``lsn`` (``first_lsn <= lsn < last_lsn``) as a batch of their own."""
        i = lsn - self.first_lsn + 1
        if not 0 < i < len(self.records):
            raise LocalProtocolError(f"LSN {lsn} is not inside batch {self.first_lsn}..{self.last_lsn} (or is its end)")
        head = self.records[:i]
        return AppendBatch._checked(head, sum(len(r.payload) for r in head), None)

    def frames(self) -> bytes:
        """The records as LOG-4 frames (the wire body's ``frames``)."""
        if type(self._frames) is memoryview:
            return bytes(self._frames)
        if self._frames is None:
            data = b"".join(self._frame_parts())
            object.__setattr__(self, "_frames", data)
            return data
        return self._frames

    def _frame_parts(self) -> list[bytes]:
        """Each record's 64-byte frame header (the log's codec, LOG-4), then its payload (not copied)."""
        return encode_frames(self.records, self.records[0].lsn)

    def encoded(self) -> bytes:
        """This message's frame (REP-2), computed once (one copy of the payloads)."""
        if self._encoded is None:
            if self._frames is not None:
                frames = self.frames()
                parts = [frames]
                size = len(frames)
            else:
                parts = self._frame_parts()
                size = len(self.records) * LOG_FRAME_HEADER_BYTES + self._payload_bytes
            head = _frames_envelope(size)
            data = b"".join([_FRAME_HEADER.pack(len(head) + size, self.TYPE), head, *parts])
            object.__setattr__(self, "_encoded", data)
            object.__setattr__(self, "_frames", None)  # the frame holds the bytes; keep one copy
        return self._encoded  # type: ignore[return-value]

    @property
    def wire_bytes(self) -> int:
        """The size of this message's frame (header included)."""
        return len(self.encoded())

    def _wire(self) -> dict[str, Any]:
        return {"frames": self.frames()}

    @classmethod
    def _from_wire(cls, body: dict[str, Any]) -> "AppendBatch":
        data = body["frames"]
        if type(data) is not bytes:
            _fail(cls, "frames must be a byte string")
        return cls._parse_frames(data)

    @classmethod
    def _parse_frames(cls, data: bytes | memoryview) -> "AppendBatch":
        """REP-11: LOG-4 frames -> records, every header field checked (so the
        encoding is canonical). The frames are decoded by the log's own
        decoder (:func:`wal.decode_frames`). Record hashes are not checked
        here: the replica's ``Log.append_records`` verifies the chain onto
        its log."""
        view = memoryview(data)
        n = len(view)
        out: list[Record] = []
        total = first = prev_epoch = 0

        def check(pos: int, lsn: int, epoch: int, flags: int, back: int, plen: int) -> None:
            # REP-11's rules, in this order, each with its message. A frame
            # the decoder yielded is valid-looking and complete (LOG-4), so
            # only the frame it stopped at can break the LSN, flags or
            # length rules.
            if not out:
                if lsn < 1:
                    _fail(cls, "lsn=0 is outside 1..")
            elif lsn != first + len(out):
                _fail(cls, f"LSNs are not consecutive ({first + len(out) - 1} then {lsn})")
            if epoch < 1:
                _fail(cls, f"epoch=0 is outside 1.. (LSN {lsn})")
            if out and epoch < prev_epoch:
                _fail(cls, f"epoch goes back from {prev_epoch} to {epoch} at LSN {lsn}")
            if flags != 0 or back != lsn - (first if out else lsn):
                _fail(cls, f"frame of LSN {lsn}: flags must be 0 and batch_back {lsn - (first if out else lsn)} (REP-11)")
            if plen > MAX_PAYLOAD_BYTES or pos + LOG_FRAME_HEADER_BYTES + plen > n:
                _fail(cls, f"frame of LSN {lsn}: payload of {plen} bytes does not fit the batch")

        scan = FrameScan()
        for pos, plen, lsn, epoch, type_, back, hash_, payload in decode_frames(view, 0, n, scan):
            if not out:
                check(pos, lsn, epoch, 0, back, plen)
                first = lsn
            elif lsn != first + len(out) or epoch < prev_epoch or back != lsn - first:
                check(pos, lsn, epoch, 0, back, plen)  # a rule is broken: check() says which
            if len(out) >= MAX_BATCH_RECORDS:
                _fail(cls, f"more than {MAX_BATCH_RECORDS} records")
            out.append(Record(lsn, epoch, type_, bytes(payload), hash_))
            total += plen
            prev_epoch = epoch
        pos = scan.offset
        if pos < n:  # the decoder stopped at a frame that is incomplete or not valid-looking
            if n - pos < LOG_FRAME_HEADER_BYTES:
                _fail(cls, f"frame at byte {pos}: {n - pos} bytes left, a frame header needs {LOG_FRAME_HEADER_BYTES}")
            fields_ = unpack_frame_header(view, pos)
            if fields_ is None:
                _fail(cls, f"frame at byte {pos}: header check mismatch")
            plen, lsn, epoch, _type, flags, back, _crc, _hash = fields_
            check(pos, lsn, epoch, flags, back, plen)
            _fail(cls, f"frame at byte {pos} is not a valid LOG-4 frame")
        if not out:
            _fail(cls, "a batch holds at least one record")
        if len(out) > 1 and total > BATCH_SOFT_MAX_BYTES:
            _fail(cls, f"{total} payload bytes in {len(out)} records exceeds {BATCH_SOFT_MAX_BYTES}")
        return cls._checked(tuple(out), total, view)


def _frames_envelope(size: int) -> bytes:
    """Canonical CBOR of ``{"frames": <byte string of size bytes>}`` up to the bytes themselves."""
    if size < 24:
        head = bytes((0x40 + size,))
    elif size < 1 << 8:
        head = b"\x58" + size.to_bytes(1, "big")
    elif size < 1 << 16:
        head = b"\x59" + size.to_bytes(2, "big")
    elif size < 1 << 32:
        head = b"\x5a" + size.to_bytes(4, "big")
    else:
        head = b"\x5b" + size.to_bytes(8, "big")
    return b"\xa1\x66frames" + head


def _decode_append_batch(body: bytes) -> "AppendBatch":
    """REP-2 for AppendBatch without a general CBOR pass over megabytes: the
    body must be exactly the canonical envelope followed by the frames."""
    if body[:8] != b"\xa1\x66frames" or len(body) < 9:
        raise RemoteProtocolError("AppendBatch body must be the canonical CBOR map {\"frames\": bytes}")
    for n in (0, 1, 2, 4, 8):  # the byte string's head: 1 byte plus n length bytes
        size = len(body) - 9 - n
        if size >= 0 and _frames_envelope(size) == body[: 9 + n]:
            break
    else:
        raise RemoteProtocolError("AppendBatch body is not canonical CBOR of {\"frames\": bytes} (REP-2)")
    try:
        return AppendBatch._parse_frames(memoryview(body)[9 + n :])
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Master -> replica, when idle: the master's last durable LSN (REP-12)."""

    TYPE: ClassVar[int] = 14
    master_lsn: int

    def __post_init__(self) -> None:
        _uint(Heartbeat, "master_lsn", self.master_lsn)


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Replica -> master: records up to ``durable_lsn`` are fsynced here; the
    store has applied up to ``applied_lsn`` (REP-12, INV-NoAckBeforeDurable)."""

    TYPE: ClassVar[int] = 15
    durable_lsn: int
    applied_lsn: int

    def __post_init__(self) -> None:
        _uint(Ack, "durable_lsn", self.durable_lsn)
        _uint(Ack, "applied_lsn", self.applied_lsn, 0, self.durable_lsn)


@dataclass(frozen=True, slots=True)
class Fence(Message):
    """Master -> replica: "I accept no more writes; my log ends at ``last_lsn``" (REP-14)."""

    TYPE: ClassVar[int] = 16
    epoch: int
    last_lsn: int

    def __post_init__(self) -> None:
        _uint(Fence, "epoch", self.epoch, 1)
        _uint(Fence, "last_lsn", self.last_lsn)


@dataclass(frozen=True, slots=True)
class Drained(Message):
    """Replica -> master: "I hold everything up to the fence, durably; it ends with ``hash``" (REP-14)."""

    TYPE: ClassVar[int] = 17
    lsn: int
    hash: bytes

    def __post_init__(self) -> None:
        _uint(Drained, "lsn", self.lsn)
        _bytes(Drained, "hash", self.hash, HASH_SIZE)


@dataclass(frozen=True, slots=True)
class Promote(Message):
    """Master -> one replica: "become master in ``new_epoch``" (REP-15)."""

    TYPE: ClassVar[int] = 18
    new_epoch: int

    def __post_init__(self) -> None:
        _uint(Promote, "new_epoch", self.new_epoch, 2)


@dataclass(frozen=True, slots=True)
class Promoted(Message):
    """Replica -> master: "I am master in ``epoch``; my log ends at ``last_lsn``/``last_hash``" (REP-15)."""

    TYPE: ClassVar[int] = 19
    epoch: int
    last_lsn: int
    last_hash: bytes

    def __post_init__(self) -> None:
        _uint(Promoted, "epoch", self.epoch, 2)
        _uint(Promoted, "last_lsn", self.last_lsn)
        _bytes(Promoted, "last_hash", self.last_hash, HASH_SIZE)


@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """Either side, after authentication: "I am closing this connection, because ..." (REP-16)."""

    TYPE: ClassVar[int] = 20
    reason: str

    def __post_init__(self) -> None:
        _text(Goodbye, "reason", self.reason)


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello, Challenge, Proof, Position, SeedRequest, Probe, ProbeReply, Accept, Refuse,
        SnapshotBegin, SnapshotChunk, SnapshotEnd, AppendBatch, Heartbeat, Ack, Fence, Drained,
        Promote, Promoted, Goodbye,
    )
}
_FIELD_NAMES = {cls: getattr(cls, "WIRE_FIELDS", None) or frozenset(f.name for f in fields(cls))
                for cls in MESSAGE_TYPES.values()}


# -- events that are not wire messages ----------------------------------------


class Event:
    """Base of session events that are not wire messages."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class AuthFailed(Event):
    """Master side: the replica's Proof did not verify (REP-5). The only legal
    next step is ``send(Refuse("auth", ...))``, then closing."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed its side at a frame boundary (REP-17)."""


Input = Union[type[Message], type[Event]]

# -- the transition table (REP-18) ----------------------------------------------

M, R = Role.MASTER, Role.REPLICA
S = State
_BYE = {(M, Goodbye): S.CLOSED, (R, Goodbye): S.CLOSED}

#: The whole state machine: state -> {(sender, message type) -> next state}.
#: specs/replication.md quotes it (tests/test_protocol_spec.py keeps them equal).
#: EOF at a frame boundary moves any state but ERROR to CLOSED (REP-17).
TRANSITIONS: dict[State, dict[tuple[Role, Input], State]] = {
    S.HELLO: {(R, Hello): S.CHALLENGE},
    S.CHALLENGE: {(M, Challenge): S.REPLICA_PROOF},
    S.REPLICA_PROOF: {(R, Proof): S.MASTER_PROOF, (R, AuthFailed): S.AUTH_FAILED},
    S.AUTH_FAILED: {(M, Refuse): S.CLOSED},
    S.MASTER_PROOF: {(M, Proof): S.REQUEST, (M, Refuse): S.CLOSED},
    S.REQUEST: {(R, Position): S.DECIDE, (R, SeedRequest): S.SEED, **_BYE},
    S.DECIDE: {(M, Accept): S.STREAMING, (M, Probe): S.PROBE, (M, Refuse): S.CLOSED, **_BYE},
    S.PROBE: {(R, ProbeReply): S.DECIDE, **_BYE},
    S.SEED: {(M, Accept): S.STREAMING, (M, SnapshotBegin): S.SNAPSHOT, (M, Heartbeat): S.SEED, (M, Refuse): S.CLOSED, **_BYE},
    S.SNAPSHOT: {(M, SnapshotChunk): S.SNAPSHOT, (M, SnapshotEnd): S.SNAPSHOT_DONE, (M, Heartbeat): S.SNAPSHOT, (M, Refuse): S.CLOSED, **_BYE},
    S.SNAPSHOT_DONE: {(M, Accept): S.STREAMING, (M, Refuse): S.CLOSED, **_BYE},
    S.STREAMING: {
        (M, AppendBatch): S.STREAMING, (M, Heartbeat): S.STREAMING, (R, Ack): S.STREAMING,
        (M, Fence): S.FENCING, (M, Promote): S.PROMOTING, **_BYE,
    },
    S.FENCING: {
        (M, AppendBatch): S.FENCING, (M, Heartbeat): S.FENCING, (R, Ack): S.FENCING, (R, Drained): S.DRAINED, **_BYE,
    },
    S.DRAINED: {(M, Heartbeat): S.DRAINED, (R, Ack): S.DRAINED, (M, Promote): S.PROMOTING, **_BYE},
    S.PROMOTING: {(R, Ack): S.PROMOTING, (R, Promoted): S.CLOSED, **_BYE},
    S.CLOSED: dict(_BYE),
    S.ERROR: {},
}
del M, R, S

#: States in which the peer has not proved it knows the secret yet (REP-3).
_PREAUTH_STATES = frozenset({State.HELLO, State.CHALLENGE, State.REPLICA_PROOF, State.AUTH_FAILED, State.MASTER_PROOF})


# -- wire encoding (REP-2) ------------------------------------------------------


def encode_message(msg: Message) -> bytes:
    """The frame for ``msg``: u32 body length, u8 type, canonical CBOR body (REP-2)."""
    if type(msg) is AppendBatch:
        return msg.encoded()  # computed once per batch, whoever it is sent to
    body = cbor2.dumps(msg._wire(), canonical=True)
    return _FRAME_HEADER.pack(len(body), msg.TYPE) + body


_CBOR_ERRORS = (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError, KeyError, IndexError, AttributeError)


def decode_body(type_code: int, body: bytes) -> Message:
    """Decode one frame body into a message.

    Raises:
        RemoteProtocolError: unknown type, malformed or non-canonical CBOR, a
            missing or extra field, or a field out of range (REP-2).
    """
    cls = MESSAGE_TYPES.get(type_code)
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {type_code}")
    if cls is AppendBatch:
        return _decode_append_batch(body)
    try:
        value = cbor2.loads(body)
    except _CBOR_ERRORS as exc:
        raise RemoteProtocolError(f"{cls.__name__} body is not valid CBOR: {exc}") from None
    if type(value) is not dict or set(value) != _FIELD_NAMES[cls] or not all(type(k) is str for k in value):
        got = sorted(map(str, value)) if type(value) is dict else type(value).__name__
        raise RemoteProtocolError(f"{cls.__name__} body must be a map of {sorted(_FIELD_NAMES[cls])}, got {got}")
    try:
        msg = cls._from_wire(value)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc)) from None
    except TypeError as exc:  # a field of the wrong shape reached a constructor
        raise RemoteProtocolError(f"invalid {cls.__name__}: {exc}") from None
    if cbor2.dumps(msg._wire(), canonical=True) != body:
        raise RemoteProtocolError(f"{cls.__name__} body is not canonical CBOR (REP-2)")
    return msg


# -- authentication (REP-4) -------------------------------------------------------


def auth_transcript(prover: Role, replica_nonce: bytes, master_nonce: bytes) -> bytes:
    """REP-4: the bytes a Proof's HMAC covers: domain, prover's role, both nonces."""
    return _AUTH_DOMAIN + prover.value.encode() + b"\x00" + replica_nonce + master_nonce


def _mac(secret: bytes, prover: Role, replica_nonce: bytes, master_nonce: bytes) -> bytes:
    return hmac.new(secret, auth_transcript(prover, replica_nonce, master_nonce), sha256).digest()


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
        check = getattr(self, "_check_" + type(item).__name__)
        check(sender, item)
        self._state = allowed[key]

    # Context checks, one per input. They run before the state changes and
    # raise LocalProtocolError (re-raised as RemoteProtocolError on receive).

    def _check_Hello(self, sender: Role, m: Hello) -> None:
        self.replica_nonce = m.nonce

    def _check_Challenge(self, sender: Role, m: Challenge) -> None:
        if m.nonce == self.replica_nonce:
            raise LocalProtocolError("the master's nonce equals the replica's (reflection)")
        self.master_nonce = m.nonce

    def _check_Proof(self, sender: Role, m: Proof) -> None:
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

    def _check_AuthFailed(self, sender: Role, m: AuthFailed) -> None:
        pass

    def _check_Refuse(self, sender: Role, m: Refuse) -> None:
        pre_auth = self._state in (State.AUTH_FAILED, State.MASTER_PROOF)
        if pre_auth and m.code != "auth":
            raise LocalProtocolError("before authentication only Refuse('auth') is allowed (INV-AuthFirst)")
        if not pre_auth and m.code == "auth":
            raise LocalProtocolError("Refuse('auth') after authentication succeeded")

    def _check_Position(self, sender: Role, m: Position) -> None:
        self.position = m

    def _check_SeedRequest(self, sender: Role, m: SeedRequest) -> None:
        self.seed_request = m

    def _check_Probe(self, sender: Role, m: Probe) -> None:
        assert self.position is not None
        if m.lsns[-1] > self.position.last_lsn:
            raise LocalProtocolError(
                f"probe for LSN {m.lsns[-1]} beyond the replica's last LSN {self.position.last_lsn} (REP-8)"
            )
        self.probe = m

    def _check_ProbeReply(self, sender: Role, m: ProbeReply) -> None:
        assert self.probe is not None
        if len(m.hashes) != len(self.probe.lsns):
            raise LocalProtocolError(f"{len(m.hashes)} hashes answer {len(self.probe.lsns)} probes (REP-8)")
        self.probe = None

    def _check_Accept(self, sender: Role, m: Accept) -> None:
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

    def _check_SnapshotBegin(self, sender: Role, m: SnapshotBegin) -> None:
        assert self.seed_request is not None
        if not self.seed_request.accepts_snapshot:
            raise LocalProtocolError("the replica said it cannot take a snapshot (REP-10)")
        self.snapshot = m
        self._snap_chunks = 0
        self._snap_size = 0
        self._snap_hasher = blake3.blake3()

    def _check_SnapshotChunk(self, sender: Role, m: SnapshotChunk) -> None:
        self._snap_chunks += 1
        self._snap_size += len(m.data)
        self._snap_hasher.update(m.data)

    def _check_SnapshotEnd(self, sender: Role, m: SnapshotEnd) -> None:
        if m != self.snapshot_end():
            raise LocalProtocolError(
                f"SnapshotEnd says {m.chunks} chunks/{m.size} bytes/digest {m.digest.hex()[:16]}.., but "
                f"{self._snap_chunks} chunks/{self._snap_size} bytes/{self._snap_hasher.digest().hex()[:16]}.. were sent"
            )

    def _check_AppendBatch(self, sender: Role, m: AppendBatch) -> None:
        # REP-11: batches are gapless and never repeat (no gaps, no duplicates).
        if m.first_lsn != self.next_lsn:
            raise LocalProtocolError(f"batch starts at LSN {m.first_lsn}; LSN {self.next_lsn} is next (REP-11)")
        if self.fence is not None and m.last_lsn > self.fence.last_lsn:
            raise LocalProtocolError(f"batch goes past the fence at LSN {self.fence.last_lsn} (REP-14)")
        self.next_lsn = m.last_lsn + 1

    def _check_Heartbeat(self, sender: Role, m: Heartbeat) -> None:
        if self.accept is not None and m.master_lsn < self.last_lsn:
            raise LocalProtocolError(f"heartbeat says the master is at LSN {m.master_lsn}, but it sent {self.last_lsn} (REP-12)")

    def _check_Ack(self, sender: Role, m: Ack) -> None:
        # INV-NoAckBeforeDurable (protocol half): nothing beyond what was received.
        if m.durable_lsn > self.last_lsn:
            raise LocalProtocolError(f"ack for LSN {m.durable_lsn}, but only up to {self.last_lsn} was sent (REP-12)")
        if m.durable_lsn < self.acked_lsn:
            raise LocalProtocolError(f"ack goes back from LSN {self.acked_lsn} to {m.durable_lsn} (INV-CursorMonotonic)")
        self.acked_lsn = m.durable_lsn

    def _check_Fence(self, sender: Role, m: Fence) -> None:
        assert self.accept is not None
        if m.last_lsn < self.last_lsn:
            raise LocalProtocolError(f"fence at LSN {m.last_lsn} is below LSN {self.last_lsn} already sent (REP-14)")
        if m.epoch < self.accept.epoch:
            raise LocalProtocolError("fence epoch is below the accepted epoch")
        self.fence = m

    def _check_Drained(self, sender: Role, m: Drained) -> None:
        assert self.fence is not None
        if m.lsn != self.fence.last_lsn or self.acked_lsn < m.lsn:
            raise LocalProtocolError(
                f"Drained at LSN {m.lsn} needs an Ack covering the fence LSN {self.fence.last_lsn} first (REP-14)"
            )

    def _check_Promote(self, sender: Role, m: Promote) -> None:
        assert self.accept is not None
        floor = max(self.accept.epoch, self.fence.epoch if self.fence else 0)
        if m.new_epoch <= floor:
            raise LocalProtocolError(f"new epoch {m.new_epoch} must exceed epoch {floor} (REP-15)")
        self.promote = m

    def _check_Promoted(self, sender: Role, m: Promoted) -> None:
        assert self.promote is not None
        if m.epoch != self.promote.new_epoch or m.last_lsn != self.last_lsn:
            raise LocalProtocolError(
                f"Promoted(epoch {m.epoch}, LSN {m.last_lsn}) must name epoch {self.promote.new_epoch} "
                f"and LSN {self.last_lsn} (REP-15)"
            )

    def _check_Goodbye(self, sender: Role, m: Goodbye) -> None:
        if sender is not self.role:
            self.peer_goodbye = m


# -- master-side decisions (pure) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeedMasterHashes:
    """:class:`PositionCheck` needs the master's hashes at these LSNs before it can go on."""

    lsns: tuple[int, ...]


class PositionCheck:
    """Decides the master's answer to a replica's Position (REP-7, REP-8, REP-9).

    Pure: the driver supplies the master's hashes when asked and forwards
    probes and replies. Equal hashes at LSN n mean equal histories up to n
    (the hash chain), so "equal" is monotone in n and the last common LSN can
    be found by narrowing ``(known equal, known different)`` with multi-point
    probes (up to ``probes_per_round`` LSNs per round trip).

    Loop::

        while True:
            action = check.next_action()
            if isinstance(action, NeedMasterHashes): check.add_master_hashes({...})
            elif isinstance(action, Probe): send it; check.add_reply(reply)
            else: send action (Accept or Refuse); done
    """

    def __init__(self, position: Position, *, log_id: bytes, first_lsn: int, last_lsn: int, epoch: int,
                 probes_per_round: int = 32):
        if not 2 <= probes_per_round <= MAX_PROBES:
            raise LocalProtocolError(f"probes_per_round must be 2..{MAX_PROBES}")
        self.position = position
        self._log_id = log_id
        self._m_first = first_lsn
        self._m_last = last_lsn
        self._epoch = epoch
        self._k = probes_per_round
        self._master: dict[int, bytes] = {}
        self._outstanding: tuple[int, ...] | None = None
        self._result: Accept | Refuse | None = None
        self.rounds = 0
        p = position
        self._floor = max(p.first_lsn - 1, first_lsn - 1)
        self._eq: int | None = None      # greatest LSN known equal
        self._diff: int | None = None    # smallest LSN known different
        self._floor_tested = False
        if p.log_id != log_id:
            self._result = Refuse("wrong-log", f"replica log {p.log_id.hex()} is not master log {log_id.hex()}")
        elif p.last_lsn <= last_lsn:
            if p.last_lsn < first_lsn - 1:
                self._result = Refuse(
                    "behind-retention",
                    f"the master no longer holds LSN {p.last_lsn + 1} (it keeps {first_lsn}..{last_lsn})",
                    master_lsn=last_lsn,
                )
            else:
                self._top = p.last_lsn
                self._phase = "position"
        else:
            if last_lsn < self._floor:
                self._result = self._ahead()
            else:
                self._top = last_lsn
                self._phase = "search"

    def _ahead(self) -> Refuse:
        return Refuse(
            "ahead",
            f"replica is at LSN {self.position.last_lsn}, beyond the master's last LSN {self._m_last}; "
            f"it is never rolled back",
            master_lsn=self._m_last,
        )

    def _diverged(self, last_common: int | None) -> Refuse:
        return Refuse(
            "diverged",
            f"replica at LSN {self.position.last_lsn} is not on the master's history; last common LSN "
            f"{'unknown (below the retained range)' if last_common is None else last_common}",
            last_common_lsn=last_common,
            master_lsn=self._m_last,
        )

    @property
    def done(self) -> bool:
        return self._result is not None

    def next_action(self) -> NeedMasterHashes | Probe | Accept | Refuse:
        if self._result is not None:
            return self._result
        if self._outstanding is not None:
            raise LocalProtocolError("a Probe is outstanding: add_reply() first")
        if self._phase == "position":
            lsn = self.position.last_lsn
            if lsn not in self._master:
                return NeedMasterHashes((lsn,))
            if self._master[lsn] == self.position.last_hash:
                p = self.position
                self._result = Accept(self._log_id, self._epoch, p.last_lsn + 1, p.last_hash, self._m_last)
                return self._result
            self._diff = lsn
            self._phase = "search"
            if lsn == self._floor:
                self._result = self._diverged(None)
                return self._result
        points = self._probe_points()
        missing = tuple(p for p in points if p not in self._master)
        if missing:
            return NeedMasterHashes(missing)
        self._outstanding = points
        self.rounds += 1
        return Probe(points)

    def _probe_points(self) -> tuple[int, ...]:
        pts: set[int] = set()
        if not self._floor_tested and self._eq is None:
            pts.add(self._floor)
        if self._diff is None:
            pts.add(self._top)
        lo = self._eq if self._eq is not None else self._floor
        hi = self._diff if self._diff is not None else self._top
        room = self._k - len(pts)
        inner = hi - lo - 1
        if inner > 0 and room > 0:
            n = min(room, inner)
            for i in range(1, n + 1):
                pts.add(lo + (inner + 1) * i // (n + 1))
        return tuple(sorted(pts))

    def add_master_hashes(self, hashes: dict[int, bytes]) -> None:
        """The master's own hashes at the LSNs a :class:`NeedMasterHashes` named."""
        self._master.update(hashes)

    def add_reply(self, reply: ProbeReply) -> None:
        """The replica's answer to the last Probe."""
        if self._outstanding is None or len(reply.hashes) != len(self._outstanding):
            raise LocalProtocolError("this reply does not answer the outstanding probe")
        points, self._outstanding = self._outstanding, None
        equal = {lsn: (h is not None and h == self._master[lsn]) for lsn, h in zip(points, reply.hashes)}
        if self._floor in equal:
            self._floor_tested = True
        diffs = [lsn for lsn, eq in equal.items() if not eq]
        if diffs:
            d = min(diffs)
            self._diff = d if self._diff is None else min(self._diff, d)
        eqs = [lsn for lsn, eq in equal.items() if eq and (self._diff is None or lsn < self._diff)]
        if eqs:
            self._eq = max(eqs + ([self._eq] if self._eq is not None else []))
        if self._diff is None:  # the master's last record matches: the replica is ahead
            self._result = self._ahead()
        elif self._eq is None and self._floor_tested:
            self._result = self._diverged(None)
        elif self._eq is not None and self._diff == self._eq + 1:
            self._result = self._diverged(self._eq)


#: :func:`decide_seed` returns this when the master should send a snapshot.
SEED_WITH_SNAPSHOT = _Sentinel("SEED_WITH_SNAPSHOT")


def decide_seed(request: SeedRequest, *, log_id: bytes, first_lsn: int, last_lsn: int, epoch: int,
                hash_before_first: bytes, has_snapshot: bool) -> Accept | Refuse | _Sentinel:
    """REP-10: how to seed a replica with no log.

    Streaming from LSN 1 is the default whenever the master still holds LSN 1
    (and its log starts after the zero hash); otherwise a snapshot, if both
    sides can; otherwise a refusal.
    """
    if first_lsn == 1 and hash_before_first == ZERO_HASH:
        return Accept(log_id, epoch, 1, ZERO_HASH, last_lsn)
    if has_snapshot and request.accepts_snapshot:
        return SEED_WITH_SNAPSHOT
    why = "the master has no snapshot source" if not has_snapshot else "the replica cannot take a snapshot"
    return Refuse("no-seed", f"the master's log starts at LSN {first_lsn}, and {why}", master_lsn=last_lsn)


def answer_probe(probe: Probe, *, first_lsn: int, last_lsn: int, hash_at: Any) -> ProbeReply:
    """REP-8, replica side: hashes at the probed LSNs, None outside ``first_lsn - 1 .. last_lsn``.

    ``hash_at`` is a callable ``lsn -> bytes`` (the driver passes ``Log.hash_at``).
    """
    return ProbeReply(tuple(hash_at(n) if first_lsn - 1 <= n <= last_lsn else None for n in probe.lsns))


def refusal_error(refuse: Refuse, *, position: Position | None = None) -> EngineError:
    """The typed error a replica raises for a master's Refuse (REP-9)."""
    replica_lsn = position.last_lsn if position is not None else 0
    code = refuse.code
    text = f"master refused: {refuse.detail}"
    if code == "auth":
        return AuthenticationError(
            "the master rejected this replica's proof: the replication secrets differ "
            "(compare NODE/replication.secret on both nodes)"
        )
    if code == "diverged":
        return DivergedError(refuse.last_common_lsn, replica_lsn)
    if code == "ahead":
        return ReplicaAheadError(replica_lsn, refuse.master_lsn if refuse.master_lsn is not None else -1)
    if code == "wrong-log":
        return WrongLogError(None, None, text)
    if code == "behind-retention":
        return BehindRetentionError(text)
    if code == "no-seed":
        return SeedUnavailableError(text)
    if code == "unavailable":
        return MasterUnavailableError(text)
    return ReplicationRefusedError(text, code=code)  # pragma: no cover - REFUSE_CODES is closed


def batch_records(records: Iterable[Record], *, max_bytes: int = BATCH_SOFT_MAX_BYTES,
                  max_records: int = MAX_BATCH_RECORDS) -> list[AppendBatch]:
    """Split consecutive records into batches that satisfy REP-11."""
    out: list[AppendBatch] = []
    cur: list[Record] = []
    size = 0
    for r in records:
        if cur and (size + len(r.payload) > max_bytes or len(cur) >= max_records):
            out.append(AppendBatch(tuple(cur)))
            cur, size = [], 0
        cur.append(r)
        size += len(r.payload)
    if cur:
        out.append(AppendBatch(tuple(cur)))
    return out


# -- documentation generated from the table --------------------------------------------


def _input_name(item: Input) -> str:
    return item.__name__


def render_transition_table() -> str:
    """The Markdown table specs/replication.md quotes (kept equal by a test)."""
    lines = ["| state | sender | input | next state |", "|---|---|---|---|"]
    for state, moves in TRANSITIONS.items():
        if not moves:
            lines.append(f"| {state.value} | - | - | - |")
        for (sender, item), nxt in moves.items():
            lines.append(f"| {state.value} | {sender.value} | {_input_name(item)} | {nxt.value} |")
    return "\n".join(lines)


def render_state_diagram() -> str:
    """A Mermaid state diagram of :data:`TRANSITIONS` (Goodbye edges folded into a note)."""
    lines = ["stateDiagram-v2", "    [*] --> HELLO"]
    for state, moves in TRANSITIONS.items():
        for (sender, item), nxt in moves.items():
            if item is Goodbye:
                continue
            lines.append(f"    {state.value} --> {nxt.value}: {sender.value} {_input_name(item)}")
    lines.append("    CLOSED --> [*]")
    lines.append("    note right of CLOSED: Goodbye (either side) from REQUEST onwards also leads here; EOF leads here from any state but ERROR")
    return "\n".join(lines)
