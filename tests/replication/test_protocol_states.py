"""Every message type, in every state, from both ends (REP-18; h2's test_state_machines).

Each case walks a real :class:`SessionPair` into the state (so the session's
context is what a conversation would leave), then offers one message:

* arriving from the peer: legal pairs of :data:`TRANSITIONS` move to the
  table's next state; anything else raises RemoteProtocolError and leaves the
  session in ERROR for good;
* being sent by this end: legal pairs move on; anything else raises
  LocalProtocolError, also sticky.
"""

from __future__ import annotations

import os

import pytest

from engine import replication as P
from engine.errors import LocalProtocolError, RemoteProtocolError
from engine.replication import (
    PREAMBLE,
    TRANSITIONS,
    Accept,
    Ack,
    AppendBatch,
    Challenge,
    Drained,
    Fence,
    Goodbye,
    Heartbeat,
    Hello,
    Position,
    Probe,
    ProbeReply,
    Promote,
    Promoted,
    Proof,
    Refuse,
    SeedRequest,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    State,
)
from tests.support.replication import LOG_ID, MASTER, REPLICA, SessionPair, history
from wal.format import ZERO_HASH

HIST = history(12)
H = b"\x22" * 32
POS = Position("r1", LOG_ID, 1, 1, 3, HIST[2].hash)

_AUTH = [
    (REPLICA, lambda p: Hello(os.urandom(32))),
    (MASTER, lambda p: Challenge(os.urandom(32))),
    (REPLICA, lambda p: p.replica.proof()),
    (MASTER, lambda p: p.master.proof()),
]
_STREAM = _AUTH + [(REPLICA, lambda p: POS), (MASTER, lambda p: Accept(LOG_ID, 1, 4, HIST[2].hash, 10))]
_SEED = _AUTH + [(REPLICA, lambda p: SeedRequest("r1", True))]
_FENCE_OPEN = _STREAM + [(MASTER, lambda p: Fence(1, 6))]
_FENCE_FULL = _FENCE_OPEN + [(MASTER, lambda p: AppendBatch(tuple(HIST[3:6]))), (REPLICA, lambda p: Ack(6, 6))]

#: state -> steps that lead there. AUTH_FAILED needs different secrets (see _pair_in).
PATHS = {
    State.HELLO: [],
    State.CHALLENGE: _AUTH[:1],
    State.REPLICA_PROOF: _AUTH[:2],
    State.AUTH_FAILED: _AUTH[:3],
    State.MASTER_PROOF: _AUTH[:3],
    State.REQUEST: _AUTH,
    State.DECIDE: _AUTH + [(REPLICA, lambda p: POS)],
    State.PROBE: _AUTH + [(REPLICA, lambda p: POS), (MASTER, lambda p: Probe((1, 2)))],
    State.SEED: _SEED,
    State.SNAPSHOT: _SEED + [(MASTER, lambda p: SnapshotBegin(LOG_ID, 1, 3, HIST[2].hash)),
                             (MASTER, lambda p: SnapshotChunk(b"abc"))],
    State.SNAPSHOT_DONE: _SEED + [(MASTER, lambda p: SnapshotBegin(LOG_ID, 1, 3, HIST[2].hash)),
                                  (MASTER, lambda p: p.master.snapshot_end())],
    State.STREAMING: _STREAM,
    State.FENCING: _FENCE_OPEN,
    State.DRAINED: _FENCE_FULL + [(REPLICA, lambda p: Drained(6, HIST[5].hash))],
    State.PROMOTING: _STREAM + [(MASTER, lambda p: Promote(2))],
    State.CLOSED: _STREAM + [(REPLICA, lambda p: Goodbye("done"))],
    State.ERROR: _STREAM,
}
# Drained is only legal once the fence is reached and acked: a second FENCING path.
PATH_FOR = {(State.FENCING, Drained): _FENCE_FULL}


def _pair_in(state: State, role, cls) -> tuple[SessionPair, set]:
    bad_secret = state is State.AUTH_FAILED
    pair = SessionPair(replica_secret=b"a-different-secret-for-the-replica") if bad_secret else SessionPair()
    spoke = set()
    for sender, make in PATH_FOR.get((state, cls), PATHS[state]):
        pair.send(sender, make(pair))
        spoke.add(sender)
    if state is State.ERROR:
        pair.master.send_failed()
        pair.replica.send_failed()
    assert pair.sessions[role].state is state, pair.log
    return pair, spoke


def _sample(cls, s, state):
    """A message of type ``cls`` that fits session ``s``'s context, if any would."""
    last = max(s.last_lsn, 0)
    if cls in (Hello, Challenge):
        return cls(os.urandom(32))
    if cls is Proof:
        try:
            return s.proof()
        except LocalProtocolError:
            return Proof(os.urandom(32))
    if cls is Position:
        return POS
    if cls is SeedRequest:
        return SeedRequest("r1", True)
    if cls is Probe:
        return Probe((1, 2))
    if cls is ProbeReply:
        return ProbeReply((H,) * (len(s.probe.lsns) if s.probe else 1))
    if cls is Accept:
        if state is State.SEED:
            return Accept(LOG_ID, 1, 1, ZERO_HASH, 10)
        if state is State.SNAPSHOT_DONE:
            return Accept(LOG_ID, 1, s.snapshot.lsn + 1, s.snapshot.hash, 10)
        return Accept(LOG_ID, 1, POS.last_lsn + 1, POS.last_hash, 10)
    if cls is Refuse:
        if state in (State.AUTH_FAILED, State.MASTER_PROOF):
            return Refuse("auth", "authentication failed")
        return Refuse("diverged", "no", last_common_lsn=1)
    if cls is SnapshotBegin:
        return SnapshotBegin(LOG_ID, 1, 3, HIST[2].hash)
    if cls is SnapshotChunk:
        return SnapshotChunk(b"xyz")
    if cls is SnapshotEnd:
        try:
            return s.snapshot_end()
        except LocalProtocolError:
            return SnapshotEnd(0, 0, H)
    if cls is AppendBatch:
        start = s.next_lsn or 4
        return AppendBatch(tuple(HIST[start - 1 : start + 1]))
    if cls is Heartbeat:
        return Heartbeat(100)
    if cls is Ack:
        return Ack(last, 0)
    if cls is Fence:
        return Fence(1, last + 2)
    if cls is Drained:
        return Drained(s.fence.last_lsn if s.fence else last, H)
    if cls is Promote:
        return Promote(2)
    if cls is Promoted:
        return Promoted(s.promote.new_epoch if s.promote else 2, last, H)
    if cls is Goodbye:
        return Goodbye("bye")
    raise AssertionError(cls)


def _reachable(role, state) -> bool:
    return not (state is State.AUTH_FAILED and role is REPLICA)


CASES = [
    (role, state, cls)
    for role in (MASTER, REPLICA)
    for state in State
    if _reachable(role, state)
    for cls in P.MESSAGE_TYPES.values()
]


def _id(case):
    role, state, cls = case
    return f"{role.value}-{state.value}-{cls.__name__}"


def test_every_state_is_covered():
    assert set(PATHS) == set(State)
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_message_arriving_in_every_state(case):
    role, state, cls = case
    pair, spoke = _pair_in(state, role, cls)
    me = pair.sessions[role]
    sender = role.peer
    msg = _sample(cls, pair.sessions[sender] if cls is Proof else me, state)
    data = P.encode_message(msg)
    if sender not in spoke:
        data = PREAMBLE + data
    me.receive_data(data)
    legal = TRANSITIONS[state].get((sender, cls))
    if legal is not None:
        assert me.next_event() == msg
        assert me.state is legal
    else:
        with pytest.raises(RemoteProtocolError):
            me.next_event()
        assert me.state is State.ERROR
        with pytest.raises(RemoteProtocolError):  # sticky
            me.next_event()
        with pytest.raises(LocalProtocolError):
            me.send(Goodbye("too late"))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_message_sent_in_every_state(case):
    role, state, cls = case
    pair, _ = _pair_in(state, role, cls)
    me = pair.sessions[role]
    msg = _sample(cls, me, state)
    legal = TRANSITIONS[state].get((role, cls))
    if legal is not None:
        data = me.send(msg)
        assert data.endswith(P.encode_message(msg))
        assert me.state is legal
    else:
        with pytest.raises(LocalProtocolError):
            me.send(msg)
        assert me.state is State.ERROR
        with pytest.raises(LocalProtocolError):
            me.send(msg)


def test_every_legal_pair_is_exercised_both_ways():
    """Each table entry is hit by a send case and (where the receiver can be in
    that state) an arrival case above. The replica never is in AUTH_FAILED: it
    receives that Refuse("auth") in MASTER_PROOF, which has its own entry."""
    for state, moves in TRANSITIONS.items():
        for (sender, item) in moves:
            if item in P.MESSAGE_TYPES.values():
                assert (sender, state, item) in CASES
                assert (sender.peer, state, item) in CASES or not _reachable(sender.peer, state)
    assert (REPLICA, State.MASTER_PROOF, Refuse) in CASES
