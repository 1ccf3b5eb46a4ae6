"""Byte layouts of segment headers and record frames (specs/log-format.md).

Pure functions over bytes: no files, no clocks. Every constant and layout
here is normative in ``specs/log-format.md``; the section is cited beside it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

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
    "decode_frame_header",
    "SegmentHeaderError",
]

# LOG-1: segment header, 96 bytes.
SEGMENT_MAGIC = b"MAILWAL\n"
FORMAT_VERSION = 1
SEGMENT_HEADER_SIZE = 96
_SEGMENT_HEADER = struct.Struct("<8sHHI16sQQ32sQ")  # up to the check field
assert _SEGMENT_HEADER.size == 88
# LOG-3: the part of the header every version keeps: magic, version, header_size.
_VERSION_PREFIX = struct.Struct("<8sHH")
MIN_SEGMENT_HEADER_SIZE = 24  # the prefix, reserved u32, check

# LOG-4: frame header, 64 bytes.
FRAME_HEADER_SIZE = 64
_FRAME_HEAD = struct.Struct("<IQQHHI")  # payload_len lsn epoch type flags batch_back
assert _FRAME_HEAD.size == 28
_HEAD_CRC = struct.Struct("<I")
HASH_SIZE = 32
ZERO_HASH = bytes(HASH_SIZE)

# LOG-5: the fields the record hash covers besides the hashes.
_HASHED_FIELDS = struct.Struct("<QQHI")  # lsn epoch type payload_len
_HASH_DOMAIN = b"mailwal-record-v1\x00"

# LOG-4: a payload is at most 64 MiB; larger lengths are not valid-looking.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024


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


def payload_hash(payload: bytes) -> bytes:
    """blake3 of the payload bytes (32 bytes)."""
    return blake3.blake3(payload, max_threads=1 if len(payload) < 1 << 20 else blake3.blake3.AUTO).digest()


def record_hash(prev_hash: bytes, lsn: int, epoch: int, type_: int, payload_len: int, p_hash: bytes) -> bytes:
    """LOG-5: the chained record hash.

    ``blake3(domain || prev_hash || lsn || epoch || type || payload_len || blake3(payload))``
    """
    return blake3.blake3(
        _HASH_DOMAIN + prev_hash + _HASHED_FIELDS.pack(lsn, epoch, type_, payload_len) + p_hash
    ).digest()


def encode_frame(lsn: int, epoch: int, type_: int, payload: bytes, hash_: bytes, batch_back: int = 0, flags: int = 0) -> bytes:
    """LOG-4: the on-disk bytes of one record."""
    head = _FRAME_HEAD.pack(len(payload), lsn, epoch, type_, flags, batch_back)
    return head + _HEAD_CRC.pack(zlib.crc32(head)) + hash_ + payload


def decode_frame_header(data: bytes | memoryview, offset: int = 0) -> FrameHeader | None:
    """Parse the 64-byte frame header at ``offset``.

    Returns None when the header is not *valid-looking* (LOG-8): too short, its
    head CRC does not match, or it declares an impossible payload length. The
    payload and record hash are not checked here.
    """
    if len(data) - offset < FRAME_HEADER_SIZE:
        return None
    head = bytes(data[offset : offset + 28])
    (crc,) = _HEAD_CRC.unpack_from(data, offset + 28)
    if zlib.crc32(head) != crc:
        return None
    payload_len, lsn, epoch, type_, flags, batch_back = _FRAME_HEAD.unpack(head)
    if payload_len > MAX_PAYLOAD_BYTES or lsn < 1 or flags != 0 or batch_back >= lsn:
        return None
    hash_ = bytes(data[offset + 32 : offset + 64])
    return FrameHeader(payload_len, lsn, epoch, type_, flags, batch_back, hash_)
