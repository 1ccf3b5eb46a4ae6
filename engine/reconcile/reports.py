"""Reconcile reports: ``NODE/reconcile/<seq>-<UTC time>-fork<lsn>.json`` (REC-11).

An apply writes its report (every decision, action and result) before its
first action and rewrites it as actions complete, each time by an atomic
replace; :func:`reconcile_summary` reads the last one for ``walctl status``.
"""

from __future__ import annotations

import json
import os
import time

from wal import OS_FILEOPS

from ..node.layout import REPORT_DIR, list_reports

__all__ = ["REPORT_DIR", "REPORT_FORMAT", "list_reports", "new_report_path", "write_report", "reconcile_summary"]

REPORT_FORMAT = 1


def new_report_path(node_dir: str, fork_lsn: int) -> str:
    """``NODE/reconcile/<seq>-<UTC time>-fork<lsn>.json``; the sequence number orders reports."""
    directory = os.path.join(node_dir, REPORT_DIR)
    seq = 0
    for path in list_reports(node_dir):
        head = os.path.basename(path).split("-", 1)[0]
        if head.isdigit():
            seq = max(seq, int(head))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return os.path.join(directory, f"{seq + 1:06d}-{stamp}-fork{fork_lsn}.json")


def write_report(path: str, doc: dict) -> None:
    """Write the report ``doc`` to ``path`` (atomic replace; the directory is made and
    fsynced the first time), stamped with ``written_ms``."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        OS_FILEOPS.mkdir(directory)
        OS_FILEOPS.fsync_dir(os.path.dirname(directory))
    doc["written_ms"] = int(time.time() * 1000)
    OS_FILEOPS.write_file_atomic(path, json.dumps(doc, indent=1, sort_keys=False).encode() + b"\n")


def reconcile_summary(node_dir: str) -> dict:
    """A short summary of a node's reconcile reports, for ``walctl status``.

    ``{"reports": n, "last": {file, status, fork, survivor, diverged, counts,
    actions, warnings, written_ms} | None}``; ``last.status`` is ``done``,
    ``failed``, ``applying`` (still running, or it crashed: rerun it) or
    ``interrupted``.
    """
    files = list_reports(node_dir)
    out: dict = {"reports": len(files), "last": None}
    if not files:
        return out
    try:
        with open(files[-1], "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        out["last"] = {"file": files[-1], "status": "unreadable", "error": str(exc)}
        return out
    out["last"] = {
        "file": files[-1],
        "status": doc.get("apply", {}).get("status"),
        "fork": doc.get("fork"),
        "survivor": doc.get("survivor", {}).get("side"),
        "diverged": doc.get("diverged"),
        "counts": doc.get("counts"),
        "actions": {k: v for k, v in doc.get("apply", {}).items() if k not in ("status", "dry_run")},
        "warnings": len(doc.get("plan", {}).get("warnings", [])),
        "written_ms": doc.get("written_ms"),
    }
    return out
