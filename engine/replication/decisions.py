"""The master's decisions about a replica, pure (REP-7, REP-8, REP-9, REP-11).

Where a replica may resume (:class:`PositionCheck`, narrowing the last common
LSN with multi-point probes), how a new replica is seeded
(:func:`decide_seed`), the answer to a probe, the error a refusal means to the
replica, and how records are cut into batches. No clock, no disk: the drivers
supply hashes and positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from wal import ZERO_HASH, Record

from ..errors import (
    AuthenticationError,
    BehindRetentionError,
    DivergedError,
    EngineError,
    LocalProtocolError,
    MasterUnavailableError,
    ReplicaAheadError,
    ReplicationRefusedError,
    SeedUnavailableError,
    WrongLogError,
)
from .messages import (
    BATCH_SOFT_MAX_BYTES,
    MAX_BATCH_RECORDS,
    MAX_PROBES,
    Accept,
    AppendBatch,
    Position,
    Probe,
    ProbeReply,
    Refuse,
    SeedRequest,
    _Sentinel,
)

# -- master-side decisions (pure) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeedMasterHashes:
    """:class:`PositionCheck` needs the master's hashes at these LSNs before it can go on."""

    lsns: tuple[int, ...]


class PositionCheck:
    """Decides the master's answer to a replica's Position (REP-7, REP-8, REP-9).

    Pure: the driver supplies the master's hashes when asked and forwards
    probes and replies. Equal hashes at LSN n mean equal histories up to n
    (the hash chain), so "equal" is monotone in n and the last common LSN can
    be found by narrowing ``(known equal, known different)`` with multi-point
    probes (up to ``probes_per_round`` LSNs per round trip).

    Loop::

        while True:
            action = check.next_action()
            if isinstance(action, NeedMasterHashes): check.add_master_hashes({...})
            elif isinstance(action, Probe): send it; check.add_reply(reply)
            else: send action (Accept or Refuse); done
    """

    def __init__(self, position: Position, *, log_id: bytes, first_lsn: int, last_lsn: int, epoch: int,
                 probes_per_round: int = 32):
        if not 2 <= probes_per_round <= MAX_PROBES:
            raise LocalProtocolError(f"probes_per_round must be 2..{MAX_PROBES}")
        self.position = position
        self._log_id = log_id
        self._m_first = first_lsn
        self._m_last = last_lsn
        self._epoch = epoch
        self._k = probes_per_round
        self._master: dict[int, bytes] = {}
        self._outstanding: tuple[int, ...] | None = None
        self._result: Accept | Refuse | None = None
        self.rounds = 0
        p = position
        self._floor = max(p.first_lsn - 1, first_lsn - 1)
        self._eq: int | None = None      # greatest LSN known equal
        self._diff: int | None = None    # smallest LSN known different
        self._floor_tested = False
        if p.log_id != log_id:
            self._result = Refuse("wrong-log", f"replica log {p.log_id.hex()} is not master log {log_id.hex()}")
        elif p.last_lsn <= last_lsn:
            if p.last_lsn < first_lsn - 1:
                self._result = Refuse(
                    "behind-retention",
                    f"the master no longer holds LSN {p.last_lsn + 1} (it keeps {first_lsn}..{last_lsn})",
                    master_lsn=last_lsn,
                )
            else:
                self._top = p.last_lsn
                self._phase = "position"
        else:
            if last_lsn < self._floor:
                self._result = self._ahead()
            else:
                self._top = last_lsn
                self._phase = "search"

    def _ahead(self) -> Refuse:
        return Refuse(
            "ahead",
            f"replica is at LSN {self.position.last_lsn}, beyond the master's last LSN {self._m_last}; "
            f"it is never rolled back",
            master_lsn=self._m_last,
        )

    def _diverged(self, last_common: int | None) -> Refuse:
        return Refuse(
            "diverged",
            f"replica at LSN {self.position.last_lsn} is not on the master's history; last common LSN "
            f"{'unknown (below the retained range)' if last_common is None else last_common}",
            last_common_lsn=last_common,
            master_lsn=self._m_last,
        )

    @property
    def done(self) -> bool:
        return self._result is not None

    def next_action(self) -> NeedMasterHashes | Probe | Accept | Refuse:
        if self._result is not None:
            return self._result
        if self._outstanding is not None:
            raise LocalProtocolError("a Probe is outstanding: add_reply() first")
        if self._phase == "position":
            lsn = self.position.last_lsn
            if lsn not in self._master:
                return NeedMasterHashes((lsn,))
            if self._master[lsn] == self.position.last_hash:
                p = self.position
                self._result = Accept(self._log_id, self._epoch, p.last_lsn + 1, p.last_hash, self._m_last)
                return self._result
            self._diff = lsn
            self._phase = "search"
            if lsn == self._floor:
                self._result = self._diverged(None)
                return self._result
        points = self._probe_points()
        missing = tuple(p for p in points if p not in self._master)
        if missing:
            return NeedMasterHashes(missing)
        self._outstanding = points
        self.rounds += 1
        return Probe(points)

    def _probe_points(self) -> tuple[int, ...]:
        pts: set[int] = set()
        if not self._floor_tested and self._eq is None:
            pts.add(self._floor)
        if self._diff is None:
            pts.add(self._top)
        lo = self._eq if self._eq is not None else self._floor
        hi = self._diff if self._diff is not None else self._top
        room = self._k - len(pts)
        inner = hi - lo - 1
        if inner > 0 and room > 0:
            n = min(room, inner)
            for i in range(1, n + 1):
                pts.add(lo + (inner + 1) * i // (n + 1))
        return tuple(sorted(pts))

    def add_master_hashes(self, hashes: dict[int, bytes]) -> None:
        """The master's own hashes at the LSNs a :class:`NeedMasterHashes` named."""
        self._master.update(hashes)

    def add_reply(self, reply: ProbeReply) -> None:
        """The replica's answer to the last Probe."""
        if self._outstanding is None or len(reply.hashes) != len(self._outstanding):
            raise LocalProtocolError("this reply does not answer the outstanding probe")
        points, self._outstanding = self._outstanding, None
        equal = {lsn: (h is not None and h == self._master[lsn]) for lsn, h in zip(points, reply.hashes)}
        if self._floor in equal:
            self._floor_tested = True
        diffs = [lsn for lsn, eq in equal.items() if not eq]
        if diffs:
            d = min(diffs)
            self._diff = d if self._diff is None else min(self._diff, d)
        eqs = [lsn for lsn, eq in equal.items() if eq and (self._diff is None or lsn < self._diff)]
        if eqs:
            self._eq = max(eqs + ([self._eq] if self._eq is not None else []))
        if self._diff is None:  # the master's last record matches: the replica is ahead
            self._result = self._ahead()
        elif self._eq is None and self._floor_tested:
            self._result = self._diverged(None)
        elif self._eq is not None and self._diff == self._eq + 1:
            self._result = self._diverged(self._eq)


#: :func:`decide_seed` returns this when the master should send a snapshot.
SEED_WITH_SNAPSHOT = _Sentinel("SEED_WITH_SNAPSHOT")


def decide_seed(request: SeedRequest, *, log_id: bytes, first_lsn: int, last_lsn: int, epoch: int,
                hash_before_first: bytes, has_snapshot: bool) -> Accept | Refuse | _Sentinel:
    """REP-10: how to seed a replica with no log.

    Streaming from LSN 1 is the default whenever the master still holds LSN 1
    (and its log starts after the zero hash); otherwise a snapshot, if both
    sides can; otherwise a refusal.
    """
    if first_lsn == 1 and hash_before_first == ZERO_HASH:
        return Accept(log_id, epoch, 1, ZERO_HASH, last_lsn)
    if has_snapshot and request.accepts_snapshot:
        return SEED_WITH_SNAPSHOT
    why = "the master has no snapshot source" if not has_snapshot else "the replica cannot take a snapshot"
    return Refuse("no-seed", f"the master's log starts at LSN {first_lsn}, and {why}", master_lsn=last_lsn)


def answer_probe(probe: Probe, *, first_lsn: int, last_lsn: int, hash_at: Any) -> ProbeReply:
    """REP-8, replica side: hashes at the probed LSNs, None outside ``first_lsn - 1 .. last_lsn``.

    ``hash_at`` is a callable ``lsn -> bytes`` (the driver passes ``Log.hash_at``).
    """
    return ProbeReply(tuple(hash_at(n) if first_lsn - 1 <= n <= last_lsn else None for n in probe.lsns))


def refusal_error(refuse: Refuse, *, position: Position | None = None) -> EngineError:
    """The typed error a replica raises for a master's Refuse (REP-9)."""
    replica_lsn = position.last_lsn if position is not None else 0
    code = refuse.code
    text = f"master refused: {refuse.detail}"
    if code == "auth":
        return AuthenticationError(
            "the master rejected this replica's proof: the replication secrets differ "
            "(compare NODE/replication.secret on both nodes)"
        )
    if code == "diverged":
        return DivergedError(refuse.last_common_lsn, replica_lsn)
    if code == "ahead":
        return ReplicaAheadError(replica_lsn, refuse.master_lsn if refuse.master_lsn is not None else -1)
    if code == "wrong-log":
        return WrongLogError(None, None, text)
    if code == "behind-retention":
        return BehindRetentionError(text)
    if code == "no-seed":
        return SeedUnavailableError(text)
    if code == "unavailable":
        return MasterUnavailableError(text)
    return ReplicationRefusedError(text, code=code)  # pragma: no cover - REFUSE_CODES is closed


def batch_records(records: Iterable[Record], *, max_bytes: int = BATCH_SOFT_MAX_BYTES,
                  max_records: int = MAX_BATCH_RECORDS) -> list[AppendBatch]:
    """Split consecutive records into batches that satisfy REP-11."""
    out: list[AppendBatch] = []
    cur: list[Record] = []
    size = 0
    for r in records:
        if cur and (size + len(r.payload) > max_bytes or len(cur) >= max_records):
            out.append(AppendBatch(tuple(cur)))
            cur, size = [], 0
        cur.append(r)
        size += len(r.payload)
    if cur:
        out.append(AppendBatch(tuple(cur)))
    return out


