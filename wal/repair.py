"""Whole-log verification and explicit repair (LOG-15).

:func:`verify` reads every segment header, frame, record hash and chain link
without changing anything. :func:`repair` is the only code path besides the
torn-tail trim of :meth:`wal.Log.open` that removes bytes from a log, and it
copies everything it removes to ``broken/`` inside the log directory first.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from .errors import CorruptRecordError, UnsupportedVersionError, WalError
from .fileops import OS_FILEOPS, FileOps
from .lock import LogLock
from .format import ZERO_HASH
from .reader import LogReader
from .segment import list_segments, read_segment_header, scan_segment

__all__ = ["verify", "repair", "VerifyReport", "RepairReport"]


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` is False on corruption."""

    path: str
    ok: bool
    log_id: str | None = None
    segments: int = 0
    records: int = 0
    bytes: int = 0
    first_lsn: int | None = None
    last_lsn: int = 0
    last_hash: str = ZERO_HASH.hex()
    torn_tail: dict | None = None  # a torn final write that opening the log will trim
    error: dict | None = None  # {segment, offset, lsn, reason}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RepairReport:
    path: str
    cut_segment: str | None = None
    cut_offset: int | None = None
    first_lost_lsn: int | None = None
    backups: list[str] = field(default_factory=list)
    last_lsn: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def total_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for _, n in list_segments(path))


def verify(path: str, *, on_bytes: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every frame, hash, chain link and segment header of a log.

    Never raises for damage: the report carries it. Raises WalError only if
    ``path`` is not a log at all.
    """
    segs = list_segments(path) if os.path.isdir(path) else []
    if not segs:
        raise WalError(f"{path} is not a mailwal log (no segment files)")
    report = VerifyReport(path=path, ok=True, segments=len(segs), first_lsn=segs[0][0])
    expected_lsn: int | None = None
    expected_prev: bytes | None = None
    log_id: bytes | None = None
    seg_start: int | None = None  # first LSN of the segment being scanned
    try:
        for i, (first, name) in enumerate(segs):
            seg_path = os.path.join(path, name)
            seg_start = expected_lsn if expected_lsn is not None else first
            if log_id is None:
                log_id = read_segment_header(seg_path).log_id
                report.log_id = str(__import__("uuid").UUID(bytes=log_id))
            scan = scan_segment(
                seg_path, expected_first_lsn=expected_lsn if expected_lsn is not None else first,
                expected_prev_hash=expected_prev, log_id=log_id, is_last=(i == len(segs) - 1),
                on_bytes=on_bytes,
            )
            report.records += scan.records
            report.bytes += scan.end_offset
            report.last_lsn = scan.last_lsn
            report.last_hash = scan.last_hash.hex()
            if scan.torn is not None:
                report.torn_tail = {"segment": scan.torn.segment, "offset": scan.torn.offset,
                                    "bytes": scan.torn.size, "reason": scan.torn.reason}
            expected_lsn = scan.last_lsn + 1
            expected_prev = scan.last_hash
    except CorruptRecordError as exc:
        report.ok = False
        report.error = {"segment": exc.segment, "offset": exc.offset, "lsn": exc.lsn, "reason": exc.reason}
        if exc.lsn is not None and seg_start is not None and exc.lsn > seg_start:
            # The damaged segment's records before the damage verified too:
            # count them, so last_lsn is the last good record of the log.
            try:
                good_hash = LogReader(path).hash_at(exc.lsn - 1)
            except WalError:
                pass
            else:
                report.records += exc.lsn - seg_start
                report.bytes += exc.offset
                report.last_lsn = exc.lsn - 1
                report.last_hash = good_hash.hex()
    except UnsupportedVersionError as exc:
        report.ok = False
        report.error = {"segment": exc.segment, "offset": 0, "lsn": None, "reason": str(exc)}
    return report


def repair(path: str, *, fileops: FileOps = OS_FILEOPS, lock: LogLock | None = None) -> RepairReport:
    """Cut the log at its first damage so it opens again.

    The damaged segment is truncated at the damaged record, and later
    segments are removed; every removed byte is first copied to
    ``broken/`` in the log directory (fsynced). A log with no damage is left
    unchanged. Records after the cut are *lost from this log*: re-fetch them
    from a replica (the report names the first lost LSN).

    Raises:
        UnsupportedVersionError: a segment has a format version this code
            does not know (nothing is changed: upgrade mailwal instead).
        LogLockedError: a writer has the log open (LOG-14); nothing is changed.
        WalError: the first segment's header is damaged.

    ``lock``: the log's :class:`~wal.lock.LogLock`, held by the caller
    (``walctl repair`` holds it across its confirmation prompt). Without
    it, repair takes the lock for its whole run.
    """
    if not os.path.isdir(path) or not list_segments(path):
        raise WalError(f"{path} is not a mailwal log (no segment files)")
    if lock is not None:
        if not lock.held or os.path.realpath(lock.log_dir) != os.path.realpath(path):
            raise WalError(f"repair of {path} was given a lock it does not hold on this log")
        return _repair_locked(path, fileops)
    with LogLock(path, purpose="repairing it"):  # LOG-14: no Log appends while the log is cut
        return _repair_locked(path, fileops)


def _repair_locked(path: str, fileops: FileOps) -> RepairReport:
    report = verify(path)
    rep = RepairReport(path=path, last_lsn=report.last_lsn)
    if report.ok:
        return rep
    # LOG-3: a segment of an unknown format version is not damage; cutting it
    # away would discard records a newer mailwal can read.
    for _, name in list_segments(path):
        try:
            read_segment_header(os.path.join(path, name))
        except CorruptRecordError:
            pass
    err = report.error
    assert err is not None
    segs = list_segments(path)
    names = [n for _, n in segs]
    idx = names.index(err["segment"])
    broken = os.path.join(path, "broken")
    if not os.path.isdir(broken):
        fileops.mkdir(broken)
        fileops.fsync_dir(path)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    offset = err["offset"]
    seg_path = os.path.join(path, err["segment"])
    if offset == 0 and idx == 0:
        raise WalError(f"the first segment's header is damaged ({err['reason']}); restore the log from a replica")
    # Copy aside: the damaged segment from the cut, and every later segment whole.
    with open(seg_path, "rb") as f:
        f.seek(offset)
        data = f.read()
    aside = os.path.join(broken, f"{err['segment']}.{offset}.{stamp}.broken")
    fileops.write_file_atomic(aside, data)
    rep.backups.append(aside)
    for name in names[idx + 1:]:
        p = os.path.join(path, name)
        with open(p, "rb") as f:
            dst = os.path.join(broken, f"{name}.0.{stamp}.broken")
            fileops.write_file_atomic(dst, f.read())
        rep.backups.append(dst)
    for name in reversed(names[idx + 1:]):
        fileops.unlink(os.path.join(path, name))
    if offset == 0:
        fileops.unlink(seg_path)
    else:
        fileops.truncate(seg_path, offset)
    fileops.fsync_dir(path)
    rep.cut_segment = err["segment"]
    rep.cut_offset = offset
    rep.first_lost_lsn = err["lsn"]
    after = verify(path)
    rep.last_lsn = after.last_lsn
    if not after.ok:
        raise WalError(f"repair left the log damaged: {after.error}")
    return rep
