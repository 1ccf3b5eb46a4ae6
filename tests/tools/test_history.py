"""The torture history checker finds each kind of violation (and no false ones)."""

from tools.torture.history import check


def node(name, mailboxes, last_lsn=10, last_hash="h10", digest="d", hashes=None):
    return {"name": name, "last_lsn": last_lsn, "last_hash": last_hash, "digest": digest,
            "hashes": hashes or {}, "mailboxes": mailboxes}


def deliver(i, guid, outcome="acked", t0=None, mailbox="user/a/INBOX", uidvalidity=7):
    t0 = float(i) if t0 is None else t0
    return {"op": "deliver", "id": i, "mailbox": mailbox, "guid": guid, "outcome": outcome,
            "t0": t0, "t1": t0 + 0.5, "uidvalidity": uidvalidity}


def box(*msgs, uidvalidity=7):
    return {"uidvalidity": uidvalidity, "messages": [{"uid": u, "guid": g, "flags": list(f)} for u, g, f in msgs]}


def test_clean_run_passes():
    ops = [deliver(1, "g1"), deliver(2, "g2"), deliver(3, "g3", outcome="unknown")]
    mbs = {"user/a/INBOX": box((1, "g1", ()), (2, "g2", ()))}
    out = check(ops, [node("m", mbs), node("r", mbs)])
    assert out["ok"], out
    assert out["lost"] == out["duplicated"] == out["diverged"] == 0


def test_lost_acked_delivery_is_reported_with_the_op():
    ops = [deliver(1, "g1"), deliver(2, "g2")]
    out = check(ops, [node("m", {"user/a/INBOX": box((1, "g1", ()), (2, "g2", ()))}),
                      node("r", {"user/a/INBOX": box((1, "g1", ()))})])
    assert not out["ok"] and out["lost"] == 1
    v = out["verdicts"]["every acknowledged delivery is present exactly once on every node"]["violations"]
    assert v == [{"node": "r", "op": ops[1], "found": 0, "problem": "lost"}]


def test_duplicate_and_phantom_and_perm():
    ops = [deliver(1, "g1"), deliver(2, "g2", outcome="unknown"), deliver(3, "g3", outcome="perm")]
    mbs = {"user/a/INBOX": box((1, "g1", ()), (2, "g1", ()), (3, "g2", ()), (4, "g2", ()), (5, "g3", ()), (6, "gx", ()))}
    out = check(ops, [node("m", mbs)])
    problems = sorted(v["problem"] for v in out["verdicts"]["every acknowledged delivery is present exactly once on every node"]["violations"])
    assert problems == ["duplicated", "duplicated", "message nobody delivered", "stored although refused permanently"]
    assert out["duplicated"] == 2


def test_flags_last_acked_wins_and_ambiguity_is_skipped():
    ops = [deliver(1, "g1"),
           {"op": "flags", "id": 2, "mailbox": "user/a/INBOX", "guid": "g1", "flag": "\\Seen", "action": "add",
            "outcome": "acked", "t0": 2, "t1": 2.1},
           {"op": "flags", "id": 3, "mailbox": "user/a/INBOX", "guid": "g1", "flag": "\\Seen", "action": "remove",
            "outcome": "acked", "t0": 3, "t1": 3.1}]
    good = check(ops, [node("m", {"user/a/INBOX": box((1, "g1", ()))})])
    assert good["ok"], good
    bad = check(ops, [node("m", {"user/a/INBOX": box((1, "g1", ("\\Seen",)))})])
    assert not bad["ok"]
    # an unknown remove after the acked add makes either outcome acceptable
    ops2 = ops[:2] + [dict(ops[2], outcome="unknown")]
    for flags in ((), ("\\Seen",)):
        assert check(ops2, [node("m", {"user/a/INBOX": box((1, "g1", flags))})])["ok"]


def test_uid_order_and_uidvalidity():
    ops = [deliver(1, "g1"), deliver(2, "g2")]
    swapped = {"user/a/INBOX": box((2, "g1", ()), (1, "g2", ()))}
    out = check(ops, [node("m", swapped)])
    assert not out["ok"]
    assert "lower UID" in out["verdicts"]["UIDs are unique and increasing per mailbox; UIDVALIDITY changes only by reconcile"]["violations"][0]["problem"]
    # renumbered by a reconcile: allowed
    assert check(ops, [node("m", swapped)], reconcile_reports=[{"renumbered": [["user/a/INBOX", "g1"]]}])["ok"]
    changed = {"user/a/INBOX": box((1, "g1", ()), (2, "g2", ()), uidvalidity=9)}
    assert not check(ops, [node("m", changed)])["ok"]
    assert check(ops, [node("m", changed)], reconcile_reports=[{"uidvalidity_changed": ["user/a/INBOX"]}])["ok"]


def test_log_prefix_digest_and_cursors():
    mbs = {}
    m = node("m", mbs, last_lsn=10, last_hash="h10", hashes={"8": "h8"})
    behind = node("r", mbs, last_lsn=8, last_hash="h8")
    forked = node("r2", mbs, last_lsn=8, last_hash="zz")
    out = check([], [m, behind, forked])
    problems = [v["problem"] for v in out["verdicts"]["every replica log is a prefix of the master's; digests equal after quiescence"]["violations"]]
    assert problems == ["replica not caught up after quiescence", "log is not a prefix of the master's"]
    assert out["diverged"] == 2
    samples = [{"master": "m", "epoch": 1, "replica": "r", "durable_lsn": 5, "t": 1},
               {"master": "m", "epoch": 1, "replica": "r", "durable_lsn": 4, "t": 2},
               {"master": "m", "epoch": 2, "replica": "r", "durable_lsn": 1, "t": 3}]
    out = check([], [node("m", {})], cursor_samples=samples)
    assert len(out["verdicts"]["no cursor moved backwards"]["violations"]) == 1


def test_a_node_that_could_not_be_observed_is_a_violation_not_a_crash():
    """walctl torture seed 42: a node that would not start had no last LSN; the checker crashed."""
    down = node("r", {}, last_lsn=None, last_hash=None, digest=None)
    out = check([], [node("m", {}), down])
    v = out["verdicts"]["every replica log is a prefix of the master's; digests equal after quiescence"]["violations"]
    assert not out["ok"] and out["diverged"] == 1
    assert v[0]["node"] == "r" and "could not be observed" in v[0]["problem"]
