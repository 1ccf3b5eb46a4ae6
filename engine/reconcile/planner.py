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

from .replay import FlagOp, Key, MailboxTrack, MessageTrack, resolve_flag
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
    uid: int
    guid: bytes
    flags: frozenset
    internaldate_ms: int = 0
    delivered_ms: int = 0


@dataclass
class MailboxView:
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
    """Read access to the survivor's current mailboxes (the driver reads its store)."""

    def by_id(self, mailbox_id: str) -> MailboxView | None: ...

    def by_name(self, name: str) -> MailboxView | None: ...


class DictSurvivorView:
    """A :class:`SurvivorView` over plain data (tests, and the driver's cache)."""

    def __init__(self, mailboxes: Iterable[MailboxView]):
        self._by_id = {m.mailbox_id: m for m in mailboxes}

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
    ``renumber``, ``delete_mailbox``. ``mailbox`` names the target (id when
    it exists, else the name a ``create_mailbox`` before it makes).
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


_ORDER = {"create_mailbox": 0, "rename_mailbox": 1, "copy_message": 2, "set_flags": 3, "keep_flag_changes": 3,
          "redeliver": 4, "expunge": 5, "renumber": 6, "delete_mailbox": 7}


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
    sr = d.a if survivor == "a" else d.b
    lr = d.b if survivor == "a" else d.a
    out: dict[str, set[int]] = {}
    for md in d.mailboxes:
        lt = md.track("b" if survivor == "a" else "a")
        if not md.same_id or lt is None:
            continue
        delivered = bool(lr.messages_in(lt.mailbox_id))
        for lm in lr.messages_in(lt.mailbox_id, "pre"):
            sm = sr.messages.get(lm.key)
            if sm is None or sm.expunged_lsn is None or sm.gone_with_mailbox:
                continue
            if (lm.explicit or lm.baseline) or (delivered and lm.expunged_lsn is not None):
                out.setdefault(lm.mailbox_id, set()).add(lm.key[2])
    return out


def _one_per_guid(tracks: Iterable[MessageTrack]) -> list[MessageTrack]:
    """REC-5, REC-8: the messages one tail delivered into one mailbox, one per GUID.

    A tail can deliver one GUID more than once into a mailbox: a REC-6
    redelivery moves a message to a fresh UID (same bytes, flags and dates)
    before its old UID is expunged. It is one message; it lives on at the
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
            expunged_lsn=live.expunged_lsn, gone_with_mailbox=live.gone_with_mailbox))
    return out


def _winning_ops(lm: MessageTrack, sm: MessageTrack) -> list[list]:
    """``[flag, value, changed_ms]`` for each flag whose loser operation wins over the
    survivor's (REC-8), in flag order."""
    out = []
    for flag in sorted(lm.touched_flags()):
        winner, op = resolve_flag(sm.op(flag), lm.op(flag))
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
    """
    pre_guids = pre_guids or {}
    if survivor not in ("a", "b"):
        raise ValueError("survivor must be 'a' or 'b'")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
    loser = "b" if survivor == "a" else "a"
    sr = d.a if survivor == "a" else d.b
    lr = d.b if survivor == "a" else d.a
    p = Plan(survivor, strategy, destructive)
    copies: list[tuple[int, Action]] = []
    created_names: set[str] = set()

    def decide(rule: str, mailbox: str, text: str, **extra) -> None:
        p.decisions.append({"rule": rule, "mailbox": mailbox, "decision": text, **extra})

    def target_for(md: MailboxDiff, lt: MailboxTrack) -> tuple[MailboxView | None, str]:
        """The survivor mailbox that receives the loser's messages for this pair."""
        if md.same_id:
            v = view.by_id(lt.mailbox_id)
            if v is not None:
                return v, v.name
        name = (lt.deleted[1] if lt.deleted else lt.name) or md.fork_name
        if name is None:
            return None, lt.mailbox_id
        return view.by_name(name), name

    for md in d.mailboxes:
        st, lt = md.track(survivor), md.track(loser)
        if lt is None:
            continue  # only the survivor changed this mailbox: nothing to bring over
        label = md.name
        loser_deleted = lt.deleted is not None
        if loser_deleted and not destructive:
            decide("REC-10", label, f"deleted on the loser (LSN {lt.deleted[0]}); not applied without "
                                    f"--apply-destructive: its messages are kept", lsn=lt.deleted[0])
        honour_delete = loser_deleted and destructive
        tgt, tgt_name = target_for(md, lt)

        # -- the mailbox itself ------------------------------------------------
        if honour_delete:
            if md.same_id and tgt is not None and tgt.mailbox_id == lt.mailbox_id:
                fresh = [m for m in sr.messages_in(lt.mailbox_id) if m.alive] if st else []
                if fresh:
                    decide("REC-10", label, f"deleted on the loser, but the survivor received {len(fresh)} "
                                            f"message(s) in it after the fork: kept")
                    p.warnings.append(f"mailbox {label!r}: not deleted, the survivor has new mail in it")
                else:
                    p.actions.append(Action("delete_mailbox", "REC-10", tgt.mailbox_id, tgt.name, {},
                                            "deleted on the loser; --apply-destructive"))
            else:
                decide("REC-10", label, "created or deleted on the loser only: nothing to copy")
            continue
        if tgt is None:
            needs = any(True for _ in lr.messages_in(lt.mailbox_id)) or lt.created
            if needs and tgt_name not in created_names:
                why = ("created on the loser" if lt.created else
                       "deleted on the survivor; the loser still has mail for it: recreated under its name")
                p.actions.append(Action("create_mailbox", "REC-7", None, tgt_name, {}, why))
                created_names.add(tgt_name)
        elif md.same_id and lt.renames and tgt.mailbox_id == lt.mailbox_id:
            final = lt.renames[-1][2]
            fork_name = lt.renames[0][1]
            if tgt.name == final:
                pass
            elif st is not None and st.renames:
                decide("REC-7", label, f"renamed on both sides ({fork_name!r} -> {tgt.name!r} on the survivor, "
                                       f"-> {final!r} on the loser): the survivor's name is kept")
            elif view.by_name(final) is not None:
                decide("REC-7", label, f"renamed to {final!r} on the loser, but the survivor has a mailbox "
                                       f"of that name: kept as {tgt.name!r}")
            else:
                p.actions.append(Action("rename_mailbox", "REC-7", tgt.mailbox_id, tgt.name,
                                        {"new_name": final}, f"renamed on the loser to {final!r}"))

        # -- copies: messages only the loser has (REC-5) ------------------------
        both_guids = {x.guid for pair in md.both for x in pair}
        survivor_guids = {x.guid for x in sr.messages_in(st.mailbox_id)} if st is not None else set()
        # Messages from before the fork that the survivor expunged, by GUID when known
        # (moved_keys_wanted): a loser's REC-6 redelivery of one of them is that message.
        expunged_pre = {}
        if md.same_id and st is not None:
            for sm in sr.messages_in(st.mailbox_id, "pre"):
                guid = pre_guids.get(sm.key)
                if guid is not None and sm.expunged_lsn is not None and not sm.gone_with_mailbox:
                    expunged_pre[guid] = sm
        floor = 0
        if md.same_id:
            floor = lt.max_uid + 1  # REC-6: never reuse a UID the loser's clients saw
        loser_new = _one_per_guid(lr.messages_in(lt.mailbox_id))
        # REC-8: the survivor's side is its operations in the mailbox that receives the loser's
        # messages (not the paired one when that was deleted and the target made anew, REC-7)
        survivor_box = tgt.mailbox_id if tgt is not None else st.mailbox_id if st is not None else None
        survivor_new = ({m.guid: m for m in _one_per_guid(sr.messages_in(survivor_box))}
                        if survivor_box is not None else {})
        for m in sorted(loser_new, key=lambda m: m.lsn):
            if not m.alive and destructive and m.expunged_lsn is not None:
                decide("REC-10", label, "delivered and expunged on the loser: not copied (--apply-destructive)",
                       guid=m.guid.hex(), lsn=m.lsn)
                continue
            present = tgt.uids_of(m.guid) if tgt is not None else []
            if present:
                if m.guid in both_guids:
                    rule, what = "REC-5", ("the survivor has it too (delivered on both sides, or copied back "
                                           "by an earlier apply): one message")
                else:
                    rule, what = "REC-12", "already on the survivor"
                decide(rule, label, f"{what}, at UID {present[0]}", guid=m.guid.hex(), lsn=m.lsn)
                continue
            if m.guid in survivor_guids:
                decide("REC-5", label, "delivered on both sides and expunged on the survivor since: not copied back",
                       guid=m.guid.hex(), lsn=m.lsn)
                continue
            if m.guid in expunged_pre:
                sm = expunged_pre[m.guid]
                decide("REC-5", label, f"the loser's delivery is its move (REC-6) of UID {sm.key[2]} from before "
                                       f"the fork, which the survivor expunged at LSN {sm.expunged_lsn}: one "
                                       f"message, the expunge stands, not copied back",
                       guid=m.guid.hex(), lsn=m.lsn, uid=sm.key[2])
                continue
            why = "delivered only on the loser"
            if m.expunged_lsn is not None:
                why += f"; expunged there at LSN {m.expunged_lsn}, kept without --apply-destructive"
            elif m.gone_with_mailbox:
                why += "; its mailbox was deleted there, kept without --apply-destructive"
            flags = sorted(m.flags or ())
            # REC-8: the copy holds the flags the message ended with, at its delivery time; each
            # flag's later winning change is logged after it at its own time (as set_flags would).
            later = {f: [op.value, op.changed_ms] for f in sorted(m.touched_flags())
                     if (op := m.op(f)) is not None and not (op.via == "append" and op.changed_ms == m.delivered_ms)}
            act = Action("copy_message", "REC-5", tgt.mailbox_id if tgt else None, tgt.name if tgt else tgt_name,
                         {"guid": m.guid.hex(), "source_lsn": m.lsn, "flags": flags, "uid_floor": floor,
                          "internaldate_ms": m.internaldate_ms, "delivered_ms": m.delivered_ms,
                          "loser_uid": m.uid, "size": m.size, "flag_changes": later}, why)
            copies.append((m.lsn, act))

        if tgt is None:
            continue

        # -- flags (REC-8) ----------------------------------------------------------
        def survivor_msg(key: Key, lm: MessageTrack) -> tuple[MessageTrack | None, MessageView | None]:
            if key[0] == "pre":
                sm = sr.messages.get(key)
                if not md.same_id or tgt.mailbox_id != lt.mailbox_id:
                    return sm, None
                if sm is not None and not sm.alive:
                    return moved_to(key, sm)
                uid = st.uid_of(key, False) if st is not None else key[2]
                return sm, (tgt.messages.get(uid) if uid is not None else None)
            # a message delivered in the loser's tail: the survivor's copy of that GUID, one message
            # however many times the survivor's tail delivered it (a REC-6 move, copies of tails)
            sm = survivor_new.get(lm.guid)
            uids = tgt.uids_of(lm.guid)
            if sm is None and uids and st is not None:
                # REC-8: the survivor holds that GUID from before the fork (the loser's copy is a
                # REC-6 redelivery of it): the survivor's operations on that UID are its side.
                hk = st.key_for(uids[0])
                if hk is not None and hk[0] == "pre":
                    sm = sr.messages.get(hk)
            return sm, (tgt.messages.get(uids[0]) if uids else None)

        def moved_to(key: Key, sm: MessageTrack) -> tuple[MessageTrack, MessageView | None]:
            """REC-14: where a pre-fork message the survivor expunged lives on, if anywhere: the
            greatest UID holding its GUID that already held it before the expunge (a REC-6
            redelivery, or a copy from before the fork). Expunged by a client with no such
            copy: nowhere, and the loser's flag changes on it are dropped."""
            guid = pre_guids.get(key)
            if guid is None or sm.gone_with_mailbox or st is None:
                return sm, None
            holders = []
            for u in tgt.uids_of(guid):
                hk = st.key_for(u)
                if hk is None:
                    continue  # the survivor renumbered the mailbox and the tail never met this UID
                hm = sr.messages.get(hk)
                if hk[0] == "new" and (hm is None or hm.lsn > sm.expunged_lsn):
                    continue  # delivered after the expunge: a new arrival, not where the message moved
                holders.append((u, hk, hm))
            if not holders:
                return sm, None
            u, hk, hm = max(holders, key=lambda h: h[0])
            decide("REC-14", label, f"UID {key[2]} (from before the fork) was expunged on the survivor at LSN "
                                   f"{sm.expunged_lsn}; its message lives on at UID {u}, which gets the loser's "
                                   f"flag changes", uid=key[2], moved_to=u, guid=guid.hex())
            return _survivor_ops(sm, hm, hk, guid), tgt.messages[u]

        # A message the loser expunged (or lost with its mailbox) stays on the survivor
        # unless destructive (REC-10), and then its flags are the loser's like any other's.
        touched = [m for m in [*lr.messages_in(lt.mailbox_id, "pre"), *loser_new]
                   if (m.alive or not destructive) and (m.explicit or m.baseline)]
        # REC-8: several of the loser's tracks can be one survivor message (a pre-fork UID the
        # survivor moved, and the loser's own delivery of that GUID): its operations per flag
        # are the latest on any of them, as in REC-5, and it gets one set_flags action.
        same_message: dict[int, list[tuple[MessageTrack, MessageTrack | None]]] = {}
        targets: dict[int, MessageView] = {}
        for lm in sorted(touched, key=lambda m: (m.key[0], m.uid)):
            sm, vm = survivor_msg(lm.key, lm)
            if vm is None:
                if lm.key[0] == "pre" and sm is not None and sm.expunged_lsn is not None:
                    kept = _winning_ops(lm, sm) if merge and not sm.gone_with_mailbox and st is not None \
                        and not st.renumbered else None
                    if kept:
                        decide("CTL-9", label, f"UID {lm.key[2]} (from before the fork) was expunged on the "
                                               f"survivor at LSN {sm.expunged_lsn}; the merged tail keeps the "
                                               f"loser's flag changes on it for the reconcile it goes to",
                               uid=lm.key[2])
                        p.actions.append(Action("keep_flag_changes", "CTL-9", tgt.mailbox_id, tgt.name,
                                                {"uid": lm.key[2], "ops": kept},
                                                "flag changes on a message the merge's newer tail expunged"))
                    elif kept is None:
                        decide("REC-14", label, f"UID {lm.key[2]} (from before the fork) was expunged on the "
                                               f"survivor at LSN {sm.expunged_lsn} and lives on at no other UID: "
                                               f"the loser's flag changes on it are dropped", uid=lm.key[2])
                continue
            if lm.guid is not None and vm.guid != lm.guid:
                p.warnings.append(f"mailbox {label!r} UID {vm.uid}: GUID {vm.guid.hex()[:16]} on the survivor, "
                                  f"{lm.guid.hex()[:16]} expected; flags left alone")
                continue
            targets[vm.uid] = vm
            same_message.setdefault(vm.uid, []).append((lm, sm))
        for uid, tracks in same_message.items():
            vm = targets[uid]
            add, remove, changed = [], [], {}
            record: dict[str, list[str]] = {"add": [], "remove": []}
            touched_flags = set(vm.flags).union(*(t.touched_flags() for pair in tracks for t in pair if t))
            for flag in sorted(touched_flags):
                lop = _latest(lm.op(flag) for lm, _ in tracks)
                sop = _latest(sm.op(flag) for _, sm in tracks if sm is not None)
                winner, op = resolve_flag(sop, lop)
                if winner != "loser":
                    if winner == "survivor" and lop is not None and sop.value != lop.value:
                        decide("REC-8", label, f"flag {flag} on UID {vm.uid}: the survivor's later "
                                               f"{'add' if sop.value else 'remove'} wins", flag=flag, uid=vm.uid,
                               survivor=sop.to_dict(), loser=lop.to_dict())
                    continue
                want = op.value
                if sop is not None and sop.value != want:
                    decide("REC-8", label, f"flag {flag} on UID {vm.uid}: the loser's later "
                                           f"{'add' if want else 'remove'} wins", flag=flag, uid=vm.uid,
                           survivor=sop.to_dict(), loser=lop.to_dict())
                if want and flag not in vm.flags:
                    add.append(flag)
                elif not want and flag in vm.flags:
                    remove.append(flag)
                else:
                    # REC-8: already as the winning change wants, which is logged all the same: a
                    # later reconcile of another tail must find it (an older opposite change of
                    # that tail would otherwise count as the latest).
                    record["add" if want else "remove"].append(flag)
                changed[flag] = op.changed_ms  # REC-8: logged at the applied change's time
            if add or remove or record["add"] or record["remove"]:
                p.actions.append(Action("set_flags", "REC-8", tgt.mailbox_id, tgt.name,
                                        {"uid": vm.uid, "guid": vm.guid.hex(), "add": add, "remove": remove,
                                         "record": record, "changed_ms": changed},
                                        "flag changes made on the loser"))

        # -- UID collisions (REC-6, REC-9) --------------------------------------------
        active = []  # (UID, the survivor's message there, the loser's) for each collision still there
        if md.same_id and tgt.mailbox_id == lt.mailbox_id and (st is None or not st.renumbered):
            for uid, ma, mb_ in md.collisions:
                sm, lm = (ma, mb_) if survivor == "a" else (mb_, ma)
                vm = tgt.messages.get(uid)
                if vm is None:
                    continue  # the survivor's message at that UID is gone already
                if vm.guid != sm.guid:
                    p.warnings.append(f"mailbox {label!r} UID {uid}: GUID {vm.guid.hex()[:16]} on the survivor, "
                                      f"{sm.guid.hex()[:16]} expected")
                p.warnings.append(f"mailbox {label!r} UID {uid} collision: GUID {sm.guid.hex()[:16]} on the "
                                  f"survivor, {lm.guid.hex()[:16]} on the loser")
                active.append((uid, vm, lm))
            if active and strategy == "renumber":
                # One redelivery per GUID that no UID outside the collided ones holds: a GUID at
                # several collided UIDs (an earlier apply's redelivery whose expunge never came,
                # or the same bytes delivered twice) moves once, from its greatest UID (the one
                # it lives on, as in REC-5); every collided UID is expunged after.
                collided = {u for u, _, _ in active}
                moving: dict[bytes, list[int]] = {}  # GUID -> its collided UIDs, when it has no other
                for uid, vm, lm in active:
                    if not [u for u in tgt.uids_of(vm.guid) if u not in collided]:
                        moving.setdefault(vm.guid, []).append(uid)
                moves = set()
                for guid, uids in sorted(moving.items(), key=lambda x: max(x[1])):
                    uid = max(uids)
                    moves.add(uid)
                    p.actions.append(Action("redeliver", "REC-6", tgt.mailbox_id, tgt.name,
                                            {"uid": uid, "guid": guid.hex(), "uid_floor": floor,
                                             "collided": sorted(uids)},
                                            f"UID {uid} collided: the survivor's message moves to a fresh UID "
                                            f"(one record: delivered there, expunged here)"))
                rest = sorted((u, vm) for u, vm, _ in active if u not in moves)
                if rest:
                    p.actions.append(Action("expunge", "REC-6", tgt.mailbox_id, tgt.name,
                                            {"uids": [u for u, _ in rest], "guids": [vm.guid.hex() for _, vm in rest]},
                                            "collided UIDs whose message lives at another UID are expunged once "
                                            "it has its fresh UID"))
            elif active:
                p.actions.append(Action("renumber", "REC-9", tgt.mailbox_id, tgt.name,
                                        {"collisions": sorted(u for u, _, _ in active)},
                                        "UID collision: new UIDVALIDITY, every message renumbered by arrival"))

        # -- the loser's expunges of messages from before the fork (REC-10) -------------
        if md.same_id and tgt.mailbox_id == lt.mailbox_id:
            gone = []
            moved: dict[bytes, list[tuple[int, MessageTrack]]] = {}
            for lm in lr.messages_in(lt.mailbox_id, "pre"):
                if lm.expunged_lsn is None or lm.moved:
                    continue  # a move (MS-16) is not an expunge: the message lives on
                sm = sr.messages.get(lm.key)
                uid = st.uid_of(lm.key, sm is not None and not sm.alive) if st is not None else lm.key[2]
                if uid is None or uid not in tgt.messages:
                    continue
                if destructive:
                    gone.append(uid)
                elif len(tgt.uids_of(tgt.messages[uid].guid)) > 1:
                    moved.setdefault(tgt.messages[uid].guid, []).append((uid, lm))
                else:
                    decide("REC-10", label, f"UID {lm.key[2]} expunged on the loser (LSN {lm.expunged_lsn}); "
                                            f"not applied without --apply-destructive", uid=lm.key[2])
            # REC-6 done in two applies: the survivor holds the message at a fresh UID too, and the
            # loser's tail has the expunge of the collided UID (an earlier apply's, cut aside with its
            # branch). Expunging it loses nothing, keeping it leaves the message twice. The
            # survivor's last UID of that message always stays.
            # Kept: a UID outside this plan's REC-6 expunges (collided UIDs, these hits) when the
            # message has one, else its greatest hit.
            collided_uids = {u for u, _, _ in active} if strategy == "renumber" else set()
            renumbered = []
            for guid, hits in moved.items():
                hit_uids = {uid for uid, _ in hits}
                outside = [u for u in tgt.uids_of(guid) if u not in collided_uids and u not in hit_uids]
                keep = max(outside) if outside else max(hit_uids)
                for uid, lm in hits:
                    if uid == keep:
                        decide("REC-10", label, f"UID {lm.key[2]} expunged on the loser (LSN {lm.expunged_lsn}); "
                                                f"not applied without --apply-destructive", uid=lm.key[2])
                    else:
                        renumbered.append(uid)
            if renumbered:
                p.actions.append(Action("expunge", "REC-6", tgt.mailbox_id, tgt.name,
                                        {"uids": sorted(renumbered),
                                         "guids": [tgt.messages[u].guid.hex() for u in sorted(renumbered)]},
                                        "expunged on the loser, and the survivor holds each of these messages at "
                                        "a later UID too (a collision renumbered by an earlier apply)"))
            if gone:
                p.actions.append(Action("expunge", "REC-10", tgt.mailbox_id, tgt.name,
                                        {"uids": sorted(gone),
                                         "guids": [tgt.messages[u].guid.hex() for u in sorted(gone)]},
                                        "expunged on the loser; --apply-destructive"))

    # Copies go in the loser's arrival order across mailboxes (REC-5).
    p.actions.extend(a for _, a in sorted(copies, key=lambda x: x[0]))
    p.actions.sort(key=lambda a: _ORDER[a.kind])  # stable: copies keep their order
    return p
