"""The old name of the reconcile driver: its names now live in :mod:`engine.reconcile`."""

from engine.reconcile.apply import (
    _REPORT_EVERY_ACTIONS,
    ApplyResult,
    _AlreadyPresent,
    _Executor,
    _Gone,
    _log_end,
    _write_report,
    apply_reconcile,
    log,
)
from engine.reconcile.errors import NotSurvivorError, ReconcileError, UndecodableRecordError
from engine.reconcile.planner import (
    Action,
    MailboxView,
    MessageView,
    Plan,
    arrival_order,
    moved_keys_wanted,
    plan,
)
from engine.reconcile.read import _GUID_WINDOW, Progress, Reconciliation, StoreView, _decoded, _names_from_prefix
from engine.reconcile.read import NoProgress as _NoProgress
from engine.reconcile.read import choose_survivor, guids_at_fork, reconcile
from engine.reconcile.read import store_names as _store_names
from engine.reconcile.replay import SideReplay
from engine.reconcile.reports import REPORT_DIR, REPORT_FORMAT, list_reports, reconcile_summary
from engine.reconcile.reports import new_report_path as _report_path
from engine.reconcile.tail_diff import Diff, compare

__all__ = [
    "REPORT_DIR",
    "ReconcileError",
    "NotSurvivorError",
    "UndecodableRecordError",
    "Progress",
    "Reconciliation",
    "ApplyResult",
    "reconcile",
    "apply_reconcile",
    "guids_at_fork",
    "choose_survivor",
    "reconcile_summary",
    "list_reports",
    "StoreView",
]
