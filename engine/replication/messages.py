"""Replication wire messages and their limits (REP-1, REP-2, REP-3), sans I/O.

Every message is a frozen dataclass that validates itself when built, so an
invalid message cannot exist (a bad field raises
:class:`~engine.errors.LocalProtocolError`). :class:`AppendBatch` carries
records as the log's own LOG-4 frames (:mod:`wal`'s frame codec), so the
replica appends exactly the bytes the master's log holds. Events that are not
wire messages (:class:`AuthFailed`, :class:`ConnectionClosed`) are here too.
The byte encoding of a whole frame is :mod:`.codec`; the state machine is
:mod:`.transitions` and :mod:`.session`.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Union

from wal import FRAME_HEADER_SIZE as LOG_FRAME_HEADER_BYTES
from wal import (
    HASH_SIZE,
    MAX_PAYLOAD_BYTES,
    FrameScan,
    Record,
    decode_frames,
    encode_frames,
    unpack_frame_header,
)

from ..errors import LocalProtocolError

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



class _Sentinel:
    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name



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
