"""A stateful model of one master and one replica over an unreliable in-memory
link (STYLE 6): appends, shipping, delivery, duplication, loss and reconnects
are rules; the invariants of specs/replication.md are checked after every step.

The "drivers" here are a few lines each, doing what engine/sender.py and
engine/receiver.py do around the sessions: the replica appends a batch only
if it extends its log and chains (as ``Log.append_records``), then acks; a
protocol error drops the connection; a reconnect re-runs authentication and
the position check (REP-7, REP-8).
"""

from __future__ import annotations

import os

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine import replication as P
from engine.errors import RemoteProtocolError
from engine.replication import NEED_DATA, Ack, AppendBatch, Heartbeat, Position, PositionCheck, State
from tests.support.replication import LOG_ID, MASTER, REPLICA, SessionPair, chain
from wal.format import ZERO_HASH, payload_hash, record_hash


class ReplicationMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.master: list = []
        self.replica: list = []
        self.pair: SessionPair | None = None
        self.to_replica: list[bytes] = []
        self.to_master: list[bytes] = []
        self.next_send = 1
        self.cursor = 0  # the master's view of the replica's acked durable LSN
        self.history: list[str] = []

    # -- helpers -------------------------------------------------------------

    def _hash(self, recs, lsn):
        return ZERO_HASH if lsn == 0 else recs[lsn - 1].hash

    def _drop(self, why: str) -> None:
        self.history.append(f"drop({why})")
        self.pair = None
        self.to_replica.clear()
        self.to_master.clear()

    # -- rules -----------------------------------------------------------------

    @rule(n=st.integers(1, 5))
    def append(self, n):
        prev = self.master[-1].hash if self.master else ZERO_HASH
        self.master += chain(len(self.master) + 1, [os.urandom(3) for _ in range(n)], prev)
        self.history.append(f"append({n})")

    @precondition(lambda self: self.pair is None)
    @rule()
    def connect(self):
        pair = SessionPair()
        pair.authenticate()
        last = len(self.replica)
        pos = Position("r1", LOG_ID, 1, 1, last, self._hash(self.replica, last))
        pair.send(REPLICA, pos)
        check = PositionCheck(pos, log_id=LOG_ID, first_lsn=1, last_lsn=len(self.master), epoch=1)
        while True:
            action = check.next_action()
            if isinstance(action, P.NeedMasterHashes):
                check.add_master_hashes({n: self._hash(self.master, n) for n in action.lsns})
            elif isinstance(action, P.Probe):
                pair.send(MASTER, action)
                reply = P.answer_probe(action, first_lsn=1, last_lsn=last, hash_at=lambda n: self._hash(self.replica, n))
                [ev] = pair.send(REPLICA, reply)
                check.add_reply(ev)
            else:
                break
        # The replica only ever holds a prefix, so it is always accepted where it is.
        assert isinstance(action, P.Accept), action
        pair.send(MASTER, action)
        self.pair = pair
        self.next_send = action.start_lsn
        self.cursor = max(self.cursor, last)
        self.history.append(f"connect(at {last})")

    @precondition(lambda self: self.pair is not None)
    @rule(k=st.integers(1, 4))
    def ship(self, k):
        recs = self.master[self.next_send - 1 : self.next_send - 1 + k]
        if recs:
            self.to_replica.append(self.pair.master.send(AppendBatch(tuple(recs))))
            self.next_send += len(recs)
        else:
            self.to_replica.append(self.pair.master.send(Heartbeat(len(self.master))))

    @precondition(lambda self: self.pair is not None and self.to_replica)
    @rule(dup=st.booleans())
    def deliver_to_replica(self, dup):
        data = self.to_replica[0] if dup else self.to_replica.pop(0)
        try:
            events = self.pair.deliver(REPLICA, data)
        except RemoteProtocolError as exc:  # e.g. a duplicated batch: REP-11
            return self._drop(str(exc))
        for ev in events:
            if isinstance(ev, AppendBatch):
                for r in ev.records:  # what Log.append_records checks
                    prev = self._hash(self.replica, len(self.replica))
                    assert r.lsn == len(self.replica) + 1
                    assert r.hash == record_hash(prev, r.lsn, r.epoch, r.type, len(r.payload), payload_hash(r.payload))
                    self.replica.append(r)
            durable = len(self.replica)
            self.to_master.append(self.pair.replica.send(Ack(durable, durable)))

    @precondition(lambda self: self.pair is not None and self.to_master)
    @rule(dup=st.booleans())
    def deliver_to_master(self, dup):
        data = self.to_master[0] if dup else self.to_master.pop(0)
        for ev in self.pair.deliver(MASTER, data):
            assert isinstance(ev, Ack)
            assert ev.durable_lsn <= len(self.replica)
            self.cursor = max(self.cursor, ev.durable_lsn)

    @precondition(lambda self: self.pair is not None and self.to_replica)
    @rule()
    def lose_a_frame(self):
        self.to_replica.pop(0)
        self.history.append("lose")

    @precondition(lambda self: self.pair is not None)
    @rule()
    def disconnect(self):
        self._drop("disconnect")

    # -- invariants (specs/replication.md, section 14) ------------------------------

    @invariant()
    def prefix_agreement(self):
        """INV-PrefixAgreement."""
        assert self.replica == self.master[: len(self.replica)]

    @invariant()
    def no_ack_before_durable(self):
        """INV-NoAckBeforeDurable and INV-CursorMonotonic (cursor only moves up, never past durable)."""
        assert self.cursor <= len(self.replica)

    @invariant()
    def sessions_never_in_error_while_connected(self):
        if self.pair is not None:
            assert self.pair.master.state is State.STREAMING
            assert self.pair.replica.state is State.STREAMING

    def teardown(self):
        # Liveness under a healthy link: reconnect and ship everything.
        if self.pair is None:
            self.connect()
        self.to_replica.clear()
        self.to_master.clear()
        self._drop("teardown")
        self.connect()
        while self.next_send <= len(self.master):
            self.ship(100)
            while self.to_replica:
                self.deliver_to_replica(False)
        assert self.replica == self.master


ReplicationMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestReplicationMachine = ReplicationMachine.TestCase


def test_the_session_pair_handshake_needs_no_data_left_over():
    pair = SessionPair()
    pair.authenticate()
    assert pair.master.next_event() is NEED_DATA and pair.replica.next_event() is NEED_DATA
