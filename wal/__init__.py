"""mailwal's write-ahead log: fsynced, hash-chained, segmented.

Lifecycle
---------
* ``Log.create(path)`` makes a new log directory (conventionally ``*.wal``)
  holding one empty segment; it appears complete or not at all (LOG-2).
* ``Log.open(path)`` reopens it after a clean stop or a crash. The last
  segment is verified record by record: a torn final write is copied to
  ``torn/`` and trimmed (LOG-8); any other damage raises
  :class:`CorruptRecordError` naming segment file, byte offset and LSN
  (LOG-9). Nothing is fixed silently.
* One holder writes a log at a time (LOG-14): ``Log.open`` and ``repair``
  take its :class:`LogLock` and refuse with :class:`LogLockedError`, which
  names the process to stop; :func:`log_in_use` asks without taking it.
* ``log.append(type, payload)`` returns an :class:`Appended` (LSN, hash,
  epoch) only after the record is written and ``fdatasync``'ed. Appends from
  many threads share fsyncs (group commit). A failed write or sync fails the
  log for good (:class:`LogFailedError`, LOG-12); reopen to recover.
* ``log.read(from_lsn)`` / ``log.follow(from_lsn, stop)`` yield verified
  :class:`Record` values from any LSN without scanning from the start.
  :class:`LogReader` does the same for a directory another process owns;
  :class:`SeekReader` reads single records and hashes by LSN, reading frame
  headers only.
* ``log.cursors`` keeps named consumer positions durably (LOG-13);
  ``log.drop_before`` deletes whole old segments no cursor needs.
* Epochs: :func:`start_epoch` makes a new epoch current and records it in
  the log's history (``EPOCHS``); :func:`read_history` returns the history
  completed from the records (REC-2). :func:`search_fork` /
  :func:`find_fork` find where two copies of one log forked, from a few
  record hashes (REC-1, REC-3); ``log.truncate_after(lsn, aside)`` cuts a
  diverged tail into a log of its own (LOG-16).
* ``verify(path)`` checks a whole log read-only; ``repair(path)`` cuts it at
  its first damage after copying the cut bytes to ``broken/`` (LOG-15).
* ``log.close()``.

Segments are named by their first LSN (``00000000000000000001.seg``) and roll
over at ``segment_max_bytes``. Every record's hash covers its LSN, epoch,
type, payload and the previous record's hash, across segments, so one
(LSN, hash) pair names a whole history. The byte layout is in
``specs/log-format.md`` and is coded once, in :mod:`wal.format`: the frame
functions exported here (``encode_frame_header``, ``record_hash``,
``decode_frames``...) are what the writer, the readers and the
replication protocol's ``AppendBatch`` use. Payloads are
canonical CBOR (:mod:`wal.codec`). Segments at creation and every small
file (``EPOCH``, ``EPOCHS``, cursors, copies of cut bytes) are written by
atomic replace, :meth:`FileOps.write_file_atomic` / :meth:`FileOps.open_atomic`
(mode 0644, or as asked: 0600 for secrets).

Modules: ``writer`` (:class:`Log`), ``reader`` and ``framewalk`` (reading
forward), ``seek`` (:class:`SeekReader`), ``history`` (epochs), ``fork``
(the fork search), ``cursors``, ``repair`` (verify and repair), ``lock``
(the writer lock), ``segment`` and ``format`` (the bytes), ``codec`` (CBOR),
``fileops`` (every durable write), ``errors``.

This package imports nothing from ``engine`` or ``tools`` and never imports
anyio: it is blocking and thread-safe.
"""

from . import codec
from .cursors import CursorStore
from .errors import (
    CorruptRecordError,
    CursorError,
    EpochHistoryError,
    ForeignLogError,
    ForkUnknownError,
    LogClosedError,
    LogFailedError,
    LogLockedError,
    LsnNotAvailableError,
    OutOfOrderError,
    RetentionError,
    UnsupportedVersionError,
    WalError,
)
from .fileops import OS_FILEOPS, AtomicFile, FileOps
from .format import (
    FORMAT_VERSION,
    FRAME_HEADER_SIZE,
    HASH_SIZE,
    MAX_PAYLOAD_BYTES,
    ZERO_HASH,
    FrameHeader,
    FrameScan,
    Record,
    decode_frame_header,
    decode_frames,
    encode_frame,
    encode_frame_header,
    encode_frames,
    parse_frame_header,
    payload_hash,
    record_hash,
    unpack_frame_header,
)
from .fork import Fork, ForkSearch, find_fork, search_fork
from .history import EpochEntry, epoch_of, read_history, start_epoch, sync_history
from .lock import LogLock, log_in_use
from .reader import LogReader
from .repair import RepairReport, VerifyReport, repair, verify
from .seek import SeekReader
from .segment import TornTail
from .writer import DEFAULT_SEGMENT_MAX_BYTES, Appended, Log

__all__ = [
    "Log", "Appended", "Record", "LogReader", "CursorStore", "TornTail", "LogLock", "log_in_use",
    "verify", "repair", "VerifyReport", "RepairReport", "SeekReader",
    "EpochEntry", "start_epoch", "read_history", "sync_history", "epoch_of",
    "Fork", "ForkSearch", "search_fork", "find_fork",
    "FileOps", "OS_FILEOPS", "AtomicFile", "codec", "payload_hash", "record_hash",
    "FORMAT_VERSION", "ZERO_HASH", "DEFAULT_SEGMENT_MAX_BYTES",
    "FRAME_HEADER_SIZE", "HASH_SIZE", "MAX_PAYLOAD_BYTES", "FrameHeader", "encode_frame", "encode_frame_header", "encode_frames",
    "decode_frame_header", "parse_frame_header", "unpack_frame_header", "decode_frames", "FrameScan",
    "WalError", "CorruptRecordError", "UnsupportedVersionError", "LogFailedError",
    "LogClosedError", "LogLockedError", "OutOfOrderError", "LsnNotAvailableError", "CursorError", "RetentionError",
    "EpochHistoryError", "ForeignLogError", "ForkUnknownError",
]
