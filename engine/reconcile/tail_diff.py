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

from .replay import MailboxTrack, MessageTrack, SideReplay

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
        return c

    def to_dict(self) -> dict:
        return {"mailboxes": [m.to_dict() for m in self.mailboxes], "counts": self.counts(),
                "epochs_started": {"a": self.a.epochs, "b": self.b.epochs}}


def _message_conflicts(ma: MessageTrack, mb: MessageTrack, uid_a: int, uid_b: int) -> list[dict]:
    """Per-flag conflicts between two sides' operations on one message (REC-8)."""
    out = []
    for flag in sorted(ma.touched_flags() | mb.touched_flags()):
        oa, ob = ma.op(flag), mb.op(flag)
        if oa is None or ob is None or oa.value == ob.value:
            continue
        winner = "a" if oa.changed_ms > ob.changed_ms else "b" if ob.changed_ms > oa.changed_ms else (
            "a" if oa.value else "b")
        result = (oa if winner == "a" else ob).value
        out.append({"uid_a": uid_a, "uid_b": uid_b, "guid": ma.guid.hex() if ma.guid else None, "flag": flag,
                    "a": oa.to_dict(), "b": ob.to_dict(), "winner": winner, "result": "set" if result else "clear"})
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
    for lsn, ev in tail_a:
        a.feed(lsn, ev)
    for lsn, ev in tail_b:
        b.feed(lsn, ev)
    return compare(a, b, names=names)


def compare(a: SideReplay, b: SideReplay, *, names: dict[str, str] | None = None) -> Diff:
    """The diff of two replayed tails (see :func:`diff`)."""
    names = names or {}
    pairs: list[tuple[MailboxTrack | None, MailboxTrack | None, bool]] = []
    # REC-4: mailboxes that existed at the fork are one mailbox on both sides.
    pre_ids = sorted({i for s in (a, b) for i, t in s.mailboxes.items() if not t.created})
    for mid in pre_ids:
        pairs.append((a.mailboxes.get(mid), b.mailboxes.get(mid), True))
    # Mailboxes created in the tails pair by name (the last name each had).
    created_b: dict[str, list[MailboxTrack]] = {}
    for t in sorted((t for t in b.mailboxes.values() if t.created), key=lambda t: t.created_lsn):
        created_b.setdefault(t.deleted[1] if t.deleted else t.name, []).append(t)
    for t in sorted((t for t in a.mailboxes.values() if t.created), key=lambda t: t.created_lsn):
        nm = t.deleted[1] if t.deleted else t.name
        cands = created_b.get(nm)
        pairs.append((t, cands.pop(0) if cands else None, False))
    for lst in created_b.values():
        for t in lst:
            pairs.append((None, t, False))

    out = []
    for ta, tb, same in pairs:
        mid = (ta or tb).mailbox_id
        fork_name = None
        if same:
            fork_name = (ta.fork_name if ta else None) or (tb.fork_name if tb else None) or names.get(mid)
        display = (ta.name if ta and ta.name else None) or (tb.name if tb and tb.name else None) or fork_name or mid
        md = MailboxDiff(display, ta, tb, same, fork_name)
        new_a = a.messages_in(ta.mailbox_id) if ta else []
        new_b = b.messages_in(tb.mailbox_id) if tb else []
        guids_b: dict[bytes, MessageTrack] = {}
        for m in new_b:
            guids_b.setdefault(m.guid, m)
        guids_a: dict[bytes, MessageTrack] = {}
        for m in new_a:
            guids_a.setdefault(m.guid, m)
        for m in sorted(new_a, key=lambda m: m.lsn):
            other = guids_b.get(m.guid)
            if other is None:
                md.only_in_a.append(m)
            elif guids_a[m.guid] is m:
                md.both.append((m, other))
                md.conflicts.extend(_message_conflicts(m, other, m.uid, other.uid))
        md.only_in_b = [m for m in sorted(new_b, key=lambda m: m.lsn) if m.guid not in guids_a]
        if same:
            # REC-6: one UID given to different messages on the two sides.
            by_uid_b = {(m.uid_space, m.uid): m for m in new_b}
            for m in sorted(new_a, key=lambda m: m.uid):
                o = by_uid_b.get((m.uid_space, m.uid))
                if o is not None and o.guid != m.guid:
                    md.collisions.append((m.uid, m, o))
            pre_a = {m.key: m for m in a.messages_in(mid, "pre")} if ta else {}
            pre_b = {m.key: m for m in b.messages_in(mid, "pre")} if tb else {}
            for key in sorted(set(pre_a) & set(pre_b)):
                md.conflicts.extend(_message_conflicts(pre_a[key], pre_b[key], key[2], key[2]))
            md.expunged_a = sorted(m.key[2] for m in pre_a.values() if m.expunged_lsn is not None)
            md.expunged_b = sorted(m.key[2] for m in pre_b.values() if m.expunged_lsn is not None)
        for side, lst in (("a", md.flag_changes_a), ("b", md.flag_changes_b)):
            replay = a if side == "a" else b
            t = md.track(side)
            if t is None:
                continue
            for kind in ("pre", "new"):
                for m in replay.messages_in(t.mailbox_id, kind):
                    for ch in m.changes:
                        lst.append(dict(ch, guid=m.guid.hex() if m.guid else None))
            lst.sort(key=lambda c: c["lsn"])
        out.append(md)
    out.sort(key=lambda m: (m.name, m.mailbox_id or ""))
    return Diff(a, b, out)
