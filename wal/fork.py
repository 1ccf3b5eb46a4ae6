"""The fork point of two logs of one lineage, found from a few record hashes (REC-1, REC-3).

Theory of operation
-------------------
Every record hash covers the epoch (LOG-5), so two logs that were equal up
to LSN ``n`` and then written by two different masters differ at ``n + 1``
even if the two records carry the same payload. Because each hash also
covers the previous one, "the hashes at ``n`` are equal" implies "the logs
are equal at every LSN up to ``n``" (REC-1). The *fork point* of two logs is
the greatest LSN at which their hashes are equal (0 when they share
nothing).

Finding it without reading the shared prefix (REC-3): the search compares
``hash_at(n)`` of both logs at a few LSNs, each read with a
:class:`~wal.seek.SeekReader` (one frame header per log). First the LSNs
around every epoch boundary of both histories (:mod:`wal.history`; after a
failover the fork is one of them), then, inside the remaining interval, a
gallop down from the end followed by a binary search. Equality is monotone
along the LSNs, so each probe halves what is left.

Read-only and lock-free; never writes a byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import ForeignLogError, ForkUnknownError, LsnNotAvailableError
from .history import EpochEntry, epoch_of, read_history
from .seek import SeekReader

__all__ = ["Fork", "ForkSearch", "search_fork", "find_fork"]


class Fork(NamedTuple):
    """The fork point: the greatest LSN both logs agree on, its epoch and hash."""

    lsn: int
    epoch: int
    hash: bytes


@dataclass
class ForkSearch:
    """What :func:`search_fork` found and what it cost."""

    fork: Fork
    last_a: int
    last_b: int
    hash_a: bytes  # hash of A's last record
    hash_b: bytes
    history_a: list[EpochEntry]
    history_b: list[EpochEntry]
    probes: int = 0  # LSNs compared
    records_read: int = 0  # frames whose header or payload was read, both logs
    bytes_read: int = 0  # bytes read from segment files, both logs
    steps: list[tuple[int, bool]] = field(default_factory=list)  # (lsn, equal) in probe order
    # Of bytes_read, what finding and verifying each log's last record read:
    # its payload, whose hash alone tells a complete record from a torn one
    # (LOG-8). The rest (probe_bytes_read) is frame headers, and small frames
    # read whole by probes.
    end_bytes_read: int = 0

    @property
    def probe_bytes_read(self) -> int:
        """Bytes read by the comparisons and the epoch histories (after both ends were found)."""
        return self.bytes_read - self.end_bytes_read

    @property
    def diverged(self) -> bool:
        """True unless one log is a prefix of the other (both have records after the fork)."""
        return self.fork.lsn < min(self.last_a, self.last_b)

    def to_dict(self) -> dict:
        return {
            "fork": {"lsn": self.fork.lsn, "epoch": self.fork.epoch, "hash": self.fork.hash.hex()},
            "diverged": self.diverged,
            "a": {"last_lsn": self.last_a, "last_hash": self.hash_a.hex(),
                  "epochs": [e.to_dict() for e in self.history_a]},
            "b": {"last_lsn": self.last_b, "last_hash": self.hash_b.hex(),
                  "epochs": [e.to_dict() for e in self.history_b]},
            "search": {"probes": self.probes, "records_read": self.records_read, "bytes_read": self.bytes_read,
                       "end_bytes_read": self.end_bytes_read, "probe_bytes_read": self.probe_bytes_read},
        }


def search_fork(dir_a: str, dir_b: str, *, reader_a: SeekReader | None = None,
                reader_b: SeekReader | None = None) -> ForkSearch:
    """Find the fork point of two logs of one lineage, reading O(log n) records (REC-3).

    Args:
        dir_a, dir_b: log directories (held by a writer or not; no lock taken).
        reader_a, reader_b: readers to use (the caller keeps them open to
            read the tails afterwards, and to see what the search read).

    Returns:
        A :class:`ForkSearch`: the fork point, both logs' last records and
        histories, and the cost of the search.

    Raises:
        ForeignLogError: the logs have different log ids.
        ForkUnknownError: they differ at the oldest LSN both still hold.
        CorruptRecordError, EpochHistoryError, WalError.
    """
    ra = reader_a or SeekReader(dir_a)
    rb = reader_b or SeekReader(dir_b)
    try:
        if ra.log_id != rb.log_id:
            raise ForeignLogError(dir_a, ra.log_id, dir_b, rb.log_id)
        ra.last()
        rb.last()
        end_bytes = ra.bytes_read + rb.bytes_read
        ha = read_history(ra.directory, reader=ra)
        hb = read_history(rb.directory, reader=rb)
        la, hash_a, _ = ra.last()
        lb, hash_b, _ = rb.last()
        steps: list[tuple[int, bool]] = []
        cache: dict[int, bool] = {}

        def equal(n: int) -> bool:
            if n not in cache:
                cache[n] = ra.hash_at(n) == rb.hash_at(n)
                steps.append((n, cache[n]))
            return cache[n]

        floor = max(ra.first_lsn(), rb.first_lsn()) - 1
        top = min(la, lb)
        if floor > top:
            raise ForkUnknownError(top)
        if not equal(floor):
            raise ForkUnknownError(floor)
        lo, hi = floor, top + 1  # equal at lo; unequal (or absent on one side) at hi
        if equal(top):
            lo = top
        else:
            hi = top
            # Epoch boundaries of both histories: after a failover the fork is
            # one of them, and each costs one probe pair (REC-3).
            anchors = sorted({n for e in ha + hb for n in (e.first_lsn - 1, e.first_lsn) if lo < n < hi})
            a_lo, a_hi = 0, len(anchors)
            while a_lo < a_hi:  # binary search over the anchors: equality is monotone
                mid = (a_lo + a_hi) // 2
                if equal(anchors[mid]):
                    lo = anchors[mid]
                    a_lo = mid + 1
                else:
                    hi = anchors[mid]
                    a_hi = mid
            # Gallop down from the end (forks are usually recent), then bisect.
            step = 1
            while hi - lo > 1:
                n = hi - step
                if n <= lo:
                    break
                if equal(n):
                    lo = n
                    break
                hi = n
                step *= 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if equal(mid):
                    lo = mid
                else:
                    hi = mid
        fork_hash = ra.hash_at(lo)
        if lo == 0:
            fork_epoch = 0
        else:
            try:
                fork_epoch = ra.epoch_at(lo)
            except LsnNotAvailableError:  # the record before the retained segments
                fork_epoch = epoch_of(ha, lo)
        return ForkSearch(
            fork=Fork(lo, fork_epoch, fork_hash), last_a=la, last_b=lb, hash_a=hash_a, hash_b=hash_b,
            history_a=ha, history_b=hb, probes=len(steps),
            records_read=ra.records_read + rb.records_read, bytes_read=ra.bytes_read + rb.bytes_read, steps=steps,
            end_bytes_read=end_bytes,
        )
    finally:
        if reader_a is None:
            ra.close()
        if reader_b is None:
            rb.close()


def find_fork(dir_a: str, dir_b: str) -> Fork:
    """``(lsn, epoch, hash)`` of the greatest LSN at which both logs have the same hash.

    See :func:`search_fork` for errors and cost (O(log n) records read).
    """
    return search_fork(dir_a, dir_b).fork

