"""The log writer: recovery on open, group-committed appends, rotation, retention.

Theory of operation
-------------------
One :class:`Log` object owns a log directory for writing (LOG-14: one writer
per directory, held with :class:`wal.lock.LogLock`). Appenders call
:meth:`Log.append` from any number of threads. Records travel in *batches*
(:class:`_Batch`); at any moment there is at most one *open* batch (taking
records) and at most one *in-flight* batch (being written and synced).

1. Outside any lock, the appender hashes its payload (blake3).
2. Under the log lock it gives the record its LSN and chained hash (LOG-5)
   and encodes the whole 64-byte frame header (LOG-4; ``batch_back`` is
   known here because the open batch is exactly the next write), then adds
   header and payload to the open batch. The writing thread only joins the
   pieces: one ``write`` and one ``fdatasync`` per batch.
3. If nothing is in flight, the appender *leads*: it takes the open batch,
   writes and syncs it outside the lock, and returns. Otherwise it parks on
   its batch's *gate*, a lock held from the batch's creation until the batch
   is durable (or failed). Releasing a gate wakes one parked appender, which
   releases the gate again as it leaves, so a batch's appenders wake one
   after another (under the GIL they run one at a time anyway; waking all
   at once makes them fight over it). Nothing is allocated or sorted per
   waiting record; the completion is signalled once per batch.
4. When a sync ends and the open batch has records, the disk is kept busy:
   the syncing thread takes it at once. A leading appender hands it to the
   log's *flusher* thread (started on first need) and returns to its caller;
   the flusher keeps syncing batches until none is open. A lone appender
   never involves the flusher.
5. :meth:`Log.notify_durable` registers a callback on a batch instead of a
   parked thread (the async face resolves all of a batch's futures with one
   callback); registering the same callable for many records of one batch
   calls it once.

Nothing is acknowledged before its batch's ``fdatasync`` returned. If a write
or fdatasync fails, the log enters the *failed* state for good (LOG-12): the
failed batch, the open batch behind it and every later append raise
:class:`LogFailedError`, and the fd is never synced again. Reopening the log
recovers from what is on disk.

A batch never spans segments. Before writing a batch into a full segment,
the syncing thread creates the next segment (LOG-2); the previous one was
fully synced by the batch before, so only the last segment can be torn.
"""

from __future__ import annotations

import struct
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, Sequence

from . import history
from .cursors import CursorStore
from .errors import (
    CorruptRecordError,
    LogClosedError,
    LogFailedError,
    OutOfOrderError,
    RetentionError,
    WalError,
)
from .fileops import OS_FILEOPS, FileOps
from .lock import LogLock
from .format import (
    FORMAT_VERSION,
    MAX_PAYLOAD_BYTES,
    SEGMENT_HEADER_SIZE,
    ZERO_HASH,
    Record,
    SegmentHeader,
    decode_frame_header,
    encode_frame_header,
    encode_frames,
    payload_hash,
    record_hash,
)
from .reader import LogReader, SegmentIndex
from .segment import TornTail, create_segment, iter_frames, list_segments, read_segment_header, scan_segment

__all__ = ["Log", "Appended", "DEFAULT_SEGMENT_MAX_BYTES"]

DEFAULT_SEGMENT_MAX_BYTES = 64 * 1024 * 1024
_U64_MAX = (1 << 64) - 1


def _check_field(name: str, value: int, maximum: int) -> None:
    """LOG-4: record fields must fit their frame header field."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise WalError(f"record {name} must be an integer in 0..{maximum}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Appended:
    """The acknowledgement of one durable record."""

    lsn: int
    hash: bytes
    epoch: int


_new = object.__new__
_set_lsn, _set_hash, _set_epoch = (Appended.__dict__[name].__set__ for name in ("lsn", "hash", "epoch"))


def _appended(lsn: int, hash_: bytes, epoch: int) -> Appended:
    """``Appended(lsn, hash_, epoch)`` without the frozen dataclass's ``__init__``
    (its per-field ``object.__setattr__`` runs once per appended record)."""
    a = _new(Appended)
    _set_lsn(a, lsn)
    _set_hash(a, hash_)
    _set_epoch(a, epoch)
    return a


_allocate_lock = threading.Lock


class _Batch:
    """Records bound for one ``write`` + ``fdatasync`` (see the theory of operation).

    ``gate`` is held from creation until the batch is durable or failed;
    then it is released once and every parked appender acquires and
    releases it in turn (a latch that wakes its waiters one by one).
    """

    __slots__ = ("parts", "first_lsn", "last_lsn", "last_hash", "gate", "error", "callbacks")

    def __init__(self, first_lsn: int):
        self.parts: list = []  # frame header, payload, frame header, payload, ...
        self.first_lsn = first_lsn
        self.last_lsn = first_lsn - 1
        self.last_hash = b""
        self.gate = _allocate_lock()
        self.gate.acquire()
        self.error: WalError | None = None  # set before the gate opens when the batch will never be durable
        self.callbacks: dict | None = None  # notify_durable callables (a dict: each called once)


def _remove_abandoned_creations(fileops: FileOps, parent: str, prefix: str) -> None:
    """Remove ``PREFIX<pid>`` directories whose process is gone (LOG-2).

    Such a directory is a ``Log.create`` that was killed before its rename:
    it holds a segment header and ``EPOCH``, never a record, so nothing in it
    was acknowledged. A live process's directory is left alone.
    """
    import shutil

    for name in os.listdir(parent):
        if not name.startswith(prefix) or not name[len(prefix):].isdigit():
            continue
        pid = int(name[len(prefix):])
        try:
            os.kill(pid, 0)
            continue  # alive (or not ours to signal): maybe creating right now
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(parent, name))
        fileops.fsync_dir(parent)


_SEALED_TAIL_BYTES = 256 * 1024


def _check_sealed_end(path: str, header: SegmentHeader, nxt: SegmentHeader) -> None:
    """LOG-9 at open: a sealed segment must end exactly with the record the next
    segment's header chains onto (LSN ``nxt.first_lsn - 1``, hash ``nxt.prev_hash``).

    Cheap: looks for that frame in the segment's last 256 KiB (a walk of the
    frame headers when the last record is larger). A sealed segment that was
    truncated, extended or whose last record changed fails the open; damage
    further inside is found by readers and ``verify`` (LOG-11, LOG-15).
    """
    name = os.path.basename(path)
    want_lsn = nxt.first_lsn - 1
    size = os.path.getsize(path)
    if want_lsn < header.first_lsn:  # an empty sealed segment: header only, chained through
        if size != SEGMENT_HEADER_SIZE or nxt.prev_hash != header.prev_hash:
            raise CorruptRecordError(name, SEGMENT_HEADER_SIZE, header.first_lsn,
                                     "empty sealed segment does not chain onto the next")
        return
    start = max(SEGMENT_HEADER_SIZE, size - _SEALED_TAIL_BYTES)
    with open(path, "rb") as f:
        f.seek(start)
        tail = f.read()
    needle = struct.pack("<Q", want_lsn)
    pos = tail.rfind(needle)
    while pos != -1:
        off = pos - 4
        if off >= 0:
            fh = decode_frame_header(tail, off)
            if fh is not None and fh.lsn == want_lsn and start + off + fh.frame_size == size:
                if fh.hash != nxt.prev_hash:
                    raise CorruptRecordError(name, start + off, want_lsn,
                                             "last record does not chain onto the next segment's header")
                return
        pos = tail.rfind(needle, 0, max(pos, 0))
    for off, fh, _payload in iter_frames(path, SEGMENT_HEADER_SIZE):  # a large last record: walk headers
        if fh.lsn == want_lsn and off + fh.frame_size == size and fh.hash == nxt.prev_hash:
            return
    raise CorruptRecordError(name, size, want_lsn,
                             f"sealed segment does not end with record {want_lsn} (truncated or damaged)")


class Log:
    """A write-ahead log directory opened for appending. Thread-safe.

    Use :meth:`create` for a new log and :meth:`open` for an existing one.
    """

    def __init__(self, path: str, ops: FileOps, segment_max_bytes: int):
        self.path = os.path.abspath(path)
        self._ops = ops
        self.segment_max_bytes = segment_max_bytes
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._open: _Batch | None = None  # taking records; the next batch written
        self._inflight: _Batch | None = None  # being written and synced (by a leader or the flusher)
        self._closing = False  # close() has begun: no new batch is taken
        self._wakes = 0  # wake_waiters() calls: wait_for returns when it changes
        self._handoff: _Batch | None = None  # an in-flight batch given to the flusher, not yet picked up
        self._flush_cond = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None
        self._failed: LogFailedError | None = None
        self._closed = False
        self._fd: int | None = None
        self._writer_lock = LogLock(self.path)
        self.index = SegmentIndex()
        self.cursors = CursorStore(self.path, ops)
        self.torn_tails: list[TornTail] = []
        self.fsync_count = 0
        # Optional observer: on_sync(records in the batch, seconds of write+fdatasync),
        # called by the syncing thread after each successful group commit (metrics).
        self.on_sync = None
        self.batch_count = 0
        # Filled by _recover():
        self.log_id = uuid.UUID(int=0)
        self._next_lsn = 1
        self._last_hash = ZERO_HASH
        self._durable_lsn = 0
        self._durable_hash = ZERO_HASH
        self._epoch = 1
        self._active_name = ""
        self._active_size = 0
        self._active_first = 1

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str,
        *,
        log_id: uuid.UUID | None = None,
        first_lsn: int = 1,
        prev_hash: bytes = ZERO_HASH,
        epoch: int = 1,
        segment_max_bytes: int = DEFAULT_SEGMENT_MAX_BYTES,
        fileops: FileOps = OS_FILEOPS,
    ) -> "Log":
        """Create a new, empty log at ``path`` (which must not exist).

        The directory appears complete or not at all: it is built under a
        temporary name, then renamed and its parent fsynced (LOG-2).
        ``first_lsn``/``prev_hash`` start a log mid-history (a seeded replica).
        """
        path = os.path.abspath(path)
        if os.path.exists(path):
            raise WalError(f"{path} already exists; open it instead of creating it")
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        prefix = "." + os.path.basename(path) + ".creating-"
        _remove_abandoned_creations(fileops, parent, prefix)
        tmp = os.path.join(parent, prefix + str(os.getpid()))
        if os.path.exists(tmp):
            raise WalError(f"{tmp} exists: a log creation was interrupted; remove it and retry")
        fileops.mkdir(tmp)
        header = SegmentHeader(FORMAT_VERSION, (log_id or uuid.uuid4()).bytes, first_lsn, prev_hash)
        create_segment(fileops, tmp, header)
        fileops.write_file_atomic(os.path.join(tmp, "EPOCH"), str(epoch).encode())
        fileops.rename(tmp, path)
        fileops.fsync_dir(parent)
        return cls.open(path, segment_max_bytes=segment_max_bytes, fileops=fileops)

    @classmethod
    def open(
        cls,
        path: str,
        *,
        segment_max_bytes: int = DEFAULT_SEGMENT_MAX_BYTES,
        fileops: FileOps = OS_FILEOPS,
        create: bool = False,
    ) -> "Log":
        """Open an existing log for appending, recovering from a crash.

        Recovery (LOG-8, LOG-9): the last segment is verified record by
        record; a torn final batch is copied to ``torn/`` beside the segments
        and trimmed; any other damage raises :class:`CorruptRecordError`.

        Raises:
            LogLockedError: another writer holds the log (LOG-14).
            CorruptRecordError, UnsupportedVersionError, WalError (not a log).
        """
        if create and not os.path.exists(path):
            return cls.create(path, segment_max_bytes=segment_max_bytes, fileops=fileops)
        if not os.path.isdir(path) or not list_segments(path):
            raise WalError(f"{path} is not a mailwal log (no segment files); create it with Log.create")
        log = cls(path, fileops, segment_max_bytes)
        log._writer_lock.acquire()
        try:
            log._recover()
        except BaseException:
            log._writer_lock.release()
            raise
        return log

    def _recover(self) -> None:
        for name in os.listdir(self.path):
            if name.startswith(".") and name.endswith(".tmp"):
                self._ops.unlink(os.path.join(self.path, name))  # never renamed: never acknowledged
        segs = list_segments(self.path)
        headers = [read_segment_header(os.path.join(self.path, n)) for _, n in segs]
        log_id = headers[0].log_id
        for (first, name), h in zip(segs, headers):
            if h.log_id != log_id:
                raise CorruptRecordError(name, 0, first, "segment belongs to another log (log id differs)")
            if h.first_lsn != first:
                raise CorruptRecordError(name, 0, first, f"file name says LSN {first}, header says {h.first_lsn}")
        self.log_id = uuid.UUID(bytes=log_id)
        for (first, name), h, nxt in zip(segs, headers, headers[1:]):
            _check_sealed_end(os.path.join(self.path, name), h, nxt)
        last_first, last_name = segs[-1]
        scan = scan_segment(
            os.path.join(self.path, last_name),
            expected_first_lsn=None, expected_prev_hash=None, log_id=log_id, is_last=True,
        )
        if scan.torn is not None:
            self._trim(scan)
        last_epoch = None
        # The last record may sit in the previous segment: a crash right
        # after a rotation leaves the newest segment holding only its header.
        if scan.last_lsn >= segs[0][0]:
            for rec in LogReader(self.path, index=self.index).records(scan.last_lsn, scan.last_lsn):
                last_epoch = rec.epoch
        self._epoch = max(last_epoch or 1, self._read_epoch_file())
        self._next_lsn = scan.last_lsn + 1
        self._last_hash = scan.last_hash
        self._durable_lsn = scan.last_lsn
        self._durable_hash = scan.last_hash
        self._active_name = last_name
        self._active_first = last_first
        self._active_size = scan.end_offset
        self._fd = self._ops.open_append(os.path.join(self.path, last_name))

    def _read_epoch_file(self) -> int:
        try:
            with open(os.path.join(self.path, "EPOCH"), "rb") as f:
                return int(f.read().strip() or b"1")
        except FileNotFoundError:
            return 1

    def _trim(self, scan) -> None:
        torn = scan.torn
        seg_path = os.path.join(self.path, torn.segment)
        torn_dir = os.path.join(self.path, "torn")
        if not os.path.isdir(torn_dir):
            self._ops.mkdir(torn_dir)
            self._ops.fsync_dir(self.path)
        with open(seg_path, "rb") as f:
            f.seek(torn.offset)
            data = f.read(torn.size)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = os.path.join(torn_dir, f"{torn.segment}.{torn.offset}.{stamp}.torn")
        self._ops.write_file_atomic(aside, data)
        self._ops.truncate(seg_path, torn.offset)
        self.torn_tails.append(torn)

    def close(self) -> None:
        """Wait for an in-flight sync, then close. Later calls raise LogClosedError.

        Appenders still waiting for records that were not synced get
        LogClosedError (nothing unsynced is acknowledged).
        """
        with self._cond:
            self._closing = True
            while self._inflight is not None or self._handoff is not None:
                self._cond.wait()
            if self._closed:
                return
            self._closed = True
            dropped, self._open = self._open, None
            if dropped is not None:
                dropped.error = LogClosedError(
                    f"log {self.path} was closed before LSNs {dropped.first_lsn}..{dropped.last_lsn} became durable")
            self._cond.notify_all()
            self._flush_cond.notify_all()
            flusher = self._flusher
            if self._fd is not None:
                try:
                    self._ops.close(self._fd)
                except OSError:
                    pass
                self._fd = None
        if dropped is not None:
            self._settle(dropped)
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join()
        self._writer_lock.release()

    def __enter__(self) -> "Log":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state -------------------------------------------------------------

    @property
    def last_lsn(self) -> int:
        """The last durable LSN (0 for an empty log)."""
        return self._durable_lsn

    @property
    def last_hash(self) -> bytes:
        """The hash of the last durable record (LOG-6)."""
        return self._durable_hash

    @property
    def first_lsn(self) -> int:
        segs = list_segments(self.path)
        return segs[0][0] if segs else 1

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def failed(self) -> LogFailedError | None:
        """The sticky failure, or None while the log is healthy."""
        return self._failed

    def segment_count(self) -> int:
        return len(list_segments(self.path))

    def size_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, n)) for _, n in list_segments(self.path))

    # -- appending ---------------------------------------------------------

    def append(self, type_: int, payload: bytes, *, epoch: int | None = None) -> Appended:
        """Append one record; returns once it is durable (fdatasync'ed).

        Raises:
            LogFailedError: this or an earlier sync failed (nothing acknowledged).
            LogClosedError: the log was closed.
        """
        # The single-record path of enqueue + sync_to, inlined: this is the
        # per-record cost every appender thread pays.
        n = len(payload)
        if n > MAX_PAYLOAD_BYTES:
            raise WalError(f"payload of {n} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
        if type_.__class__ is not int or not 0 <= type_ <= 0xFFFF:
            _check_field("type", type_, 0xFFFF)
        if epoch is not None:
            _check_field("epoch", epoch, _U64_MAX)
        ph = payload_hash(payload)
        with self._lock:
            if self._closed or self._failed is not None:
                self._check_usable()
            ep = self._epoch if epoch is None else epoch
            if ep < self._epoch:
                raise WalError(f"epoch {ep} is below the log's epoch {self._epoch}: epochs never decrease along a log")
            lsn = self._next_lsn
            h = record_hash(self._last_hash, lsn, ep, type_, n, ph)
            b = self._open
            if b is None:
                b = self._open = _Batch(lsn)
            b.parts += (encode_frame_header(n, lsn, ep, type_, lsn - b.first_lsn, h), payload)
            b.last_lsn = lsn
            b.last_hash = h
            self._next_lsn = lsn + 1
            self._last_hash = h
            self._epoch = ep
            lead = self._inflight is None
            if lead:
                self._open = None
                self._inflight = b
        if lead:
            self._lead(b)
        else:
            self._await(b, lsn)
        return _appended(lsn, h, ep)

    def append_many(self, items: Sequence[tuple[int, bytes]], *, epoch: int | None = None) -> list[Appended]:
        """Append several records with consecutive LSNs; returns once all are durable."""
        out = self.enqueue(items, epoch=epoch)
        if out:
            self._wait_durable(out[-1].lsn)
        return out

    def enqueue(self, items: Sequence[tuple[int, bytes]], *, epoch: int | None = None) -> list[Appended]:
        """Give records their LSNs and hashes *without* waiting for durability.

        The returned values are NOT acknowledgements: call :meth:`sync_to`
        (or :meth:`notify_durable`) with the last LSN before telling anyone.
        This split lets a caller decide something under its own lock (say, a
        mailbox UID) in LSN order while the fsync wait is shared with other
        appenders (group commit).
        """
        # Check every item before touching state: a bad item must not leave
        # earlier items of the same call enqueued (they would be written by
        # the next sync although the caller got an error).
        for type_, payload in items:
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise WalError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
            _check_field("type", type_, 0xFFFF)
        if epoch is not None:
            _check_field("epoch", epoch, _U64_MAX)
        p_hashes = [payload_hash(p) for _, p in items]
        with self._lock:
            self._check_usable()
            ep = self._epoch if epoch is None else epoch
            if ep < self._epoch:
                raise WalError(f"epoch {ep} is below the log's epoch {self._epoch}: epochs never decrease along a log")
            out = []
            if not items:
                return out
            lsn, prev = self._next_lsn, self._last_hash
            b = self._open
            if b is None:
                b = self._open = _Batch(lsn)
            parts, first = b.parts, b.first_lsn
            for (type_, payload), ph in zip(items, p_hashes):
                n = len(payload)
                prev = record_hash(prev, lsn, ep, type_, n, ph)
                parts += (encode_frame_header(n, lsn, ep, type_, lsn - first, prev), payload)
                out.append(_appended(lsn, prev, ep))
                lsn += 1
            b.last_lsn = lsn - 1
            b.last_hash = prev
            self._next_lsn, self._last_hash = lsn, prev
            self._epoch = ep  # later appends must not go below it either
        return out

    def sync_to(self, lsn: int) -> None:
        """Return once record ``lsn`` is durable, leading a group sync if needed.

        Raises:
            LogFailedError: the sync covering ``lsn`` (or an earlier one) failed.
            LogClosedError: the log was closed first.
        """
        if self._durable_lsn >= lsn:  # only grows, and only after its fdatasync returned
            return
        with self._lock:
            if lsn >= self._next_lsn and self._durable_lsn < lsn:
                raise WalError(f"LSN {lsn} was never enqueued (the next LSN is {self._next_lsn})")
        self._wait_durable(lsn)

    def notify_durable(self, lsn: int, callback) -> None:
        """Call ``callback(durable_lsn, error)`` once record ``lsn`` is durable
        (``error`` None) or never will be (``error`` the LogFailedError or
        LogClosedError an appender would get).

        The callback runs in the thread that synced the batch holding ``lsn``
        (or at once in this thread when ``lsn`` is already settled); it must
        be quick, must not raise (an exception it raises is ignored) and must
        not append to or wait for this log (it may run on the flusher thread,
        which would then wait for itself).
        ``durable_lsn`` is the last LSN of that batch: every record up to it
        is durable. The same callable registered for several records of one
        batch is called once for that batch. Starts a sync if none is
        running, so the record is written without any thread waiting.

        Raises:
            WalError: ``lsn`` was never enqueued.
        """
        kick = None
        with self._lock:
            if self._durable_lsn >= lsn:
                settled = (self._durable_lsn, None)
            elif lsn >= self._next_lsn:
                raise WalError(f"LSN {lsn} was never enqueued (the next LSN is {self._next_lsn})")
            elif self._failed is not None:
                settled = (self._durable_lsn, LogFailedError(f"{self._failed} (LSN {lsn} was not acknowledged)"))
            elif self._closed:
                settled = (self._durable_lsn, LogClosedError(f"log {self.path} was closed before LSN {lsn} became durable"))
            else:
                settled = None
                b = self._inflight
                if b is None or lsn > b.last_lsn:
                    b = self._open
                if b.callbacks is None:
                    b.callbacks = {callback: None}
                else:
                    b.callbacks[callback] = None
                if self._inflight is None:
                    self._open = None
                    self._inflight = kick = b
        if settled is not None:
            try:
                callback(*settled)
            except Exception:
                pass  # documented: a callback must not raise; the log's state is unaffected
        elif kick is not None:
            self._hand_to_flusher(kick)

    def append_records(self, records: Sequence[Record]) -> None:
        """Append records made elsewhere (a replica copying its master).

        Each record MUST extend this log exactly: LSN ``last + 1`` and a hash
        that chains onto this log's last hash (LOG-5). Returns once durable.

        Raises:
            OutOfOrderError: a gap, overlap or broken chain (nothing appended).
            LogFailedError, LogClosedError.
        """
        if not records:
            return
        p_hashes = [payload_hash(r.payload) for r in records]
        with self._lock:
            self._check_usable()
            lsn, prev = self._next_lsn, self._last_hash
            for r, ph in zip(records, p_hashes):
                if r.lsn != lsn:
                    raise OutOfOrderError(lsn, r.lsn)
                h = record_hash(prev, lsn, r.epoch, r.type, len(r.payload), ph)
                if h != r.hash:
                    raise OutOfOrderError(lsn, r.lsn, "record hash does not chain onto this log")
                lsn, prev = lsn + 1, h
            b = self._open
            if b is None:
                b = self._open = _Batch(self._next_lsn)
            b.parts += encode_frames(records, b.first_lsn)
            b.last_lsn = lsn - 1
            b.last_hash = prev
            self._next_lsn, self._last_hash = lsn, prev
            if records[-1].epoch > self._epoch:
                self._epoch = records[-1].epoch
        self._wait_durable(lsn - 1)

    @property
    def _pending(self) -> list:
        """The payloads of the open batch (records enqueued, no sync started)."""
        b = self._open
        return [] if b is None else b.parts[1::2]

    def _check_usable(self) -> None:
        if self._closed:
            raise LogClosedError(f"log {self.path} is closed")
        if self._failed is not None:
            raise self._failed

    def _wait_durable(self, lsn: int) -> None:
        """Called *without* the lock: lead a sync, or park, until ``lsn`` is durable.

        Raises:
            LogFailedError: the sync covering ``lsn`` (or an earlier one) failed.
            LogClosedError: the log was closed before ``lsn`` became durable.
        """
        # ``_durable_lsn`` only grows, and only after the fdatasync that
        # covers it returned, so this unlocked read never acknowledges early.
        if self._durable_lsn >= lsn:
            return
        with self._lock:
            if self._durable_lsn >= lsn:
                return
            if self._failed is not None:
                raise LogFailedError(f"{self._failed} (LSN {lsn} was not acknowledged)") from self._failed.__cause__
            if self._closed:
                raise LogClosedError(f"log {self.path} was closed before LSN {lsn} became durable")
            b = self._inflight
            if b is None or lsn > b.last_lsn:
                b = self._open  # not None: lsn was enqueued and is neither durable nor in flight
            lead = self._inflight is None
            if lead:
                self._open = None
                self._inflight = b
        if lead:
            self._lead(b)
        else:
            self._await(b, lsn)

    def _await(self, b: _Batch, lsn: int) -> None:
        """Park until batch ``b`` (holding ``lsn``) is settled; raise if it failed.

        ``with b.gate`` releases the gate again on the way out, which wakes the
        next appender parked on the same batch (see :class:`_Batch`). An
        interrupted wait (Ctrl-C) holds nothing, so the chain stays intact.
        """
        with b.gate:
            pass
        error = b.error
        if error is not None:
            if isinstance(error, LogFailedError):
                raise LogFailedError(f"{error} (LSN {lsn} was not acknowledged)") from error.__cause__
            raise error.__class__(str(error))

    def _lead(self, b: _Batch) -> None:
        """Sync in-flight batch ``b`` in this thread; hand the next one to the flusher."""
        following = self._sync(b)
        if following is not None:
            self._hand_to_flusher(following)

    def _sync(self, b: _Batch) -> _Batch | None:
        """Write and fdatasync in-flight batch ``b``, publish the result, settle the batch.

        Returns the next batch (already taken as in flight) when records
        arrived meanwhile, else None. On failure fails the log for good
        (LOG-12), settles ``b`` and the open batch behind it with the failure,
        and raises the sticky LogFailedError.
        """
        error: BaseException | None = None
        written = 0
        try:
            written = self._write_batch(b)
        except BaseException as exc:  # any failure fails the log (LOG-12)
            error = exc
        dropped = following = None
        with self._lock:
            if error is None:
                self._durable_lsn = b.last_lsn
                self._durable_hash = b.last_hash
                self._active_size += written
                following = self._open
                if following is not None and not self._closing:
                    self._open = None
                else:
                    following = None
                self._inflight = following
            else:
                failed = self._failed = LogFailedError(
                    f"log {self.path} failed while syncing LSNs {b.first_lsn}..{b.last_lsn}: {error}; "
                    f"it refuses writes until reopened"
                )
                failed.__cause__ = error
                b.error = failed
                dropped, self._open = self._open, None
                if dropped is not None:
                    dropped.error = failed
                self._inflight = None
            self._cond.notify_all()
        self._settle(b)
        if error is not None:
            if dropped is not None:
                self._settle(dropped)
            raise b.error
        return following

    def _settle(self, b: _Batch) -> None:
        """Open ``b``'s gate (its parked appenders wake one by one) and run its callbacks."""
        b.gate.release()
        if b.callbacks:
            settled = (self._durable_lsn if b.error is not None else b.last_lsn, b.error)
            for callback in b.callbacks:
                try:
                    callback(*settled)
                except Exception:
                    pass  # documented in notify_durable: a callback must not raise

    def _hand_to_flusher(self, b: _Batch) -> None:
        """Give an in-flight batch to the flusher thread, starting it if needed."""
        with self._lock:
            self._handoff = b
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name=f"wal-flusher {self.path}", daemon=True)
                self._flusher.start()
            self._flush_cond.notify()

    def _flush_loop(self) -> None:
        """The flusher: sync handed-off batches, and whatever piles up behind them, until closed."""
        while True:
            with self._lock:
                while self._handoff is None and not self._closed:
                    self._flush_cond.wait()
                if self._handoff is None:
                    return
                b, self._handoff = self._handoff, None
            try:
                while b is not None:
                    b = self._sync(b)
            except LogFailedError:
                pass  # sticky; the failed batches were settled with the failure

    def _write_batch(self, b: _Batch) -> int:
        if self._active_size >= self.segment_max_bytes and self._active_first < b.first_lsn:
            self._rotate(b.first_lsn, self._durable_hash)
        data = b"".join(b.parts)
        assert self._fd is not None
        started = time.perf_counter()
        self._ops.write_all(self._fd, data)
        self._ops.fdatasync(self._fd)
        self.fsync_count += 1
        self.batch_count += 1
        if self.on_sync is not None:
            self.on_sync(b.last_lsn - b.first_lsn + 1, time.perf_counter() - started)
        return len(data)

    def _rotate(self, first_lsn: int, prev_hash: bytes) -> None:
        header = SegmentHeader(FORMAT_VERSION, self.log_id.bytes, first_lsn, prev_hash)
        name = create_segment(self._ops, self.path, header)
        old = self._fd
        self._fd = self._ops.open_append(os.path.join(self.path, name))
        if old is not None:
            self._ops.close(old)
        self._active_name = name
        self._active_first = first_lsn
        self._active_size = os.path.getsize(os.path.join(self.path, name))

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the epoch of later appends, durably (EPOCH file)."""
        with self._cond:
            self._check_usable()
            if epoch < self._epoch:
                raise WalError(f"epoch {epoch} is below the log's epoch {self._epoch}")
            self._ops.write_file_atomic(os.path.join(self.path, "EPOCH"), str(epoch).encode())
            self._epoch = epoch

    # -- cutting a diverged tail (failover) -----------------------------------

    def truncate_after(self, lsn: int, aside_path: str) -> int:
        """Move every record after ``lsn`` into a new log at ``aside_path``, then cut them.

        Used when this log diverged from its master's history at ``lsn``
        (LOG-16): the tail is never deleted; it becomes a standalone log
        directory (same log id, first LSN ``lsn + 1``, chained onto the hash
        at ``lsn``) that ``walctl reconcile`` reads. Order: the aside log is
        made durable first, then the segments are cut (truncate + fdatasync,
        later segments unlinked, directory fsynced), so a crash in between
        leaves the records in both places, never in neither. The ``EPOCHS``
        history loses entries that start after ``lsn``.

        The caller MUST have stopped appends. Returns the number of records moved.

        Raises:
            WalError: ``lsn`` is below the first retained record, or appends are pending.
        """
        with self._cond:
            self._check_usable()
            if self._open is not None or self._inflight is not None or self._next_lsn != self._durable_lsn + 1:
                raise WalError("truncate_after needs a quiet log: appends are in flight")
            last = self._durable_lsn
            if lsn >= last:
                return 0
            segs = list_segments(self.path)
            if lsn + 1 < segs[0][0]:
                raise WalError(f"cannot cut at LSN {lsn}: the log starts at {segs[0][0]}")
            prev = self.hash_at(lsn) if lsn > 0 else ZERO_HASH
            tail = list(self.read(lsn + 1, last))
            aside = Log.create(aside_path, log_id=self.log_id, first_lsn=lsn + 1, prev_hash=prev,
                               epoch=tail[0].epoch, fileops=self._ops)
            try:
                aside.append_records(tail)
            finally:
                aside.close()
            # Find where LSN lsn+1 starts.
            cut_seg = max(i for i, (first, _) in enumerate(segs) if first <= lsn + 1)
            first, name = segs[cut_seg]
            offset = None
            for off, fh, _payload in iter_frames(os.path.join(self.path, name), SEGMENT_HEADER_SIZE):
                if fh.lsn == lsn + 1:
                    offset = off
                    break
            if offset is None:
                raise WalError(f"record {lsn + 1} not found in segment {name}")
            if self._fd is not None:
                self._ops.close(self._fd)
                self._fd = None
            for _, later in reversed(segs[cut_seg + 1:]):
                self._ops.unlink(os.path.join(self.path, later))
                self.index.forget(later)
            self._ops.truncate(os.path.join(self.path, name), offset)
            self.index.forget(name)
            self._ops.fsync_dir(self.path)
            self._active_name, self._active_first = name, first
            self._active_size = offset
            self._fd = self._ops.open_append(os.path.join(self.path, name))
            self._next_lsn = lsn + 1
            self._last_hash = self._durable_hash = prev
            self._durable_lsn = lsn
            entries = [e for e in history.read_history_file(self.path) if e.first_lsn <= lsn]
            history.write_history(self.path, entries, self._ops)
            return len(tail)

    # -- reading -----------------------------------------------------------

    def reader(self) -> LogReader:
        """A reader bounded by this log's durable LSN, sharing its index."""
        return LogReader(self.path, durable_lsn=lambda: self._durable_lsn, wait=self._follow_wait, index=self.index)

    def read(self, from_lsn: int = 1, to_lsn: int | None = None) -> Iterator[Record]:
        """Durable records ``from_lsn``..``to_lsn``, verified."""
        return self.reader().records(from_lsn, to_lsn)

    def follow(self, from_lsn: int, stop: threading.Event, poll_interval_s: float = 0.5) -> Iterator[Record]:
        """Records from ``from_lsn`` on, waiting for new ones until ``stop`` is set.

        Raises:
            LogClosedError / LogFailedError: the follower has every durable
                record and the log was closed or failed, so no more will come.
        """
        return self.reader().records(from_lsn, follow=True, stop=stop, poll_interval_s=poll_interval_s)

    def _follow_wait(self, lsn: int, timeout: float | None = None) -> bool:
        # wait_for returns at once on a closed or failed log; a follower that
        # has caught up would then spin. Tell it instead.
        if self.wait_for(lsn, timeout):
            return True
        with self._cond:
            if self._durable_lsn < lsn:
                if self._closed:
                    raise LogClosedError(f"log {self.path} was closed; LSN {lsn} will not come")
                if self._failed is not None:
                    raise LogFailedError(f"{self._failed} (a follower waited for LSN {lsn})")
        return False

    def wait_for(self, lsn: int, timeout: float | None = None) -> bool:
        """Block until ``lsn`` is durable, the log fails or closes, wake_waiters() is called, or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            woken = self._wakes
            while self._durable_lsn < lsn and not self._closed and self._failed is None and self._wakes == woken:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._durable_lsn >= lsn

    def wake_waiters(self) -> None:
        """Wake every thread blocked in :meth:`wait_for`: each returns (False
        unless its LSN is durable) at once instead of at its timeout, so a
        caller shutting down its own loop need not wait for it."""
        with self._cond:
            self._wakes += 1
            self._cond.notify_all()

    def hash_at(self, lsn: int) -> bytes:
        """The hash of durable record ``lsn`` (``lsn == 0`` gives the zero hash)."""
        if lsn == self._durable_lsn:
            return self._durable_hash
        return self.reader().hash_at(lsn)

    # -- retention ---------------------------------------------------------

    def drop_before(self, lsn: int, *, force: bool = False) -> list[str]:
        """Delete whole segments whose records are all below ``lsn`` (LOG-13).

        Never deletes the active segment. Unless ``force``, refuses to drop a
        record some cursor has not consumed yet (cursor LSN < record LSN).

        Returns:
            The names of the deleted segment files.
        Raises:
            RetentionError: a cursor still needs a segment that would go.
        """
        segs = list_segments(self.path)
        limit = lsn
        if not force:
            floor = self.cursors.minimum()
            if floor is not None and floor + 1 < lsn:
                raise RetentionError(
                    f"cursor(s) still need records from LSN {floor + 1}; dropping below {lsn} "
                    f"would discard them (drop the cursor or force)"
                )
        dropped = []
        for (first, name), (nxt_first, _) in zip(segs, segs[1:]):
            if nxt_first <= limit and name != self._active_name:
                self._ops.unlink(os.path.join(self.path, name))
                self.index.forget(name)
                dropped.append(name)
            else:
                break
        if dropped:
            self._ops.fsync_dir(self.path)
        return dropped
