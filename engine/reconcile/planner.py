"""The plan: what brings the survivor up to date with the loser's tail (REC-5..REC-14).

:func:`plan` turns a :class:`~engine.reconcile.tail_diff.Diff` into the
:class:`Action` list that brings the *survivor* (the master that lives on) up
to date with the *loser*'s tail, checking each one against a
:class:`SurvivorView` of the survivor's current store. Because every action
is derived from the current store, planning again after an apply (complete
or interrupted) yields only what is still missing: the apply is idempotent
(REC-12). Choices that need no action are recorded as decisions, each with
the rule that made it.

Pure: no I/O, no clock; the driver (:mod:`engine.reconcile.apply`) reads the
store and the logs and passes what the plan needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Protocol

from .replay import FlagOp, Key, LastChange, MailboxTrack, MessageTrack, resolve_flag
from .tail_diff import Diff, MailboxDiff

__all__ = [
    "STRATEGIES",
    "MessageView",
    "MailboxView",
    "SurvivorView",
    "DictSurvivorView",
    "Action",
    "Plan",
    "plan",
    "moved_keys_wanted",
    "arrival_order",
]

STRATEGIES = ("renumber", "uidvalidity")


@dataclass(frozen=True)
class MessageView:
    """One message of the survivor's store as it is now."""

    uid: int
    guid: bytes
    flags: frozenset
    internaldate_ms: int = 0
    delivered_ms: int = 0


@dataclass
class MailboxView:
    """One mailbox of the survivor's store as it is now (read once per plan, never changed)."""

    mailbox_id: str
    name: str
    uidvalidity: int
    uidnext: int
    messages: dict[int, MessageView]

    def uids_of(self, guid: bytes) -> list[int]:
        """The UIDs holding ``guid``, ascending. A view is read once for a plan and never
        changed, so its GUID index is built on the first call (the plan asks per message)."""
        return list(self._uids_by_guid.get(guid, ()))

    @cached_property
    def _uids_by_guid(self) -> dict[bytes, list[int]]:
        index: dict[bytes, list[int]] = {}
        for uid in sorted(self.messages):
            index.setdefault(self.messages[uid].guid, []).append(uid)
        return index


class SurvivorView(Protocol):
    """Read access to the survivor's current mailboxes, users and subscriptions (the driver reads its store)."""

    def by_id(self, mailbox_id: str) -> MailboxView | None: ...

    def by_name(self, name: str) -> MailboxView | None: ...

    def user_hash(self, name: str) -> str | None: ...

    def subscribed(self, user: str, mailbox: str) -> bool: ...


class DictSurvivorView:
    """A :class:`SurvivorView` over plain data (tests, and the driver's cache)."""

    def __init__(self, mailboxes: Iterable[MailboxView], users: dict[str, str] | None = None,
                 subscriptions: Iterable[tuple[str, str]] = ()):
        self._by_id = {m.mailbox_id: m for m in mailboxes}
        self._users = dict(users or {})
        self._subscriptions = set(subscriptions)

    def user_hash(self, name: str) -> str | None:
        return self._users.get(name)

    def subscribed(self, user: str, mailbox: str) -> bool:
        return (user, mailbox) in self._subscriptions

    def by_id(self, mailbox_id: str) -> MailboxView | None:
        return self._by_id.get(mailbox_id)

    def by_name(self, name: str) -> MailboxView | None:
        for m in self._by_id.values():
            if m.name == name:
                return m
        return None


# ---------------------------------------------------------------------------
# The plan


@dataclass
class Action:
    """One change to make on the survivor, with the rule that asks for it.

    ``kind`` is one of: ``create_mailbox``, ``rename_mailbox``,
    ``copy_message``, ``set_flags``, ``redeliver``, ``expunge``,
    ``renumber``, ``delete_mailbox``, ``set_user``, ``delete_user``,
    ``set_subscription``. ``mailbox`` names the target (id when it exists,
    else the name a ``create_mailbox`` before it makes; empty for users).
    """

    kind: str
    rule: str
    mailbox_id: str | None
    mailbox: str
    detail: dict
    reason: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "rule": self.rule, "mailbox_id": self.mailbox_id, "mailbox": self.mailbox,
                **self.detail, "reason": self.reason}


@dataclass
class Plan:
    """What :func:`plan` decided: the actions in the order they run, and the decisions and
    warnings that go to the report (REC-11)."""

    survivor: str  # "a" or "b"
    strategy: str
    destructive: bool
    actions: list[Action] = field(default_factory=list)
    decisions: list[dict] = field(default_factory=list)  # choices that need no action
    warnings: list[str] = field(default_factory=list)  # GUID mismatches and the like (REC-11)

    def counts(self) -> dict:
        out: dict[str, int] = {"actions": len(self.actions), "decisions": len(self.decisions),
                               "warnings": len(self.warnings)}
        for a in self.actions:
            out[a.kind] = out.get(a.kind, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"survivor": self.survivor, "strategy": self.strategy, "destructive": self.destructive,
                "actions": [a.to_dict() for a in self.actions], "decisions": self.decisions,
                "warnings": self.warnings, "counts": self.counts()}


# The order actions run in: a mailbox exists before messages go into it, messages are in place
# before their flags, collisions and expunges come after the copies they make room for.
_ORDER = {"set_user": 0, "delete_user": 0, "create_mailbox": 0, "rename_mailbox": 1, "copy_message": 2,
          "set_flags": 3, "keep_flag_changes": 3, "redeliver": 4, "expunge": 5, "renumber": 6, "delete_mailbox": 7,
          "set_subscription": 8}


def arrival_order(messages: Iterable[MessageView]) -> list[int]:
    """REC-9: UIDs in arrival order (delivery time, then old UID)."""
    return [m.uid for m in sorted(messages, key=lambda m: (m.delivered_ms, m.uid))]


def moved_keys_wanted(d: Diff, survivor: str) -> dict[str, set[int]]:
    """REC-14: the pre-fork messages whose GUID :func:`plan` needs, by mailbox id -> UIDs at the fork.

    These are the messages of a mailbox that existed at the fork whose flags the
    loser changed and that the survivor's tail expunged: the tails name them by
    ``(mailbox id, UID at the fork)`` only, and the survivor may hold the same
    message at another UID (a REC-6 redelivery). The driver reads their GUIDs
    from the shared prefix and passes them to :func:`plan` as ``pre_guids``.

    Also listed (REC-5): the messages from before the fork that *both* tails
    expunged, in a mailbox where the loser delivered: the loser's expunge may be
    the second half of a REC-6 move whose redelivery is in its tail, and when the
    survivor's expunge was a client's, that redelivery is the message the
    survivor's client expunged, not one to copy back.
    """
    survivor_replay = d.a if survivor == "a" else d.b
    loser_replay = d.b if survivor == "a" else d.a
    out: dict[str, set[int]] = {}
    for mailbox_diff in d.mailboxes:
        loser_track = mailbox_diff.track("b" if survivor == "a" else "a")
        if not mailbox_diff.same_id or loser_track is None:
            continue
        delivered = bool(loser_replay.messages_in(loser_track.mailbox_id))
        for loser_msg in loser_replay.messages_in(loser_track.mailbox_id, "pre"):
            survivor_msg = survivor_replay.messages.get(loser_msg.key)
            if survivor_msg is None or survivor_msg.expunged_lsn is None or survivor_msg.gone_with_mailbox:
                continue
            if (loser_msg.explicit or loser_msg.baseline) or (delivered and loser_msg.expunged_lsn is not None):
                out.setdefault(loser_msg.mailbox_id, set()).add(loser_msg.key[2])
    return out


def _one_per_guid(tracks: Iterable[MessageTrack]) -> list[MessageTrack]:
    """REC-5, REC-8: the messages one tail delivered into one mailbox, one per GUID.

    A tail can deliver one GUID more than once into a mailbox: a REC-6 move
    delivers the message at a fresh UID (same bytes, flags and dates; one
    record, MS-16, or in a log that holds it so, a redelivery before the
    expunge of the old UID). It is one message; it lives on at the
    greatest UID still holding it (else at its last delivery), whose flags are
    its flags. Its operations per flag are the latest in log order on any of
    its UIDs, except the flags a later delivery with the first one's delivery
    time only copied (a redelivery's ``append``: not a client's decision).
    The merged track keeps the first delivery's LSN (its arrival)."""
    groups: dict[bytes, list[MessageTrack]] = {}
    for m in sorted(tracks, key=lambda m: m.lsn):
        groups.setdefault(m.guid, []).append(m)
    out = []
    for same in groups.values():
        if len(same) == 1:
            out.append(same[0])
            continue
        alive = [m for m in same if m.alive]
        live = max(alive, key=lambda m: m.uid) if alive else same[-1]
        first = same[0]
        replaces = [t.baseline for t in same if t.baseline is not None]
        baseline = max(replaces, key=lambda b: b[1].lsn) if replaces else None
        since = baseline[1].lsn if baseline is not None else -1
        explicit: dict[str, FlagOp] = {}
        for t in same:
            copied = t is not first and t.delivered_ms == first.delivered_ms
            for flag, op in t.explicit.items():
                if op.lsn <= since or (copied and op.via == "append"):
                    continue
                if flag not in explicit or op.lsn > explicit[flag].lsn:
                    explicit[flag] = op
        out.append(MessageTrack(
            live.key, live.mailbox_id, live.uid, guid=live.guid, size=live.size,
            internaldate_ms=first.internaldate_ms, delivered_ms=first.delivered_ms, lsn=first.lsn,
            uid_space=live.uid_space, flags=live.flags, explicit=explicit, baseline=baseline,
            changes=sorted((c for t in same for c in t.changes), key=lambda c: c["lsn"]),
            expunged_lsn=live.expunged_lsn, gone_with_mailbox=live.gone_with_mailbox,
            body_from=next((t.body_from for t in same if t.body_from), None)))
    return out


def _winning_ops(loser_msg: MessageTrack, survivor_msg: MessageTrack) -> list[list]:
    """``[flag, value, changed_ms]`` for each flag whose loser operation wins over the
    survivor's (REC-8), in flag order."""
    out = []
    for flag in sorted(loser_msg.touched_flags()):
        winner, op = resolve_flag(survivor_msg.op(flag), loser_msg.op(flag))
        if winner == "loser":
            out.append([flag, op.value, op.changed_ms])
    return out


def _latest(ops: Iterable[FlagOp | None]) -> FlagOp | None:
    """The operation logged last (greatest LSN) among ``ops`` of one log, None if none."""
    return max((op for op in ops if op is not None), key=lambda op: op.lsn, default=None)


def _survivor_ops(moved: MessageTrack, holder: MessageTrack | None, key: Key, guid: bytes) -> MessageTrack:
    """REC-14: the survivor's operations on a message it moved from one UID to another.

    Per flag, the later (by LSN: one log) of its operations on the old UID and on
    the new one. The new UID's delivery only copied the old UID's flags, so its
    ``append`` operations are not decisions of the survivor and are left out."""
    merged: dict[str, FlagOp] = {}
    tracks = [moved] + ([holder] if holder is not None else [])
    for flag in set().union(*(t.touched_flags() for t in tracks)):
        ops = [op for t in tracks if (op := t.op(flag)) is not None and op.via != "append"]
        if ops:
            merged[flag] = max(ops, key=lambda op: op.lsn)
    return MessageTrack(key, moved.mailbox_id, key[2], guid=guid, explicit=merged)


def plan(d: Diff, survivor: str, view: SurvivorView, *, strategy: str = "renumber",
         destructive: bool = False, pre_guids: dict[Key, bytes] | None = None, merge: bool = False) -> Plan:
    """The actions that merge the loser's tail into the survivor (REC-5..REC-12).

    Args:
        d: the diff of the two tails.
        survivor: ``"a"`` or ``"b"``: the side whose node lives on.
        view: the survivor's current store.
        strategy: ``"renumber"`` or ``"uidvalidity"`` for UID collisions.
        destructive: also apply the loser's expunges and mailbox deletes.
        pre_guids: ``("pre", mailbox id, UID at the fork) -> GUID`` from the
            shared prefix, for the keys :func:`moved_keys_wanted` lists
            (REC-14). A key missing here is treated as expunged for good.
        merge: the survivor is a CTL-9 merge's scratch node, whose records
            become a tail reconciled again later: a loser's flag change on a
            message the survivor expunged is kept (``keep_flag_changes``),
            not dropped, since that expunge may never be applied (REC-10).

    Raises:
        ValueError: ``survivor`` or ``strategy`` is not one of the allowed values.
    """
    return Planner(d, survivor, view, strategy=strategy, destructive=destructive, pre_guids=pre_guids,
                   merge=merge).run()


@dataclass
class _MailboxPair:
    """One mailbox of the diff as the planner works on it."""

    diff: MailboxDiff
    survivor_track: MailboxTrack | None  # what the survivor's tail did to it (None: nothing)
    loser_track: MailboxTrack  # what the loser's tail did to it
    target: MailboxView | None  # the survivor's mailbox that receives the loser's changes (None: none yet)
    target_name: str  # its name, or the name a create_mailbox gives it
    loser_deliveries: list[MessageTrack]  # the loser's tail's deliveries into it, one per GUID
    uid_floor: int  # REC-6: every UID the reconcile gives here is at least this

    @property
    def label(self) -> str:
        return self.diff.name

    @property
    def same_mailbox(self) -> bool:
        """The target is the mailbox both sides had at the fork (one id), not one matched by name."""
        return self.diff.same_id and self.target is not None and self.target.mailbox_id == self.loser_track.mailbox_id


class Planner:
    """Builds the :class:`Plan` for one diff (:func:`plan` is the entry point).

    Each mailbox pair the loser's tail touched is planned by the rule groups
    below, in this order (the order of the report's decisions):

    1. the loser deleted the mailbox (:meth:`_loser_deleted_mailbox`, REC-10);
    2. the mailbox itself: create or rename (:meth:`_create_or_rename_mailbox`, REC-7);
    3. copies of the loser's deliveries (:meth:`_copy_loser_deliveries`, REC-5);
    4. flags (:meth:`_merge_flags`, REC-8, with REC-14 and CTL-9 for messages
       the survivor expunged);
    5. UID collisions (:meth:`_resolve_collisions`, REC-6 or REC-9);
    6. the loser's expunges of messages from before the fork
       (:meth:`_apply_loser_expunges`, REC-10 and its REC-6 exception).

    Copies then go in the loser's arrival order across mailboxes (REC-5) and
    every action in the order the executor must run them (``_ORDER``).
    """

    def __init__(self, diff: Diff, survivor: str, view: SurvivorView, *, strategy: str = "renumber",
                 destructive: bool = False, pre_guids: dict[Key, bytes] | None = None, merge: bool = False):
        if survivor not in ("a", "b"):
            raise ValueError("survivor must be 'a' or 'b'")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
        self.diff = diff
        self.survivor = survivor
        self.loser = "b" if survivor == "a" else "a"
        self.view = view
        self.strategy = strategy
        self.destructive = destructive
        self.pre_guids = pre_guids or {}
        self.merge = merge
        self.survivor_replay = diff.a if survivor == "a" else diff.b
        self.loser_replay = diff.b if survivor == "a" else diff.a
        self.plan = Plan(survivor, strategy, destructive)
        self._copies: list[tuple[int, Action]] = []  # (LSN of the loser's delivery, its copy)
        self._created_names: set[str] = set()

    def run(self) -> Plan:
        """Plan every mailbox of the diff, then users (REC-15) and subscriptions (REC-16); call once."""
        for mailbox_diff in self.diff.mailboxes:
            self._plan_mailbox(mailbox_diff)
        self._plan_users()
        self._plan_subscriptions()
        # REC-5: copies go in the loser's arrival order across mailboxes.
        self.plan.actions.extend(action for _, action in sorted(self._copies, key=lambda c: c[0]))
        self.plan.actions.sort(key=lambda action: _ORDER[action.kind])  # stable: copies keep their order
        return self.plan

    # -- helpers ---------------------------------------------------------------

    def _decide(self, rule: str, mailbox: str, text: str, **extra) -> None:
        """Record a choice that needs no action (REC-11: it goes to the report)."""
        self.plan.decisions.append({"rule": rule, "mailbox": mailbox, "decision": text, **extra})

    def _act(self, kind: str, rule: str, pair: _MailboxPair, detail: dict, reason: str) -> None:
        self.plan.actions.append(Action(kind, rule, pair.target.mailbox_id, pair.target.name, detail, reason))

    def _target_for(self, mailbox_diff: MailboxDiff, loser_track: MailboxTrack) -> tuple[MailboxView | None, str]:
        """REC-4, REC-7: the survivor mailbox that receives the loser's messages for this pair: the
        same mailbox (by id) if it existed at the fork and still does, else the one of its name."""
        if mailbox_diff.same_id:
            by_id = self.view.by_id(loser_track.mailbox_id)
            if by_id is not None:
                return by_id, by_id.name
        name = (loser_track.deleted[1] if loser_track.deleted else loser_track.name) or mailbox_diff.fork_name
        if name is None:
            return None, loser_track.mailbox_id
        return self.view.by_name(name), name

    def _plan_mailbox(self, mailbox_diff: MailboxDiff) -> None:
        loser_track = mailbox_diff.track(self.loser)
        if loser_track is None:
            return  # only the survivor changed this mailbox: nothing to bring over
        target, target_name = self._target_for(mailbox_diff, loser_track)
        pair = _MailboxPair(
            mailbox_diff, mailbox_diff.track(self.survivor), loser_track, target, target_name,
            loser_deliveries=_one_per_guid(self.loser_replay.messages_in(loser_track.mailbox_id)),
            # REC-6: never reuse a UID the loser's clients saw
            uid_floor=loser_track.max_uid + 1 if mailbox_diff.same_id else 0,
        )
        if loser_track.deleted is not None:
            if self.destructive:
                self._loser_deleted_mailbox(pair)
                return
            self._decide("REC-10", pair.label, f"deleted on the loser (LSN {loser_track.deleted[0]}); not applied "
                                               f"without --apply-destructive: its messages are kept",
                         lsn=loser_track.deleted[0])
        self._create_or_rename_mailbox(pair)
        self._copy_loser_deliveries(pair)
        if pair.target is None:
            return
        self._merge_flags(pair)
        collided = self._resolve_collisions(pair)
        self._apply_loser_expunges(pair, collided if self.strategy == "renumber" else set())

    # -- REC-15, REC-16: users and subscriptions ----------------------------------

    @staticmethod
    def _loser_wins(survivor: LastChange | None, loser: LastChange) -> bool:
        """REC-15, REC-16: the loser's change is applied unless the survivor changed the same thing
        at the same time or later (``changed_ms``; a tie keeps the survivor's)."""
        return survivor is None or loser.changed_ms > survivor.changed_ms

    def _plan_users(self) -> None:
        """REC-15: each user the loser changed gets the loser's last change, unless the survivor
        changed that user later; nothing when the survivor has it already."""
        for name, loser in sorted(self.loser_replay.users.items()):
            survivor = self.survivor_replay.users.get(name)
            if not self._loser_wins(survivor, loser):
                self._decide("REC-15", "", f"user {name!r}: the survivor's later change stands", user=name,
                             survivor=survivor.to_dict(), loser=loser.to_dict())
                continue
            if self.view.user_hash(name) == loser.value:
                continue
            kind = "set_user" if loser.value is not None else "delete_user"
            detail = {"user": name, "changed_ms": loser.changed_ms}
            if loser.value is not None:
                detail["password_hash"] = loser.value
            why = "password set on the loser" if loser.value is not None else "deleted on the loser"
            self.plan.actions.append(Action(kind, "REC-15", None, "", detail, why))

    def _plan_subscriptions(self) -> None:
        """REC-16: per user and mailbox name, the loser's last subscribe or unsubscribe, unless the
        survivor changed it later."""
        for (user, mailbox), loser in sorted(self.loser_replay.subscriptions.items()):
            survivor = self.survivor_replay.subscriptions.get((user, mailbox))
            if not self._loser_wins(survivor, loser):
                self._decide("REC-16", mailbox, f"{user}'s subscription: the survivor's later change stands",
                             user=user)
                continue
            if self.view.subscribed(user, mailbox) == loser.value:
                continue
            self.plan.actions.append(Action(
                "set_subscription", "REC-16", None, mailbox,
                {"user": user, "subscribed": loser.value, "changed_ms": loser.changed_ms},
                "subscribed on the loser" if loser.value else "unsubscribed on the loser"))

    # -- REC-10, REC-7: the mailbox itself ---------------------------------------

    def _loser_deleted_mailbox(self, pair: _MailboxPair) -> None:
        """REC-10 with --apply-destructive: delete the survivor's mailbox the loser deleted, unless
        the survivor received mail in it after the fork."""
        if not pair.same_mailbox:
            self._decide("REC-10", pair.label, "created or deleted on the loser only: nothing to copy")
            return
        fresh = ([m for m in self.survivor_replay.messages_in(pair.loser_track.mailbox_id) if m.alive]
                 if pair.survivor_track else [])
        if fresh:
            self._decide("REC-10", pair.label, f"deleted on the loser, but the survivor received {len(fresh)} "
                                               f"message(s) in it after the fork: kept")
            self.plan.warnings.append(f"mailbox {pair.label!r}: not deleted, the survivor has new mail in it")
        else:
            self._act("delete_mailbox", "REC-10", pair, {}, "deleted on the loser; --apply-destructive")

    def _create_or_rename_mailbox(self, pair: _MailboxPair) -> None:
        """REC-7: create the target when the survivor has none (once per name), or give it the
        loser's last name unless the survivor renamed it too or the name is taken."""
        loser_track, target = pair.loser_track, pair.target
        if target is None:
            needs = any(True for _ in self.loser_replay.messages_in(loser_track.mailbox_id)) or loser_track.created
            if needs and pair.target_name not in self._created_names:
                why = ("created on the loser" if loser_track.created else
                       "deleted on the survivor; the loser still has mail for it: recreated under its name")
                self.plan.actions.append(Action("create_mailbox", "REC-7", None, pair.target_name, {}, why))
                self._created_names.add(pair.target_name)
            return
        if not (pair.same_mailbox and loser_track.renames):
            return
        final = loser_track.renames[-1][2]
        fork_name = loser_track.renames[0][1]
        if target.name == final:
            return
        if pair.survivor_track is not None and pair.survivor_track.renames:
            self._decide("REC-7", pair.label, f"renamed on both sides ({fork_name!r} -> {target.name!r} on the "
                                              f"survivor, -> {final!r} on the loser): the survivor's name is kept")
        elif self.view.by_name(final) is not None:
            self._decide("REC-7", pair.label, f"renamed to {final!r} on the loser, but the survivor has a mailbox "
                                              f"of that name: kept as {target.name!r}")
        else:
            self._act("rename_mailbox", "REC-7", pair, {"new_name": final, "children": loser_track.rename_children},
                      f"renamed on the loser to {final!r}")

    # -- REC-5: copies of messages only the loser has ----------------------------

    def _survivor_expunged_at_fork(self, pair: _MailboxPair) -> dict[bytes, MessageTrack]:
        """GUID -> the survivor's track of a message from before the fork that its tail expunged
        (GUIDs known from ``pre_guids``, :func:`moved_keys_wanted`): a loser's REC-6 redelivery
        of one of them is that message."""
        out = {}
        if pair.diff.same_id and pair.survivor_track is not None:
            for expunged in self.survivor_replay.messages_in(pair.survivor_track.mailbox_id, "pre"):
                guid = self.pre_guids.get(expunged.key)
                if guid is not None and expunged.expunged_lsn is not None and not expunged.gone_with_mailbox:
                    out[guid] = expunged
        return out

    def _copy_loser_deliveries(self, pair: _MailboxPair) -> None:
        """REC-5: copy back each message only the loser's tail delivered (one per GUID); not one
        the survivor holds, one both sides delivered that the survivor expunged since, or the
        loser's move of a message the survivor expunged; REC-10: not one the loser expunged,
        with --apply-destructive."""
        label, target = pair.label, pair.target
        both_guids = {m.guid for both in pair.diff.both for m in both}
        survivor_guids = ({m.guid for m in self.survivor_replay.messages_in(pair.survivor_track.mailbox_id)}
                          if pair.survivor_track is not None else set())
        expunged_at_fork = self._survivor_expunged_at_fork(pair)
        for message in sorted(pair.loser_deliveries, key=lambda m: m.lsn):
            if not message.alive and self.destructive and message.expunged_lsn is not None:
                self._decide("REC-10", label, "delivered and expunged on the loser: not copied "
                                              "(--apply-destructive)", guid=message.guid.hex(), lsn=message.lsn)
                continue
            present = target.uids_of(message.guid) if target is not None else []
            if present:
                if message.guid in both_guids:
                    rule, what = "REC-5", ("the survivor has it too (delivered on both sides, or copied back "
                                           "by an earlier apply): one message")
                else:
                    rule, what = "REC-12", "already on the survivor"
                self._decide(rule, label, f"{what}, at UID {present[0]}", guid=message.guid.hex(), lsn=message.lsn)
                continue
            if message.guid in survivor_guids:
                self._decide("REC-5", label, "delivered on both sides and expunged on the survivor since: not "
                                             "copied back", guid=message.guid.hex(), lsn=message.lsn)
                continue
            if message.guid in expunged_at_fork:
                expunged = expunged_at_fork[message.guid]
                self._decide("REC-5", label, f"the loser's delivery is its move (REC-6) of UID {expunged.key[2]} "
                                             f"from before the fork, which the survivor expunged at LSN "
                                             f"{expunged.expunged_lsn}: one message, the expunge stands, not "
                                             f"copied back", guid=message.guid.hex(), lsn=message.lsn,
                             uid=expunged.key[2])
                continue
            self._copies.append((message.lsn, self._copy_action(pair, message)))

    @staticmethod
    def _copy_action(pair: _MailboxPair, message: MessageTrack) -> Action:
        why = "delivered only on the loser"
        if message.expunged_lsn is not None:
            why += f"; expunged there at LSN {message.expunged_lsn}, kept without --apply-destructive"
        elif message.gone_with_mailbox:
            why += "; its mailbox was deleted there, kept without --apply-destructive"
        # REC-8: the copy holds the flags the message ended with, at its delivery time; each
        # flag's later winning change is logged after it at its own time (as set_flags would).
        later = {flag: [op.value, op.changed_ms] for flag in sorted(message.touched_flags())
                 if (op := message.op(flag)) is not None
                 and not (op.via == "append" and op.changed_ms == message.delivered_ms)}
        target = pair.target
        body = message.body_from or ("lsn", message.lsn)
        return Action("copy_message", "REC-5", target.mailbox_id if target else None,
                      target.name if target else pair.target_name,
                      {"guid": message.guid.hex(), "source_lsn": message.lsn, "body_from": list(body),
                       "flags": sorted(message.flags or ()),
                       "uid_floor": pair.uid_floor, "internaldate_ms": message.internaldate_ms,
                       "delivered_ms": message.delivered_ms, "loser_uid": message.uid, "size": message.size,
                       "flag_changes": later}, why)

    # -- REC-8, REC-14, CTL-9: flags ---------------------------------------------

    def _merge_flags(self, pair: _MailboxPair) -> None:
        """REC-8: bring the loser's winning flag operations to the survivor's messages.

        A message the loser expunged (or lost with its mailbox) stays on the survivor unless
        destructive (REC-10), and then its flags are the loser's like any other's. Several of
        the loser's tracks can be one survivor message (a pre-fork UID the survivor moved, and
        the loser's own delivery of that GUID): its operations per flag are the latest on any
        of them, as in REC-5, and it gets one set_flags action.
        """
        survivor_deliveries = {m.guid: m for m in
                               _one_per_guid(self.survivor_replay.messages_in(pair.target.mailbox_id))}
        touched = [m for m in [*self.loser_replay.messages_in(pair.loser_track.mailbox_id, "pre"),
                               *pair.loser_deliveries]
                   if (m.alive or not self.destructive) and (m.explicit or m.baseline)]
        tracks_at: dict[int, list[tuple[MessageTrack, MessageTrack | None]]] = {}  # survivor UID -> its tracks
        held_at: dict[int, MessageView] = {}
        for loser_msg in sorted(touched, key=lambda m: (m.key[0], m.uid)):
            survivor_msg, held = self._survivor_side(pair, loser_msg, survivor_deliveries)
            if held is None:
                if loser_msg.key[0] == "pre" and survivor_msg is not None and survivor_msg.expunged_lsn is not None:
                    self._flags_on_a_message_the_survivor_expunged(pair, loser_msg, survivor_msg)
                continue
            if loser_msg.guid is not None and held.guid != loser_msg.guid:
                self.plan.warnings.append(f"mailbox {pair.label!r} UID {held.uid}: GUID {held.guid.hex()[:16]} on "
                                          f"the survivor, {loser_msg.guid.hex()[:16]} expected; flags left alone")
                continue
            held_at[held.uid] = held
            tracks_at.setdefault(held.uid, []).append((loser_msg, survivor_msg))
        for uid, tracks in tracks_at.items():
            self._set_flags(pair, held_at[uid], tracks)

    def _survivor_side(self, pair: _MailboxPair, loser_msg: MessageTrack,
                       survivor_deliveries: dict[bytes, MessageTrack]) -> tuple[MessageTrack | None,
                                                                               MessageView | None]:
        """The survivor's track of the message ``loser_msg`` is (its operations since the fork,
        None if it has none) and the survivor's message now (None: it holds none)."""
        key, target, survivor_track = loser_msg.key, pair.target, pair.survivor_track
        if key[0] == "pre":
            survivor_msg = self.survivor_replay.messages.get(key)
            if not pair.same_mailbox:
                return survivor_msg, None
            if survivor_msg is not None and not survivor_msg.alive:
                return self._where_it_moved(pair, key, survivor_msg)
            uid = survivor_track.uid_of(key, False) if survivor_track is not None else key[2]
            return survivor_msg, (target.messages.get(uid) if uid is not None else None)
        # A message delivered in the loser's tail: the survivor's copy of that GUID, one message
        # however many times the survivor's tail delivered it (a REC-6 move, copies of tails).
        survivor_msg = survivor_deliveries.get(loser_msg.guid)
        uids = target.uids_of(loser_msg.guid)
        if survivor_msg is None and uids and survivor_track is not None:
            # REC-8: the survivor holds that GUID from before the fork (the loser's copy is a
            # REC-6 redelivery of it): the survivor's operations on that UID are its side.
            held_key = survivor_track.key_for(uids[0])
            if held_key is not None and held_key[0] == "pre":
                survivor_msg = self.survivor_replay.messages.get(held_key)
        return survivor_msg, (target.messages.get(uids[0]) if uids else None)

    def _where_it_moved(self, pair: _MailboxPair, key: Key,
                        survivor_msg: MessageTrack) -> tuple[MessageTrack, MessageView | None]:
        """REC-14: where a pre-fork message the survivor expunged lives on, if anywhere: the
        greatest UID holding its GUID that already held it before the expunge (a REC-6
        redelivery, or a copy from before the fork). Expunged by a client with no such
        copy: nowhere, and the loser's flag changes on it are dropped."""
        guid = self.pre_guids.get(key)
        survivor_track = pair.survivor_track
        if guid is None or survivor_msg.gone_with_mailbox or survivor_track is None:
            return survivor_msg, None
        holders = []
        for uid in pair.target.uids_of(guid):
            held_key = survivor_track.key_for(uid)
            if held_key is None:
                continue  # the survivor renumbered the mailbox and the tail never met this UID
            holder = self.survivor_replay.messages.get(held_key)
            if held_key[0] == "new" and (holder is None or holder.lsn > survivor_msg.expunged_lsn):
                continue  # delivered after the expunge: a new arrival, not where the message moved
            holders.append((uid, held_key, holder))
        if not holders:
            return survivor_msg, None
        uid, held_key, holder = max(holders, key=lambda h: h[0])
        self._decide("REC-14", pair.label, f"UID {key[2]} (from before the fork) was expunged on the survivor at "
                                           f"LSN {survivor_msg.expunged_lsn}; its message lives on at UID {uid}, "
                                           f"which gets the loser's flag changes", uid=key[2], moved_to=uid,
                     guid=guid.hex())
        return _survivor_ops(survivor_msg, holder, held_key, guid), pair.target.messages[uid]

    def _flags_on_a_message_the_survivor_expunged(self, pair: _MailboxPair, loser_msg: MessageTrack,
                                                  survivor_msg: MessageTrack) -> None:
        """The loser's flag changes on a message from before the fork that the survivor expunged
        and holds nowhere else: dropped (REC-14), or, on a CTL-9 merge's scratch node, kept
        (``keep_flag_changes``) for the reconcile the merged tail goes to."""
        uid = loser_msg.key[2]
        survivor_track = pair.survivor_track
        kept = (_winning_ops(loser_msg, survivor_msg)
                if self.merge and not survivor_msg.gone_with_mailbox and survivor_track is not None
                and not survivor_track.renumbered else None)
        if kept:
            self._decide("CTL-9", pair.label, f"UID {uid} (from before the fork) was expunged on the survivor at "
                                              f"LSN {survivor_msg.expunged_lsn}; the merged tail keeps the loser's "
                                              f"flag changes on it for the reconcile it goes to", uid=uid)
            self._act("keep_flag_changes", "CTL-9", pair, {"uid": uid, "ops": kept},
                      "flag changes on a message the merge's newer tail expunged")
        elif kept is None:
            self._decide("REC-14", pair.label, f"UID {uid} (from before the fork) was expunged on the survivor at "
                                               f"LSN {survivor_msg.expunged_lsn} and lives on at no other UID: the "
                                               f"loser's flag changes on it are dropped", uid=uid)

    def _set_flags(self, pair: _MailboxPair, held: MessageView,
                   tracks: list[tuple[MessageTrack, MessageTrack | None]]) -> None:
        """REC-8: per flag, the latest operation of each side on any of ``tracks`` (one survivor
        message, ``held``), and the winner; one set_flags action for the loser's wins."""
        add, remove, changed = [], [], {}
        record: dict[str, list[str]] = {"add": [], "remove": []}
        touched_flags = set(held.flags).union(*(t.touched_flags() for both in tracks for t in both if t))
        for flag in sorted(touched_flags):
            loser_op = _latest(loser_msg.op(flag) for loser_msg, _ in tracks)
            survivor_op = _latest(survivor_msg.op(flag) for _, survivor_msg in tracks if survivor_msg is not None)
            winner, op = resolve_flag(survivor_op, loser_op)
            if winner != "loser":
                if winner == "survivor" and loser_op is not None and survivor_op.value != loser_op.value:
                    self._decide("REC-8", pair.label, f"flag {flag} on UID {held.uid}: the survivor's later "
                                                      f"{'add' if survivor_op.value else 'remove'} wins", flag=flag,
                                 uid=held.uid, survivor=survivor_op.to_dict(), loser=loser_op.to_dict())
                continue
            want = op.value
            if survivor_op is not None and survivor_op.value != want:
                self._decide("REC-8", pair.label, f"flag {flag} on UID {held.uid}: the loser's later "
                                                  f"{'add' if want else 'remove'} wins", flag=flag, uid=held.uid,
                             survivor=survivor_op.to_dict(), loser=loser_op.to_dict())
            if want and flag not in held.flags:
                add.append(flag)
            elif not want and flag in held.flags:
                remove.append(flag)
            else:
                # REC-8: already as the winning change wants, which is logged all the same: a
                # later reconcile of another tail must find it (an older opposite change of
                # that tail would otherwise count as the latest).
                record["add" if want else "remove"].append(flag)
            changed[flag] = op.changed_ms  # REC-8: logged at the applied change's time
        if add or remove or record["add"] or record["remove"]:
            self._act("set_flags", "REC-8", pair, {"uid": held.uid, "guid": held.guid.hex(), "add": add,
                                                   "remove": remove, "record": record, "changed_ms": changed},
                      "flag changes made on the loser")

    # -- REC-6, REC-9: UID collisions --------------------------------------------

    def _resolve_collisions(self, pair: _MailboxPair) -> set[int]:
        """REC-6, REC-9: the collided UIDs still holding the survivor's message, each resolved by
        the strategy: a move to a fresh UID (``renumber``) or a new UIDVALIDITY. Returns them."""
        survivor_track, target = pair.survivor_track, pair.target
        if not pair.same_mailbox or (survivor_track is not None and survivor_track.renumbered):
            return set()
        live = []  # (UID, the survivor's message there, the loser's) for each collision still there
        for uid, message_a, message_b in pair.diff.collisions:
            survivor_msg, loser_msg = (message_a, message_b) if self.survivor == "a" else (message_b, message_a)
            held = target.messages.get(uid)
            if held is None:
                continue  # the survivor's message at that UID is gone already
            if held.guid != survivor_msg.guid:
                self.plan.warnings.append(f"mailbox {pair.label!r} UID {uid}: GUID {held.guid.hex()[:16]} on the "
                                          f"survivor, {survivor_msg.guid.hex()[:16]} expected")
            self.plan.warnings.append(f"mailbox {pair.label!r} UID {uid} collision: GUID "
                                      f"{survivor_msg.guid.hex()[:16]} on the survivor, "
                                      f"{loser_msg.guid.hex()[:16]} on the loser")
            live.append((uid, held))
        if live and self.strategy == "renumber":
            self._move_collided(pair, live)
        elif live:
            self._act("renumber", "REC-9", pair, {"collisions": sorted(uid for uid, _ in live)},
                      "UID collision: new UIDVALIDITY, every message renumbered by arrival")
        return {uid for uid, _ in live}

    def _move_collided(self, pair: _MailboxPair, live: list[tuple[int, MessageView]]) -> None:
        """REC-6: one move per GUID that no UID outside the collided ones holds. A GUID at
        several collided UIDs (an earlier apply's redelivery whose expunge never came, or the
        same bytes delivered twice) moves once, from its greatest UID (the one it lives on, as
        in REC-5); every collided UID a move does not take is expunged after."""
        target = pair.target
        collided = {uid for uid, _ in live}
        moving: dict[bytes, list[int]] = {}  # GUID -> its collided UIDs, when it has no other
        for uid, held in live:
            if not [u for u in target.uids_of(held.guid) if u not in collided]:
                moving.setdefault(held.guid, []).append(uid)
        moved = set()
        for guid, uids in sorted(moving.items(), key=lambda item: max(item[1])):
            uid = max(uids)
            moved.add(uid)
            self._act("redeliver", "REC-6", pair, {"uid": uid, "guid": guid.hex(), "uid_floor": pair.uid_floor,
                                                   "collided": sorted(uids)},
                      f"UID {uid} collided: the survivor's message moves to a fresh UID (one record: delivered "
                      f"there, expunged here)")
        rest = sorted((uid, held) for uid, held in live if uid not in moved)
        if rest:
            self._act("expunge", "REC-6", pair, {"uids": [uid for uid, _ in rest],
                                                 "guids": [held.guid.hex() for _, held in rest]},
                      "collided UIDs whose message lives at another UID are expunged once it has its fresh UID")

    # -- REC-10: the loser's expunges of messages from before the fork ------------

    def _apply_loser_expunges(self, pair: _MailboxPair, collided: set[int]) -> None:
        """REC-10: the loser's expunges of messages from before the fork, applied only with
        --apply-destructive; a move (MS-16) is not an expunge. One exception (REC-6): a message
        the survivor also holds at another UID, see :meth:`_expunge_second_copies`."""
        if not pair.same_mailbox:
            return
        label, target, survivor_track = pair.label, pair.target, pair.survivor_track
        gone = []
        second_copies: dict[bytes, list[tuple[int, MessageTrack]]] = {}
        for loser_msg in self.loser_replay.messages_in(pair.loser_track.mailbox_id, "pre"):
            if loser_msg.expunged_lsn is None or loser_msg.moved:
                continue  # a move (MS-16) is not an expunge: the message lives on
            survivor_msg = self.survivor_replay.messages.get(loser_msg.key)
            uid = (survivor_track.uid_of(loser_msg.key, survivor_msg is not None and not survivor_msg.alive)
                   if survivor_track is not None else loser_msg.key[2])
            if uid is None or uid not in target.messages:
                continue
            if self.destructive:
                gone.append(uid)
            elif len(target.uids_of(target.messages[uid].guid)) > 1:
                second_copies.setdefault(target.messages[uid].guid, []).append((uid, loser_msg))
            else:
                self._decide("REC-10", label, f"UID {loser_msg.key[2]} expunged on the loser (LSN "
                                              f"{loser_msg.expunged_lsn}); not applied without "
                                              f"--apply-destructive", uid=loser_msg.key[2])
        self._expunge_second_copies(pair, second_copies, collided)
        if gone:
            self._act("expunge", "REC-10", pair, {"uids": sorted(gone),
                                                  "guids": [target.messages[u].guid.hex() for u in sorted(gone)]},
                      "expunged on the loser; --apply-destructive")

    def _expunge_second_copies(self, pair: _MailboxPair, second_copies: dict[bytes, list[tuple[int, MessageTrack]]],
                               collided: set[int]) -> None:
        """REC-6 done in two applies: the survivor holds the message at a fresh UID too, and the
        loser's tail has the expunge of the collided UID (an earlier apply's, cut aside with its
        branch). Expunging it loses nothing, keeping it leaves the message twice. The
        survivor's last UID of that message always stays: a UID outside this plan's REC-6
        expunges (``collided``, and these UIDs) when the message has one, else its greatest."""
        target = pair.target
        expunged = []
        for guid, hits in second_copies.items():
            hit_uids = {uid for uid, _ in hits}
            outside = [u for u in target.uids_of(guid) if u not in collided and u not in hit_uids]
            keep = max(outside) if outside else max(hit_uids)
            for uid, loser_msg in hits:
                if uid == keep:
                    self._decide("REC-10", pair.label, f"UID {loser_msg.key[2]} expunged on the loser (LSN "
                                                       f"{loser_msg.expunged_lsn}); not applied without "
                                                       f"--apply-destructive", uid=loser_msg.key[2])
                else:
                    expunged.append(uid)
        if expunged:
            self._act("expunge", "REC-6", pair, {"uids": sorted(expunged),
                                                 "guids": [target.messages[u].guid.hex() for u in sorted(expunged)]},
                      "expunged on the loser, and the survivor holds each of these messages at a later UID too "
                      "(a collision renumbered by an earlier apply)")
