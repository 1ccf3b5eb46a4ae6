"""Read single records of a log by LSN without scanning segments (LOG-4, LOG-8, LOG-11).

Theory of operation
-------------------
A :class:`SeekReader` finds the frame of an LSN without reading the segment
from its start and without reading long payloads: what it reads does not
grow with the sizes of the messages. Where records are small it *probes*:
an interpolation/bisection search over byte offsets of the segment file,
resynchronising on frame headers. Where they are large it *walks*: from a
known frame start, it follows frame lengths, reading each 64-byte header
(LOG-4) and seeking over the payload. A lookup reads O(log n) small records,
or the headers of at most one segment's large records; never the prefix,
and never a payload longer than 64 KiB. The record hash is in the frame
header, so the hash at an LSN costs one header once its frame is found:
this is what the fork search (:mod:`wal.fork`) and the epoch history
(:mod:`wal.history`) probe.

A frame found by resynchronisation is accepted only if its header check
passes, its LSN lies in the possible range, and the next frame's hash
chains onto it (or it is the last record of a non-final segment whose
successor's header names its hash). Walking from a segment start or from
an accepted frame is exact, and a header on the way that fails its check is
damage (:class:`CorruptRecordError` with segment, offset and LSN), never
stepped over. The end of a log is its last record whose hash verifies: its
payload is read, as only that tells a complete record from a torn write
(LOG-8). Reading records forward from a found frame verifies every hash of
the chain, like :class:`wal.LogReader`.

Read-only and lock-free: it works on a directory no one holds or another
process writes (LOG-11), and never writes a byte.
"""

from __future__ import annotations

import bisect
import os
import re
import uuid
from typing import Callable, Iterator

from .errors import CorruptRecordError, LsnNotAvailableError, UnsupportedVersionError, WalError
from .format import (
    FRAME_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    ZERO_HASH,
    FrameHeader,
    Record,
    SegmentHeader,
    SegmentHeaderError,
    decode_frame_header,
    decode_segment_header,
    payload_hash,
    record_hash,
)
from .segment import _classify_failure, list_segments

__all__ = ["SeekReader"]

# SeekReader tuning (see "locating" in SeekReader). A probe reads about one
# window; walking from an exact frame start is cheaper than another probe
# below these bounds.
_SCAN_WINDOW_BYTES = 1024  # first window; doubles (to 64 KiB) while nothing is found
_SCAN_WINDOW_MAX_BYTES = 64 * 1024
_SCAN_BUDGET_BYTES = 64 * 1024  # a probe's scan gives up after reading this much
_VERIFY_MAX_BYTES = 64 * 1024  # the longest successor payload a probe reads to accept a frame
_WALK_MAX_RECORDS = 32
_WALK_MAX_BYTES = 8 * 1024
_WALK_COST_FACTOR = 4  # walk when its headers cost at most this many average frames (2-3 probes)
_WALK_AFTER_GIVING_UP_BYTES = 256 * 1024  # after a probe gave up: walk if its headers cost at most this
_END_WINDOWS_BYTES = (2 * 1024, 8 * 1024, 32 * 1024)  # last(): look for a frame this near the end first
_STREAM_BUFFER_BYTES = 1 << 20
_NONZERO = re.compile(rb"[^\x00]")
_STREAM_ANCHOR_EVERY = 64  # streaming remembers every 64th frame start for later lookups
_GAVE_UP = object()  # SeekReader._scan: the scan budget ran out


class SeekReader:
    """Read records of a log directory by LSN without scanning segments.

    Works on a directory no one holds or another process writes (no lock):
    it sees the complete frames on disk when it looks. Counters
    ``bytes_read``, ``read_calls`` and ``records_read`` say what it cost.
    Locating a record reads frame headers, not payloads (see "locating").

    Raises (from its methods): :class:`LsnNotAvailableError` for an LSN the
    log does not hold, :class:`CorruptRecordError` for damage it meets.
    """

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self._segs = list_segments(self.directory) if os.path.isdir(self.directory) else []
        if not self._segs:
            raise WalError(f"{directory} is not a mailwal log (no segment files)")
        self._firsts = [f for f, _ in self._segs]
        self._headers: dict[str, SegmentHeader] = {}
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._anchors: dict[str, list[tuple[int, int]]] = {}  # exact frame starts (lsn, offset)
        self._hashes: dict[int, bytes] = {}
        self._frames: dict[int, tuple[str, int, FrameHeader]] = {}  # frames located or walked over
        self._end: tuple[int, bytes, int] | None = None  # (last lsn, last hash, last epoch)
        self._end_offset: int | None = None  # where the frame after the last record would start
        self.bytes_read = 0
        self.read_calls = 0
        self.records_read = 0

    # -- plumbing -----------------------------------------------------------

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "SeekReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            fd = os.open(os.path.join(self.directory, name), os.O_RDONLY | os.O_CLOEXEC)
            self._fds[name] = fd
            self._sizes[name] = os.fstat(fd).st_size
        return fd

    def _size(self, name: str) -> int:
        self._fd(name)
        return self._sizes[name]

    def _pread(self, name: str, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(name), size, offset)
        self.bytes_read += len(data)
        self.read_calls += 1
        return data

    def header(self, name: str) -> SegmentHeader:
        h = self._headers.get(name)
        if h is None:
            data = self._pread(name, 0, SEGMENT_HEADER_SIZE)
            try:
                h = decode_segment_header(data)
            except SegmentHeaderError as exc:
                version = getattr(exc, "version", None)
                if version is not None:
                    raise UnsupportedVersionError(name, version) from exc
                raise CorruptRecordError(name, 0, None, str(exc)) from exc
            if h.first_lsn != int(name.split(".")[0]):
                raise CorruptRecordError(name, 0, h.first_lsn, "file name and header disagree on the first LSN")
            self._headers[name] = h
        return h

    @property
    def log_id(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.header(self._segs[0][1]).log_id)

    def first_lsn(self) -> int:
        """The first LSN the log still holds (older segments may be dropped)."""
        return self._firsts[0]

    def _seg_of(self, lsn: int) -> int:
        i = bisect.bisect_right(self._firsts, lsn) - 1
        if i < 0:
            raise LsnNotAvailableError(lsn, self._firsts[0], self.last()[0])
        return i

    def _frame(self, name: str, offset: int) -> FrameHeader | None:
        return decode_frame_header(self._pread(name, offset, FRAME_HEADER_SIZE))

    def _add_anchor(self, name: str, lsn: int, offset: int) -> None:
        anchors = self._anchors.setdefault(name, [])
        i = bisect.bisect_left(anchors, (lsn, -1))
        if i < len(anchors) and anchors[i][0] == lsn:
            return
        anchors.insert(i, (lsn, offset))

    # -- locating -----------------------------------------------------------
    #
    # The frame of an LSN is found inside its segment in one of two ways:
    #
    # * walking: from an exact frame start (the segment's first frame, or
    #   one found before: an anchor), follow frame lengths. Only headers are
    #   read: a window of bytes while frames are small (one read holds
    #   several), just the 64-byte header after a frame longer than that,
    #   seeking over its payload. A walk costs at most 64 bytes per record
    #   passed, whatever the payload sizes.
    # * probing: guess a byte offset between two known frame starts
    #   (interpolation, or halving), scan forward for a valid-looking header
    #   with a possible LSN, and accept it only if the next frame's hash
    #   chains onto it, which reads that frame's payload. Cheap where records
    #   are small; where they are large, finding a header would mean reading
    #   through payloads. So a probe reads at most _SCAN_BUDGET_BYTES and
    #   accepts a frame only if its successor's payload is at most
    #   _VERIFY_MAX_BYTES long.
    #
    # locate() probes while the records of the interval are small and walks
    # as soon as walking costs less than a few more probes (or a probe gave
    # up inside a long payload). The bytes a lookup reads therefore do not
    # grow with the sizes of the messages in the log: large records are
    # passed over for 64 bytes each, and no payload longer than
    # _VERIFY_MAX_BYTES is read. The record hash is in the frame header
    # (LOG-4), so the hash at an LSN costs one header once its frame is found.

    def _successor_checks(self, i: int, name: str, c: int, fh: FrameHeader) -> bool:
        """True if the frame after ``fh`` (at ``c``) chains onto ``fh.hash``.

        The successor's payload is read to recompute its hash, so a successor
        longer than ``_VERIFY_MAX_BYTES`` is not checked and ``fh`` is not
        accepted (the caller walks instead).
        """
        end = self._size(name)
        nxt = c + fh.frame_size
        if nxt == end and i + 1 < len(self._segs):
            nfirst, nname = self._segs[i + 1]
            return nfirst == fh.lsn + 1 and self.header(nname).prev_hash == fh.hash
        if nxt + FRAME_HEADER_SIZE > end:
            return False
        nfh = self._frame(name, nxt)
        if nfh is None or nfh.lsn != fh.lsn + 1 or nxt + nfh.frame_size > end or nfh.payload_len > _VERIFY_MAX_BYTES:
            return False
        payload = self._pread(name, nxt + FRAME_HEADER_SIZE, nfh.payload_len)
        self.records_read += 1
        return record_hash(fh.hash, nfh.lsn, nfh.epoch, nfh.type, nfh.payload_len, payload_hash(payload)) == nfh.hash

    def _scan(self, i: int, name: str, start: int, stop: int, lo_lsn: int, hi_lsn: int):
        """The first accepted frame starting in ``[start, stop)`` with LSN in ``(lo_lsn, hi_lsn)``.

        Candidates are found by looking for the high bytes every LSN of the
        range shares (a C-speed ``bytes.find``), then checked: header check,
        LSN range, fits in the file, successor chains onto it.

        Returns:
            ``(offset, header)`` of the accepted frame (both it and its
            successor become anchors); None if no accepted frame starts in
            the range; ``_GAVE_UP`` if ``_SCAN_BUDGET_BYTES`` were read
            before ``stop`` without accepting one (a long payload covers the
            start of the range).
        """
        end = self._size(name)
        a, b = lo_lsn + 1, hi_lsn - 1
        if a > b:
            return None
        ab, bb = a.to_bytes(8, "little"), b.to_bytes(8, "little")
        k = 0
        while k < 8 and ab[7 - k] == bb[7 - k]:
            k += 1
        needle = ab[8 - k:]
        lead = 4 + (8 - k)  # bytes of the frame before the needle
        zero_needle = not any(needle)
        pos = start
        window = _SCAN_WINDOW_BYTES
        scanned = 0
        while pos < stop:
            if scanned >= _SCAN_BUDGET_BYTES:
                return _GAVE_UP
            limit = min(stop - pos, window)
            buf = self._pread(name, pos, min(limit + FRAME_HEADER_SIZE, end - pos))
            scanned += len(buf)
            window = min(window * 2, _SCAN_WINDOW_MAX_BYTES)
            j = buf.find(needle, lead) if needle else lead
            while j != -1:
                c_rel = j - lead
                if c_rel >= limit:
                    break
                fh = decode_frame_header(buf, c_rel) if c_rel + FRAME_HEADER_SIZE <= len(buf) else None
                if fh is not None and a <= fh.lsn <= b and pos + c_rel + fh.frame_size <= end:
                    if self._successor_checks(i, name, pos + c_rel, fh):
                        c = pos + c_rel
                        self._add_anchor(name, fh.lsn, c)
                        self._frames[fh.lsn] = (name, c, fh)
                        self._hashes[fh.lsn] = fh.hash
                        if c + fh.frame_size < end:
                            self._add_anchor(name, fh.lsn + 1, c + fh.frame_size)
                        return c, fh
                nxt = j + 1
                if zero_needle and not any(buf[c_rel + 4: j]):
                    # Inside a run of zero bytes (LSN 0 is never valid): the next
                    # candidate's LSN needs a non-zero byte, so jump past the run.
                    m = _NONZERO.search(buf, j)
                    if m is None:
                        break
                    nxt = m.start() + 1
                j = buf.find(needle, nxt) if needle else (nxt if nxt < len(buf) else -1)
            pos += limit
        return None

    def _headers_from(self, name: str, lsn: int, offset: int, end: int, *,
                      large: bool = False) -> Iterator[tuple[int, FrameHeader | None]]:
        """``(offset, header)`` of the frames from the exact frame start
        ``(lsn, offset)`` on, reading headers only (see "locating").

        ``large`` says the frames are expected to be longer than a read
        window, so the first read is a header only.

        The header is None where the bytes at ``offset`` are not a complete,
        valid-looking header with the expected LSN whose frame fits before
        ``end``; the iteration ends after yielding it, or at ``end``. Each
        good frame becomes an anchor and its hash is remembered.
        """
        buf_off, buf = offset, b""
        window = _SCAN_WINDOW_BYTES
        header_only = large
        while offset < end:
            rel = offset - buf_off
            if rel < 0 or rel + FRAME_HEADER_SIZE > len(buf):
                buf_off, rel = offset, 0
                if header_only:  # after a frame longer than a window: its successor may be long too
                    buf = self._pread(name, offset, min(FRAME_HEADER_SIZE, end - offset))
                else:  # a run of small frames: read a window, doubling while the run lasts
                    buf = self._pread(name, offset, min(window, end - offset))
                    window = min(window * 2, _SCAN_WINDOW_MAX_BYTES)
            fh = decode_frame_header(buf, rel) if rel + FRAME_HEADER_SIZE <= len(buf) else None
            if fh is None or fh.lsn != lsn or offset + fh.frame_size > end:
                yield offset, None
                return
            self.records_read += 1
            self._add_anchor(name, lsn, offset)
            self._frames[lsn] = (name, offset, fh)
            self._hashes[lsn] = fh.hash
            yield offset, fh
            offset += fh.frame_size
            lsn += 1
            header_only = fh.frame_size > _SCAN_WINDOW_BYTES
            if header_only:
                window = _SCAN_WINDOW_BYTES

    def _walk(self, i: int, name: str, lsn: int, offset: int, target: int, *,
              large: bool = False) -> tuple[int, FrameHeader]:
        """Follow frame lengths from the exact frame start ``(lsn, offset)`` to ``target``
        (``large``: see :meth:`_headers_from`).

        Raises:
            LsnNotAvailableError: the complete frames of the last segment end
                before ``target`` (and no later record is known to exist).
            CorruptRecordError: a frame header on the way fails its check,
                carries another LSN, or its frame passes the end of the
                segment, where the log holds that LSN.
        """
        end = self._size(name)
        last_seg = i == len(self._segs) - 1
        lsn_next, at = lsn, offset
        for off, fh in self._headers_from(name, lsn, offset, end, large=large):
            if fh is None:
                at = off
                break
            if fh.lsn == target:
                return off, fh
            lsn_next, at = fh.lsn + 1, off + fh.frame_size
        # no good frame of lsn_next at ``at``
        if last_seg and (self._end is None or lsn_next > self._end[0]):
            raise LsnNotAvailableError(target, self._firsts[0], lsn_next - 1)
        if at >= end:
            raise CorruptRecordError(name, at, lsn_next, f"segment ends before LSN {lsn_next}")
        raise CorruptRecordError(name, at, lsn_next, "frame header check failed or LSN out of sequence")

    def _bracket(self, i: int, name: str, lsn: int) -> tuple[int, int, int, int, bool]:
        """``(lo_lsn, lo_off, hi_lsn, hi_off, hi_exact)`` around ``lsn`` in segment ``i``.

        ``(lo_lsn, lo_off)`` is the nearest exact frame start at or before
        ``lsn``; ``hi`` the nearest one after it (or the end of the segment's
        records: the next segment's first LSN, or the log's end once
        :meth:`last` found it), else an upper bound (``hi_exact`` False).
        """
        first = self._firsts[i]
        end = self._size(name)
        anchors = self._anchors.get(name, [])
        k = bisect.bisect_right(anchors, (lsn, float("inf")))
        lo_lsn, lo_off = anchors[k - 1] if k > 0 else (first, SEGMENT_HEADER_SIZE)
        if k < len(anchors):
            return lo_lsn, lo_off, anchors[k][0], anchors[k][1], True
        if i + 1 < len(self._segs):
            return lo_lsn, lo_off, self._firsts[i + 1], end, True
        if self._end is not None and self._end_offset is not None and self._end_offset > lo_off:
            return lo_lsn, lo_off, self._end[0] + 1, self._end_offset, True
        # every frame is at least a header long: a true upper bound
        return lo_lsn, lo_off, lo_lsn + (end - lo_off) // FRAME_HEADER_SIZE + 1, end, False

    @staticmethod
    def _walking_is_cheaper(records: int, average_frame: float) -> bool:
        """Walking ``records`` frames of ``average_frame`` bytes costs less than probing."""
        if average_frame > _VERIFY_MAX_BYTES:
            return True  # a probe could not verify what it finds
        per_record = average_frame if average_frame < _SCAN_WINDOW_BYTES else FRAME_HEADER_SIZE
        return records * per_record <= _WALK_COST_FACTOR * average_frame

    def locate(self, lsn: int) -> tuple[str, int, FrameHeader]:
        """(segment file name, byte offset, frame header) of record ``lsn``.

        Reads frame headers, and small frames whole while probing; never a
        payload longer than 64 KiB (see "locating" above).

        Raises:
            LsnNotAvailableError: ``lsn`` is below the first retained LSN or
                beyond the last complete record.
            CorruptRecordError: a segment is damaged where the search looked.
        """
        if lsn < self._firsts[0]:
            raise LsnNotAvailableError(lsn, self._firsts[0], -1)
        if self._end is not None and lsn > self._end[0]:  # past the last verified record (a torn tail)
            raise LsnNotAvailableError(lsn, self._firsts[0], self._end[0])
        known = self._frames.get(lsn)
        if known is not None:
            return known
        i = self._seg_of(lsn)
        _, name = self._segs[i]
        self.header(name)
        end = self._size(name)
        limit = end  # probes found no accepted frame (of the LSNs sought) starting in [limit, hi_off)
        interpolate = True
        while True:
            lo_lsn, lo_off, hi_lsn, hi_off, hi_exact = self._bracket(i, name, lsn)
            if lsn >= hi_lsn:
                raise LsnNotAvailableError(lsn, self._firsts[0], -1)
            if limit <= lo_off:
                limit = end
            stop = min(hi_off, limit)
            records = lsn - lo_lsn
            average = (hi_off - lo_off) / (hi_lsn - lo_lsn) if hi_exact else 0.0
            large = average > _SCAN_WINDOW_BYTES
            if (records <= _WALK_MAX_RECORDS or stop - lo_off <= _WALK_MAX_BYTES
                    or (hi_exact and self._walking_is_cheaper(records, average))):
                off, fh = self._walk(i, name, lo_lsn, lo_off, lsn, large=large)
                return name, off, fh
            span = stop - lo_off
            if interpolate and hi_exact and stop == hi_off:
                probe = lo_off + span * (lsn - lo_lsn) // (hi_lsn - lo_lsn)
                probe -= span // (hi_lsn - lo_lsn) // 2 + FRAME_HEADER_SIZE  # land just before the frame
            else:
                probe = lo_off + span // 2
            probe = max(lo_off + 1, min(probe, stop - 1))
            found = self._scan(i, name, probe, stop, lo_lsn, hi_lsn)
            if found is _GAVE_UP and records * FRAME_HEADER_SIZE <= _WALK_AFTER_GIVING_UP_BYTES:
                off, fh = self._walk(i, name, lo_lsn, lo_off, lsn, large=True)  # long payloads here
                return name, off, fh
            if found is None or found is _GAVE_UP:
                limit = probe
            elif found[1].lsn == lsn:
                return name, found[0], found[1]
            # Safeguarded interpolation: after a step that did not halve the
            # interval, halve it once, then try interpolating again.
            n_lo, n_lo_off, _, n_hi_off, _ = self._bracket(i, name, lsn)
            interpolate = not interpolate or (min(n_hi_off, limit) - n_lo_off) * 2 <= span

    # -- records and hashes ---------------------------------------------------

    def hash_at(self, lsn: int) -> bytes:
        """The hash of record ``lsn`` (0 gives the zero hash, LOG-6).

        The hash of the record just before a segment comes from that
        segment's header, so it is known even after retention dropped it.
        """
        if lsn == 0:
            return ZERO_HASH
        h = self._hashes.get(lsn)
        if h is not None:
            return h
        j = bisect.bisect_left(self._firsts, lsn + 1)
        if j < len(self._firsts) and self._firsts[j] == lsn + 1:
            h = self.header(self._segs[j][1]).prev_hash
        else:
            _, _, fh = self.locate(lsn)
            h = fh.hash
        self._hashes[lsn] = h
        return h

    def bytes_after(self, lsn: int) -> int:
        """Bytes of segment data holding the records after ``lsn`` (for progress bars)."""
        if lsn >= self.last()[0]:
            return 0
        if lsn + 1 <= self._firsts[0]:
            i, off = 0, SEGMENT_HEADER_SIZE
        else:
            i = self._seg_of(lsn + 1)
            off = SEGMENT_HEADER_SIZE if self._firsts[i] == lsn + 1 else self.locate(lsn + 1)[1]
        return self._size(self._segs[i][1]) - off + sum(self._size(n) for _, n in self._segs[i + 1:])

    def epoch_at(self, lsn: int) -> int:
        """The epoch of record ``lsn``."""
        _, _, fh = self.locate(lsn)
        return fh.epoch

    def record(self, lsn: int) -> Record:
        """Record ``lsn``, its hash verified against the record before it."""
        name, off, fh = self.locate(lsn)
        payload = self._pread(name, off + FRAME_HEADER_SIZE, fh.payload_len)
        self.records_read += 1
        prev = self.hash_at(lsn - 1)
        if record_hash(prev, fh.lsn, fh.epoch, fh.type, fh.payload_len, payload_hash(payload)) != fh.hash:
            raise CorruptRecordError(name, off, lsn, "record hash mismatch")
        return Record(fh.lsn, fh.epoch, fh.type, payload, fh.hash)

    def last(self) -> tuple[int, bytes, int]:
        """(LSN, hash, epoch) of the last complete record; (first-1, prev hash, epoch) if none.

        The last record's payload is read and its hash checked against the
        record before it: only that tells a complete record from a torn
        write (LOG-8). Finding it reads little besides: the bytes near the
        end of the last segment where records are small, else the headers
        of the last segment's frames (see "locating").
        """
        if self._end is not None:
            return self._end
        i = len(self._segs) - 1
        first, name = self._segs[i]
        header = self.header(name)
        end = self._size(name)
        result = (first - 1, header.prev_hash, 0)
        end_offset = SEGMENT_HEADER_SIZE
        if end > SEGMENT_HEADER_SIZE:
            lsn, offset, prev, before = self._last_frame_to_verify(i, name, end)
            if before is not None:
                result = before
            sizes: list[int] = []
            for rec in self._stream(i, offset, lsn, prev, on_bytes=sizes.append):
                result = (rec.lsn, rec.hash, rec.epoch)
            end_offset = offset + sum(sizes)
        if result[0] == first - 1 and first > self._firsts[0]:
            result = (first - 1, header.prev_hash, self.epoch_at(first - 1))
        self._forget_after(name, result[0])
        self._end, self._end_offset = result, end_offset
        return result

    def _last_frame_to_verify(self, i: int, name: str, end: int):
        """Where :meth:`last` starts checking records: ``(lsn, offset, hash
        before it, (lsn, hash, epoch) of the record before it or None)``.

        Small records: a frame accepted near the end (its successor's hash
        checked), so what follows it is a few records. Otherwise the last
        frame reached by walking headers from the last exact frame start
        known, so only its payload is read; walking stops at the first bad
        header, which the check then finds torn (LOG-8) or corrupt.
        """
        first = self._firsts[i]
        header = self.header(name)
        upper = first + (end - SEGMENT_HEADER_SIZE) // FRAME_HEADER_SIZE + 1
        for window in _END_WINDOWS_BYTES:
            start = end - window
            if start <= SEGMENT_HEADER_SIZE:
                return first, SEGMENT_HEADER_SIZE, header.prev_hash, None
            found = self._scan(i, name, start, end, first - 1, upper)
            if isinstance(found, tuple):
                c, fh = found
                return fh.lsn + 1, c + fh.frame_size, fh.hash, (fh.lsn, fh.hash, fh.epoch)
        lsn, offset, prev, before = first, SEGMENT_HEADER_SIZE, header.prev_hash, None
        for a_lsn, a_off in reversed(self._anchors.get(name, [])):
            known = self._frames.get(a_lsn - 1)
            if known is not None:
                fh = known[2]
                lsn, offset, prev, before = a_lsn, a_off, fh.hash, (fh.lsn, fh.hash, fh.epoch)
                break
        start = (lsn, offset, prev, before)
        for off, fh in self._headers_from(name, lsn, offset, end, large=True):
            if fh is None:
                break
            start = (fh.lsn, off, prev, before)
            prev, before = fh.hash, (fh.lsn, fh.hash, fh.epoch)
        return start

    def _forget_after(self, name: str, last_lsn: int) -> None:
        """Drop what walking the last segment learnt about frames after the log's end (a torn tail)."""
        self._anchors[name] = [a for a in self._anchors.get(name, []) if a[0] <= last_lsn]
        for lsn in [n for n in self._frames if n > last_lsn]:
            del self._frames[lsn]
        for lsn in [n for n in self._hashes if n > last_lsn]:
            del self._hashes[lsn]

    def records(self, from_lsn: int, *, on_bytes: Callable[[int], None] | None = None) -> Iterator[Record]:
        """Verified records from ``from_lsn`` to the end of the log.

        Every hash is checked against the chain, and each segment header
        against the hash of the record before it, like :class:`wal.LogReader`;
        a torn tail of the last segment ends the iteration quietly.
        """
        last = self.last()[0]
        if from_lsn > last:
            return
        from_lsn = max(from_lsn, self._firsts[0])
        prev = self.hash_at(from_lsn - 1)
        i = self._seg_of(from_lsn)
        if from_lsn == self._firsts[i]:
            off = SEGMENT_HEADER_SIZE
        else:
            _, off, _ = self.locate(from_lsn)
        yield from self._stream(i, off, from_lsn, prev, on_bytes=on_bytes)

    def _stream(self, i: int, offset: int, lsn: int, prev: bytes, *,
                on_bytes: Callable[[int], None] | None = None) -> Iterator[Record]:
        while True:
            first, name = self._segs[i]
            end = self._size(name)
            buf_off, buf = offset, b""
            while offset < end:
                rel = offset - buf_off
                if rel + FRAME_HEADER_SIZE > len(buf):
                    buf_off, rel = offset, 0
                    buf = self._pread(name, offset, min(_STREAM_BUFFER_BYTES, end - offset))
                fh = decode_frame_header(buf, rel) if rel + FRAME_HEADER_SIZE <= len(buf) else None
                failure = None
                if fh is None:
                    failure = "frame header check failed or incomplete"
                elif fh.lsn != lsn:
                    failure = f"frame has LSN {fh.lsn}, expected {lsn}"
                elif offset + fh.frame_size > end:
                    failure = "frame extends past end of file"
                else:
                    if rel + fh.frame_size > len(buf):  # read on from what the buffer holds of this frame
                        have = buf[rel:]
                        want = min(max(_STREAM_BUFFER_BYTES, fh.frame_size), end - offset) - len(have)
                        buf_off, rel = offset, 0
                        buf = have + self._pread(name, offset + len(have), want)
                    payload = buf[rel + FRAME_HEADER_SIZE: rel + fh.frame_size]
                    self.records_read += 1
                    if record_hash(prev, fh.lsn, fh.epoch, fh.type, fh.payload_len, payload_hash(payload)) != fh.hash:
                        failure = "record hash mismatch"
                if failure is not None:
                    if i == len(self._segs) - 1 and _classify_failure(os.path.join(self.directory, name), offset, lsn, end):
                        return  # a torn final write (LOG-8): the end of the log
                    raise CorruptRecordError(name, offset, lsn, failure)
                assert fh is not None
                if on_bytes is not None:
                    on_bytes(fh.frame_size)
                if (lsn - first) % _STREAM_ANCHOR_EVERY == 0:
                    self._add_anchor(name, lsn, offset)
                yield Record(fh.lsn, fh.epoch, fh.type, bytes(payload), fh.hash)
                prev = fh.hash
                offset += fh.frame_size
                lsn += 1
            if i + 1 >= len(self._segs):
                return
            i += 1
            nfirst, nname = self._segs[i]
            if nfirst != lsn:
                raise CorruptRecordError(nname, 0, lsn, f"segment starts at LSN {nfirst}, chain expects {lsn}")
            if self.header(nname).prev_hash != prev:
                raise CorruptRecordError(nname, 0, lsn, "segment header prev_hash breaks the hash chain")
            offset = SEGMENT_HEADER_SIZE
