"""Hypothesis: random histories forked at a random point, random operations on each side.

A model records what each side did after the fork (through the ordinary
Node API, on two copies of one node directory) and predicts the report:
messages only in A / only in B / on both sides, UID collisions, flag
conflicts and their winners, expunges and mailbox changes (REC-4..REC-8).
Then B's tail is applied to A and the test checks the merged store and that
planning again finds nothing left to do (REC-5, REC-6, REC-9, REC-10, REC-12).
"""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.node import Node, rebuild_store
from engine.reconcile import apply_reconcile, reconcile
from engine.store.events import body_guid, decode_event

FLAGSETS = [(), ("\\Seen",), ("\\Flagged",), ("$Work",), ("\\Seen", "\\Flagged"), ("\\Seen", "$Work")]
BOXES = ["INBOX", "Work", "New"]
KINDS = ["deliver", "deliver", "deliver", "flags", "flags", "expunge", "create", "rename", "delete"]


class Side:
    """What one side did after the fork, as the model sees it."""

    def __init__(self, label: str, node: Node, pre: dict):
        self.label = label
        self.node = node
        self.ids = {m.name: m.mailbox_id for m in node.list_mailboxes()}  # current name -> id
        # current messages: id -> uid -> key; keys: ("pre", id, uid) or ("new", guid)
        self.msgs = {mid: {uid: ("pre", mid, uid) for (m, uid) in pre if m == mid} for mid in self.ids.values()}
        self.delivered: dict[str, dict[bytes, dict]] = {}  # mailbox id -> guid -> delivery
        self.ops: dict[tuple, dict] = {}  # key -> {"explicit": {flag: (value, ms)}, "baseline": (set, ms) | None}
        self.expunged_pre: dict[str, list[int]] = {}
        self.created: dict[str, str] = {}  # name -> id
        self.renamed: set[str] = set()
        self.deleted: set[str] = set()
        self.deleted_new = False

    def record(self, lsn: int):
        rec = next(self.node.log.read(lsn, lsn))
        return decode_event(rec.type, rec.payload)

    def flag_state(self, key) -> dict:
        return self.ops.setdefault(key, {"explicit": {}, "baseline": None})

    def op(self, key, flag):
        s = self.ops.get(key)
        if s is None:
            return None
        if flag in s["explicit"]:
            return s["explicit"][flag]
        if s["baseline"] is not None:
            kept, ms = s["baseline"]
            return (flag in kept, ms)
        return None

    def touched(self, key) -> set:
        s = self.ops.get(key)
        if s is None:
            return set()
        return set(s["explicit"]) | (set(s["baseline"][0]) if s["baseline"] else set())

    # -- operations (invalid ones are skipped) ---------------------------------------------------

    def mark(self) -> None:
        """A first record that differs on the two sides, so the fork is where the copy was made."""
        self.run("deliver", 0, 1, 0, [0], body=b"first record after the fork on " + self.label.encode())

    def run(self, kind: str, x: int, y: int, z: int, counter: list[int], body: bytes | None = None) -> None:
        n = self.node
        name = BOXES[x % 3]
        if name == "Work" and "Work" not in self.ids and "Projects" in self.ids:
            name = "Projects"
        mid = self.ids.get(name)
        if kind == "deliver" and mid is not None:
            if body is not None:
                pass
            elif y % 4 == 0:
                body = b"shared body %d" % (z % 3)  # may be delivered on both sides
            else:
                counter[0] += 1
                body = b"%s only %d" % (self.label.encode(), counter[0])
            guid = body_guid(body)
            if guid in self.delivered.setdefault(mid, {}):
                return
            r = n.deliver(name, body, flags=FLAGSETS[z % len(FLAGSETS)])
            assert not r.duplicate
            ev = self.record(r.lsn)
            key = ("new", guid)
            self.delivered[mid][guid] = {"uid": r.uid, "lsn": r.lsn, "key": key, "flags": set(ev.flags)}
            self.msgs[mid][r.uid] = key
            st = self.flag_state(key)
            for f in ev.flags:
                st["explicit"][f] = (True, ev.delivered_ms)
        elif kind == "flags" and mid is not None and self.msgs[mid]:
            uids = sorted(self.msgs[mid])
            uid = uids[y % len(uids)]
            op = ("add", "remove", "replace")[z % 3]
            fl = FLAGSETS[1 + (y + z) % (len(FLAGSETS) - 1)]
            lsn = n.store_flags(name, [uid], op, fl)
            ms = self.record(lsn).changed_ms
            st = self.flag_state(self.msgs[mid][uid])
            if op == "replace":
                st["explicit"], st["baseline"] = {}, (set(fl), ms)
            else:
                for f in fl:
                    st["explicit"][f] = (op == "add", ms)
        elif kind == "expunge" and mid is not None and self.msgs[mid]:
            uids = sorted(self.msgs[mid])
            uid = uids[y % len(uids)]
            n.expunge(name, [uid])
            key = self.msgs[mid].pop(uid)
            if key[0] == "pre":
                self.expunged_pre.setdefault(mid, []).append(uid)
            else:
                self.delivered[mid][key[1]]["expunged"] = True
        elif kind == "create" and "New" not in self.ids and "New" not in self.created:
            n.create_mailbox("New")
            self.ids["New"] = self.created["New"] = n.state.by_name["New"].mailbox_id
            self.msgs[self.ids["New"]] = {}
        elif kind == "rename" and "Work" in self.ids:
            n.rename_mailbox("Work", "Projects")
            self.ids["Projects"] = self.ids.pop("Work")
            self.renamed.add(self.ids["Projects"])
        elif kind == "delete" and "New" in self.ids:
            n.delete_mailbox("New")
            self.deleted.add(self.ids.pop("New"))
            self.deleted_new = True


def resolve(sop, lop):
    """REC-8, as the model states it: (winning side, value)."""
    if lop is None:
        return None
    if sop is None:
        return lop[0]
    if sop[1] != lop[1]:
        return sop[0] if sop[1] > lop[1] else lop[0]
    return sop[0] or lop[0]


_D = (0, "deliver", 0, 0, 0)


@pytest.mark.heavy
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    prefix=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=1, max_size=6),
    ops=st.lists(st.tuples(st.integers(0, 1), st.sampled_from(KINDS), st.integers(0, 40), st.integers(0, 40),
                           st.integers(0, 40)), max_size=18),
    strategy=st.sampled_from(["renumber", "uidvalidity"]),
    destructive=st.booleans(),
)
# REC-8 with REC-7 and REC-12: the loser created a mailbox and delivered into it with \\Seen,
# the survivor created and deleted one of that name. The first apply makes the mailbox anew and
# copies the message; the second weighs the loser's \\Seen against the survivor's operations in
# the new mailbox (not the deleted one) and plans nothing.
@example(prefix=[(0, 0)], ops=[_D] * 9 + [(0, "create", 0, 0, 0), (0, "delete", 0, 0, 0), (1, "create", 0, 0, 0),
                                         (1, "deliver", 8, 0, 1)], strategy="renumber", destructive=False)
def test_rec4_to_rec12_random_forks_report_the_model_and_merge(tmp_path_factory, prefix, ops, strategy, destructive):
    tmp = tmp_path_factory.mktemp("model")
    pa, pb = str(tmp / "a"), str(tmp / "b")
    n = Node.init(pa, name="a")
    n.create_mailbox("INBOX")
    n.create_mailbox("Work")
    pre: dict[tuple, bytes] = {}
    for i, (box, fl) in enumerate(prefix):
        name = ("INBOX", "Work")[box]
        r = n.deliver(name, b"prefix %d" % i, flags=FLAGSETS[fl])
        pre[(n.state.by_name[name].mailbox_id, r.uid)] = body_guid(b"prefix %d" % i)
    fork_lsn = n.log.last_lsn
    n.close()
    shutil.copytree(pa, pb)
    a_node, b_node = Node.open(pa), Node.open(pb)
    fork_ids = {m.name: m.mailbox_id for m in a_node.list_mailboxes()}
    try:
        sides = [Side("a", a_node, pre), Side("b", b_node, pre)]
        counter = [0]
        for s in sides:
            s.mark()
        for side, kind, x, y, z in ops:
            sides[side].run(kind, x, y, z, counter)
        A, B = sides
        b_node.close()
        la, lb = a_node.log.path, b_node.log.path

        # ---- the report (REC-4..REC-8) -----------------------------------------------------
        rep = reconcile(la, lb).to_dict()
        assert rep["fork"]["lsn"] == fork_lsn
        assert rep["diverged"] == (a_node.log.last_lsn > fork_lsn and B.node.log.last_lsn > fork_lsn)
        pairs = {}
        for m in rep["mailboxes"]:
            ida = m["a"]["mailbox_id"] if m["a"] else None
            idb = m["b"]["mailbox_id"] if m["b"] else None
            pairs[(ida, idb)] = m
        pre_ids = set(fork_ids.values())
        expected_pairs = set()
        for mid in sorted(set(A.delivered) | set(B.delivered) | set(A.expunged_pre) | set(B.expunged_pre)
                          | {k[1] for s in sides for k in s.ops if k[0] == "pre"} | A.renamed | B.renamed):
            if mid in A.created.values() or mid in B.created.values():
                continue
            expected_pairs.add(mid)
        for mid in expected_pairs:
            m = next(v for (ia, ib), v in pairs.items() if mid in (ia, ib))
            ga = set(A.delivered.get(mid, {}))
            gb = set(B.delivered.get(mid, {}))
            assert {x["guid"] for x in m["only_in_a"]} == {g.hex() for g in ga - gb}
            assert {x["guid"] for x in m["only_in_b"]} == {g.hex() for g in gb - ga}
            assert {x["guid"] for x in m["both"]} == {g.hex() for g in ga & gb}
            ua = {d["uid"]: g for g, d in A.delivered.get(mid, {}).items()}
            ub = {d["uid"]: g for g, d in B.delivered.get(mid, {}).items()}
            assert {c["uid"] for c in m["uid_collisions"]} == {u for u in set(ua) & set(ub) if ua[u] != ub[u]}
            assert m["expunged"]["a"] == sorted(A.expunged_pre.get(mid, []))
            assert m["expunged"]["b"] == sorted(B.expunged_pre.get(mid, []))
            want_conflicts = set()
            keys = {k for s in sides for k in s.ops if (k[0] == "pre" and k[1] == mid)}
            keys |= {("new", g) for g in ga & gb}
            for key in keys:
                for flag in A.touched(key) | B.touched(key):
                    oa, ob = A.op(key, flag), B.op(key, flag)
                    if oa is None or ob is None or oa[0] == ob[0]:
                        continue
                    winner = "a" if oa[1] > ob[1] else "b" if ob[1] > oa[1] else ("a" if oa[0] else "b")
                    uid = key[2] if key[0] == "pre" else A.delivered[mid][key[1]]["uid"]
                    want_conflicts.add((uid, flag, winner))
            assert {(c["uid_a"], c["flag"], c["winner"]) for c in m["flag_conflicts"]} == want_conflicts
            if mid in A.renamed:
                assert m["a"]["renamed"] and m["mailbox"] == "Projects"
        new_pair = [v for (ia, ib), v in pairs.items()
                    if ia in A.created.values() or ib in B.created.values()]
        assert len(new_pair) == (1 if (A.created or B.created) else 0)
        assert rep["counts"]["mailboxes_deleted_b"] == int(B.deleted_new)

        # ---- apply B's tail to A and check the merge ---------------------------------------
        before = {m.mailbox_id: {x.uid: x for x in a_node.list_messages(m.name)} for m in a_node.list_mailboxes()}
        uv_before = {m.mailbox_id: m.uidvalidity for m in a_node.list_mailboxes()}
        res = apply_reconcile(a_node, la, lb, strategy=strategy, destructive=destructive)
        assert res.survivor == "a" and res.counts()["failed"] == 0, res.results
        after = {m.mailbox_id: {x.uid: x for x in a_node.list_messages(m.name)} for m in a_node.list_mailboxes()}
        by_name = {m.name: m.mailbox_id for m in a_node.list_mailboxes()}

        for mid, dels in B.delivered.items():
            target = mid if mid in pre_ids else by_name.get("New")
            old_guids = [x.guid for x in before.get(target, {}).values()]
            guids = [x.guid for x in after.get(target, {}).values()]
            for g, d in dels.items():
                if g in A.delivered.get(target, {}):
                    # REC-5: one message; the survivor's copy (or its expunge) stands
                    assert guids.count(g.hex()) == old_guids.count(g.hex())
                    continue
                gone = d.get("expunged") or (mid not in pre_ids and B.deleted_new)
                want = 0 if (destructive and gone) else 1
                assert guids.count(g.hex()) == want, (g, d, destructive)
        for mid in pre_ids:
            ua = {d["uid"]: g for g, d in A.delivered.get(mid, {}).items()}
            ub = {d["uid"]: g for g, d in B.delivered.get(mid, {}).items()}
            live = [u for u in set(ua) & set(ub) if ua[u] != ub[u] and u in before.get(mid, {})]
            if live and strategy == "renumber":
                assert not set(live) & set(after[mid])  # REC-6
                assert uv_before[mid] == a_node.store.mailbox(a_node.state.by_id[mid].name).uidvalidity
            elif live:
                assert a_node.state.by_id[mid].uidvalidity > uv_before[mid]  # REC-9
                assert sorted(after[mid]) == list(range(1, len(after[mid]) + 1))
            # REC-8 and REC-10 on the messages from before the fork
            for (pmid, uid), guid in pre.items():
                if pmid != mid or uid not in before.get(mid, {}):
                    continue
                now = [x for x in after[mid].values() if x.guid == guid.hex()]
                if destructive and uid in B.expunged_pre.get(mid, []):
                    assert now == []
                    continue
                assert len(now) == 1
                key = ("pre", mid, uid)
                for flag in A.touched(key) | B.touched(key) | set(before[mid][uid].flags):
                    win = resolve(A.op(key, flag), B.op(key, flag))
                    want = (flag in before[mid][uid].flags) if win is None else win
                    assert (flag in now[0].flags) == want, (flag, A.op(key, flag), B.op(key, flag))

        # ---- REC-12: nothing left to do ---------------------------------------------------
        again = apply_reconcile(a_node, la, lb, strategy=strategy, destructive=destructive)
        assert again.plan.actions == [], [x.to_dict() for x in again.plan.actions]
        other = "uidvalidity" if strategy == "renumber" else "renumber"
        assert apply_reconcile(a_node, la, lb, strategy=other, destructive=destructive, dry_run=True).plan.actions == []
        digest = a_node.digest()
    finally:
        a_node.close()
        b_node.close()
    assert rebuild_store(pa) == digest
