"""Failover helpers: starting a new epoch when a node is promoted (REC-2).

:func:`promote` is the offline half of a promotion: it makes a node's log
enter a new epoch (``wal.history.start_epoch``: ``EPOCH`` then ``EPOCHS``)
and writes an :class:`~engine.store.events.EpochStarted` record as the first
record of that epoch (REC-2). Deciding *when* to promote, fencing the old
master and switching roles belong to the replication side.

Precondition: nothing else appends to the node's log meanwhile (a replica
whose receiver is stopped, or a master whose writes are paused and
drained). The function checks it: if another record slipped in first, the
history is repaired from the records and :class:`PromotionRaceError` is
raised.
"""

from __future__ import annotations

from dataclasses import dataclass

from wal import EpochEntry, SeekReader, read_history, start_epoch
from wal.history import first_lsn_of_epoch, write_history

from ..errors import EngineError
from ..store.events import EpochStarted, encode_event

__all__ = ["Promotion", "PromotionRaceError", "promote"]


class PromotionRaceError(EngineError):
    """Another record was appended while the promotion started its epoch.

    The epoch did start (the history was repaired to name its real first
    record); stop replication and writes before promoting.
    """


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote` did: the epoch and its first record."""

    epoch: int
    first_lsn: int  # the EpochStarted record
    fork_lsn: int  # the last record of the previous epoch (first_lsn - 1)
    fork_hash: bytes

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "first_lsn": self.first_lsn, "fork_lsn": self.fork_lsn,
                "fork_hash": self.fork_hash.hex()}


def promote(node, *, epoch: int | None = None, node_name: str | None = None) -> Promotion:
    """Start a new epoch on ``node``'s log and write its EpochStarted record (REC-2).

    Args:
        node: an open :class:`engine.node.Node` (its role is not changed here).
        epoch: the new epoch; default: one above every epoch in the log's
            history. Passing the log's current epoch finishes an earlier
            promotion that crashed before its EpochStarted record.
        node_name: recorded in the EpochStarted record (default: the node's name).

    Returns:
        A :class:`Promotion`.

    Raises:
        wal.WalError: the epoch is not above the log's, or the log failed.
        PromotionRaceError: see the module docstring.
    """
    log = node.log
    history = read_history(log.path)
    top = max([log.epoch] + [e.epoch for e in history])
    entry: EpochEntry
    if epoch is None or epoch > log.epoch:
        entry = start_epoch(log, epoch if epoch is not None else top + 1)
    else:
        last = history[-1]
        if not (epoch == log.epoch == last.epoch and last.first_lsn == log.last_lsn + 1):
            raise EngineError(
                f"epoch {epoch} is not above the log's epoch {log.epoch}, and it is not an unfinished promotion "
                f"(no record of it yet): pick a greater epoch"
            )
        entry = last
    ev = EpochStarted(entry.epoch, entry.first_lsn - 1, entry.prev_hash, node_name or node.config.name)
    appended = log.append(*encode_event(ev))
    if appended.lsn != entry.first_lsn:
        with SeekReader(log.path) as r:
            first = first_lsn_of_epoch(r, entry.epoch, entry.first_lsn, appended.lsn)
            fixed = EpochEntry(entry.epoch, first, r.hash_at(first - 1))
        write_history(log.path, [e for e in read_history(log.path) if e.epoch < entry.epoch] + [fixed])
        raise PromotionRaceError(
            f"record {entry.first_lsn} was appended by someone else while epoch {entry.epoch} started; the "
            f"EpochStarted record is at LSN {appended.lsn} and the epoch history was repaired"
        )
    return Promotion(entry.epoch, appended.lsn, entry.first_lsn - 1, entry.prev_hash)
