"""Walking the frames of a segment file: big reads, the codec's decoder, no per-frame objects.

:func:`walk_frames` and :func:`verified_frames` are what :func:`wal.segment.scan_segment`
(and so ``verify`` and recovery) and :meth:`wal.LogReader.records` spend their
time in. The frame layout, the valid-looking rule (LOG-4, LOG-8) and the
record hash chain (LOG-5) are :mod:`wal.format`'s: frames are decoded by
:func:`wal.format.decode_frames`, the same decoder that reads replication
batches. This module only reads the file: a segment is read in 1 MiB
chunks (:data:`CHUNK_BYTES`); the decoder works on a memoryview of each,
so a frame costs no copy and no object but the tuple handed out.
"""

from __future__ import annotations

import os
from typing import Iterator

from .format import FRAME_HEADER_SIZE, FrameScan, decode_frames

__all__ = ["walk_frames", "verified_frames", "WalkStop", "CHUNK_BYTES"]

CHUNK_BYTES = 1 << 20


def walk_frames(path: str, start_offset: int, end_offset: int | None = None) -> Iterator[tuple]:
    """Yield ``(offset, payload_len, lsn, epoch, type, batch_back, hash, payload)``
    for each complete, valid-looking frame (LOG-8) from ``start_offset``.

    ``payload`` is a memoryview into a read buffer: use or copy it before the
    next step. Stops quietly at the first frame that is incomplete or not
    valid-looking, or at ``end_offset`` (default: the file size when opened);
    hashes are not checked here (see :func:`verified_frames`).
    """
    return _frames(path, start_offset, end_offset, FrameScan(), None)


class WalkStop:
    """Why :func:`verified_frames` stopped early (``reason`` None: it ran out of
    complete, valid-looking frames, or reached its end offset)."""

    __slots__ = ("reason",)

    def __init__(self) -> None:
        self.reason: str | None = None


def verified_frames(path: str, start_offset: int, lsn: int, prev: bytes, stop: WalkStop,
                    end_offset: int | None = None) -> Iterator[tuple]:
    """Yield ``(offset, payload_len, lsn, epoch, type, batch_back, hash, payload)``
    for each frame from ``start_offset`` that is valid-looking (LOG-8),
    carries the next LSN (``lsn``, then ``lsn + 1``...) and whose record
    hash chains onto ``prev`` (LOG-5).

    ``payload`` is a memoryview into the read buffer: use or copy it before
    the next step. At a frame that fails its LSN or hash it sets
    ``stop.reason`` and ends; at an incomplete or not valid-looking frame it
    ends with ``stop.reason`` None (callers classify, LOG-8).
    """
    return _frames(path, start_offset, end_offset, FrameScan(lsn, prev), stop)


def _frames(path: str, start_offset: int, end_offset: int | None, scan: FrameScan,
            stop: WalkStop | None) -> Iterator[tuple]:
    """Decode the file's frames from ``start_offset`` chunk by chunk (see
    :func:`walk_frames`); at the end, ``stop.reason`` is the chain failure, if any."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size if end_offset is None else end_offset
        f.seek(start_offset)
        data = b""
        base = start_offset  # the file offset of data[0]
        pos = 0
        while True:
            yield from decode_frames(memoryview(data), pos, len(data), scan, base)
            if scan.reason is not None and stop is not None:
                stop.reason = scan.reason
            if scan.bad_header or scan.reason is not None:
                return
            # The frame at scan.offset continues past the buffer (or the buffer is used up).
            pos = scan.offset
            left_in_range = size - (base + pos)
            buffered = len(data) - pos
            if left_in_range <= buffered:
                return  # the range holds no more: an incomplete frame, or the end
            need = max(buffered + scan.need, FRAME_HEADER_SIZE)
            data = _refill(f, data, pos, need, left_in_range)
            base += pos
            pos = 0
            if len(data) == buffered:
                return  # the file ended before the range did (it shrank)


def _refill(f, data: bytes, pos: int, need: int, left_in_range: int) -> bytes:
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
    return b"".join(parts) if len(parts) > 1 else keep
