"""The master's recent durable records, shared by every replica stream.

:class:`TailBuffer` holds the newest durable records of the master's log as
:class:`~engine.replication.AppendBatch` messages, in LSN order, up to
``max_bytes``. The sender (``engine/sender.py``) fills it from disk with one
reader for all replicas, and every replica stream that has caught up takes its
batches from it: each record is read, verified and encoded once, whatever the
number of replicas (an AppendBatch caches its frame). A stream that is behind
the buffer's first LSN reads from disk on its own, so a slow replica costs disk
reads, never memory: the buffer drops its oldest batches past ``max_bytes``
whoever still wants them.

Pure and synchronous: no I/O, no clock, no locks (the sender uses it from its
event loop thread only).

Invariants (checked by ``tests/replication/test_replication_tail.py``):

* the batches are gapless: each starts at the previous one's ``last_lsn + 1``;
* the held cost stays at most ``max_bytes`` once more than one batch is held
  (the newest batch is always kept, so ``end_lsn`` stays known);
* :meth:`take` returns exactly the records from the asked LSN on, never one
  before it, never a gap.
"""

from __future__ import annotations

import bisect

from .messages import AppendBatch

__all__ = ["TailBuffer", "batch_cost"]

#: Per-record bookkeeping counted on top of the payload bytes (frame header, Record object).
RECORD_OVERHEAD_BYTES = 200


def batch_cost(batch: AppendBatch) -> int:
    """Memory a held batch may cost: its payloads, and its encoded frame once sent (about as much again)."""
    return 2 * batch.payload_bytes + RECORD_OVERHEAD_BYTES * len(batch.records)


class TailBuffer:
    """Recent durable records as AppendBatches (see the module docstring).

    Args:
        max_bytes: the most :func:`batch_cost` held (the newest batch is kept even if larger).
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._batches: list[AppendBatch] = []
        self._firsts: list[int] = []
        self._head = 0  # index of the oldest batch still held
        self._cost = 0
        self.evicted_batches = 0

    # -- queries ------------------------------------------------------------------

    @property
    def start_lsn(self) -> int | None:
        """The first LSN held, None when empty."""
        return self._firsts[self._head] if self._head < len(self._batches) else None

    @property
    def end_lsn(self) -> int | None:
        """The last LSN held, None when empty."""
        return self._batches[-1].last_lsn if self._head < len(self._batches) else None

    @property
    def last_hash(self) -> bytes | None:
        """The hash of the last record held (for the chain check of the next read)."""
        return self._batches[-1].records[-1].hash if self._head < len(self._batches) else None

    @property
    def cost(self) -> int:
        return self._cost

    def __len__(self) -> int:
        return len(self._batches) - self._head

    def take(self, lsn: int, max_payload_bytes: int) -> list[AppendBatch] | None:
        """Batches holding ``lsn`` and what follows, up to about ``max_payload_bytes`` of payload.

        Returns:
            None when ``lsn`` is not held and comes before what is (or the
            buffer is empty): the caller reads from disk; ``[]`` when ``lsn``
            is past the end (nothing new yet); else at least one batch, the
            first starting exactly at ``lsn`` (a held batch is split if
            ``lsn`` falls inside it).
        """
        start = self.start_lsn
        if start is None or lsn < start:
            return None
        if lsn > self._batches[-1].last_lsn:
            return []
        i = bisect.bisect_right(self._firsts, lsn, lo=self._head) - 1
        first = self._batches[i]
        out = [first if first.first_lsn == lsn else first.since(lsn)]
        size = out[0].payload_bytes
        for b in self._batches[i + 1 :]:
            if size + b.payload_bytes > max_payload_bytes:
                break
            out.append(b)
            size += b.payload_bytes
        return out

    # -- changes ------------------------------------------------------------------

    def extend(self, batches: list[AppendBatch]) -> None:
        """Add batches that continue the buffer (or start it when empty).

        Raises:
            ValueError: a batch does not start right after the last LSN held.
        """
        for b in batches:
            end = self.end_lsn
            if end is not None and b.first_lsn != end + 1:
                raise ValueError(f"batch starts at LSN {b.first_lsn}, the tail ends at {end}")
            self._batches.append(b)
            self._firsts.append(b.first_lsn)
            self._cost += batch_cost(b)
        while self._cost > self.max_bytes and len(self) > 1:
            self._cost -= batch_cost(self._batches[self._head])
            self._batches[self._head] = None  # type: ignore[call-overload]  # free it now
            self._head += 1
            self.evicted_batches += 1
        if self._head > 256 and self._head * 2 > len(self._batches):
            del self._batches[: self._head]
            del self._firsts[: self._head]
            self._head = 0

    def clear(self) -> None:
        """Drop everything (e.g. the log was found rewritten under the buffer)."""
        self._batches.clear()
        self._firsts.clear()
        self._head = 0
        self._cost = 0
