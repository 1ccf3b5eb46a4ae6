"""A log's epoch history: the ``EPOCHS`` file, completed from the records (REC-2).

Every promotion starts a new *epoch*; the epoch is inside every record hash
(LOG-5) and never decreases along a log. A log directory keeps ``EPOCHS``,
a small JSON file written by atomic replace (specs/log-format.md section 1)
that lists, for every epoch the log has seen, ``(epoch, first_lsn,
prev_hash)``: the first LSN written in that epoch and the hash of the record
before it (the hash the epoch forked from).

:func:`start_epoch` appends an entry and makes the epoch current (``EPOCH``
file first, :meth:`wal.Log.set_epoch`, then ``EPOCHS``).
:func:`read_history` returns the file's entries completed from the log
itself: an epoch whose entry is missing (a replica that received records of
a new epoch, or a crash between ``EPOCH`` and ``EPOCHS``) is found by a
binary search over the epochs of records, read with a
:class:`~wal.seek.SeekReader`. The history is a hint: the fork search
(:mod:`wal.fork`) uses its entries only as places to probe, and every
conclusion it draws comes from real record hashes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .errors import EpochHistoryError, WalError
from .fileops import OS_FILEOPS, FileOps
from .seek import SeekReader

__all__ = [
    "EPOCHS_FILE",
    "EpochEntry",
    "read_history",
    "read_history_file",
    "write_history",
    "first_lsn_of_epoch",
    "start_epoch",
    "sync_history",
    "epoch_of",
]

EPOCHS_FILE = "EPOCHS"
_EPOCHS_FORMAT = 1


@dataclass(frozen=True, slots=True)
class EpochEntry:
    """One epoch of a log's history (REC-2).

    ``prev_hash`` is the hash of record ``first_lsn - 1``: the history this
    epoch forked from.
    """

    epoch: int
    first_lsn: int
    prev_hash: bytes

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "first_lsn": self.first_lsn, "prev_hash": self.prev_hash.hex()}


def _history_path(log_dir: str) -> str:
    return os.path.join(log_dir, EPOCHS_FILE)


def read_history_file(log_dir: str) -> list[EpochEntry]:
    """The entries of ``EPOCHS`` as written (empty if the file is absent).

    Raises:
        EpochHistoryError: the file exists but is not a valid history.
    """
    path = _history_path(log_dir)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return []
    try:
        doc = json.loads(raw)
        if doc.get("format") != _EPOCHS_FORMAT:
            raise ValueError(f"unknown format {doc.get('format')!r}")
        out = [EpochEntry(int(e), int(f), bytes.fromhex(h)) for e, f, h in doc["epochs"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise EpochHistoryError(f"{path} is not a valid epoch history: {exc}") from exc
    for prev, cur in zip(out, out[1:]):
        if not (cur.epoch > prev.epoch and cur.first_lsn >= prev.first_lsn):
            raise EpochHistoryError(f"{path}: epochs must increase with first LSNs ({prev} then {cur})")
    if any(len(e.prev_hash) != 32 or e.first_lsn < 1 for e in out):
        raise EpochHistoryError(f"{path}: an entry has a bad LSN or hash")
    return out


def write_history(log_dir: str, entries: list[EpochEntry], fileops: FileOps = OS_FILEOPS) -> None:
    """Replace ``EPOCHS`` with ``entries`` by atomic replace (:meth:`wal.FileOps.write_file_atomic`).

    Raises:
        EpochHistoryError: the entries do not increase (epochs and first LSNs).
    """
    for prev, cur in zip(entries, entries[1:]):
        if not (cur.epoch > prev.epoch and cur.first_lsn >= prev.first_lsn):
            raise EpochHistoryError(f"epochs must increase with first LSNs ({prev} then {cur})")
    _write_history(log_dir, entries, fileops)


def first_lsn_of_epoch(reader: "SeekReader", epoch: int, lo: int, hi: int) -> int:
    """The first LSN in ``[lo, hi]`` whose record has an epoch >= ``epoch``.

    ``hi`` MUST hold such a record; epochs never decrease along a log, so a
    binary search reads O(log(hi - lo)) records.
    """
    while lo < hi:
        mid = (lo + hi) // 2
        if reader.epoch_at(mid) >= epoch:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _write_history(log_dir: str, entries: list[EpochEntry], fileops: FileOps) -> None:
    doc = {"format": _EPOCHS_FORMAT, "epochs": [[e.epoch, e.first_lsn, e.prev_hash.hex()] for e in entries]}
    fileops.write_file_atomic(_history_path(log_dir), json.dumps(doc, indent=1).encode() + b"\n")


def _epoch_file(log_dir: str) -> int | None:
    try:
        with open(os.path.join(log_dir, "EPOCH"), "rb") as f:
            return int(f.read().strip() or b"1")
    except (FileNotFoundError, ValueError):
        return None


def _complete(reader: SeekReader, entries: list[EpochEntry], epoch_file: int | None) -> list[EpochEntry]:
    """Add the epochs the records show but ``entries`` lack (REC-2)."""
    first = reader.first_lsn()
    last_lsn, last_hash, last_epoch = reader.last()
    out = list(entries)
    if not out or out[0].first_lsn > first:
        if last_lsn >= first:
            base = reader.epoch_at(first)
        else:
            base = epoch_file or 1
        if not out or base < out[0].epoch:
            out.insert(0, EpochEntry(base, first, reader.hash_at(first - 1)))
    # Epoch boundaries after the last known entry, by bisection on the epochs
    # of records (they never decrease along a log).
    top = out[-1]
    lo = max(top.first_lsn, first)
    if last_lsn >= lo and last_epoch > top.epoch:
        found: list[EpochEntry] = []

        def split(a: int, ea: int, b: int, eb: int) -> None:
            # epoch(a) == ea < eb == epoch(b), a < b
            while b - a > 1:
                mid = (a + b) // 2
                em = reader.epoch_at(mid)
                if em == ea:
                    a = mid
                elif em == eb:
                    b = mid
                else:
                    split(a, ea, mid, em)
                    a, ea = mid, em
            found.append(EpochEntry(eb, b, reader.hash_at(b - 1)))

        e_lo = reader.epoch_at(lo)
        if e_lo > top.epoch:
            out.append(EpochEntry(e_lo, lo, reader.hash_at(lo - 1)))
        elif e_lo < last_epoch:
            split(lo, e_lo, last_lsn, last_epoch)
        out.extend(sorted(found, key=lambda e: e.first_lsn))
    if epoch_file is not None and epoch_file > out[-1].epoch:
        # start_epoch made the epoch current but crashed before EPOCHS (or no
        # record of it exists yet): it begins after the last record.
        out.append(EpochEntry(epoch_file, last_lsn + 1, last_hash))
    return out


def read_history(log_dir: str, *, reader: SeekReader | None = None) -> list[EpochEntry]:
    """The epoch history of a log: ``EPOCHS`` completed from its records (REC-2).

    Read-only and lock-free. Reads a handful of records (the first, the
    last, and O(log n) per epoch missing from the file), never the log whole.

    Raises:
        EpochHistoryError: the ``EPOCHS`` file is damaged.
        WalError: ``log_dir`` is not a log.
    """
    own = reader is None
    reader = reader or SeekReader(log_dir)
    try:
        return _complete(reader, read_history_file(log_dir), _epoch_file(log_dir))
    finally:
        if own:
            reader.close()


def epoch_of(history: list[EpochEntry], lsn: int) -> int:
    """The epoch the history assigns to ``lsn`` (0 for LSN 0 or before the history)."""
    out = 0
    for e in history:
        if e.first_lsn <= lsn:
            out = e.epoch
    return out


def sync_history(log, *, fileops: FileOps = OS_FILEOPS) -> list[EpochEntry]:
    """Write the completed history to ``EPOCHS`` if the file lacks entries.

    A replica calls this after appending records of a new epoch, so that its
    own history names the epoch without a search next time. Idempotent.
    """
    current = read_history_file(log.path)
    full = read_history(log.path)
    if full != current:
        _write_history(log.path, full, fileops)
    return full


def start_epoch(log, epoch: int, *, fileops: FileOps = OS_FILEOPS) -> EpochEntry:
    """Make ``epoch`` the epoch of ``log``'s next records and record it in ``EPOCHS``.

    The caller MUST have stopped appends (nothing enqueued and not yet
    durable): the new epoch's first LSN is ``log.last_lsn + 1`` and the hash
    it forks from is ``log.last_hash``. Order (REC-2): the ``EPOCH`` file
    first (:meth:`wal.Log.set_epoch`), then ``EPOCHS``; a crash between the
    two is repaired by :func:`read_history`, which infers the same entry.

    Returns:
        The new entry.
    Raises:
        WalError: ``epoch`` does not exceed the log's current epoch, or the
            log is closed or failed.
    """
    if epoch <= log.epoch:
        raise WalError(f"a new epoch must exceed the current one: log {log.path} is at epoch {log.epoch}, got {epoch}")
    history = read_history(log.path)
    entry = EpochEntry(epoch, log.last_lsn + 1, log.last_hash)
    log.set_epoch(epoch)
    history = [e for e in history if e.epoch < epoch] + [entry]
    _write_history(log.path, history, fileops)
    return entry
