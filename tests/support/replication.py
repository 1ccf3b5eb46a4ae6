"""Shared helpers for the replication tests: SessionPair and record makers.

:class:`SessionPair` wires a master and a replica
:class:`~engine.replication.ReplicationSession` back to back with no network:
``pair.send(role, msg)`` has that role's session produce the bytes and feeds
them to the other side, returning the events that came out. Every delivered
message is logged in ``pair.log`` so that a failing test can print the
conversation.
"""

from __future__ import annotations

import os
import uuid

from engine.replication import (
    NEED_DATA,
    Accept,
    Challenge,
    Hello,
    Message,
    Position,
    ReplicationSession,
    Role,
)
from wal.format import ZERO_HASH, Record, payload_hash, record_hash

SECRET = b"replication-test-secret-0123456789"
LOG_ID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff").bytes
MASTER, REPLICA = Role.MASTER, Role.REPLICA


def chain(first_lsn: int, payloads: list[bytes], prev_hash: bytes = ZERO_HASH, epoch: int = 1, type_: int = 1) -> list[Record]:
    """Records ``first_lsn..`` with these payloads, hash-chained after ``prev_hash``."""
    out = []
    prev = prev_hash
    for i, p in enumerate(payloads):
        lsn = first_lsn + i
        h = record_hash(prev, lsn, epoch, type_, len(p), payload_hash(p))
        out.append(Record(lsn, epoch, type_, p, h))
        prev = h
    return out


def history(n: int, tag: bytes = b"m", first_lsn: int = 1, prev_hash: bytes = ZERO_HASH) -> list[Record]:
    return chain(first_lsn, [tag + b"-%d" % i for i in range(first_lsn, first_lsn + n)], prev_hash)


class SessionPair:
    """Two sessions back to back (h11's ConnectionPair, for replication)."""

    def __init__(self, master_secret: bytes = SECRET, replica_secret: bytes = SECRET):
        self.sessions = {MASTER: ReplicationSession(MASTER, master_secret), REPLICA: ReplicationSession(REPLICA, replica_secret)}
        self.log: list[tuple[str, Message]] = []

    @property
    def master(self) -> ReplicationSession:
        return self.sessions[MASTER]

    @property
    def replica(self) -> ReplicationSession:
        return self.sessions[REPLICA]

    def send(self, sender: Role, msg: Message) -> list:
        """``sender`` sends ``msg``; returns the events the other side produced."""
        data = self.sessions[sender].send(msg)
        self.log.append((sender.value, msg))
        return self.deliver(sender.peer, data)

    def deliver(self, receiver: Role, data: bytes) -> list:
        s = self.sessions[receiver]
        s.receive_data(data)
        events = []
        while True:
            ev = s.next_event()
            if ev is NEED_DATA:
                return events
            events.append(ev)

    def authenticate(self) -> None:
        self.send(REPLICA, Hello(os.urandom(32)))
        self.send(MASTER, Challenge(os.urandom(32)))
        self.send(REPLICA, self.replica.proof())
        self.send(MASTER, self.master.proof())

    def stream_from(self, records: list[Record], log_id: bytes = LOG_ID, master_lsn: int | None = None) -> Position:
        """Authenticate, present a replica holding ``records``, accept it."""
        self.authenticate()
        last = records[-1] if records else None
        pos = Position("r1", log_id, 1, 1, last.lsn if last else 0, last.hash if last else ZERO_HASH)
        self.send(REPLICA, pos)
        self.send(MASTER, Accept(log_id, 1, pos.last_lsn + 1, pos.last_hash, master_lsn if master_lsn is not None else pos.last_lsn))
        return pos
