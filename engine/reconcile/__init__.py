"""Reconciling two logs after a fork (specs/reconcile.md; stranded tails: CTL-9 in specs/control.md).

What a reconcile is
-------------------
After a hard failover two copies of one log can hold different records
after some LSN: the *fork point* (REC-1). The records one side wrote after it
are its *tail*. A reconcile brings the *survivor* (the master that lives on)
up to date with the *loser*'s tail: it copies the loser's messages, flag
changes, mailbox creates and renames into the survivor through the
survivor's ordinary write path, so each change is a durable log record. It
never rewrites history: the loser's tail stays where it was cut aside.

The order of a reconcile
------------------------
1. **Locate the fork** (:func:`reconcile`, :mod:`.read`): a binary search over
   both logs' record hashes (:func:`wal.fork.search_fork`, REC-1..REC-3),
   which reads O(log n) records and never the shared prefix.
2. **Diff** (:func:`diff` / :func:`compare`, :mod:`.replay` and
   :mod:`.tail_diff`): each tail is replayed into tracks of mailboxes and
   messages, and the two sides' mailboxes are paired (REC-4) and compared.
3. **Plan** (:func:`plan`, :mod:`.planner`): the diff becomes a list of
   :class:`Action` s checked against the survivor's current store (a
   :class:`SurvivorView`), plus decisions that need no action.
4. **Apply** (:func:`apply_reconcile`, :mod:`.apply`): each action re-checks
   its target and writes through the node.
5. **Report** (:mod:`.reports`): ``NODE/reconcile/<seq>-<time>-fork<lsn>.json``
   is written before the first action and rewritten as actions complete.

Which module does what
----------------------
* :mod:`.replay`: one tail replayed into tracks; the flag rule (REC-8).
* :mod:`.tail_diff`: the diff of two replayed tails (REC-4..REC-8).
* :mod:`.planner`: the plan, one method per rule group (REC-5..REC-14).
* :mod:`.read`: reading the logs and the survivor's store for a reconcile
  (fork search, tails, names and GUIDs from the shared prefix).
* :mod:`.apply`: the executor and :func:`apply_reconcile`.
* :mod:`.reports`: report paths, writing, listing, the ``walctl status`` summary.
* :mod:`.placement`: putting a diverged tail whose fork point left the
  master's history back on it before it is reconciled (CTL-9).
* :mod:`.errors`: the errors, each saying what the operator can do.

:mod:`.replay`, :mod:`.tail_diff` and :mod:`.planner` are the pure core:
no I/O, no clock (times are the records' own), no threads.

The REC rules, in short
-----------------------
* REC-1..REC-3: the fork point, epoch history, and finding the fork point
  without reading the prefix.
* REC-4: mailboxes that existed at the fork pair by id; ones created in the
  tails pair by name.
* REC-5: a message only in the loser's tail is copied (one message per GUID).
* REC-6: a UID both sides gave to different messages: the loser's message is
  copied, the survivor's moves to a fresh UID (strategy ``renumber``); every
  UID a reconcile gives is one no client of either side saw.
* REC-7: mailbox creates and renames are carried over; a survivor's delete
  with loser mail in it recreates the mailbox.
* REC-8: per flag, the later change wins; a tie keeps the flag set.
* REC-9: strategy ``uidvalidity``: a new UIDVALIDITY, every message renumbered.
* REC-10: the loser's expunges and mailbox deletes only with ``--apply-destructive``.
* REC-11: every decision, action and warning goes to the report.
* REC-12: planning again after an apply plans only what is still missing.
* REC-13: ``walctl reconcile``.
* REC-14: the loser's flag changes on a message the survivor moved follow it.
* REC-15, REC-16: the loser's user and subscription changes, unless the survivor's are later.
* REC-17: the loser's copies, moves and appends of several messages are deliveries of its tail;
  a move's source stays.
"""

from .apply import ApplyResult, apply_reconcile
from .errors import NotSurvivorError, ReconcileError, TailPlacementError, UndecodableRecordError
from .placement import TailBase, locate_tail_base, node_uid_floors, place_tail, rebase_tail
from .planner import (
    STRATEGIES,
    Action,
    DictSurvivorView,
    MailboxView,
    MessageView,
    Plan,
    SurvivorView,
    arrival_order,
    moved_keys_wanted,
    plan,
)
from .read import Progress, Reconciliation, StoreView, choose_survivor, guids_at_fork, reconcile
from .replay import FlagOp, MailboxTrack, MessageTrack, SideReplay, resolve_flag
from .reports import REPORT_DIR, list_reports, reconcile_summary
from .tail_diff import Diff, MailboxDiff, compare, diff

__all__ = [
    # locate the fork, read the tails
    "reconcile",
    "Reconciliation",
    "Progress",
    "guids_at_fork",
    "choose_survivor",
    "StoreView",
    # diff
    "diff",
    "compare",
    "Diff",
    "MailboxDiff",
    "SideReplay",
    "MailboxTrack",
    "MessageTrack",
    "FlagOp",
    "resolve_flag",
    # plan
    "plan",
    "Plan",
    "Action",
    "STRATEGIES",
    "SurvivorView",
    "DictSurvivorView",
    "MailboxView",
    "MessageView",
    "moved_keys_wanted",
    "arrival_order",
    # apply and report
    "apply_reconcile",
    "ApplyResult",
    "REPORT_DIR",
    "list_reports",
    "reconcile_summary",
    # tail placement (CTL-9)
    "place_tail",
    "locate_tail_base",
    "rebase_tail",
    "node_uid_floors",
    "TailBase",
    # errors
    "ReconcileError",
    "NotSurvivorError",
    "UndecodableRecordError",
    "TailPlacementError",
]
