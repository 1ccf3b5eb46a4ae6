"""The old name of the pure reconcile core: its names now live in :mod:`engine.reconcile`."""

from engine.reconcile.planner import (
    _ORDER,
    STRATEGIES,
    Action,
    DictSurvivorView,
    MailboxView,
    MessageView,
    Plan,
    SurvivorView,
    _latest,
    _one_per_guid,
    _survivor_ops,
    _winning_ops,
    arrival_order,
    moved_keys_wanted,
    plan,
)
from engine.reconcile.replay import FlagOp, Key, MailboxTrack, MessageTrack, SideReplay, resolve_flag
from engine.reconcile.tail_diff import Diff, MailboxDiff, _message_conflicts, compare, diff

__all__ = [
    "STRATEGIES",
    "FlagOp",
    "MessageTrack",
    "MailboxTrack",
    "SideReplay",
    "MailboxDiff",
    "Diff",
    "diff",
    "MessageView",
    "MailboxView",
    "SurvivorView",
    "DictSurvivorView",
    "Action",
    "Plan",
    "plan",
    "moved_keys_wanted",
    "arrival_order",
    "resolve_flag",
]
