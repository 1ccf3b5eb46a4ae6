"""Applying a plan to the survivor: :func:`apply_reconcile` and its executor (REC-5..REC-12).

:func:`apply_reconcile` reads the two logs (:func:`~engine.reconcile.read.reconcile`,
the survivor's tail from the node's own log), plans against the node's
current store (:func:`~engine.reconcile.planner.plan`) and carries the plan
out through the node's ordinary write path, so every change is a durable log
record. Its report (every decision, action and result) is written to
``NODE/reconcile/<seq>-<time>-fork<lsn>.json`` before the first action and
rewritten as actions complete (REC-11, :mod:`engine.reconcile.reports`).

Running :func:`apply_reconcile` again plans against the store as it now is,
so an apply that completed plans nothing, and an interrupted one plans
exactly what is left (REC-12). Each action also re-checks its target (the
GUID at the UID it changes) right before writing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Collection

from wal import WalError
from wal import SeekReader, search_fork

from ..store.errors import MailStoreError
from ..store.events import FlagsChanged, MessageAppended, MessagesAppended, body_guid, decode_event
from .errors import ReconcileError
from .planner import Action, MessageView, Plan, arrival_order, moved_keys_wanted, plan
from .read import (NoProgress, Progress, Reconciliation, StoreView, body_at_fork, choose_survivor, guids_at_fork,
                   reconcile, store_names)
from .reports import new_report_path, write_report

__all__ = ["ApplyResult", "apply_reconcile"]

log = logging.getLogger("mailwal.reconcile")

# While applying, the report is rewritten at least this often (REC-11).
_REPORT_EVERY_ACTIONS = 200
_REPORT_EVERY_S = 2.0


@dataclass
class ApplyResult:
    """What :func:`apply_reconcile` did."""

    reconciliation: Reconciliation
    plan: Plan
    survivor: str
    results: list[dict] = field(default_factory=list)
    report_path: str | None = None
    status: str = "planned"
    dry_run: bool = False
    # the survivor's last record (lsn, hash hex) once the apply ended: its decisions rest on
    # the survivor's log up to there (engine.reconcile.placement.requeue_applied_tails)
    survivor_end: dict | None = None

    def counts(self) -> dict:
        c = {"planned": len(self.plan.actions), "done": 0, "skipped": 0, "failed": 0}
        for r in self.results:
            c[r["status"]] = c.get(r["status"], 0) + 1
        c["pending"] = c["planned"] - c["done"] - c["skipped"] - c["failed"]
        return c

    def to_dict(self) -> dict:
        out = self.reconciliation.to_dict()
        out.update({
            "survivor": {"side": self.survivor,
                         "path": self.reconciliation.dir_a if self.survivor == "a" else self.reconciliation.dir_b},
            "plan": self.plan.to_dict(),
            "results": self.results,
            "apply": {"status": self.status, "dry_run": self.dry_run, **self.counts(),
                      **({"survivor_end": self.survivor_end} if self.survivor_end else {})},
            "report": self.report_path,
        })
        return out



def _write_report(path: str, result: ApplyResult) -> None:
    write_report(path, result.to_dict())


class _AlreadyPresent(Exception):
    """A copy found its message already in the mailbox (delivered again since the plan)."""

    def __init__(self, uid: int):
        super().__init__(uid)
        self.uid = uid


class _Gone(Exception):
    """A move found its old UID expunged since the plan (by a client)."""


class _Executor:
    """Carries out plan actions on a node, re-checking each target first."""

    def __init__(self, node, loser_dir: str, strategy: str, fork_lsn: int = 0):
        self.node = node
        self.loser = SeekReader(loser_dir)
        self.strategy = strategy
        self.fork_lsn = fork_lsn
        self._guids: dict[str, dict[bytes, list[int]]] = {}

    def close(self) -> None:
        self.loser.close()

    # -- helpers -------------------------------------------------------------

    def _mailbox(self, act: Action):
        st = self.node.state
        mb = st.by_id.get(act.mailbox_id) if act.mailbox_id else None
        if mb is None:
            mb = st.by_name.get(act.mailbox)
        if mb is None:
            raise ReconcileError(f"mailbox {act.mailbox!r} is not on the survivor")
        return mb

    def _rows(self, mailbox_id: str) -> dict[int, tuple]:
        self.node.list_mailboxes()  # waits until the store applied every durable record
        return {r[0]: r for r in self.node.store.message_rows(mailbox_id)}

    def _guid_index(self, mailbox_id: str) -> dict[bytes, list[int]]:
        idx = self._guids.get(mailbox_id)
        if idx is None:
            idx = {}
            for uid, row in self._rows(mailbox_id).items():
                idx.setdefault(row[1], []).append(uid)
            self._guids[mailbox_id] = idx
        return idx

    def _append(self, mailbox_id: str, body: bytes, flags, internaldate_ms: int, delivered_ms: int,
                uid_floor: int, *, leaving: Collection[int] = (), replaces: int = 0) -> tuple[int, int]:
        """Append a message under the node's state lock, at a UID >= ``uid_floor`` (REC-6).

        The node's own delivery path would refuse a GUID it saw recently (MS-6
        dedup) and cannot skip UIDs, hence the event is planned here. Raises
        _AlreadyPresent, logging nothing, when the message was delivered to the
        mailbox since the plan was made (at a UID not in ``leaving``, the ones a
        move leaves or the plan's REC-6 expunge removes).

        With ``replaces`` the record is a move (MS-16): the message leaves that
        UID in the same record, with the flags it has there when the record is
        planned (``flags`` is ignored). Under the state lock no write can come
        in between, so no client change to the old UID is ever lost and an
        interrupted apply never leaves the message at two UIDs.
        """
        box: dict = {}
        guid = body_guid(body)

        def plan_fn():
            mb = self.node.state.by_id.get(mailbox_id)
            if mb is None:
                raise ReconcileError(f"mailbox {mailbox_id} disappeared from the survivor")
            # The GUID index was read from the store before this action; a delivery since
            # (the MTA retrying a message the old master had acknowledged) is only in the
            # decision state's recent deliveries, read here under the same lock the
            # delivery path holds.
            seen = mb.recent.get(guid)
            if seen is not None and seen[0] not in leaving and seen[0] in mb.uids:
                raise _AlreadyPresent(seen[0])
            now_flags = self._flags_under_lock(mb, replaces, guid) if replaces else flags
            ev = MessageAppended(mailbox_id, max(mb.uidnext, uid_floor), mb.highestmodseq + 1, guid, body,
                                 tuple(now_flags), internaldate_ms, delivered_ms, replaces)
            box["ev"] = ev
            return ev

        try:
            lsn = self.node._write(plan_fn)
        except _AlreadyPresent as present:
            self._guids.setdefault(mailbox_id, {}).setdefault(guid, []).append(present.uid)
            raise
        uid = box["ev"].uid
        uids = self._guids.setdefault(mailbox_id, {}).setdefault(guid, [])
        if replaces in uids:
            uids.remove(replaces)
        uids.append(uid)
        return uid, lsn

    def _flags_under_lock(self, mb, uid: int, guid: bytes) -> tuple[str, ...]:
        """The flags of ``uid`` now (state lock held: no write can come in between).

        The store applies durable records behind the log; every record up to the
        log's end was planned before this lock was taken and becomes durable
        without it, so the store catches up while we wait."""
        if uid not in mb.uids:
            raise _Gone(uid)
        if not self.node.wait_applied(self.node.log.last_lsn):
            raise ReconcileError(f"the store did not catch up with the log (LSN {self.node.log.last_lsn}) "
                                 f"before moving UID {uid} of mailbox {mb.name!r}; run the apply again")
        row = self.node.store.message_row(mb.mailbox_id, uid)
        if row is None or row[1] != guid:
            raise ReconcileError(f"mailbox {mb.name!r} UID {uid}: the store does not hold the message the "
                                 f"decision state has there (held by a quarantine?); nothing moved")
        return row[2]

    # -- actions -------------------------------------------------------------

    def run(self, act: Action) -> dict:
        fn = getattr(self, "_do_" + act.kind)
        return fn(act)

    def _do_create_mailbox(self, act: Action) -> dict:
        if act.mailbox in self.node.state.by_name:
            return {"status": "skipped", "why": "a mailbox of that name exists already"}
        lsn = self.node.create_mailbox(act.mailbox)
        return {"status": "done", "lsn": lsn}

    def _do_rename_mailbox(self, act: Action) -> dict:
        mb = self._mailbox(act)
        new = act.detail["new_name"]
        if mb.name == new:
            return {"status": "skipped", "why": "already has that name"}
        if new in self.node.state.by_name:
            return {"status": "skipped", "why": f"{new!r} is taken on the survivor"}
        lsn = self.node.rename_mailbox(mb.name, new, children=bool(act.detail.get("children")))
        return {"status": "done", "lsn": lsn}

    def _body(self, guid: bytes, body_from: list) -> bytes | str:
        """REC-5: the bytes of GUID ``guid``: from the survivor's store when it holds them, else from
        the loser's delivery record (``["lsn", L]``: a single or multi-message append), else from
        the shared prefix of the survivor's own log (``["pre", mailbox id, UID at the fork]``: a
        loser's copy or move of a message from before the fork). A string says why none was found."""
        held = self.node.store.body_by_guid(guid)
        if held is not None:
            return held
        if body_from and body_from[0] == "lsn":
            rec = self.loser.record(body_from[1])
            ev = decode_event(rec.type, rec.payload)
            bodies = ([ev.body] if isinstance(ev, MessageAppended)
                      else list(ev.bodies) if isinstance(ev, MessagesAppended) else [])
            for body in bodies:
                if body_guid(body) == guid:
                    return body
            return f"loser record {rec.lsn} is not a delivery of GUID {guid.hex()[:16]}"
        if body_from and body_from[0] == "pre":
            with SeekReader(self.node.log.path) as own:
                body = body_at_fork(own, self.fork_lsn, guid)
            if body is not None:
                return body
            return (f"GUID {guid.hex()[:16]} (UID {body_from[2]} at the fork) is in neither the survivor's store "
                    f"nor its retained log")
        return f"no record holds GUID {guid.hex()[:16]}"

    def _do_copy_message(self, act: Action) -> dict:
        mb = self._mailbox(act)
        guid = bytes.fromhex(act.detail["guid"])
        have = self._guid_index(mb.mailbox_id).get(guid)
        if have:
            return {"status": "skipped", "why": f"already present at UID {have[0]}"}
        body = self._body(guid, act.detail.get("body_from") or ["lsn", act.detail["source_lsn"]])
        if isinstance(body, str):
            log.warning(body)
            return {"status": "failed", "why": body}
        try:
            uid, lsn = self._append(mb.mailbox_id, body, act.detail["flags"], act.detail["internaldate_ms"],
                                    act.detail["delivered_ms"], act.detail["uid_floor"])
        except _AlreadyPresent as present:
            return {"status": "skipped", "why": f"delivered again during the reconcile, at UID {present.uid}"}
        # REC-8: the copy holds its final flags at its delivery time; the loser's later changes
        # are logged after it at their own times (they change nothing now; a later reconcile
        # of another tail orders its own changes against them).
        later = act.detail.get("flag_changes") or {}
        if later:
            when = {f: ms for f, (_, ms) in later.items()}
            lsns = self._log_flag_changes(mb.name, uid, when, [f for f, (v, _) in later.items() if v],
                                          [f for f, (v, _) in later.items() if not v])
            lsn = lsns[-1] if lsns else lsn
        return {"status": "done", "uid": uid, "lsn": lsn}

    def _check_guid(self, act: Action, mailbox_id: str, uid: int, guid_hex: str) -> tuple | None:
        row = self.node._read_fresh(lambda store: store.message_row(mailbox_id, uid))
        if row is None:
            return None
        if row[1].hex() != guid_hex:
            msg = (f"mailbox {act.mailbox!r} UID {uid}: GUID {row[1].hex()[:16]} on the survivor, "
                   f"{guid_hex[:16]} planned; left alone")
            log.warning(msg)
            return ()
        return row

    def _do_set_flags(self, act: Action) -> dict:
        mb = self._mailbox(act)
        uid = act.detail["uid"]
        row = self._check_guid(act, mb.mailbox_id, uid, act.detail["guid"])
        if not row:
            return {"status": "skipped", "why": "the message is gone or is another message now"}
        have = set(row[2])
        add = [f for f in act.detail["add"] if f not in have]
        remove = [f for f in act.detail["remove"] if f in have]
        # REC-8: a winning change the flags match already is logged all the same (still matching:
        # one that no longer does was changed by a client since the plan, later).
        record = act.detail.get("record") or {}
        add_as_is = [f for f in record.get("add", ()) if f in have]
        remove_as_is = [f for f in record.get("remove", ()) if f not in have]
        lsns = self._log_flag_changes(mb.name, uid, act.detail.get("changed_ms") or {},
                                      add + add_as_is, remove + remove_as_is)
        if not lsns:
            return {"status": "skipped", "why": "flags are as planned already"}
        out = {"status": "done", "lsn": lsns[-1], "added": add, "removed": remove}
        if add_as_is or remove_as_is:
            out["logged_as_is"] = add_as_is + remove_as_is
        return out

    def _log_flag_changes(self, name: str, uid: int, when: dict, add, remove) -> list[int]:
        """REC-8: log flag changes on ``uid``, each with the changed_ms of the loser's change it
        applies (``when``; not the apply's time), so a later reconcile of another tail orders it
        by when its client made it; one record per (operation, time), in time order."""
        now = int(time.time() * 1000)
        groups: dict[tuple[int, str], list[str]] = {}
        for op, flags in (("add", add), ("remove", remove)):
            for f in flags:
                groups.setdefault((int(when.get(f, now)), op), []).append(f)
        lsns = []
        for (ms, op), flags in sorted(groups.items()):
            lsns.append(self.node._write(
                lambda op=op, flags=flags, ms=ms: self.node.state.plan_flags(name, [uid], op, flags, now_ms=ms)))
        return lsns

    def _do_redeliver(self, act: Action) -> dict:
        """REC-6: move the survivor's message at a collided UID to a fresh UID, in one record."""
        mb = self._mailbox(act)
        uid = act.detail["uid"]
        row = self._check_guid(act, mb.mailbox_id, uid, act.detail["guid"])
        if not row:
            return {"status": "skipped", "why": "the message is gone or is another message now"}
        guid = row[1]
        leaving = {uid, *act.detail.get("collided", ())}  # its UIDs this plan's REC-6 expunge removes
        others = [u for u in self._guid_index(mb.mailbox_id).get(guid, []) if u not in leaving]
        if others:
            return {"status": "skipped", "why": f"already at UID {others[0]} as well"}
        body = self.node.fetch(mb.name, uid)
        try:
            new_uid, lsn = self._append(mb.mailbox_id, body, (), row[3], row[4], act.detail["uid_floor"],
                                        leaving=leaving, replaces=uid)
        except _AlreadyPresent as present:
            return {"status": "skipped", "why": f"delivered again during the reconcile, at UID {present.uid}"}
        except _Gone:
            return {"status": "skipped", "why": "a client expunged the message since the plan"}
        return {"status": "done", "uid": new_uid, "lsn": lsn}

    def _do_expunge(self, act: Action) -> dict:
        mb = self._mailbox(act)
        rows = self._rows(mb.mailbox_id)
        ok = []
        for uid, guid_hex in zip(act.detail["uids"], act.detail["guids"]):
            row = rows.get(uid)
            if row is None:
                continue
            if row[1].hex() != guid_hex:
                log.warning(f"mailbox {act.mailbox!r} UID {uid}: GUID {row[1].hex()[:16]} on the survivor, "
                            f"{guid_hex[:16]} planned; not expunged")
                continue
            ok.append(uid)
        idx = self._guid_index(mb.mailbox_id)
        if act.rule == "REC-6":
            self._keep_last_uids(act, ok, rows, idx)
        if not ok:
            return {"status": "skipped", "why": "nothing left to expunge"}
        lsn = self.node.expunge(mb.name, ok)
        for uid in ok:
            uids = idx.get(rows[uid][1], [])
            if uid in uids:
                uids.remove(uid)
        return {"status": "done", "lsn": lsn, "uids": ok}

    @staticmethod
    def _keep_last_uids(act: Action, uids: list[int], rows: dict[int, tuple], idx: dict[bytes, list[int]]) -> None:
        """REC-6: an expunge never takes a message's last UID: each GUID must stay at a UID
        outside this expunge (its fresh UID, or one the plan keeps), else its greatest UID in
        ``uids`` stays (removed from ``uids``), whatever the plan said."""
        by_guid: dict[bytes, list[int]] = {}
        for uid in uids:
            by_guid.setdefault(rows[uid][1], []).append(uid)
        for guid, mine in by_guid.items():
            if set(idx.get(guid, ())) <= set(mine):  # every UID of the message is in this expunge
                keep = max(mine)
                log.warning(f"mailbox {act.mailbox!r} UID {keep}: its message has no fresh UID yet; not expunged")
                uids.remove(keep)

    def _do_keep_flag_changes(self, act: Action) -> dict:
        """CTL-9: log the loser's winning flag changes on a UID the survivor (a merge's scratch
        node) expunged, each at its own changed_ms, so the merged tail carries them to the
        reconcile it goes to. They change nothing here: the UID is gone (MS-2: never reused)."""
        mb = self._mailbox(act)
        uid = act.detail["uid"]
        groups: dict[tuple[int, bool], list[str]] = {}
        for flag, value, changed_ms in act.detail["ops"]:
            groups.setdefault((int(changed_ms), bool(value)), []).append(flag)
        lsn = 0
        for (changed_ms, value), flags in sorted(groups.items()):
            def plan_fn(flags=flags, value=value, changed_ms=changed_ms):
                state = self.node.state.by_id.get(mb.mailbox_id)
                if state is None or uid in state.uids or uid >= state.uidnext:
                    raise ReconcileError(f"mailbox {act.mailbox!r} UID {uid} is not an expunged UID on the merge's "
                                         f"node; its flag changes were not kept")
                return FlagsChanged(mb.mailbox_id, (uid,), "add" if value else "remove", tuple(flags),
                                    state.highestmodseq + 1, changed_ms)

            lsn = self.node._write(plan_fn)
        return {"status": "done", "lsn": lsn}

    def _do_renumber(self, act: Action) -> dict:
        mb = self._mailbox(act)
        rows = self._rows(mb.mailbox_id)
        order = arrival_order(MessageView(r[0], r[1], frozenset(r[2]), r[3], r[4]) for r in rows.values())
        now_s = int(time.time())
        box: dict = {}

        def plan_fn():
            box["ev"] = self.node.state.plan_renumber(mb.name, order, now_s=now_s)
            return box["ev"]

        lsn = self.node._write(plan_fn)
        self._guids.pop(mb.mailbox_id, None)
        return {"status": "done", "lsn": lsn, "uidvalidity": box["ev"].uidvalidity, "messages": len(order)}

    def _do_set_user(self, act: Action) -> dict:
        """REC-15: the loser's password hash, logged at the loser's change time."""
        name, stored = act.detail["user"], act.detail["password_hash"]
        self.node.list_users()  # waits until the store applied every durable record
        if self.node.store.user_hash(name) == stored:
            return {"status": "skipped", "why": "the survivor has that password hash already"}
        lsn = self.node._write(lambda: self.node.state.plan_user_set(name, stored, now_ms=act.detail["changed_ms"]))
        return {"status": "done", "lsn": lsn}

    def _do_delete_user(self, act: Action) -> dict:
        name = act.detail["user"]
        if name not in self.node.state.users:
            return {"status": "skipped", "why": "no such user on the survivor"}
        lsn = self.node._write(lambda: self.node.state.plan_user_delete(name, now_ms=act.detail["changed_ms"]))
        return {"status": "done", "lsn": lsn}

    def _do_set_subscription(self, act: Action) -> dict:
        """REC-16: the loser's subscribe or unsubscribe, logged at the loser's change time."""
        user, wanted = act.detail["user"], act.detail["subscribed"]
        if (act.mailbox in self.node.subscriptions(user)) == wanted:
            return {"status": "skipped", "why": "already so on the survivor"}
        lsn = self.node._write(lambda: self.node.state.plan_subscription(user, act.mailbox, wanted,
                                                                         now_ms=act.detail["changed_ms"]))
        return {"status": "done", "lsn": lsn}

    def _do_delete_mailbox(self, act: Action) -> dict:
        mb = self.node.state.by_id.get(act.mailbox_id)
        if mb is None:
            return {"status": "skipped", "why": "already gone"}
        lsn = self.node.delete_mailbox(mb.name)
        return {"status": "done", "lsn": lsn}


def apply_reconcile(node, dir_a: str, dir_b: str, *, strategy: str = "renumber", destructive: bool = False,
                    dry_run: bool = False, progress: Progress | None = None,
                    on_action: Callable[[int, Action, dict], None] | None = None, merge: bool = False) -> ApplyResult:
    """Reconcile ``dir_a`` and ``dir_b`` into ``node``, the surviving master (REC-5..REC-12).

    The node's log MUST contain the last record of one of the two logs (that
    side is the survivor, see :func:`choose_survivor`); the survivor's tail
    is read from the node's own log, so the node may have written more since.

    Args:
        node: an open, writable :class:`engine.node.Node`.
        strategy: ``"renumber"`` (default) or ``"uidvalidity"`` (REC-9).
        destructive: also apply the loser's expunges and mailbox deletes (REC-10).
        dry_run: plan only: nothing is written, not even the report.
        on_action: called after each action with (index, action, result).
        merge: ``node`` is a CTL-9 merge's scratch node (see
            :func:`engine.reconcile.planner.plan`).

    Returns:
        An :class:`ApplyResult`; its report file is ``result.report_path``.

    Raises:
        NotSurvivorError, ReconcileError, wal errors from reading the logs,
        and the node's TemporaryFailure errors if it stops taking writes
        (the report then says how far the apply got: rerun it).
    """
    progress = progress or NoProgress()
    result = _plan_on_survivor(node, dir_a, dir_b, strategy=strategy, destructive=destructive, merge=merge,
                               progress=progress)
    result.dry_run = dry_run
    for warning in result.plan.warnings:
        log.warning(warning)
    if dry_run:
        return result
    result.report_path = new_report_path(node.path, result.reconciliation.search.fork.lsn)
    if not result.plan.actions:
        result.status = "done"
        result.survivor_end = _log_end(node)
        _write_report(result.report_path, result)
        return result
    result.status = "applying"
    _write_report(result.report_path, result)  # REC-11: before the first action
    _run_actions(node, result, strategy, progress, on_action)
    result.survivor_end = _log_end(node)
    _write_report(result.report_path, result)
    return result


def _plan_on_survivor(node, dir_a: str, dir_b: str, *, strategy: str, destructive: bool, merge: bool,
                      progress: Progress) -> ApplyResult:
    """Read both logs (the survivor's tail from the node's own log) and plan against the node's
    current store (REC-12); nothing is written."""
    search = search_fork(dir_a, dir_b)
    survivor = choose_survivor(node.log.path, search, (dir_a, dir_b))
    reconciliation = reconcile(dir_a, dir_b, names=store_names(node), tail_dirs={survivor: node.log.path},
                               progress=progress)
    view = StoreView(node)
    pre_guids: dict[tuple, bytes] = {}
    wanted = moved_keys_wanted(reconciliation.diff, survivor)
    if wanted:  # REC-14: the loser flagged pre-fork messages the survivor expunged; did they move?
        with SeekReader(node.log.path) as own:
            pre_guids = guids_at_fork(own, reconciliation.search.fork.lsn, wanted)
    planned = plan(reconciliation.diff, survivor, view, strategy=strategy, destructive=destructive,
                   pre_guids=pre_guids, merge=merge)
    return ApplyResult(reconciliation, planned, survivor)


def _run_actions(node, result: ApplyResult, strategy: str, progress: Progress,
                 on_action: Callable[[int, Action, dict], None] | None) -> None:
    """Carry out ``result.plan``'s actions in order, each result appended to ``result.results``.

    An action that fails on a mail-store, reconcile or log error is recorded as ``failed`` and
    the apply goes on; ``result.status`` ends ``done`` or ``failed``. Anything else stops the
    apply: the report is written once more with status ``interrupted`` and the error raised.
    The report is rewritten at least every ``_REPORT_EVERY_ACTIONS`` actions or
    ``_REPORT_EVERY_S`` seconds (REC-11).
    """
    actions = result.plan.actions
    rec = result.reconciliation
    executor = _Executor(node, rec.dir_b if result.survivor == "a" else rec.dir_a, strategy, rec.search.fork.lsn)
    last_write = time.monotonic()
    try:
        progress.phase("applying", len(actions))
        for index, action in enumerate(actions):
            try:
                outcome = executor.run(action)
            except (MailStoreError, ReconcileError, WalError) as exc:
                outcome = {"status": "failed", "why": f"{type(exc).__name__}: {exc}"}
                log.warning(f"reconcile action {index} ({action.kind} on {action.mailbox!r}) failed: {exc}")
            result.results.append({"index": index, "kind": action.kind, "mailbox": action.mailbox, **outcome})
            progress.advance(1)
            if on_action is not None:
                on_action(index, action, outcome)
            if (index + 1) % _REPORT_EVERY_ACTIONS == 0 or time.monotonic() - last_write > _REPORT_EVERY_S:
                _write_report(result.report_path, result)
                last_write = time.monotonic()
        result.status = "failed" if any(r["status"] == "failed" for r in result.results) else "done"
    except BaseException:
        result.status = "interrupted"
        _write_report(result.report_path, result)
        raise
    finally:
        executor.close()


def _log_end(node) -> dict:
    """The node's last record, ``{lsn, hash}``: the apply's decisions rest on its log up to there."""
    last = node.log.last_lsn
    return {"lsn": last, "hash": node.log.hash_at(last).hex()}

