"""Diverged tails whose fork point left the cluster's history (CTL-9, specs/control.md).

A failover's aftermath: :func:`place_tail` puts a diverged tail cut aside
on a former master back on known history before it is reconciled. A tail
whose fork point was itself cut aside later, inside a newer tail of the
same node (the node lost its place twice), is *stranded*: no master holds
its fork point, so no reconcile can place it. It is merged
into the newer tail first (CTL-9): the older tail is reconciled, by the REC
rules with its true fork point, into a scratch node holding the node's
history up to the newer tail's fork point plus the newer tail; the scratch
log's records after that fork point become one merged tail, whose fork point
lies one level closer to the master's history.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from wal import OS_FILEOPS, Log, LogReader, WalError
from wal import SeekReader

from ..node import LOG_DIR, STORE_FILE, Node, read_config
from ..node.diverged import read_tails, record_merge, tail_ends
from .apply import apply_reconcile
from .errors import TailPlacementError

_log = logging.getLogger("mailwal.reconcile")

__all__ = ["TailBase", "TailPlacementError", "locate_tail_base", "rebase_tail", "place_tail", "node_uid_floors",
]

UidFloors = Union[dict[str, tuple[int, int]], Callable[[], dict[str, tuple[int, int]]]]
_SCRATCH_BATCH_RECORDS = 1024
_SCRATCH_BATCH_BYTES = 16 << 20
_MAX_MERGE_LEVELS = 16


@dataclass(frozen=True)
class TailBase:
    """Where a diverged tail's base is: record ``fork_lsn`` with hash ``fork_hash``.

    ``state``:

    * ``"history"``: the node's log holds that record (the master's history
      as far as the node follows it): reconcile the tail as usual;
    * ``"stranded"``: the node's log left that lineage (it holds another
      record at an LSN of it) and the base lies in ``container``, another
      tail of the node: merge the tail into it (:func:`rebase_tail`);
    * ``"unknown"``: the node's log does not reach far enough to tell (it
      lags); reconcile as usual, the master decides;
    * ``"nowhere"``: the node's log holds another record at ``fork_lsn`` and
      no tail of the node holds the base: it cannot be placed (``reason``).
    """

    tail: str
    fork_lsn: int
    fork_hash: bytes
    state: str
    container: str | None = None
    reason: str = ""


def _hash_on(reader: SeekReader, lsn: int) -> bytes | None:
    """The hash of record ``lsn`` in ``reader``'s log, None if it does not hold it
    (a segment header's prev hash counts for the record before its first)."""
    if lsn < reader.first_lsn() - 1 or lsn > reader.last()[0]:
        return None
    return reader.hash_at(lsn)


def _find_container(log_id: uuid.UUID, lsn: int, h: bytes, candidates: Sequence[str]) -> str | None:
    """The last of ``candidates`` (tail directories) of log ``log_id`` holding, after its
    own fork point, record ``lsn`` with hash ``h``. Unreadable candidates are skipped."""
    found = None
    for path in candidates:
        try:
            with SeekReader(path) as r:
                if r.log_id != log_id or not r.first_lsn() <= lsn <= r.last()[0]:
                    continue
                if r.hash_at(lsn) == h:
                    found = path
        except WalError:
            continue
    return found


def locate_tail_base(log_dir: str, tail: str, others: Sequence[str]) -> TailBase:
    """Is ``tail``'s fork point on the history of the log at ``log_dir`` (the node's own
    log), stranded inside one of ``others`` (the node's other tails), or nowhere?

    Every conclusion compares real record hashes (REC-1): equal hashes at an
    LSN mean equal histories up to it, different ones different histories
    from some LSN at or below it on. Of several tails holding the base the
    last in ``others`` is taken (callers list the preferred one last).

    Raises:
        TailPlacementError: the tail belongs to another log.
        wal.WalError: a log cannot be read.
    """
    log_id, fork, fork_hash, _last = tail_ends(tail)
    others = [o for o in others if os.path.abspath(o) != os.path.abspath(tail)]
    with SeekReader(log_dir) as lr:
        if lr.log_id != log_id:
            raise TailPlacementError(f"{tail} belongs to log {log_id}, not to this node's log {lr.log_id}")
        on_log = _hash_on(lr, fork)
        if on_log == fork_hash:
            return TailBase(tail, fork, fork_hash, "history")
        container = _find_container(log_id, fork, fork_hash, others)
        if container is None:
            if on_log is None:
                return TailBase(tail, fork, fork_hash, "unknown")
            return TailBase(
                tail, fork, fork_hash, "nowhere",
                reason=(f"diverged tail {tail} forked after LSN {fork} from a history that is neither on this "
                        f"node's log (it holds another record at LSN {fork}) nor in another of its diverged tails: "
                        f"it cannot be placed on the master's history. Its records stay in {tail}; merge them by "
                        f"hand (`walctl reconcile` against a log that holds LSN {fork} with hash "
                        f"{fork_hash.hex()[:16]}, e.g. a backup of this node)"))
        if on_log is not None:
            return TailBase(tail, fork, fork_hash, "stranded", container)
        # The node's log ends before the fork point (it lags): compare at the first
        # record of the container's own branch, at or below the fork point.
        with SeekReader(container) as cr:
            first = cr.first_lsn()
            first_hash = cr.hash_at(first)
        at_first = _hash_on(lr, first)
        if at_first is not None and at_first != first_hash:
            return TailBase(tail, fork, fork_hash, "stranded", container)
        return TailBase(tail, fork, fork_hash, "unknown")


def _lineage(log_dir: str, log_id: uuid.UUID, lsn: int, h: bytes, tails: Sequence[str]) -> list[tuple[str, int, int]]:
    """Where records 1..``lsn`` of the history whose record ``lsn`` has hash ``h`` are:
    ``[(directory, first, last), ...]`` in LSN order, from the node's log and its tails."""
    chain: list[tuple[str, int, int]] = []
    while lsn > 0:
        if len(chain) > len(tails) + 1:
            raise TailPlacementError(f"the history up to LSN {lsn} loops through the diverged tails")
        with SeekReader(log_dir) as lr:
            if _hash_on(lr, lsn) == h:
                if lr.first_lsn() > 1:
                    raise TailPlacementError(
                        f"this node's log starts at LSN {lr.first_lsn()} (older segments were dropped): a stranded "
                        f"tail can only be merged with the whole history from LSN 1")
                chain.append((log_dir, 1, lsn))
                break
        holder = _find_container(log_id, lsn, h, tails)
        if holder is None:
            raise TailPlacementError(f"record {lsn} ({h.hex()[:16]}) is neither on this node's log nor in one of "
                                     f"its diverged tails")
        _, fork, fork_hash, _ = tail_ends(holder)
        chain.append((holder, fork + 1, lsn))
        lsn, h = fork, fork_hash
    chain.reverse()
    return chain


def _build_scratch(scratch_dir: str, log_id: uuid.UUID, sources: list[tuple[str, int, int]],
                   segment_max_bytes: int):
    """A master node at ``scratch_dir`` whose log is the records of ``sources``, its store
    rebuilt from them. No checkpoint record, no deletion guard (it only hosts a merge)."""

    Node.init(scratch_dir, role="master", name="tail-merge", create_log=False, guard_enabled=False,
              checkpoint_every_records=1 << 62, checkpoint_every_s=float(1 << 62),
              segment_max_bytes=segment_max_bytes)
    log = Log.create(os.path.join(scratch_dir, LOG_DIR), log_id=log_id, segment_max_bytes=segment_max_bytes)
    top_epoch = 1
    try:
        for src, first, last in sources:
            batch, size = [], 0
            for rec in LogReader(src).records(first, last):
                batch.append(rec)
                size += len(rec.payload)
                top_epoch = max(top_epoch, rec.epoch)
                if len(batch) >= _SCRATCH_BATCH_RECORDS or size >= _SCRATCH_BATCH_BYTES:
                    log.append_records(batch)
                    batch, size = [], 0
            log.append_records(batch)
            if log.last_lsn != last:
                raise TailPlacementError(f"{src} holds records up to LSN {log.last_lsn}, not {last}")
        log.set_epoch(top_epoch)  # the merge's records are in the newest epoch of the history
    finally:
        log.close()
    return Node.open(scratch_dir)


def node_uid_floors(node_dir: str) -> dict[str, tuple[int, int]]:
    """``mailbox id -> (UIDVALIDITY, UIDNEXT)`` from a node's store, read-only (the node may run)."""
    import sqlite3


    path = os.path.join(node_dir, STORE_FILE)
    if not os.path.exists(path):
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return {mid: (int(v), int(n)) for mid, v, n in
                conn.execute("SELECT mailbox_id, uidvalidity, uidnext FROM mailboxes")}
    finally:
        conn.close()


def _raise_uidnext(scratch, floors: dict[str, tuple[int, int]]) -> None:
    """Give the merge's UIDs from the node's UIDNEXT on, in every mailbox the node holds
    too (same id and UIDVALIDITY). No client ever saw a UID the merge gives (the scratch
    node serves none); above what the master had given when the node last followed it,
    they rarely collide with the master's (REC-6 would move the master's message).
    Gaps are allowed: a MessageAppended record carries its UID."""
    with scratch._state_lock:
        for mid, mb in scratch.state.by_id.items():
            floor = floors.get(mid)
            if floor is not None and floor[0] == mb.uidvalidity:
                mb.uidnext = max(mb.uidnext, floor[1])


_SCRATCH_PREFIX = ".rebase-"


def _remove_abandoned_scratch(node_dir: str) -> None:
    """Remove ``NODE/.rebase-PID-*`` scratch nodes whose process is gone (a merge killed
    midway; a scratch node holds only copies, the tails it was made from are untouched)."""
    for name in os.listdir(node_dir):
        if not name.startswith(_SCRATCH_PREFIX):
            continue
        pid = name[len(_SCRATCH_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(node_dir, name), ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def rebase_tail(node_dir: str, log_dir: str, tail: str, container: str, tails: Sequence[str], *,
                strategy: str = "renumber", destructive: bool = False,
                segment_max_bytes: int | None = None, uid_floors: UidFloors | None = None) -> dict:
    """Merge the stranded ``tail`` into ``container``, the later tail holding its base (CTL-9).

    A scratch node (``NODE/.rebase-PID-*/``, removed afterwards, or by a later
    merge once process PID is gone) gets the node's
    history up to the container's fork point (from ``log_dir`` and, when
    that point is itself in a tail, from ``tails``) plus the container's
    records. ``tail`` is reconciled into it with the REC rules
    (:func:`engine.reconcile.apply.apply_reconcile`; the fork point found
    MUST be the tail's own; UIDs it gives start at the node's UIDNEXT,
    ``uid_floors``, default :func:`node_uid_floors`). The scratch log's records after the container's
    fork point become a new tail ``NODE/diverged/STAMP-after-LSN-merged-ID.wal``
    (LOG-16: durable before anything else changes). The container's records
    are its first records, unchanged; the tail's deliveries, flag changes
    and collisions are records the merge wrote. Neither input is modified.

    Returns:
        The merged tail's ``diverged.json`` entry (not recorded yet: see
        :func:`place_tail`).

    Raises:
        TailPlacementError: the history cannot be rebuilt (the node's log no
            longer starts at LSN 1), or the merge did not complete.
    """

    if segment_max_bytes is None:
        segment_max_bytes = read_config(node_dir).segment_max_bytes
    if uid_floors is None:
        uid_floors = node_uid_floors(node_dir)
    elif callable(uid_floors):
        uid_floors = uid_floors()
    log_id, tail_fork, _, _ = tail_ends(tail)
    _, fork, fork_hash, last = tail_ends(container)
    sources = _lineage(log_dir, log_id, fork, fork_hash, [t for t in tails if t not in (tail, container)])
    sources.append((container, fork + 1, last))
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    merged = os.path.join(node_dir, "diverged", f"{stamp}-after-{fork}-merged-{uuid.uuid4().hex[:8]}.wal")
    _remove_abandoned_scratch(node_dir)
    scratch_root = tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=node_dir)
    try:
        scratch_dir = os.path.join(scratch_root, "node")
        scratch = _build_scratch(scratch_dir, log_id, sources, segment_max_bytes)
        try:
            _raise_uidnext(scratch, uid_floors)
            result = apply_reconcile(scratch, scratch.log.path, tail, strategy=strategy, destructive=destructive,
                                     merge=True)
            scratch_log = scratch.log.path
        finally:
            scratch.close()
        report = None
        if result.report_path:  # kept beside the tails (the scratch node is removed), failed or not
            report = merged[:-len(".wal")] + ".merge-report.json"
            with open(result.report_path, "rb") as f:
                OS_FILEOPS.write_file_atomic(report, f.read())
        found = result.reconciliation.search.fork.lsn
        if found != tail_fork:
            raise TailPlacementError(f"merging {tail} into {container}: the fork point found is LSN {found}, "
                                     f"not the tail's own fork point {tail_fork}")
        counts = result.counts()
        if result.status != "done" or counts["failed"]:
            raise TailPlacementError(f"merging {tail} into {container} did not complete ({result.status}: "
                                     f"{counts}); both tails are kept as they were; see {report}")
        log = Log.open(scratch_log, segment_max_bytes=segment_max_bytes)
        try:
            moved = log.truncate_after(fork, merged)  # LOG-16: the merged tail is durable on return
            merged_last = fork + moved
        finally:
            log.close()
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
    return {"path": merged, "fork_lsn": fork, "last_lsn": merged_last, "records": moved, "cut_at": stamp,
            "reconciled": False, "merged_from": [tail, container], "merge_report": report}


def place_tail(node_dir: str, log_dir: str, tail: str, *, strategy: str = "renumber",
               destructive: bool = False, uid_floors: UidFloors | None = None) -> list[dict]:
    """Make ``tail`` reconcilable against the master's history (CTL-9).

    While its base is stranded in another tail of the node, merge it into
    that tail (:func:`rebase_tail`) and go on with the merged tail (its base
    is one level closer to the node's log). Each merge is recorded in
    ``NODE/diverged.json`` before the next step: the merged tail pending,
    the tails it holds marked ``merged_into`` it.

    Args:
        node_dir: the node directory owning ``tail`` (``NODE/diverged/``).
        log_dir: the node's log, following the master.
        uid_floors: the node's ``mailbox id -> (UIDVALIDITY, UIDNEXT)``, or a
            function returning it, called only when a merge is made
            (default: read from its store, :func:`node_uid_floors`).

    Returns:
        The entries of the merged tails made, in order; the last one's
        ``path`` is the tail to reconcile now (none: ``tail`` itself).

    Raises:
        TailPlacementError: the base is nowhere (TailBase ``"nowhere"``), or a merge failed.
    """
    made: list[dict] = []
    for _ in range(_MAX_MERGE_LEVELS):
        entries = read_tails(node_dir)
        # Prefer a tail nothing was merged into (a merged tail holds its container's records
        # and more); of those, the newest. The preferred candidates go last.
        others = ([e["path"] for e in entries if e.get("merged_into")]
                  + [e["path"] for e in entries if not e.get("merged_into")])
        base = locate_tail_base(log_dir, tail, others)
        if base.state in ("history", "unknown"):
            return made
        if base.state == "nowhere":
            raise TailPlacementError(base.reason)
        assert base.container is not None
        entry = rebase_tail(node_dir, log_dir, tail, base.container, others, strategy=strategy,
                            destructive=destructive, uid_floors=uid_floors)
        record_merge(node_dir, entry)
        made.append(entry)
        tail = entry["path"]
    raise TailPlacementError(f"{tail}: more than {_MAX_MERGE_LEVELS} nested diverged tails")
