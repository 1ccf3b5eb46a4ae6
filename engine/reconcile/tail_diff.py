"""The diff of two tails: the second half of the pure core (REC-4..REC-8).

:func:`diff` replays each tail into a :class:`~engine.reconcile.replay.SideReplay`
and :func:`compare` pairs the mailboxes of the two sides (REC-4): a mailbox
that existed at the fork is the same mailbox on both sides (same id);
mailboxes created in the tails pair by name. For each pair it reports
messages delivered only in A or only in B (by GUID), the same GUID delivered
on both sides (one message, REC-5), UID collisions (REC-6), flag changes and
conflicts (REC-8), mailbox creates, renames and deletes, and expunges.
Nothing of the shared prefix is needed: messages that existed at the fork are
named by ``(mailbox id, UID at the fork)`` on both sides.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .replay import MailboxTrack, MessageTrack, SideReplay, resolve_flag

__all__ = ["MailboxDiff", "Diff", "diff", "compare"]



@dataclass
class MailboxDiff:
    """One mailbox as the two tails see it (REC-4 pairs A's and B's)."""

    name: str
    a: MailboxTrack | None
    b: MailboxTrack | None
    same_id: bool  # the mailbox existed at the fork (one id on both sides)
    fork_name: str | None
    only_in_a: list[MessageTrack] = field(default_factory=list)
    only_in_b: list[MessageTrack] = field(default_factory=list)
    both: list[tuple[MessageTrack, MessageTrack]] = field(default_factory=list)
    collisions: list[tuple[int, MessageTrack, MessageTrack]] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    flag_changes_a: list[dict] = field(default_factory=list)
    flag_changes_b: list[dict] = field(default_factory=list)
    expunged_a: list[int] = field(default_factory=list)  # UIDs at the fork expunged in A's tail
    expunged_b: list[int] = field(default_factory=list)

    def track(self, side: str) -> MailboxTrack | None:
        return self.a if side == "a" else self.b

    @property
    def mailbox_id(self) -> str | None:
        return (self.a or self.b).mailbox_id if (self.a or self.b) else None

    def empty(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.both or self.collisions or self.conflicts
                    or self.flag_changes_a or self.flag_changes_b or self.expunged_a or self.expunged_b
                    or any(t is not None and (t.created or t.renames or t.deleted or t.renumbers)
                           for t in (self.a, self.b)))

    def to_dict(self) -> dict:
        def side(t: MailboxTrack | None) -> dict | None:
            if t is None:
                return None
            return {
                "mailbox_id": t.mailbox_id, "name": t.name, "created": t.created, "created_lsn": t.created_lsn,
                "uidvalidity": t.uidvalidity,
                "renamed": [{"lsn": lsn, "from": old, "to": new} for lsn, old, new in t.renames],
                "deleted": None if t.deleted is None else {"lsn": t.deleted[0], "name": t.deleted[1]},
                "renumbered": [{"lsn": lsn, "uidvalidity": uv} for lsn, uv in t.renumbers],
            }

        def msg(m: MessageTrack) -> dict:
            return {"guid": m.guid.hex() if m.guid else None, "uid": m.uid, "lsn": m.lsn, "size": m.size,
                    "flags": sorted(m.flags or ()), "delivered_ms": m.delivered_ms,
                    "expunged": not m.alive}

        return {
            "mailbox": self.name,
            "fork_name": self.fork_name,
            "existed_at_fork": self.same_id,
            "a": side(self.a),
            "b": side(self.b),
            "only_in_a": [msg(m) for m in self.only_in_a],
            "only_in_b": [msg(m) for m in self.only_in_b],
            "both": [{"guid": ma.guid.hex(), "uid_a": ma.uid, "uid_b": mb.uid} for ma, mb in self.both],
            "uid_collisions": [{"uid": u, "guid_a": ma.guid.hex(), "guid_b": mb.guid.hex()}
                               for u, ma, mb in self.collisions],
            "flag_changes": {"a": self.flag_changes_a, "b": self.flag_changes_b},
            "flag_conflicts": self.conflicts,
            "expunged": {"a": self.expunged_a, "b": self.expunged_b},
        }


@dataclass
class Diff:
    """Everything that differs after the fork point (REC-4..REC-8)."""

    a: SideReplay
    b: SideReplay
    mailboxes: list[MailboxDiff]

    def counts(self) -> dict:
        c = {"mailboxes": len(self.mailboxes), "records_a": self.a.records, "records_b": self.b.records,
             "only_in_a": 0, "only_in_b": 0, "both": 0, "uid_collisions": 0, "flag_changes_a": 0,
             "flag_changes_b": 0, "flag_conflicts": 0, "mailboxes_created_a": 0, "mailboxes_created_b": 0,
             "mailboxes_renamed_a": 0, "mailboxes_renamed_b": 0, "mailboxes_deleted_a": 0,
             "mailboxes_deleted_b": 0, "expunged_a": 0, "expunged_b": 0}
        for m in self.mailboxes:
            c["only_in_a"] += len(m.only_in_a)
            c["only_in_b"] += len(m.only_in_b)
            c["both"] += len(m.both)
            c["uid_collisions"] += len(m.collisions)
            c["flag_changes_a"] += len(m.flag_changes_a)
            c["flag_changes_b"] += len(m.flag_changes_b)
            c["flag_conflicts"] += len(m.conflicts)
            c["expunged_a"] += len(m.expunged_a) + sum(1 for x in m.only_in_a if not x.alive)
            c["expunged_b"] += len(m.expunged_b) + sum(1 for x in m.only_in_b if not x.alive)
            for s in ("a", "b"):
                t = m.track(s)
                if t is not None:
                    c[f"mailboxes_created_{s}"] += int(t.created)
                    c[f"mailboxes_renamed_{s}"] += int(bool(t.renames))
                    c[f"mailboxes_deleted_{s}"] += int(t.deleted is not None)
        for s, replay in (("a", self.a), ("b", self.b)):
            c[f"users_changed_{s}"] = len(replay.users)
            c[f"subscriptions_changed_{s}"] = len(replay.subscriptions)
        return c

    def to_dict(self) -> dict:
        return {"mailboxes": [m.to_dict() for m in self.mailboxes], "counts": self.counts(),
                "epochs_started": {"a": self.a.epochs, "b": self.b.epochs},
                "users": {side: {name: change.to_dict() for name, change in sorted(replay.users.items())}
                          for side, replay in (("a", self.a), ("b", self.b))},
                "subscriptions": {side: [dict(change.to_dict(), user=user, mailbox=mailbox)
                                         for (user, mailbox), change in sorted(replay.subscriptions.items())]
                                  for side, replay in (("a", self.a), ("b", self.b))}}


def _message_conflicts(message_a: MessageTrack, message_b: MessageTrack, uid_a: int, uid_b: int) -> list[dict]:
    """Per-flag conflicts between two sides' operations on one message, each with its REC-8 winner."""
    out = []
    for flag in sorted(message_a.touched_flags() | message_b.touched_flags()):
        op_a, op_b = message_a.op(flag), message_b.op(flag)
        if op_a is None or op_b is None or op_a.value == op_b.value:
            continue
        winner = "a" if resolve_flag(op_a, op_b)[0] == "survivor" else "b"
        result = (op_a if winner == "a" else op_b).value
        out.append({"uid_a": uid_a, "uid_b": uid_b, "guid": message_a.guid.hex() if message_a.guid else None,
                    "flag": flag, "a": op_a.to_dict(), "b": op_b.to_dict(), "winner": winner,
                    "result": "set" if result else "clear"})
    return out


def diff(tail_a: Iterable[tuple[int, object]], tail_b: Iterable[tuple[int, object]], *,
         names: dict[str, str] | None = None) -> Diff:
    """Compare two tails (``(lsn, event)`` pairs after the fork, in LSN order).

    Args:
        names: mailbox id -> name at the fork, for mailboxes the tails do not
            name themselves (from the survivor's store or a scan of the shared
            prefix). Missing names are shown as the mailbox id.
    """
    a, b = SideReplay("a"), SideReplay("b")
    for lsn, event in tail_a:
        a.feed(lsn, event)
    for lsn, event in tail_b:
        b.feed(lsn, event)
    return compare(a, b, names=names)


def compare(a: SideReplay, b: SideReplay, *, names: dict[str, str] | None = None) -> Diff:
    """The diff of two replayed tails (see :func:`diff`), one :class:`MailboxDiff` per pair, by name."""
    names = names or {}
    out = [_compare_pair(a, b, track_a, track_b, same_id, names)
           for track_a, track_b, same_id in _pair_mailboxes(a, b)]
    out.sort(key=lambda m: (m.name, m.mailbox_id or ""))
    return Diff(a, b, out)


def _pair_mailboxes(a: SideReplay, b: SideReplay) -> list[tuple[MailboxTrack | None, MailboxTrack | None, bool]]:
    """REC-4: ``(A's track, B's track, same id)`` for each mailbox either tail touched."""
    pairs: list[tuple[MailboxTrack | None, MailboxTrack | None, bool]] = []
    # Mailboxes that existed at the fork are one mailbox on both sides.
    at_fork = sorted({mailbox_id for side in (a, b) for mailbox_id, track in side.mailboxes.items()
                      if not track.created})
    for mailbox_id in at_fork:
        pairs.append((a.mailboxes.get(mailbox_id), b.mailboxes.get(mailbox_id), True))
    # Mailboxes created in the tails pair by name (the last name each had).
    created_b: dict[str, list[MailboxTrack]] = {}
    for track in sorted((t for t in b.mailboxes.values() if t.created), key=lambda t: t.created_lsn):
        created_b.setdefault(track.deleted[1] if track.deleted else track.name, []).append(track)
    for track in sorted((t for t in a.mailboxes.values() if t.created), key=lambda t: t.created_lsn):
        same_name = created_b.get(track.deleted[1] if track.deleted else track.name)
        pairs.append((track, same_name.pop(0) if same_name else None, False))
    for unpaired in created_b.values():
        for track in unpaired:
            pairs.append((None, track, False))
    return pairs


def _compare_pair(a: SideReplay, b: SideReplay, track_a: MailboxTrack | None, track_b: MailboxTrack | None,
                  same_id: bool, names: dict[str, str]) -> MailboxDiff:
    """What differs in one pair of mailboxes: deliveries (REC-5), UID collisions (REC-6),
    flag conflicts (REC-8), expunges of messages from before the fork, and every flag change."""
    mailbox_id = (track_a or track_b).mailbox_id
    fork_name = None
    if same_id:
        fork_name = ((track_a.fork_name if track_a else None) or (track_b.fork_name if track_b else None)
                     or names.get(mailbox_id))
    display = ((track_a.name if track_a and track_a.name else None)
               or (track_b.name if track_b and track_b.name else None) or fork_name or mailbox_id)
    mailbox_diff = MailboxDiff(display, track_a, track_b, same_id, fork_name)
    new_a = a.messages_in(track_a.mailbox_id) if track_a else []
    new_b = b.messages_in(track_b.mailbox_id) if track_b else []
    _compare_deliveries(mailbox_diff, new_a, new_b)
    if same_id:
        _compare_at_fork(mailbox_diff, a, b, new_a, new_b)
    for side, changes in (("a", mailbox_diff.flag_changes_a), ("b", mailbox_diff.flag_changes_b)):
        replay = a if side == "a" else b
        track = mailbox_diff.track(side)
        if track is None:
            continue
        for kind in ("pre", "new"):
            for message in replay.messages_in(track.mailbox_id, kind):
                for change in message.changes:
                    changes.append(dict(change, guid=message.guid.hex() if message.guid else None))
        changes.sort(key=lambda c: c["lsn"])
    return mailbox_diff


def _compare_deliveries(mailbox_diff: MailboxDiff, new_a: list[MessageTrack], new_b: list[MessageTrack]) -> None:
    """REC-5: messages by GUID: delivered only in A, only in B, or in both (one message, the
    first delivery of each side; its flag conflicts, REC-8)."""
    first_b: dict[bytes, MessageTrack] = {}
    for message in new_b:
        first_b.setdefault(message.guid, message)
    first_a: dict[bytes, MessageTrack] = {}
    for message in new_a:
        first_a.setdefault(message.guid, message)
    for message in sorted(new_a, key=lambda m: m.lsn):
        other = first_b.get(message.guid)
        if other is None:
            mailbox_diff.only_in_a.append(message)
        elif first_a[message.guid] is message:
            mailbox_diff.both.append((message, other))
            mailbox_diff.conflicts.extend(_message_conflicts(message, other, message.uid, other.uid))
    mailbox_diff.only_in_b = [m for m in sorted(new_b, key=lambda m: m.lsn) if m.guid not in first_a]


def _compare_at_fork(mailbox_diff: MailboxDiff, a: SideReplay, b: SideReplay, new_a: list[MessageTrack],
                     new_b: list[MessageTrack]) -> None:
    """For a mailbox that existed at the fork: UID collisions (REC-6: one UID given to
    different messages on the two sides), flag conflicts on messages from before the fork
    (REC-8) and the UIDs at the fork each side expunged."""
    by_uid_b = {(m.uid_space, m.uid): m for m in new_b}
    for message in sorted(new_a, key=lambda m: m.uid):
        other = by_uid_b.get((message.uid_space, message.uid))
        if other is not None and other.guid != message.guid:
            mailbox_diff.collisions.append((message.uid, message, other))
    mailbox_id = mailbox_diff.mailbox_id
    pre_a = {m.key: m for m in a.messages_in(mailbox_id, "pre")} if mailbox_diff.a else {}
    pre_b = {m.key: m for m in b.messages_in(mailbox_id, "pre")} if mailbox_diff.b else {}
    for key in sorted(set(pre_a) & set(pre_b)):
        mailbox_diff.conflicts.extend(_message_conflicts(pre_a[key], pre_b[key], key[2], key[2]))
    mailbox_diff.expunged_a = sorted(m.key[2] for m in pre_a.values() if m.expunged_lsn is not None)
    mailbox_diff.expunged_b = sorted(m.key[2] for m in pre_b.values() if m.expunged_lsn is not None)
