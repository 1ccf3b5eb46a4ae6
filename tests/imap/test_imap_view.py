"""The selected-mailbox view (pure): numbering, and which updates may be sent when (IMAP-15)."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.imap.backend import Changes, MessageInfo, Snapshot
from engine.imap.commands import SequenceSet
from engine.imap.responses import Atom, ExistsData, ExpungeData, FetchData, VanishedData
from engine.store.structure import analyze
from engine.imap.view import SelectedView

S = SequenceSet
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
STRUCT = analyze(b"Subject: x\r\n\r\nbody\r\n")


def info(uid, modseq=1, flags=()):
    return MessageInfo(uid, frozenset(flags), modseq, T0, 20, STRUCT)


def view(uids, highest=10):
    return SelectedView("user/a/INBOX", Snapshot(7, max(uids, default=0) + 1, highest, [info(u) for u in uids]),
                        read_only=False)


def changes(changed=(), vanished=(), highest=20, uidnext=100):
    return Changes(7, uidnext, highest, list(changed), list(vanished))


def test_numbering_and_sets_with_star():
    v = view([3, 5, 9, 12])
    assert v.by_sequence(S(((2, None),))) == [(2, 5), (3, 9), (4, 12)]
    assert v.by_sequence(S(((3, 10),))) == [(3, 9), (4, 12)]  # numbers above EXISTS are ignored
    assert v.by_uid(S(((4, 9),))) == [(2, 5), (3, 9)]
    assert v.by_uid(S(((100, None),))) == [(4, 12)]  # n:* includes the last UID
    assert v.seq_of(9) == 3 and v.seq_of(4) is None


def test_expunge_waits_for_an_allowed_point_and_then_counts_down():
    """IMAP-15: no EXPUNGE during FETCH/STORE/SEARCH; sequence numbers stay valid until it is sent."""
    v = view([1, 2, 3, 4, 5])
    v.absorb(changes(vanished=[2, 4]))
    assert v.updates(allow_expunge=False, qresync=False, condstore=False) == []
    assert v.exists == 5 and v.by_sequence(S(((4, 4),))) == [(4, 4)]
    out = v.updates(allow_expunge=True, qresync=False, condstore=False)
    assert out == [ExpungeData(4), ExpungeData(2)]
    assert v.uids == [1, 3, 5] and v.exists == 3


def test_qresync_sessions_get_vanished_instead_of_expunge():
    v = view([1, 2, 3, 4, 5])
    v.absorb(changes(vanished=[2, 3, 4]))
    assert v.updates(allow_expunge=True, qresync=True, condstore=True) == [VanishedData("2:4")]


def test_new_messages_then_flag_changes_with_modseq_and_uid():
    v = view([1, 2])
    v.absorb(changes(changed=[info(2, 15, ["\\Seen"]), info(3, 16)], highest=16))
    out = v.updates(allow_expunge=False, qresync=True, condstore=True)
    assert out[0] == ExistsData(3)
    assert out[1] == FetchData(2, (("UID", 2), ("FLAGS", (Atom("\\Seen"),)), ("MODSEQ", (15,))))
    assert v.highestmodseq == 16 and v.updates(allow_expunge=True, qresync=True, condstore=True) == []


def test_own_changes_already_told_are_not_repeated():
    v = view([1])
    v.note_told(info(1, 11, ["\\Flagged"]))
    v.absorb(changes(changed=[info(1, 11, ["\\Flagged"])], highest=11))
    assert v.updates(allow_expunge=True, qresync=False, condstore=False) == []


def test_a_message_added_and_expunged_between_commands_is_never_announced():
    v = view([1])
    v.absorb(changes(changed=[info(2, 12)], vanished=[2], highest=13))
    assert v.updates(allow_expunge=True, qresync=False, condstore=False) == []
    assert v.uids == [1]


@settings(max_examples=60)
@given(st.lists(st.tuples(st.sampled_from(["new", "flag", "expunge", "sync", "sync-no-expunge"]),
                          st.integers(0, 30)), max_size=40))
def test_the_client_copy_always_converges_to_the_store(ops):
    """IMAP-15: replaying the announced updates on a client-side list of UIDs gives the store's list after any
    allowed point, and between points every announced sequence number is valid."""
    store: dict[int, int] = {1: 1, 2: 1, 3: 1}
    modseq = [10]
    v = view(sorted(store))
    client = sorted(store)
    seen_modseq = 10
    nxt = [4]

    def sync(allow):
        nonlocal seen_modseq
        changed = [info(u, m) for u, m in sorted(store.items()) if m > seen_modseq]
        vanished = [u for u in range(1, nxt[0]) if u not in store and u in v.meta]
        v.absorb(changes(changed=changed, vanished=vanished, highest=modseq[0], uidnext=nxt[0]))
        seen_modseq = modseq[0]
        for r in v.updates(allow_expunge=allow, qresync=False, condstore=False):
            if isinstance(r, ExpungeData):
                assert 1 <= r.seq <= len(client)
                del client[r.seq - 1]
            elif isinstance(r, ExistsData):
                assert r.count >= len(client)
                client.extend(u for u in sorted(store) if u > (client[-1] if client else 0))
                assert len(client) == r.count
            elif isinstance(r, FetchData):
                assert 1 <= r.seq <= len(client)
        if allow:
            assert client == sorted(store)
    for op, k in ops:
        modseq[0] += 1
        if op == "new":
            store[nxt[0]] = modseq[0]
            nxt[0] += 1
        elif op == "flag" and store:
            store[sorted(store)[k % len(store)]] = modseq[0]
        elif op == "expunge" and store:
            del store[sorted(store)[k % len(store)]]
        elif op == "sync":
            sync(True)
        elif op == "sync-no-expunge":
            sync(False)
    sync(True)
