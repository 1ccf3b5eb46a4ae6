"""The log's codec: segment headers, record frames and the record hash (specs/log-format.md).

This module is the one definition of the bytes of a log: the segment header
(LOG-1..LOG-3), the frame (LOG-4) and the chained record hash (LOG-5). The
writer, the readers, the frame walker (:mod:`wal.framewalk`), the seek
reader and the replication protocol (an ``AppendBatch`` carries LOG-4
frames, REP-11) encode and decode frames only through the functions here.
Pure functions over bytes: no files, no clocks.

Frames have two faces. :class:`FrameHeader`, :func:`encode_frame` and
:func:`decode_frame_header` are values for code that reads a frame now and
then. The loops that run once per record use plain tuples: appends
:func:`encode_frame_header` (or :func:`encode_frames` for records made
elsewhere), :func:`record_hash` and :func:`payload_hash`; verify, replay
and the replication wire :func:`decode_frames`, the one frame decoder. The
valid-looking rule of LOG-4 is written in :func:`decode_frames` only (the
single-header functions run it); its chain check computes
:func:`record_hash` inline, from the same hash-input layout. Both faces are
built on the layouts below.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import blake3

__all__ = [
    "FORMAT_VERSION",
    "SEGMENT_MAGIC",
    "SEGMENT_HEADER_SIZE",
    "FRAME_HEADER_SIZE",
    "HASH_SIZE",
    "ZERO_HASH",
    "MAX_PAYLOAD_BYTES",
    "SegmentHeader",
    "FrameHeader",
    "Record",
    "encode_segment_header",
    "decode_segment_header",
    "record_hash",
    "payload_hash",
    "encode_frame",
    "encode_frame_header",
    "encode_frames",
    "decode_frame_header",
    "parse_frame_header",
    "unpack_frame_header",
    "decode_frames",
    "FrameScan",
    "SegmentHeaderError",
]

# LOG-1: segment header, 96 bytes: up to the check field, then the check.
SEGMENT_MAGIC = b"MAILWAL\n"
FORMAT_VERSION = 1
_SEGMENT_HEADER = struct.Struct("<8sHHI16sQQ32sQ")  # magic version header_size - log_id first_lsn - prev_hash -
SEGMENT_HEADER_SIZE = _SEGMENT_HEADER.size + 8
# LOG-3: the part of the header every version keeps: magic, version, header_size.
_VERSION_PREFIX = struct.Struct("<8sHH")
MIN_SEGMENT_HEADER_SIZE = 24  # the prefix, reserved u32, check

# LOG-4: the frame header. The head (payload_len lsn epoch type flags
# batch_back) is what head_crc covers; the record hash follows the CRC.
_FRAME_HEAD_FIELDS = "IQQHHI"
_FRAME_HEAD = struct.Struct("<" + _FRAME_HEAD_FIELDS)
_FRAME_CHECK = struct.Struct("<I32s")  # head_crc, hash
_FRAME_HEADER = struct.Struct("<" + _FRAME_HEAD_FIELDS + "I32s")
_HEAD_SIZE = _FRAME_HEAD.size  # 28
FRAME_HEADER_SIZE = _FRAME_HEADER.size  # 64
HASH_SIZE = 32
ZERO_HASH = bytes(HASH_SIZE)

# LOG-5: blake3 over domain || prev_hash || lsn epoch type payload_len || blake3(payload).
_HASH_DOMAIN = b"mailwal-record-v1\x00"
_CHAIN_INPUT = struct.Struct(f"<{len(_HASH_DOMAIN)}s32sQQHI32s")

# LOG-4: a payload is at most 64 MiB; larger lengths are not valid-looking.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
_MULTITHREAD_PAYLOAD_BYTES = 1 << 20  # blake3 on one thread below this (threads cost more than they save)

_blake3 = blake3.blake3
_crc32 = zlib.crc32
_frame_head_pack = _FRAME_HEAD.pack
_frame_check_pack = _FRAME_CHECK.pack
_frame_header_unpack_from = _FRAME_HEADER.unpack_from
_chain_pack = _CHAIN_INPUT.pack


class SegmentHeaderError(ValueError):
    """The bytes are not a valid segment header (reason in the message)."""


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """LOG-1. ``prev_hash`` is the hash of record ``first_lsn - 1`` (LOG-6)."""

    version: int
    log_id: bytes  # 16 bytes, a UUID
    first_lsn: int
    prev_hash: bytes

    def __post_init__(self) -> None:
        if len(self.log_id) != 16:
            raise ValueError("log_id must be 16 bytes")
        if self.first_lsn < 1:
            raise ValueError("first_lsn must be >= 1")
        if len(self.prev_hash) != HASH_SIZE:
            raise ValueError("prev_hash must be 32 bytes")


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """The fixed 64 bytes in front of every record payload (LOG-4)."""

    payload_len: int
    lsn: int
    epoch: int
    type: int
    flags: int
    batch_back: int
    hash: bytes

    @property
    def frame_size(self) -> int:
        return FRAME_HEADER_SIZE + self.payload_len


@dataclass(frozen=True, slots=True)
class Record:
    """One record as readers see it: verified, never corrupt.

    ``payload`` is the record's CBOR bytes; :func:`wal.codec.loads` decodes it.
    ``hash`` names the whole history up to and including this record (LOG-5).
    """

    lsn: int
    epoch: int
    type: int
    payload: bytes
    hash: bytes

    def __post_init__(self) -> None:
        if self.lsn < 1:
            raise ValueError("lsn must be >= 1")
        if self.epoch < 0 or self.type < 0 or self.type > 0xFFFF:
            raise ValueError("epoch/type out of range")
        if len(self.hash) != HASH_SIZE:
            raise ValueError("hash must be 32 bytes")


def encode_segment_header(h: SegmentHeader) -> bytes:
    body = _SEGMENT_HEADER.pack(
        SEGMENT_MAGIC, h.version, SEGMENT_HEADER_SIZE, 0, h.log_id, h.first_lsn, 0, h.prev_hash, 0
    )
    check = blake3.blake3(body).digest(8)
    return body + check


def decode_segment_header(data: bytes) -> SegmentHeader:
    """Parse a segment header (LOG-1..LOG-3).

    Raises:
        SegmentHeaderError: short, wrong magic, bad check, or unknown version
            (the message says which; version is reported through ``.version``).
    """
    if len(data) < _VERSION_PREFIX.size:
        raise SegmentHeaderError("short segment header")
    # LOG-3: magic, version and header_size, and "the last 8 bytes of the
    # header check the bytes before them", hold for every version, so a
    # header of a version this code does not know can still be told apart
    # from a damaged one.
    magic, version, header_size = _VERSION_PREFIX.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        raise SegmentHeaderError("bad segment magic")
    if header_size < MIN_SEGMENT_HEADER_SIZE:
        raise SegmentHeaderError(f"segment header size {header_size} is impossible")
    if len(data) < header_size:
        raise SegmentHeaderError("short segment header")
    body, check = data[: header_size - 8], data[header_size - 8 : header_size]
    if blake3.blake3(body).digest(8) != check:
        raise SegmentHeaderError("segment header check mismatch")
    if version != FORMAT_VERSION:
        err = SegmentHeaderError(f"unsupported format version {version}")
        err.version = version  # type: ignore[attr-defined]
        raise err
    if header_size != SEGMENT_HEADER_SIZE:
        raise SegmentHeaderError(f"version {version} segment header must be {SEGMENT_HEADER_SIZE} bytes, says {header_size}")
    _m, _v, _hs, _r1, log_id, first_lsn, _r2, prev_hash, _r3 = _SEGMENT_HEADER.unpack(body)
    try:
        return SegmentHeader(version, log_id, first_lsn, prev_hash)
    except ValueError as exc:
        raise SegmentHeaderError(str(exc)) from exc


def payload_hash(payload: bytes | memoryview) -> bytes:
    """blake3 of the payload bytes (32 bytes); ``payload`` may be a memoryview."""
    if len(payload) < _MULTITHREAD_PAYLOAD_BYTES:
        return _blake3(payload).digest()
    return _blake3(payload, max_threads=_blake3.AUTO).digest()


def record_hash(prev_hash: bytes, lsn: int, epoch: int, type_: int, payload_len: int, p_hash: bytes) -> bytes:
    """LOG-5: the chained record hash.

    ``blake3(domain || prev_hash || lsn || epoch || type || payload_len || blake3(payload))``,
    104 bytes hashed, ``p_hash`` being :func:`payload_hash` of the payload.
    """
    return _blake3(_chain_pack(_HASH_DOMAIN, prev_hash, lsn, epoch, type_, payload_len, p_hash)).digest()


def encode_frame_header(payload_len: int, lsn: int, epoch: int, type_: int, batch_back: int, hash_: bytes,
                        flags: int = 0) -> bytes:
    """LOG-4: the 64-byte frame header of a record (its payload follows it)."""
    head = _frame_head_pack(payload_len, lsn, epoch, type_, flags, batch_back)
    return head + _frame_check_pack(_crc32(head), hash_)


def encode_frames(records: Sequence[Record], batch_first_lsn: int) -> list[bytes]:
    """LOG-4: the frames of consecutive records, as pieces (header, payload,
    header, payload...) to join or to write; ``batch_back`` counts from
    ``batch_first_lsn``. The payloads are not copied."""
    pack, check_pack, crc32 = _frame_head_pack, _frame_check_pack, _crc32
    parts: list[bytes] = []
    for r in records:
        payload = r.payload
        head = pack(len(payload), r.lsn, r.epoch, r.type, 0, r.lsn - batch_first_lsn)
        parts += (head + check_pack(crc32(head), r.hash), payload)
    return parts


def encode_frame(lsn: int, epoch: int, type_: int, payload: bytes, hash_: bytes, batch_back: int = 0,
                 flags: int = 0) -> bytes:
    """LOG-4: the on-disk bytes of one record, header then payload."""
    return encode_frame_header(len(payload), lsn, epoch, type_, batch_back, hash_, flags) + payload


def unpack_frame_header(data: bytes | memoryview, offset: int = 0) -> tuple | None:
    """The fields of the 64-byte frame header at ``offset`` whose head CRC matches.

    Returns ``(payload_len, lsn, epoch, type, flags, batch_back, head_crc,
    hash)``, or None when fewer than 64 bytes are left or ``head_crc`` does
    not match. The other fields are not checked: whether the header is
    valid-looking is :func:`decode_frames`' rule (:func:`parse_frame_header`).
    """
    if len(data) - offset < FRAME_HEADER_SIZE:
        return None
    fields = _frame_header_unpack_from(data, offset)
    if _crc32(data[offset : offset + _HEAD_SIZE]) != fields[6]:
        return None
    return fields


class FrameScan:
    """The state of :func:`decode_frames`: the chain it checks, and where and why it stopped.

    Before a call: ``lsn`` and ``prev`` (the hash of record ``lsn - 1``)
    make it check that each frame carries the next LSN and that its record
    hash chains on (LOG-5); with ``prev`` None it only decodes. Both advance
    past every frame yielded, so the next call (on more bytes) goes on.

    After the iteration ended (not after a consumer stopped it early):
    ``offset`` is where the frame it stopped at starts (or the end of the
    range), relative to the buffer; ``need`` > 0 when that frame continues
    past the range (bytes missing); ``header`` is its header's fields when
    they are valid-looking; ``bad_header`` says they are not; ``reason``
    says why the frame failed the chain check ("frame has LSN ..., expected
    ...", "record hash mismatch"), else None.
    """

    __slots__ = ("lsn", "prev", "offset", "need", "header", "bad_header", "reason")

    def __init__(self, lsn: int = 0, prev: bytes | None = None) -> None:
        self.lsn = lsn
        self.prev = prev
        self.offset = 0
        self.need = 0
        self.header: tuple | None = None
        self.bad_header = False
        self.reason: str | None = None


def decode_frames(buf: bytes | memoryview, pos: int, end: int, scan: FrameScan, base: int = 0) -> Iterator[tuple]:
    """Decode the consecutive frames of ``buf[pos:end]`` (LOG-4): the one frame decoder.

    Yields ``(base + offset, payload_len, lsn, epoch, type, batch_back,
    hash, payload)`` for each frame whose header is *valid-looking* (all 64
    bytes present, head CRC matches, ``payload_len`` at most 64 MiB, ``lsn``
    at least 1, ``flags`` 0, ``batch_back`` below ``lsn``) and whose payload
    is complete in the range; ``payload`` is a slice of ``buf`` (a
    memoryview when ``buf`` is one: use or copy it before ``buf`` goes).
    Stops at the first frame that is not, or that fails the chain check
    ``scan`` asks for, and records in ``scan`` where and why. Segment files
    (:mod:`wal.framewalk`) and replication batches (REP-11) are read with it.
    """
    lsn, prev = scan.lsn, scan.prev
    verify = prev is not None
    scan.need, scan.header, scan.bad_header, scan.reason = 0, None, False, None
    unpack, crc32, head_size, max_payload = _frame_header_unpack_from, _crc32, _HEAD_SIZE, MAX_PAYLOAD_BYTES
    b3, chain_pack, domain, multi = _blake3, _chain_pack, _HASH_DOMAIN, _MULTITHREAD_PAYLOAD_BYTES
    while True:
        left = end - pos
        if left < FRAME_HEADER_SIZE:
            if left:
                scan.need = FRAME_HEADER_SIZE - left
            break
        fields = unpack(buf, pos)
        plen, f_lsn, epoch, type_, flags, back, crc, hash_ = fields
        if crc32(buf[pos : pos + head_size]) != crc or plen > max_payload or f_lsn < 1 or flags != 0 or back >= f_lsn:
            scan.bad_header = True
            break
        nxt = pos + FRAME_HEADER_SIZE + plen
        if nxt > end:
            scan.need, scan.header = nxt - end, fields
            break
        payload = buf[pos + FRAME_HEADER_SIZE : nxt]
        if verify:
            if f_lsn != lsn:
                scan.header, scan.reason = fields, f"frame has LSN {f_lsn}, expected {lsn}"
                break
            ph = b3(payload).digest() if plen < multi else b3(payload, max_threads=b3.AUTO).digest()
            if b3(chain_pack(domain, prev, lsn, epoch, type_, plen, ph)).digest() != hash_:
                scan.header, scan.reason = fields, "record hash mismatch"
                break
            prev = hash_
            lsn += 1
        yield base + pos, plen, f_lsn, epoch, type_, back, hash_, payload
        pos = nxt
    scan.offset, scan.lsn, scan.prev = pos, lsn, prev


def parse_frame_header(data: bytes | memoryview, offset: int = 0) -> tuple | None:
    """The fields of the frame header at ``offset`` (as :func:`unpack_frame_header`
    gives them) if it is valid-looking (:func:`decode_frames`' rule), else None.

    The payload need not follow; it and the record hash are not checked.
    """
    scan = FrameScan()
    for _frame in decode_frames(data, offset, min(len(data), offset + FRAME_HEADER_SIZE), scan):
        return _frame_header_unpack_from(data, offset)  # a frame with an empty payload
    return scan.header


def decode_frame_header(data: bytes | memoryview, offset: int = 0) -> FrameHeader | None:
    """The valid-looking frame header at ``offset`` as a :class:`FrameHeader`, else None
    (see :func:`parse_frame_header`)."""
    fields = parse_frame_header(data, offset)
    if fields is None:
        return None
    payload_len, lsn, epoch, type_, flags, batch_back, _crc, hash_ = fields
    return FrameHeader(payload_len, lsn, epoch, type_, flags, batch_back, hash_)
