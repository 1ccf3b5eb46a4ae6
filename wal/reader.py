"""Reading records from any LSN, verified, in bounded memory (LOG-10, LOG-11).

A reader finds the segment holding the wanted LSN by its file name, jumps
close to it with a sparse per-segment index (built once by walking frame
headers, without reading payloads), and verifies every record it returns
against the hash chain. No corrupt record is ever returned: damage raises
:class:`~wal.errors.CorruptRecordError` with segment, offset and LSN.

Readers work on a live log: a :class:`~wal.Log` hands its readers a
``durable_lsn`` bound so they never see a record before it is fsynced; a
reader of a directory another process writes to stops at the first frame
that is not complete yet, and can follow (poll) for more.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from typing import Callable, Iterator

from .errors import CorruptRecordError, LsnNotAvailableError
from .format import FRAME_HEADER_SIZE, SEGMENT_HEADER_SIZE, ZERO_HASH, Record, decode_frame_header
from .framewalk import WalkStop, verified_frames
from .segment import INDEX_STRIDE, _classify_failure, list_segments, read_segment_header

__all__ = ["LogReader", "SegmentIndex"]

_new = object.__new__
_set_lsn, _set_epoch, _set_type, _set_payload, _set_hash = (
    Record.__dict__[name].__set__ for name in ("lsn", "epoch", "type", "payload", "hash")
)


def _record(lsn: int, epoch: int, type_: int, payload: bytes, hash_: bytes) -> Record:
    """A Record from a verified frame, without the frozen dataclass's checked
    ``__init__`` (a third of replay's time per record): the frame's layout
    already bounds every field (LOG-4) and its hash was just verified."""
    r = _new(Record)
    _set_lsn(r, lsn)
    _set_epoch(r, epoch)
    _set_type(r, type_)
    _set_payload(r, payload)
    _set_hash(r, hash_)
    return r


class SegmentIndex:
    """Sparse ``(lsn, offset, prev_hash)`` entries for each segment, cached.

    Entries are added by walking frame headers; a walk stops at the first
    frame that is not valid-looking, so an index never points past damage.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # name -> (entries, walked_to_offset, next_lsn, prev_hash_at_walk_end, count)
        self._segments: dict[str, tuple[list[tuple[int, int, bytes]], int, int, bytes, int]] = {}

    def forget(self, name: str) -> None:
        with self._lock:
            self._segments.pop(name, None)

    def locate(self, path: str, first_lsn: int, prev_hash: bytes, lsn: int) -> tuple[int, int, bytes]:
        """Return (lsn_at, offset, prev_hash) of an indexed frame at or before ``lsn``."""
        name = os.path.basename(path)
        with self._lock:
            state = self._segments.get(name)
            if state is None:
                state = ([(first_lsn, SEGMENT_HEADER_SIZE, prev_hash)], SEGMENT_HEADER_SIZE, first_lsn, prev_hash, 0)
            entries, walked, next_lsn, walk_prev, count = state
            if lsn >= next_lsn:
                entries, walked, next_lsn, walk_prev, count = self._walk(path, entries, walked, next_lsn, walk_prev, count, lsn)
                self._segments[name] = (entries, walked, next_lsn, walk_prev, count)
            i = bisect.bisect_right(entries, (lsn, float("inf"))) - 1
            return entries[max(i, 0)]

    @staticmethod
    def _walk(path, entries, walked, next_lsn, walk_prev, count, target):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = walked
            while offset + FRAME_HEADER_SIZE <= size and next_lsn <= target + INDEX_STRIDE:
                f.seek(offset)
                fh = decode_frame_header(f.read(FRAME_HEADER_SIZE))
                if fh is None or fh.lsn != next_lsn or offset + fh.frame_size > size:
                    break
                if count % INDEX_STRIDE == 0 and entries[-1][0] != fh.lsn:
                    entries = entries + [(fh.lsn, offset, walk_prev)]
                count += 1
                offset += fh.frame_size
                walk_prev = fh.hash
                next_lsn += 1
        return entries, offset, next_lsn, walk_prev, count


class LogReader:
    """Iterate verified records of the log in ``directory``.

    Args:
        directory: the log directory.
        durable_lsn: callable giving the highest LSN readers may see (a live
            :class:`~wal.Log` passes its durable LSN); None reads whatever is
            complete on disk.
        wait: callable ``wait(lsn, timeout) -> bool`` used by ``follow`` to
            sleep until ``lsn`` is durable; None polls.
        index: a shared :class:`SegmentIndex` (a live log shares its own).
    """

    def __init__(
        self,
        directory: str,
        *,
        durable_lsn: Callable[[], int] | None = None,
        wait: Callable[[int, float], bool] | None = None,
        index: SegmentIndex | None = None,
    ):
        self.directory = directory
        self._durable_lsn = durable_lsn
        self._wait = wait
        self._index = index or SegmentIndex()

    # -- positions ---------------------------------------------------------

    def segments(self) -> list[tuple[int, str]]:
        return list_segments(self.directory)

    def first_lsn(self) -> int:
        segs = self.segments()
        return segs[0][0] if segs else 1

    def _find_segment(self, segs: list[tuple[int, str]], lsn: int) -> int:
        firsts = [s[0] for s in segs]
        i = bisect.bisect_right(firsts, lsn) - 1
        if i < 0:
            last = self._last_known()
            raise LsnNotAvailableError(lsn, firsts[0] if firsts else 1, last)
        return i

    def _last_known(self) -> int:
        if self._durable_lsn is not None:
            return self._durable_lsn()
        return -1

    # -- iteration ---------------------------------------------------------

    def records(
        self,
        from_lsn: int = 1,
        to_lsn: int | None = None,
        *,
        follow: bool = False,
        stop: threading.Event | None = None,
        poll_interval_s: float = 0.2,
    ) -> Iterator[Record]:
        """Yield verified records ``from_lsn``..``to_lsn`` (inclusive).

        Without ``follow`` the iteration ends at the last durable (or
        complete) record. With ``follow`` it waits for more until ``stop`` is
        set or ``to_lsn`` is reached.

        Raises:
            LsnNotAvailableError: ``from_lsn`` is below the first retained LSN.
            CorruptRecordError: a record fails its hash, chain or framing.
        """
        lsn = max(from_lsn, 1)
        if to_lsn is not None and to_lsn < lsn:
            return  # an empty range (the loop below yields before it checks to_lsn)
        segs = self.segments()
        if not segs:
            return
        if lsn < segs[0][0]:
            raise LsnNotAvailableError(lsn, segs[0][0], self._last_known())
        i = self._find_segment(segs, lsn)
        seg_first, seg_name = segs[i]
        path = os.path.join(self.directory, seg_name)
        header = read_segment_header(path)
        at_lsn, offset, prev = self._index.locate(path, seg_first, header.prev_hash, lsn)
        cur = at_lsn
        while True:
            bound = self._durable_lsn() if self._durable_lsn is not None else None
            stopped_at = offset
            size_at_pass = os.path.getsize(path)
            walk = WalkStop()
            for off, plen, f_lsn, f_epoch, f_type, _back, f_hash, payload in verified_frames(path, offset, cur, prev, walk):
                if bound is not None and f_lsn > bound:
                    break
                prev = f_hash
                offset = off + FRAME_HEADER_SIZE + plen
                stopped_at = offset
                cur += 1
                if f_lsn >= lsn:
                    yield _record(f_lsn, f_epoch, f_type, bytes(payload), f_hash)
                if to_lsn is not None and cur > to_lsn:
                    return
                if stop is not None and stop.is_set():
                    return
            else:
                # A frame that fails its LSN or hash check at or below the durable
                # bound is damage (LOG-9); past it, the frame is still being
                # written (LOG-11) and this pass ends before it.
                if walk.reason is not None and (bound is None or cur <= bound):
                    self._damage(path, offset, cur, walk.reason, segs, seg_name)
                    return
            offset = stopped_at
            # End of what this segment holds now: move on, or wait for more.
            segs = self.segments()
            nxt = [s for s in segs if s[0] > seg_first]
            if nxt:
                if nxt[0][0] != cur:
                    if bound is not None and cur > bound:
                        pass  # the next segment is being written; wait for durability
                    elif bound is None and os.path.getsize(path) > size_at_pass:
                        continue  # another process appended and rotated meanwhile: read the rest first
                    else:
                        self._damage(path, offset, cur, f"segment ends before LSN {cur} but the next starts at {nxt[0][0]}", segs, seg_name)
                        return
                else:
                    seg_first, seg_name = nxt[0]
                    path = os.path.join(self.directory, seg_name)
                    header = read_segment_header(path)
                    if header.prev_hash != prev:
                        raise CorruptRecordError(seg_name, 0, cur, "segment header prev_hash breaks the hash chain")
                    offset = SEGMENT_HEADER_SIZE
                    continue
            elif bound is None and not follow:
                # Reading a log nobody holds open: bytes after the last complete
                # frame are either a torn tail (fine) or damage (loud).
                size = os.path.getsize(path)
                if offset < size and _classify_failure(path, offset, cur, size) is None:
                    raise CorruptRecordError(seg_name, offset, cur, "record failed verification before the end of the log")
            if bound is not None and cur <= bound and not nxt:
                raise CorruptRecordError(seg_name, offset, cur, "durable record missing or unreadable")
            if not follow:
                return
            if stop is not None and stop.is_set():
                return
            if self._wait is not None:
                self._wait(cur, poll_interval_s)
            else:
                time.sleep(poll_interval_s)
            if stop is not None and stop.is_set():
                return

    def _damage(self, path, offset, lsn, reason, segs, seg_name) -> None:
        """A frame failed: torn tail of the last segment of an unheld log ends
        the iteration quietly; anything else raises CorruptRecordError."""
        is_last = segs[-1][1] == seg_name
        if is_last and self._durable_lsn is None:
            size = os.path.getsize(path)
            if _classify_failure(path, offset, lsn, size) is not None:
                return
        if self._durable_lsn is not None and lsn > self._durable_lsn():
            return
        raise CorruptRecordError(os.path.basename(path), offset, lsn, reason)

    def hash_at(self, lsn: int) -> bytes:
        """The stored hash of record ``lsn`` (LOG-6: 0 -> all zeros; the record
        before a segment's first comes from that segment's header)."""
        if lsn == 0:
            return ZERO_HASH
        segs = self.segments()
        if segs and lsn == segs[0][0] - 1:
            return read_segment_header(os.path.join(self.directory, segs[0][1])).prev_hash
        for rec in self.records(lsn, lsn):
            return rec.hash
        raise LsnNotAvailableError(lsn, segs[0][0] if segs else 1, self._last_known())
