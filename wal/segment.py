"""Segment files: naming, creation, and scanning a segment's records.

Theory of operation
-------------------
A segment is one file ``<first_lsn:020d>.seg`` in the log directory. It is
created complete-or-absent (LOG-2): its header is written by atomic
replace (:meth:`wal.FileOps.write_file_atomic`: ``.NAME.tmp``, fdatasync,
rename, directory fsync). Records are appended in batches; a batch never
spans two segments, and a segment is fdatasynced before the next one is
created, so only the *last* segment can hold a torn write, and only in its
*last batch* (LOG-8).

:func:`scan_segment` walks the frames of one segment, verifying each record
hash against the chain, and classifies the first failure it meets:

* in any segment but the last: corruption;
* in the last segment: a torn tail when nothing after the failure belongs to
  a later write batch (LOG-8), otherwise corruption (LOG-9).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .errors import CorruptRecordError, UnsupportedVersionError
from .fileops import FileOps
from .framewalk import WalkStop, verified_frames, walk_frames
from .format import (
    FRAME_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    FrameHeader,
    Record,
    SegmentHeader,
    SegmentHeaderError,
    decode_frame_header,
    decode_segment_header,
    encode_segment_header,
)

__all__ = [
    "segment_name",
    "list_segments",
    "create_segment",
    "read_segment_header",
    "scan_segment",
    "iter_frames",
    "SegmentScan",
    "TornTail",
    "INDEX_STRIDE",
]

_NAME_RE = re.compile(r"^(\d{20})\.seg$")
INDEX_STRIDE = 64  # one sparse index entry per this many records


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}.seg"


def list_segments(directory: str) -> list[tuple[int, str]]:
    """(first_lsn, file name) of every segment, ascending."""
    out = []
    for name in os.listdir(directory):
        m = _NAME_RE.match(name)
        if m:
            out.append((int(m.group(1)), name))
    out.sort()
    return out


def create_segment(ops: FileOps, directory: str, header: SegmentHeader) -> str:
    """LOG-2: create a segment holding only its header, by atomic replace
    (``.NAME.tmp``, fdatasync, rename, directory fsync); returns its name."""
    name = segment_name(header.first_lsn)
    ops.write_file_atomic(os.path.join(directory, name), encode_segment_header(header))
    return name


def read_segment_header(path: str) -> SegmentHeader:
    """Read and check a segment header.

    Raises:
        CorruptRecordError: the header is short, has a bad magic or check.
        UnsupportedVersionError: the header names an unknown format version (LOG-3).
    """
    with open(path, "rb") as f:
        data = f.read(SEGMENT_HEADER_SIZE)
        if len(data) >= 12:  # LOG-3: another version may have a longer header
            header_size = struct.unpack_from("<H", data, 10)[0]
            if header_size > len(data):
                data += f.read(header_size - len(data))
    try:
        return decode_segment_header(data)
    except SegmentHeaderError as exc:
        version = getattr(exc, "version", None)
        if version is not None:
            raise UnsupportedVersionError(os.path.basename(path), version) from exc
        raise CorruptRecordError(os.path.basename(path), 0, None, str(exc)) from exc


@dataclass(frozen=True)
class TornTail:
    """Bytes after the last good record of the last segment (LOG-8)."""

    segment: str
    offset: int
    size: int
    reason: str


@dataclass
class SegmentScan:
    """What a scan learned about one segment."""

    name: str
    header: SegmentHeader
    end_offset: int  # end of the last good record (== file size unless torn)
    last_lsn: int  # first_lsn - 1 when the segment holds no record
    last_hash: bytes
    file_size: int
    torn: TornTail | None = None
    index: list[tuple[int, int]] = field(default_factory=list)  # sparse (lsn, offset)
    records: int = 0


def scan_segment(
    path: str,
    *,
    expected_first_lsn: int | None,
    expected_prev_hash: bytes | None,
    log_id: bytes | None,
    is_last: bool,
    on_record: Callable[[Record], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> SegmentScan:
    """Verify every record of one segment, in bounded memory.

    Args:
        expected_first_lsn / expected_prev_hash: what the chain so far requires
            of this segment's header (None: take the header's word).
        log_id: the log's id (None: take the header's word).
        is_last: whether this is the log's last segment (only it may be torn).
        on_record: called with each verified record, in order.
        on_bytes: called with the number of bytes consumed (progress).

    Returns:
        The scan; ``torn`` is set when the tail is a torn write (LOG-8).

    Raises:
        CorruptRecordError: damage that is not a torn tail (LOG-9).
        UnsupportedVersionError: unknown format version (LOG-3).
    """
    name = os.path.basename(path)
    header = read_segment_header(path)
    if log_id is not None and header.log_id != log_id:
        raise CorruptRecordError(name, 0, None, "segment belongs to another log (log id differs)")
    if expected_first_lsn is not None and header.first_lsn != expected_first_lsn:
        raise CorruptRecordError(
            name, 0, expected_first_lsn,
            f"segment starts at LSN {header.first_lsn}, chain expects {expected_first_lsn}",
        )
    if expected_prev_hash is not None and header.prev_hash != expected_prev_hash:
        raise CorruptRecordError(name, 0, header.first_lsn, "segment header prev_hash breaks the hash chain")
    file_size = os.path.getsize(path)
    scan = SegmentScan(
        name=name, header=header, end_offset=SEGMENT_HEADER_SIZE, last_lsn=header.first_lsn - 1,
        last_hash=header.prev_hash, file_size=file_size,
    )
    offset = SEGMENT_HEADER_SIZE
    prev = header.prev_hash
    records = 0
    index = scan.index
    stop = WalkStop()
    frames = verified_frames(path, offset, header.first_lsn, prev, stop, file_size)
    if on_record is None and on_bytes is None:  # verify and recovery: the bare loop
        for off, plen, lsn, _epoch, _type, _back, hash_, _payload in frames:
            if records % INDEX_STRIDE == 0:
                index.append((lsn, off))
            records += 1
            offset = off + FRAME_HEADER_SIZE + plen
            prev = hash_
    else:
        for off, plen, lsn, epoch, type_, _back, hash_, payload in frames:
            if records % INDEX_STRIDE == 0:
                index.append((lsn, off))
            if on_record is not None:
                on_record(Record(lsn, epoch, type_, bytes(payload), hash_))
            records += 1
            offset = off + FRAME_HEADER_SIZE + plen
            if on_bytes is not None:
                on_bytes(FRAME_HEADER_SIZE + plen)
            prev = hash_
    expected = header.first_lsn + records
    failure = stop.reason
    if failure is None and offset < file_size:
        failure = _frame_failure(path, offset, expected, file_size)
    scan.records = records
    if records:
        scan.end_offset = offset
        scan.last_lsn = expected - 1
        scan.last_hash = prev
    if failure is not None:
        torn_reason = _classify_failure(path, offset, expected, file_size) if is_last else None
        if torn_reason is None:
            raise CorruptRecordError(name, offset, expected, failure)
        scan.torn = TornTail(name, offset, file_size - offset, f"{failure}; {torn_reason}")
    return scan


def _frame_failure(path: str, offset: int, expected_lsn: int, file_size: int) -> str:
    """Why the frame at ``offset`` cannot be read (walk_frames stopped there quietly)."""
    with open(path, "rb") as f:
        f.seek(offset)
        head = f.read(FRAME_HEADER_SIZE)
    fh = decode_frame_header(head)
    if len(head) < FRAME_HEADER_SIZE:
        return "incomplete frame header"
    if fh is None:
        return "frame header check failed"
    if fh.lsn != expected_lsn:
        return f"frame has LSN {fh.lsn}, expected {expected_lsn}"
    if offset + fh.frame_size > file_size:
        return "frame extends past end of file"
    return "frame unreadable"  # the file changed while it was being read


def _classify_failure(path: str, offset: int, expected_lsn: int, file_size: int) -> str | None:
    """LOG-8: decide whether the bytes from ``offset`` on are a torn last batch.

    Returns a reason string when they are a torn tail, None when they are
    corruption: some valid-looking frame after the failure belongs to a write
    batch that started after ``expected_lsn``, which proves the batch holding
    ``expected_lsn`` was complete and synced before.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read(file_size - offset)
    if not tail.strip(b"\x00"):
        return "zero-filled tail"
    found = False
    for fh in _valid_looking_frames(tail, expected_lsn):
        batch_first = fh.lsn - fh.batch_back
        if batch_first > expected_lsn:
            return None
        found = True
    if found:
        return "valid-looking frames after it belong to the same unsynced batch"
    return "no valid-looking frame follows"


RESYNC_WINDOW = 4096 // FRAME_HEADER_SIZE + 2
"""LOG-8: how many LSNs after the failing one the classification looks for
(66). Damage of up to 4096 bytes touches at most 65 frame headers (64 whole
ones and parts of two), so it cannot hide every frame after it."""


def _valid_looking_frames(tail: bytes, expected_lsn: int) -> Iterator[FrameHeader]:
    """Valid-looking frame headers found in ``tail`` (LOG-8), lazily.

    For each LSN from ``expected_lsn`` to ``expected_lsn + RESYNC_WINDOW``
    not yet seen, finds the first valid-looking header carrying it (its
    8-byte LSN field sits 4 bytes into the header), then follows frame
    lengths onward while the LSNs stay consecutive. Every chain is followed,
    so damage that destroys several consecutive headers still lets the
    frames after it be found.
    """
    seen_lsns: set[int] = set()
    walked: set[int] = set()
    for lsn in range(expected_lsn, expected_lsn + RESYNC_WINDOW + 1):
        if lsn in seen_lsns:
            continue
        needle = struct.pack("<Q", lsn)
        pos = tail.find(needle, 4)
        while pos != -1:
            fh = decode_frame_header(tail, pos - 4)
            if fh is not None and fh.lsn == lsn:
                break
            pos = tail.find(needle, pos + 1)
        if pos == -1:
            continue
        at, prev_lsn = pos - 4, None
        while at < len(tail) and at not in walked:
            fh = decode_frame_header(tail, at)
            if fh is None or (prev_lsn is not None and fh.lsn != prev_lsn + 1):
                break
            walked.add(at)
            seen_lsns.add(fh.lsn)
            yield fh
            prev_lsn = fh.lsn
            at += fh.frame_size


def iter_frames(path: str, start_offset: int, end_offset: int | None = None) -> Iterator[tuple[int, FrameHeader, bytes]]:
    """Yield (offset, header, payload) from ``start_offset`` without verifying hashes.

    Stops quietly at the first frame that is incomplete or not valid-looking:
    callers verify hashes themselves and decide what a stop means.
    """
    for offset, plen, lsn, epoch, type_, batch_back, hash_, payload in walk_frames(path, start_offset, end_offset):
        yield offset, FrameHeader(plen, lsn, epoch, type_, 0, batch_back, hash_), bytes(payload)
