"""The log's exception hierarchy.

Every error a caller of :mod:`wal` can see derives from :class:`WalError`.
Errors about a place in the log carry ``segment`` (file name), ``offset``
(byte offset in that file) and ``lsn`` so that an operator can find the bytes.
"""

from __future__ import annotations

import uuid

__all__ = [
    "WalError",
    "CorruptRecordError",
    "UnsupportedVersionError",
    "LogFailedError",
    "LogClosedError",
    "LogLockedError",
    "OutOfOrderError",
    "LsnNotAvailableError",
    "CursorError",
    "RetentionError",
    "EpochHistoryError",
    "ForeignLogError",
    "ForkUnknownError",
]


class WalError(Exception):
    """Base class of every error raised by :mod:`wal`."""


class CorruptRecordError(WalError):
    """A record or segment header failed its checksum, hash or chain link.

    Raised by :func:`wal.Log.open`, readers and :func:`wal.verify` for damage
    that is *not* a torn final write (spec LOG-9). Nothing at or after the
    damaged record is returned. Fix: restore the log from a replica, or run
    ``walctl repair`` to cut the log at the damage (the cut bytes are kept).
    """

    def __init__(self, segment: str, offset: int, lsn: int | None, reason: str):
        self.segment = segment
        self.offset = offset
        self.lsn = lsn
        self.reason = reason
        super().__init__(
            f"corrupt log: {reason} in segment {segment} at offset {offset}"
            + (f" (LSN {lsn})" if lsn is not None else "")
        )


class UnsupportedVersionError(WalError):
    """A segment header names a format version this code does not read (LOG-3)."""

    def __init__(self, segment: str, version: int):
        self.segment = segment
        self.version = version
        super().__init__(
            f"segment {segment} has format version {version}; this mailwal reads "
            f"version 1 only: upgrade mailwal to read this log"
        )


class LogFailedError(WalError):
    """A write or fdatasync failed; the log refuses all further appends.

    Appends that were waiting on the failed sync are *not* acknowledged. The
    failure is sticky (LOG-12): fsync is never retried on the same file
    descriptor. Fix the cause (disk full, I/O error), then reopen the log; it
    recovers from what is on disk.
    """


class LogClosedError(WalError):
    """The log was closed; open it again to use it."""


class LogLockedError(WalError):
    """Another holder has the log's writer lock (LOG-14).

    Raised by :meth:`wal.Log.open`, :func:`wal.repair` and
    :class:`wal.LogLock` while a writer (``walctl serve``, a node, a
    repair) holds the log. Nothing was changed. Fix: stop that process (or
    close that :class:`wal.Log`), then retry; reading needs no lock
    (:class:`wal.LogReader`, ``walctl verify``).

    Attributes: ``path`` (the log directory), ``pid`` and ``command`` of the
    holder where the system tells (else None), ``purpose`` (what was refused).
    """

    def __init__(self, path: str, pid: int | None, purpose: str, command: str | None = None,
                 *, in_this_process: bool = False):
        self.path = path
        self.pid = pid
        self.command = command
        self.purpose = purpose
        if in_this_process:
            who, advice = f"another Log in this process (pid {pid})", "close that Log"
        elif pid is not None:
            who = f"another process (pid {pid}" + (f": {command})" if command else ")")
            advice = "stop that process"
        else:
            who, advice = "another process", "stop it"
        super().__init__(f"log {path} is open for writing by {who}; {advice} before {purpose}")


class OutOfOrderError(WalError):
    """A record handed to :meth:`wal.Log.append_records` does not extend the log.

    ``expected`` is the LSN the log needs next; ``got`` the LSN offered. Also
    raised when the offered record's hash does not chain onto the log's last
    hash (then ``expected == got`` and ``reason`` says so).
    """

    def __init__(self, expected: int, got: int, reason: str = "LSN out of order"):
        self.expected = expected
        self.got = got
        self.reason = reason
        super().__init__(f"{reason}: log needs LSN {expected}, got {got}")


class LsnNotAvailableError(WalError):
    """The requested LSN is not in the log: below the first retained segment
    (dropped by retention) or beyond the last record."""

    def __init__(self, lsn: int, first: int, last: int):
        self.lsn = lsn
        self.first = first
        self.last = last
        super().__init__(f"LSN {lsn} is not in the log (it holds {first}..{last})")


class CursorError(WalError):
    """A cursor name is invalid, unknown, or a move would go backwards."""


class RetentionError(WalError):
    """Dropping segments would discard records a cursor still needs."""


class EpochHistoryError(WalError):
    """The ``EPOCHS`` file is unreadable or inconsistent (names the file; REC-2).

    Raised by the readers of :mod:`wal.history` and :mod:`wal.fork`. The file
    is written by atomic replace, so this means outside damage: restore it
    from a backup, or delete it and run :func:`wal.history.sync_history` to
    rebuild it from the records (the epochs of records are authoritative).
    """


class ForeignLogError(WalError):
    """The two logs given to :func:`wal.fork.search_fork` have different log
    ids: they share no history at all. ``log_ids`` holds both."""

    def __init__(self, path_a: str, log_id_a: uuid.UUID, path_b: str, log_id_b: uuid.UUID):
        self.log_ids = (log_id_a, log_id_b)
        super().__init__(
            f"{path_a} (log {log_id_a}) and {path_b} (log {log_id_b}) are different logs, not two copies "
            f"of one history: there is no fork point to find"
        )


class ForkUnknownError(WalError):
    """The logs given to :func:`wal.fork.search_fork` differ already at the
    oldest LSN both still hold (``lsn``).

    Retention (or seeding) removed the records where they forked; the fork
    point cannot be found from these directories.
    """

    def __init__(self, lsn: int):
        self.lsn = lsn
        super().__init__(
            f"the logs differ at LSN {lsn}, the oldest LSN both still hold: they forked in records "
            f"already dropped by retention, so the fork point is unknown (restore older segments)"
        )
