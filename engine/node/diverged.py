"""The registry of a node's diverged tails: ``NODE/diverged.json`` (CTL-9).

A tail is the records a former master held after its log forked from the new
master's: cut aside into ``NODE/diverged/``, never deleted, listed here until
reconciled. Each entry is ``{path, fork_lsn, last_lsn, records, cut_at,
reconciled, ...}`` (``report`` once reconciled; ``merged_into``/``merged_from``
when tails were merged; ``requeued`` when a cut took an apply away). Every
change is one atomic, durable replace of the file, and this module is the one
place that reads or writes it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

from wal import OS_FILEOPS, WalError
from wal.seek import SeekReader

from .layout import DIVERGED_DIR, DIVERGED_FILE, KEPT_TAILS_DIR, list_reports, write_json_atomic

__all__ = ["read_tails", "write_tails", "add_tail", "record_merge", "mark_tail_reconciled", "tail_ends",
           "requeue_applied_tails"]

_log = logging.getLogger("mailwal.node")


def read_tails(node_dir: str) -> list[dict]:
    """The registry's entries (none when the node never cut a tail)."""
    try:
        with open(os.path.join(node_dir, DIVERGED_FILE)) as f:
            return json.load(f)["tails"]
    except FileNotFoundError:
        return []


def record_merge(node_dir: str, entry: dict) -> None:
    """List the merged tail and mark what it holds as merged into it, in one atomic
    replace of ``diverged.json``. The container is marked only if it was still
    pending (its records are the merged tail's first records)."""
    tail, container = (os.path.abspath(p) for p in entry["merged_from"])
    entries = read_tails(node_dir)
    for e in entries:
        path = os.path.abspath(e["path"])
        if path == tail or (path == container and not e.get("reconciled")):
            e["reconciled"] = True
            e["merged_into"] = entry["path"]
            if path == tail:
                e["report"] = entry["merge_report"]
    entries.append(entry)
    write_tails(node_dir, entries)


def write_tails(node_dir: str, entries: list[dict]) -> None:
    """Replace the registry with ``entries`` (atomic, durable)."""
    write_json_atomic(os.path.join(node_dir, DIVERGED_FILE), {"tails": entries})


def add_tail(node_dir: str, entry: dict) -> None:
    """List ``entry`` as pending unless a tail at its path is listed already (idempotent)."""
    entries = read_tails(node_dir)
    if not any(os.path.abspath(e["path"]) == os.path.abspath(entry["path"]) for e in entries):
        entries.append(entry)
        write_tails(node_dir, entries)


def mark_tail_reconciled(tail_path: str, report: str | None = None) -> bool:
    """If ``tail_path`` is a node's ``diverged/*.wal``, mark it reconciled in that
    node's ``diverged.json`` (status stops listing it). Returns whether it was one."""
    tail_path = os.path.abspath(tail_path)
    node_dir = os.path.dirname(os.path.dirname(tail_path))
    listing = os.path.join(node_dir, DIVERGED_FILE)
    if os.path.basename(os.path.dirname(tail_path)) != DIVERGED_DIR or not os.path.exists(listing):
        return False
    entries = read_tails(node_dir)
    hit = False
    for e in entries:
        if os.path.abspath(e["path"]) == tail_path:
            e["reconciled"] = True
            e["report"] = report
            hit = True
    if hit:
        write_tails(node_dir, entries)
    return hit


def tail_ends(path: str) -> tuple[uuid.UUID, int, bytes, int]:
    """(log id, fork LSN, hash at the fork, last LSN) of a tail directory."""
    with SeekReader(path) as r:
        fork = r.first_lsn() - 1
        return r.log_id, fork, r.hash_at(fork), r.last()[0]


_REQUEUED_PREFIX = "requeued-"


def requeue_applied_tails(node_dir: str, cut_tail: str, fork_lsn: int) -> list[str]:
    """CTL-9: tails reconciled into this node whose apply the cut ``cut_tail`` took away go back
    to pending. Called when the node cut its log after ``fork_lsn`` (``cut_tail`` holds what was
    after it); idempotent (a cut finished on open calls it again).

    An apply's decisions rest on the node's log as it was (REC-12 plans against the current
    store): a loser's flag change dropped because a client of this node had expunged the message
    (REC-14), a message not copied back because this node's client expunged it (REC-5). Once
    this node's log is cut, its records (the expunge, and whatever the apply wrote) are only a
    loser's tail, whose expunges are not applied (REC-10), and the dropped change would be lost.
    So every tail whose apply report (``NODE/reconcile/*.json``, status ``done``) ended on a
    record the cut took away (the report's ``survivor_end`` is in ``cut_tail``) is listed as
    pending again and reconciled like any tail, against the new master's state (idempotent:
    what is there already plans nothing). The node's own tails (``NODE/diverged/``) are marked
    pending; a tail a replica shipped (its kept copy, ``NODE/reconcile/tails/``) moves into
    ``NODE/diverged/`` as ``requeued-<name>`` and is listed. Reports of other logs (``walctl
    reconcile --apply`` on another directory) are left alone. Returns the tails requeued.
    """
    try:
        wanted = _applies_the_cut_took(node_dir, cut_tail, fork_lsn)
    except (OSError, WalError) as exc:
        _log.warning("node %s: could not check which reconciled tails the cut %s took away: %s",
                     node_dir, cut_tail, exc)
        return []
    if not wanted:
        return []
    return _requeue(node_dir, cut_tail, wanted)


def _applies_the_cut_took(node_dir: str, cut_tail: str, fork_lsn: int) -> list[tuple[str, str]]:
    """``(loser tail, report)`` of each completed apply into this node whose ``survivor_end`` is a
    record of ``cut_tail`` (after ``fork_lsn``), for the node's own tails and the kept copies of
    tails replicas shipped. Reports that cannot be read, or that have no ``survivor_end``, are
    left out."""
    diverged_dir = os.path.abspath(os.path.join(node_dir, DIVERGED_DIR))
    kept_dir = os.path.abspath(os.path.join(node_dir, KEPT_TAILS_DIR))
    wanted: list[tuple[str, str]] = []
    with SeekReader(cut_tail) as reader:
        first, last = reader.first_lsn(), reader.last()[0]
        cut_hashes: dict[int, str] = {}

        def in_cut(lsn: int, record_hash: str) -> bool:
            if not (first <= lsn <= last and lsn > fork_lsn):
                return False
            if lsn not in cut_hashes:
                cut_hashes[lsn] = reader.hash_at(lsn).hex()
            return cut_hashes[lsn] == record_hash

        for report in list_reports(node_dir):
            try:
                with open(report) as f:
                    doc = json.load(f)
                end = doc["apply"].get("survivor_end")
                side = doc["survivor"]["side"]
                loser = os.path.abspath(doc["b" if side == "a" else "a"]["path"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable, or a report with no survivor_end
            if doc["apply"].get("status") != "done" or not end or not in_cut(int(end["lsn"]), end["hash"]):
                continue
            if os.path.dirname(loser) in (diverged_dir, kept_dir):
                wanted.append((loser, report))
    return wanted


def _requeue(node_dir: str, cut_tail: str, wanted: list[tuple[str, str]]) -> list[str]:
    """List each ``(loser tail, report)`` of ``wanted`` as pending in ``diverged.json`` (one
    atomic replace), a replica's kept copy moved into ``NODE/diverged/`` first. A tail pending
    already, or merged into another tail (that one is requeued), is left alone."""
    diverged_dir = os.path.abspath(os.path.join(node_dir, DIVERGED_DIR))
    kept_dir = os.path.abspath(os.path.join(node_dir, KEPT_TAILS_DIR))
    entries = read_tails(node_dir)
    listed = {os.path.abspath(e["path"]): e for e in entries}
    requeued = []
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for loser, report in wanted:
        if os.path.dirname(loser) == kept_dir:
            dest = os.path.join(diverged_dir, _REQUEUED_PREFIX + os.path.basename(loser))
            if os.path.isdir(loser) and not os.path.exists(dest):
                os.makedirs(diverged_dir, exist_ok=True)
                os.rename(loser, dest)
                OS_FILEOPS.fsync_dir(diverged_dir)
                OS_FILEOPS.fsync_dir(kept_dir)
            if not os.path.isdir(dest):
                continue  # the kept copy is gone (moved by an earlier cut: listed then)
            loser = dest
        entry = listed.get(loser)
        if entry is None:
            if not os.path.isdir(loser):
                continue
            _, tail_fork, _, tail_last = tail_ends(loser)
            entry = {"path": loser, "fork_lsn": tail_fork, "last_lsn": tail_last, "records": tail_last - tail_fork,
                     "cut_at": stamp, "reconciled": False}
            entries.append(entry)
            listed[loser] = entry
        elif not entry.get("reconciled") or entry.get("merged_into"):
            continue  # pending already, or its records are in a merged tail (that one is requeued)
        entry["reconciled"] = False
        entry["requeued"] = {"after_cut": cut_tail, "report": report}
        requeued.append(loser)
    if requeued:
        write_tails(node_dir, entries)
        _log.warning("node %s: the cut %s took away the apply of %d reconciled tail(s); pending again: %s",
                     node_dir, cut_tail, len(requeued), ", ".join(requeued))
    return requeued
