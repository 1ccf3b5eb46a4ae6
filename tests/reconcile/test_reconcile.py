"""The reconciler: pure diff and plan, and applying a plan to a survivor node (REC-4..REC-12)."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import time

import pytest

from engine.node import Node, rebuild_store
from engine.reconcile import (
    DictSurvivorView,
    FlagOp,
    MailboxView,
    MessageView,
    NotSurvivorError,
    apply_reconcile,
    diff,
    list_reports,
    plan,
    reconcile,
    reconcile_summary,
    resolve_flag,
)
from engine.store.events import (
    FlagsChanged,
    MailboxCreated,
    MailboxDeleted,
    MailboxRenamed,
    MailboxRenumbered,
    MessageAppended,
    MessagesExpunged,
    body_guid,
)
from tests.support import ROOT

INBOX = "1" * 32
WORK = "2" * 32
NEW_A = "a" * 32
NEW_B = "b" * 32


def app(mid, uid, body: bytes, flags=(), t=1000):
    return MessageAppended(mid, uid, uid, body_guid(body), body, tuple(flags), t, t)


def flags(mid, uids, op, fl, t):
    return FlagsChanged(mid, tuple(uids), op, tuple(fl), 99, t)


def numbered(events, start=101):
    return [(start + i, e) for i, e in enumerate(events)]


def view(*boxes):
    return DictSurvivorView(boxes)


def box(mid, name, msgs, uidvalidity=7, uidnext=None):
    m = {u: MessageView(u, g, frozenset(f), 0, d) for u, g, f, d in msgs}
    return MailboxView(mid, name, uidvalidity, uidnext or (max(m, default=0) + 1), m)


# ---------------------------------------------------------------------------
# the pure core is pure


PURE_CORE = ("engine.reconcile.replay", "engine.reconcile.tail_diff", "engine.reconcile.planner")


def _imported_modules(module: str) -> set[str]:
    """Every module ``module`` imports, relative imports resolved to absolute names."""
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    package = module.rsplit(".", 1)[0].split(".")
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1]
            names.add(".".join(base + ([node.module] if node.module else [])))
    return names


def test_reconciler_core_does_no_io():
    impure = {"anyio", "socket", "os", "time", "sqlite_utils", "wal.writer", "asyncio", "threading", "logging",
              "random"}
    for module in PURE_CORE:
        names = _imported_modules(module)
        assert not names & impure, module
        # Of our own modules, the pure core imports only itself and the record payloads.
        ours = {n for n in names if n.split(".")[0] in ("engine", "wal", "tools")}
        assert ours <= {*PURE_CORE, "engine.store.events"}, module


# ---------------------------------------------------------------------------
# REC-4..REC-8: the diff


def test_rec4_rec5_messages_by_guid_and_mailbox_pairing():
    a = numbered([app(INBOX, 5, b"x"), app(INBOX, 6, b"retried"), MailboxCreated(NEW_A, "New", 50),
                  app(NEW_A, 1, b"n1"), MailboxCreated("c" * 32, "OnlyA", 51)])
    b = numbered([app(INBOX, 5, b"y"), app(INBOX, 6, b"z"), app(INBOX, 7, b"retried"),
                  MailboxCreated(NEW_B, "New", 60), app(NEW_B, 1, b"n1"), app(NEW_B, 2, b"n2")])
    d = diff(a, b, names={INBOX: "INBOX"})
    by = {m.name: m for m in d.mailboxes}
    assert set(by) == {"INBOX", "New", "OnlyA"}
    inbox = by["INBOX"]
    assert inbox.same_id and inbox.fork_name == "INBOX"
    assert [m.guid for m in inbox.only_in_a] == [body_guid(b"x")]
    assert [m.guid for m in inbox.only_in_b] == [body_guid(b"y"), body_guid(b"z")]
    assert [(x.guid, y.uid) for x, y in inbox.both] == [(body_guid(b"retried"), 7)]  # REC-5: one message
    assert [(u, x.guid, y.guid) for u, x, y in inbox.collisions] == [
        (5, body_guid(b"x"), body_guid(b"y")), (6, body_guid(b"retried"), body_guid(b"z"))]
    new = by["New"]  # REC-4: created on both sides, paired by name, no UID collision across UIDVALIDITYs
    assert not new.same_id and new.a.mailbox_id == NEW_A and new.b.mailbox_id == NEW_B
    assert [m.guid for m in new.only_in_b] == [body_guid(b"n2")] and not new.collisions
    assert by["OnlyA"].b is None and by["OnlyA"].a.created
    c = d.counts()
    assert (c["only_in_a"], c["only_in_b"], c["both"], c["uid_collisions"]) == (1, 3, 2, 2)
    assert c["mailboxes_created_a"] == 2 and c["mailboxes_created_b"] == 1


def test_rec4_names_come_from_the_tails_first():
    a = numbered([MailboxRenamed(WORK, "Work", "Projects")])
    b = numbered([MailboxDeleted(INBOX, "Old INBOX name")])
    d = diff(a, b, names={WORK: "ignored", INBOX: "ignored"})
    by = {m.mailbox_id: m for m in d.mailboxes}
    assert by[WORK].fork_name == "Work" and by[WORK].name == "Projects"
    assert by[INBOX].fork_name == "Old INBOX name"
    assert by[INBOX].b.deleted == (101, "Old INBOX name")


def test_rec6_collisions_only_in_one_uid_space():
    a = numbered([MailboxRenumbered(INBOX, 900, ((1, 1), (2, 2)), 3, 5), app(INBOX, 3, b"a3")])
    b = numbered([app(INBOX, 3, b"b3")])
    assert diff(a, b).mailboxes[0].collisions == []


@pytest.mark.parametrize("survivor,loser,winner,value", [
    (None, None, "none", None),
    (FlagOp(True, 5, 1, "add"), None, "survivor", True),
    (None, FlagOp(False, 5, 1, "remove"), "loser", False),
    (FlagOp(True, 5, 1, "add"), FlagOp(False, 6, 2, "remove"), "loser", False),
    (FlagOp(False, 9, 1, "remove"), FlagOp(True, 6, 2, "add"), "survivor", False),
    (FlagOp(False, 6, 1, "remove"), FlagOp(True, 6, 2, "add"), "loser", True),  # tie: the addition is kept
    (FlagOp(True, 6, 1, "add"), FlagOp(False, 6, 2, "remove"), "survivor", True),
])
def test_rec8_flag_rule(survivor, loser, winner, value):
    w, op = resolve_flag(survivor, loser)
    assert w == winner
    assert (op.value if op else None) == value


def test_rec8_conflicts_later_change_wins_and_replace_clears_the_rest():
    a = numbered([flags(INBOX, [1], "add", ["\\Seen"], 10), flags(INBOX, [2], "add", ["\\Flagged"], 10),
                  flags(INBOX, [3], "add", ["\\Seen"], 50)])
    b = numbered([flags(INBOX, [1], "remove", ["\\Seen"], 20), flags(INBOX, [2], "replace", ["\\Seen"], 30),
                  flags(INBOX, [3], "add", ["\\Seen"], 40)])
    m = diff(a, b).mailboxes[0]
    got = {(c["uid_a"], c["flag"]): (c["winner"], c["result"]) for c in m.conflicts}
    assert got == {(1, "\\Seen"): ("b", "clear"), (2, "\\Flagged"): ("b", "clear")}
    assert len(m.flag_changes_a) == 3 and len(m.flag_changes_b) == 3


def test_rec10_expunges_are_reported():
    a = numbered([MessagesExpunged(INBOX, (2, 3), 9)])
    b = numbered([app(INBOX, 8, b"x"), MessagesExpunged(INBOX, (8,), 10)])
    m = diff(a, b).mailboxes[0]
    assert m.expunged_a == [2, 3] and m.expunged_b == []
    assert not m.only_in_b[0].alive
    assert diff(a, b).counts()["expunged_b"] == 1


# ---------------------------------------------------------------------------
# REC-5..REC-10: the plan against a survivor view


def test_rec5_copies_in_arrival_order_above_both_uidnexts():
    a = numbered([app(INBOX, 5, b"s5")])  # the survivor
    b = numbered([app(WORK, 3, b"w3", ["\\Seen"], t=1), app(INBOX, 5, b"l5"), app(INBOX, 6, b"l6"),
                  flags(INBOX, [6], "add", ["\\Answered"], 7)])
    v = view(box(INBOX, "INBOX", [(5, body_guid(b"s5"), (), 1)]), box(WORK, "Work", [], uidnext=3))
    p = plan(diff(a, b), "a", v)
    copies = [x for x in p.actions if x.kind == "copy_message"]
    assert [c.detail["source_lsn"] for c in copies] == [101, 102, 103]  # loser LSN order, across mailboxes
    assert [c.mailbox for c in copies] == ["Work", "INBOX", "INBOX"]
    assert copies[0].detail["flags"] == ["\\Seen"] and copies[2].detail["flags"] == ["\\Answered"]
    assert copies[1].detail["uid_floor"] == 7  # REC-6: above the loser's greatest UID
    kinds = [x.kind for x in p.actions]
    assert kinds == ["copy_message"] * 3 + ["redeliver"]  # MS-16: the move expunges UID 5 itself


def test_rec5_rec12_nothing_to_copy_when_the_guid_is_there():
    a = numbered([app(INBOX, 5, b"same")])
    b = numbered([app(INBOX, 5, b"same"), app(INBOX, 6, b"copied earlier")])
    v = view(box(INBOX, "INBOX", [(5, body_guid(b"same"), (), 1), (9, body_guid(b"copied earlier"), (), 2)]))
    p = plan(diff(a, b), "a", v)
    assert p.actions == []
    rules = sorted(d["rule"] for d in p.decisions)
    assert rules == ["REC-12", "REC-5"]


def test_rec8_plan_applies_the_losers_later_changes_only():
    a = numbered([flags(INBOX, [1], "add", ["\\Seen"], 10), flags(INBOX, [2], "remove", ["\\Seen"], 90)])
    b = numbered([flags(INBOX, [1], "remove", ["\\Seen"], 20), flags(INBOX, [2], "add", ["\\Seen"], 30),
                  flags(INBOX, [3], "replace", ["$Work"], 40)])
    g = [body_guid(b"%d" % i) for i in range(4)]
    v = view(box(INBOX, "INBOX", [(1, g[1], ["\\Seen"], 0), (2, g[2], [], 0), (3, g[3], ["\\Seen", "\\Flagged"], 0)]))
    p = plan(diff(a, b), "a", v)
    got = {x.detail["uid"]: (x.detail["add"], x.detail["remove"]) for x in p.actions}
    assert got == {1: ([], ["\\Seen"]), 3: (["$Work"], ["\\Flagged", "\\Seen"])}
    assert any(d["rule"] == "REC-8" and d["uid"] == 2 and "survivor" in d["decision"] for d in p.decisions)


def test_rec7_creates_renames_and_their_conflicts():
    a = numbered([MailboxRenamed(WORK, "Work", "Mine"), MailboxCreated(NEW_A, "Taken", 5)])
    b = numbered([MailboxRenamed(WORK, "Work", "Theirs"), MailboxRenamed(INBOX, "INBOX", "Taken"),
                  MailboxCreated(NEW_B, "Fresh", 6), app(NEW_B, 1, b"f1")])
    v = view(box(WORK, "Mine", []), box(INBOX, "INBOX", []), box(NEW_A, "Taken", []))
    p = plan(diff(a, b), "a", v)
    assert [(x.kind, x.mailbox) for x in p.actions] == [("create_mailbox", "Fresh"), ("copy_message", "Fresh")]
    texts = " ".join(d["decision"] for d in p.decisions)
    assert "renamed on both sides" in texts and "has a mailbox of that name" in texts
    # without the survivor's own rename, the loser's rename applies
    p2 = plan(diff([], b), "a", view(box(WORK, "Work", []), box(INBOX, "INBOX", [])))
    assert ("rename_mailbox", "Work", "Theirs") in [(x.kind, x.mailbox, x.detail.get("new_name")) for x in p2.actions]


def test_rec7_mail_for_a_mailbox_the_survivor_deleted_is_recreated():
    a = numbered([MailboxDeleted(WORK, "Work")])
    b = numbered([app(WORK, 4, b"late mail")])
    p = plan(diff(a, b, names={WORK: "Work"}), "a", view())
    assert [(x.kind, x.mailbox) for x in p.actions] == [("create_mailbox", "Work"), ("copy_message", "Work")]


def test_rec10_destructive_records_need_the_flag():
    g1 = body_guid(b"pre1")
    b = numbered([MessagesExpunged(INBOX, (1,), 5), app(INBOX, 9, b"gone"), MessagesExpunged(INBOX, (9,), 6),
                  MailboxDeleted(WORK, "Work")])
    v = view(box(INBOX, "INBOX", [(1, g1, (), 0)]), box(WORK, "Work", [(1, body_guid(b"w"), (), 0)]))
    safe = plan(diff([], b), "a", v)
    assert [x.kind for x in safe.actions] == ["copy_message"]  # delivered-then-expunged mail is kept
    assert sum(d["rule"] == "REC-10" for d in safe.decisions) == 2
    rough = plan(diff([], b), "a", v, destructive=True)
    assert sorted((x.kind, x.mailbox) for x in rough.actions) == [("delete_mailbox", "Work"), ("expunge", "INBOX")]
    # the survivor got new mail in Work after the fork: not deleted even so
    a = numbered([app(WORK, 2, b"new on survivor")])
    kept = plan(diff(a, b), "a", v, destructive=True)
    assert "delete_mailbox" not in [x.kind for x in kept.actions]
    assert any("not deleted" in w for w in kept.warnings)


# ---------------------------------------------------------------------------
# applying to real nodes


def forked_nodes(tmp_path, prefix=None):
    pa, pb = str(tmp_path / "a"), str(tmp_path / "b")
    n = Node.init(pa, name="a")
    n.create_mailbox("INBOX")
    n.create_mailbox("Work")
    for i in range(1, 6):
        n.deliver("INBOX", b"prefix message %d" % i, flags=["\\Seen"] if i % 2 else [])
    if prefix:
        prefix(n)
    n.close()
    shutil.copytree(pa, pb)
    return Node.open(pa), Node.open(pb)


def at_ms(node, mailbox, uids, op, fl, ms):
    """store_flags with a chosen record time (REC-8 compares record times)."""
    return node._write(lambda: node.state.plan_flags(mailbox, uids, op, fl, now_ms=ms))


def contents(node) -> dict:
    return {m.name: sorted((x.guid, x.flags) for x in node.list_messages(m.name)) for m in node.list_mailboxes()}


def logs(a, b):
    return a.log.path, b.log.path


def test_rec5_rec6_rec12_apply_renumber_end_to_end(tmp_path, caplog):
    a, b = forked_nodes(tmp_path)
    try:
        a.deliver("INBOX", b"survivor 6")
        b.deliver("INBOX", b"loser 6")
        b.deliver("INBOX", b"loser 7", flags=["\\Flagged"])
        a.deliver("Work", b"retried delivery")
        b.deliver("Work", b"retried delivery")
        at_ms(a, "INBOX", [1], "remove", ["\\Seen"], 1000)
        at_ms(b, "INBOX", [1], "add", ["\\Answered"], 1500)
        at_ms(b, "INBOX", [1], "add", ["\\Seen"], 2000)
        b.close()
        caplog.set_level(logging.WARNING, logger="mailwal.reconcile")
        res = apply_reconcile(a, *logs(a, b))
        assert res.survivor == "a" and res.status == "done"
        assert res.counts()["failed"] == 0 and res.counts()["done"] > 0
        msgs = {x.guid: x for x in a.list_messages("INBOX")}
        for body in (b"survivor 6", b"loser 6", b"loser 7"):
            assert body_guid(body).hex() in msgs
        assert 6 not in {x.uid for x in msgs.values()}  # REC-6: the collided UID is gone
        assert min(x.uid for x in msgs.values() if x.uid > 5) >= 8  # above the loser's UIDs
        assert msgs[body_guid(b"loser 7").hex()].flags == ("\\Flagged",)
        assert set(msgs[body_guid(b"prefix message 1").hex()].flags) == {"\\Answered", "\\Seen"}
        assert [x.guid for x in a.list_messages("Work")] == [body_guid(b"retried delivery").hex()]
        assert any("collision" in r.message for r in caplog.records)  # REC-11: GUID mismatch warned
        before = contents(a)
        again = apply_reconcile(a, *logs(a, b))  # REC-12
        assert again.plan.actions == [] and contents(a) == before
        doc = json.load(open(res.report_path))
        assert doc["apply"]["status"] == "done" and doc["fork"]["lsn"] == 7
        assert {r["status"] for r in doc["results"]} == {"done"}
        assert reconcile_summary(a.path)["last"]["file"] == again.report_path
        digest = a.digest()
    finally:
        a.close()
    assert rebuild_store(str(tmp_path / "a")) == digest  # every change went through the log


def test_rec9_uidvalidity_strategy_renumbers_by_arrival(tmp_path):
    a, b = forked_nodes(tmp_path)
    try:
        old = {m.name: m.uidvalidity for m in a.list_mailboxes()}
        b.deliver("INBOX", b"loser 6")
        time.sleep(0.005)  # distinct delivery times: arrival order is by delivered_ms (REC-9)
        a.deliver("INBOX", b"survivor 6")
        b.close()
        res = apply_reconcile(a, *logs(a, b), strategy="uidvalidity")
        assert [x.kind for x in res.plan.actions] == ["copy_message", "renumber"]
        boxes = {m.name: m for m in a.list_mailboxes()}  # after the store applied the apply's records
        inbox = boxes["INBOX"]
        assert inbox.uidvalidity > old["INBOX"]
        assert boxes["Work"].uidvalidity == old["Work"]
        msgs = a.list_messages("INBOX")
        assert [x.uid for x in msgs] == list(range(1, 8)) and inbox.uidnext == 8
        order = [x.guid for x in msgs]
        assert order[5] == body_guid(b"loser 6").hex()  # delivered first, so numbered first
        assert order[6] == body_guid(b"survivor 6").hex()
        assert apply_reconcile(a, *logs(a, b), strategy="uidvalidity").plan.actions == []
        assert apply_reconcile(a, *logs(a, b), strategy="renumber").plan.actions == []
        r = a.deliver("INBOX", b"after")
        assert (r.uid, r.uidvalidity) == (8, inbox.uidvalidity)
        digest = a.digest()
    finally:
        a.close()
    assert rebuild_store(str(tmp_path / "a")) == digest


def test_rec10_destructive_apply(tmp_path):
    a, b = forked_nodes(tmp_path)
    try:
        b.expunge("INBOX", [2])
        b.deliver("Work", b"short lived")
        b.expunge("Work", [1])
        b.delete_mailbox("Work")
        b.close()
        kept = apply_reconcile(a, *logs(a, b), dry_run=True)
        assert [x.kind for x in kept.plan.actions] == ["copy_message"] and kept.report_path is None
        res = apply_reconcile(a, *logs(a, b), destructive=True)
        assert sorted(x.kind for x in res.plan.actions) == ["delete_mailbox", "expunge"]
        assert [m.name for m in a.list_mailboxes()] == ["INBOX"]
        assert 2 not in {x.uid for x in a.list_messages("INBOX")}
        assert apply_reconcile(a, *logs(a, b), destructive=True).plan.actions == []
    finally:
        a.close()


def test_rec12_interrupted_apply_can_be_rerun(tmp_path):
    a, b = forked_nodes(tmp_path)
    try:
        for i in range(6):
            b.deliver("INBOX", b"loser %d" % i)
        a.deliver("INBOX", b"survivor")
        b.close()
        ref = str(tmp_path / "ref")
        shutil.copytree(str(tmp_path / "a"), ref, ignore=shutil.ignore_patterns("LOCK"))

        class Crash(Exception):
            pass

        def crash_after_three(i, act, res):
            if i == 2:
                raise Crash()

        with pytest.raises(Crash):
            apply_reconcile(a, *logs(a, b), on_action=crash_after_three)
        report = json.load(open(list_reports(a.path)[-1]))
        assert report["apply"]["status"] == "interrupted" and len(report["results"]) == 3
        assert reconcile_summary(a.path)["last"]["status"] == "interrupted"
        rest = apply_reconcile(a, *logs(a, b))
        assert len(rest.plan.actions) == len(report["plan"]["actions"]) - 3
        assert apply_reconcile(a, *logs(a, b)).plan.actions == []
        got = contents(a)
    finally:
        a.close()
    r = Node.open(ref)
    try:
        apply_reconcile(r, r.log.path, str(tmp_path / "b" / "log.wal"))
        assert contents(r) == got
    finally:
        r.close()


def test_rec2_rec12_reconcile_after_a_promotion(tmp_path):
    """B promoted (EpochStarted first), A kept records of the old epoch: the fork is the boundary."""
    from engine.cluster.failover import promote

    a, b = forked_nodes(tmp_path)
    try:
        a.deliver("INBOX", b"lost on the old master")
        a.close()
        p = promote(b)
        b.deliver("INBOX", b"new master")
        r = reconcile(str(tmp_path / "a" / "log.wal"), b.log.path)
        assert r.search.fork.lsn == p.fork_lsn and r.diverged
        assert r.diff.b.epochs == [{"lsn": p.first_lsn, "epoch": 2, "node": "a"}]
        res = apply_reconcile(b, str(tmp_path / "a" / "log.wal"), b.log.path)
        assert res.survivor == "b"
        assert body_guid(b"lost on the old master").hex() in {x.guid for x in b.list_messages("INBOX")}
        assert apply_reconcile(b, str(tmp_path / "a" / "log.wal"), b.log.path).plan.actions == []
    finally:
        b.close()


def test_rec11_apply_refuses_a_node_that_is_not_the_survivor(tmp_path):
    a, b = forked_nodes(tmp_path)
    c = Node.init(str(tmp_path / "c"))
    try:
        a.deliver("INBOX", b"a")
        b.deliver("INBOX", b"b")
        b.close()
        with pytest.raises(NotSurvivorError, match="not their survivor"):
            apply_reconcile(c, *logs(a, b))
        assert list_reports(c.path) == []
    finally:
        a.close()
        c.close()


def test_rec7_loser_mailboxes_arrive_on_the_survivor(tmp_path):
    a, b = forked_nodes(tmp_path)
    try:
        b.rename_mailbox("Work", "Projects")
        b.deliver("Lists/python", b"list mail", create=True)
        a.delete_mailbox("INBOX")
        b.deliver("INBOX", b"delivered to the loser's INBOX")
        b.close()
        apply_reconcile(a, *logs(a, b))
        names = {m.name for m in a.list_mailboxes()}
        assert names == {"INBOX", "Projects", "Lists/python"}
        assert [x.guid for x in a.list_messages("INBOX")] == [body_guid(b"delivered to the loser's INBOX").hex()]
        assert apply_reconcile(a, *logs(a, b)).plan.actions == []
    finally:
        a.close()


def test_rec3_rec12_a_tail_cut_aside_reconciles_like_the_whole_log(tmp_path):
    """The loser may be only its tail: a log directory starting at fork + 1 (as a divergence cut leaves it)."""
    import wal

    a, b = forked_nodes(tmp_path)
    try:
        a.deliver("INBOX", b"survivor")
        b.deliver("INBOX", b"loser 1")
        b.store_flags("INBOX", [1], "add", ["\\Flagged"])
        b.deliver("Work", b"loser 2")
        fork = 7
        records = list(b.log.read(fork + 1))
        b.close()
        tail = str(tmp_path / "tail.wal")
        with wal.Log.create(tail, log_id=b.log.log_id, first_lsn=fork + 1,
                            prev_hash=wal.LogReader(b.log.path).hash_at(fork), epoch=records[0].epoch) as t:
            t.append_records(records)
        whole = reconcile(a.log.path, b.log.path)
        part = reconcile(a.log.path, tail)
        assert part.search.fork == whole.search.fork and part.search.fork.lsn == fork
        assert part.diff.counts() == whole.diff.counts()
        res = apply_reconcile(a, a.log.path, tail)
        assert res.survivor == "a" and res.counts()["failed"] == 0
        msgs = {x.guid: x for x in a.list_messages("INBOX")}
        assert body_guid(b"loser 1").hex() in msgs
        assert "\\Flagged" in msgs[body_guid(b"prefix message 1").hex()].flags
        assert body_guid(b"loser 2").hex() in {x.guid for x in a.list_messages("Work")}
        assert apply_reconcile(a, a.log.path, tail).plan.actions == []
        assert apply_reconcile(a, a.log.path, b.log.path).plan.actions == []  # the same history either way
    finally:
        a.close()
