"""The fast path for reading frames: big reads, one unpack per frame, no per-frame objects.

:func:`walk_frames` and :func:`verify_hash` are what :func:`wal.segment.scan_segment`
(and so ``verify`` and recovery) and :meth:`wal.LogReader.records` spend their
time in. They implement exactly the rules of :mod:`wal.format` (LOG-4, LOG-5,
LOG-8), which stays the normative, readable version; the module checks at
import that both compute the same record hash.

Why a separate path: reading a 64-byte header and then the payload with two
``read`` calls, building a :class:`~wal.format.FrameHeader` per frame and
concatenating the hash input piece by piece cost more than the hashing itself.
Here a segment is read in 1 MiB chunks, each header is unpacked with one
``struct`` call, payloads are hashed straight from a memoryview of the chunk,
and the chained-hash input is packed in one call.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Iterator

import blake3

from .format import (
    _HASH_DOMAIN,
    FRAME_HEADER_SIZE,
    MAX_PAYLOAD_BYTES,
    ZERO_HASH,
    encode_frame,
    payload_hash,
    record_hash,
)

__all__ = ["walk_frames", "verified_frames", "WalkStop", "verify_hash", "payload_digest", "chain_hash", "frame_head", "CHUNK_BYTES"]

CHUNK_BYTES = 1 << 20

# LOG-4: payload_len lsn epoch type flags batch_back | head CRC | record hash.
_FRAME = struct.Struct("<IQQHHII32s")
assert _FRAME.size == FRAME_HEADER_SIZE
# LOG-5: domain || prev_hash || lsn epoch type payload_len || blake3(payload).
_CHAIN = struct.Struct(f"<{len(_HASH_DOMAIN)}s32sQQHI32s")
# LOG-4 again, for writing: the head's 28 bytes, then CRC and record hash.
_HEAD = struct.Struct("<IQQHHI")
_CRC_HASH = struct.Struct("<I32s")
_SMALL_PAYLOAD = 1 << 20  # below this, blake3 on one thread (what payload_hash does too)

_blake3 = blake3.blake3
_crc32 = zlib.crc32
_unpack_from = _FRAME.unpack_from
_chain_pack = _CHAIN.pack
_head_pack = _HEAD.pack
_crc_hash_pack = _CRC_HASH.pack


def payload_digest(payload) -> bytes:
    """blake3 of a payload given as bytes or a memoryview (same as :func:`wal.format.payload_hash`)."""
    return _blake3(payload).digest() if len(payload) < _SMALL_PAYLOAD else payload_hash(bytes(payload))


def chain_hash(prev: bytes, lsn: int, epoch: int, type_: int, payload_len: int, p_hash: bytes) -> bytes:
    """LOG-5, as :func:`wal.format.record_hash`, packing the input in one call."""
    return _blake3(_chain_pack(_HASH_DOMAIN, prev, lsn, epoch, type_, payload_len, p_hash)).digest()


def verify_hash(prev: bytes, lsn: int, epoch: int, type_: int, payload) -> bytes:
    """The record hash (LOG-5) of a payload given as bytes or a memoryview."""
    n = len(payload)
    ph = _blake3(payload).digest() if n < _SMALL_PAYLOAD else payload_hash(bytes(payload))
    return _blake3(_chain_pack(_HASH_DOMAIN, prev, lsn, epoch, type_, n, ph)).digest()


def frame_head(payload_len: int, lsn: int, epoch: int, type_: int, batch_back: int, hash_: bytes) -> bytes:
    """The 64-byte frame header of a record (LOG-4), as :func:`wal.format.encode_frame`
    writes it in front of the payload (flags 0)."""
    head = _head_pack(payload_len, lsn, epoch, type_, 0, batch_back)
    return head + _crc_hash_pack(_crc32(head), hash_)


# The fast hashes and header must be the normative ones, bit for bit.
assert payload_digest(memoryview(b"abc")) == payload_hash(b"abc")
assert chain_hash(ZERO_HASH, 7, 3, 2, 3, payload_hash(b"abc")) == record_hash(ZERO_HASH, 7, 3, 2, 3, payload_hash(b"abc"))
assert verify_hash(ZERO_HASH, 7, 3, 2, b"abc") == record_hash(ZERO_HASH, 7, 3, 2, 3, payload_hash(b"abc"))
assert frame_head(3, 7, 3, 2, 5, b"h" * 32) + b"abc" == encode_frame(7, 3, 2, b"abc", b"h" * 32, batch_back=5)


def walk_frames(path: str, start_offset: int, end_offset: int | None = None) -> Iterator[tuple]:
    """Yield ``(offset, payload_len, lsn, epoch, type, batch_back, hash, payload)``
    for each complete, valid-looking frame (LOG-8) from ``start_offset``.

    ``payload`` is a memoryview into a read buffer: use or copy it before the
    next step. Stops quietly at the first frame that is incomplete or not
    valid-looking, or at ``end_offset`` (default: the file size when opened);
    hashes are not checked here (see :func:`verify_hash`).
    """
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size if end_offset is None else end_offset
        f.seek(start_offset)
        data = b""
        view = memoryview(data)
        pos = 0  # position in data of the frame at ``offset``
        offset = start_offset
        while offset + FRAME_HEADER_SIZE <= size:
            if pos + FRAME_HEADER_SIZE > len(data):
                data, view, pos = _refill(f, data, pos, FRAME_HEADER_SIZE, size - offset)
                if len(data) < FRAME_HEADER_SIZE:
                    return
            plen, lsn, epoch, type_, flags, batch_back, crc, hash_ = _unpack_from(data, pos)
            if (
                _crc32(view[pos : pos + 28]) != crc
                or plen > MAX_PAYLOAD_BYTES
                or lsn < 1
                or flags != 0
                or batch_back >= lsn
            ):
                return
            frame_size = FRAME_HEADER_SIZE + plen
            if offset + frame_size > size:
                return
            if pos + frame_size > len(data):
                data, view, pos = _refill(f, data, pos, frame_size, size - offset)
                if len(data) < frame_size:
                    return
            yield offset, plen, lsn, epoch, type_, batch_back, hash_, view[pos + FRAME_HEADER_SIZE : pos + frame_size]
            pos += frame_size
            offset += frame_size



class WalkStop:
    """Why :func:`verified_frames` stopped early (``reason`` None: it ran out of
    complete, valid-looking frames, or reached its end offset)."""

    __slots__ = ("reason",)

    def __init__(self) -> None:
        self.reason: str | None = None


def verified_frames(path: str, start_offset: int, lsn: int, prev: bytes, stop: WalkStop,
                    end_offset: int | None = None) -> Iterator[tuple]:
    """Yield ``(offset, payload_len, lsn, epoch, type, hash, payload)`` for each
    frame from ``start_offset`` that is valid-looking (LOG-8), carries the next
    LSN (``lsn``, then ``lsn + 1``...) and whose record hash chains onto
    ``prev`` (LOG-5).

    The loop :func:`wal.segment.scan_segment` (verify, recovery) and
    :meth:`wal.LogReader.records` (replay) spend their time in: one ``struct``
    unpack and two blake3 calls per frame, no per-frame objects but the
    yielded tuple. ``payload`` is a memoryview into the read buffer: use or
    copy it before the next step. At a frame that fails its LSN or hash it
    sets ``stop.reason`` and ends; at an incomplete or not valid-looking
    frame it ends with ``stop.reason`` None (callers classify, LOG-8).
    """
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size if end_offset is None else end_offset
        f.seek(start_offset)
        data = b""
        view = memoryview(data)
        pos = 0  # position in data of the frame at ``offset``
        offset = start_offset
        have = 0  # len(data)
        while offset + FRAME_HEADER_SIZE <= size:
            if pos + FRAME_HEADER_SIZE > have:
                data, view, pos = _refill(f, data, pos, FRAME_HEADER_SIZE, size - offset)
                have = len(data)
                if have < FRAME_HEADER_SIZE:
                    return
            plen, f_lsn, epoch, type_, flags, batch_back, crc, hash_ = _unpack_from(data, pos)
            if (
                _crc32(view[pos : pos + 28]) != crc
                or plen > MAX_PAYLOAD_BYTES
                or f_lsn < 1
                or flags != 0
                or batch_back >= f_lsn
            ):
                return
            end = pos + FRAME_HEADER_SIZE + plen
            if offset + FRAME_HEADER_SIZE + plen > size:
                return
            if end > have:
                data, view, pos = _refill(f, data, pos, FRAME_HEADER_SIZE + plen, size - offset)
                have = len(data)
                end = pos + FRAME_HEADER_SIZE + plen
                if end > have:
                    return
            if f_lsn != lsn:
                stop.reason = f"frame has LSN {f_lsn}, expected {lsn}"
                return
            payload = view[pos + FRAME_HEADER_SIZE : end]
            ph = _blake3(payload).digest() if plen < _SMALL_PAYLOAD else payload_hash(bytes(payload))
            if _blake3(_chain_pack(_HASH_DOMAIN, prev, lsn, epoch, type_, plen, ph)).digest() != hash_:
                stop.reason = "record hash mismatch"
                return
            yield offset, plen, lsn, epoch, type_, hash_, payload
            prev = hash_
            lsn += 1
            offset += FRAME_HEADER_SIZE + plen
            pos = end

def _refill(f, data: bytes, pos: int, need: int, left_in_range: int) -> tuple[bytes, memoryview, int]:
    """Keep ``data[pos:]`` and read on, so that at least ``need`` bytes are
    buffered (if the file and range hold them); never reads past the range."""
    keep = data[pos:]
    want = min(max(CHUNK_BYTES, need), left_in_range) - len(keep)
    parts = [keep]
    while want > 0:
        chunk = f.read(want)
        if not chunk:
            break
        parts.append(chunk)
        want -= len(chunk)
    data = b"".join(parts) if len(parts) > 1 else keep
    return data, memoryview(data), 0
