"""The replication state machine as one table (REP-18), and its rendering for the spec.

Rule 1: everything that moves a connection from state to state is in
:data:`TRANSITIONS` (``state -> {(sender role, message type) -> next
state}``); specs/replication.md quotes it and a test keeps the quote equal.
Rule 2: the table does not know which end is reading it: the master's session
applies ``(MASTER, Accept)`` when it sends an Accept, the replica's session
when it receives one. A pair missing from the table is illegal.
"""

from __future__ import annotations

import enum

from .messages import (
    Accept,
    Ack,
    AppendBatch,
    AuthFailed,
    Challenge,
    Drained,
    Fence,
    Goodbye,
    Heartbeat,
    Hello,
    Input,
    Position,
    Probe,
    ProbeReply,
    Promote,
    Promoted,
    Proof,
    Refuse,
    Role,
    SeedRequest,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
)


class State(enum.Enum):
    """Connection states (specs/replication.md, "States")."""

    HELLO = "HELLO"                  # replica's Hello is due
    CHALLENGE = "CHALLENGE"          # master's Challenge is due
    REPLICA_PROOF = "REPLICA_PROOF"  # replica's Proof is due
    AUTH_FAILED = "AUTH_FAILED"      # master saw a bad Proof; only Refuse(auth) may follow
    MASTER_PROOF = "MASTER_PROOF"    # master's Proof (or Refuse(auth)) is due
    REQUEST = "REQUEST"              # authenticated; replica's Position or SeedRequest is due
    DECIDE = "DECIDE"                # master decides on a Position: Accept, Refuse or Probe
    PROBE = "PROBE"                  # replica's ProbeReply is due
    SEED = "SEED"                    # master decides on a SeedRequest
    SNAPSHOT = "SNAPSHOT"            # master is sending snapshot chunks
    SNAPSHOT_DONE = "SNAPSHOT_DONE"  # snapshot complete; Accept is due
    STREAMING = "STREAMING"          # batches down, acks up
    FENCING = "FENCING"              # master stopped at Fence.last_lsn; replica catching up
    DRAINED = "DRAINED"              # replica holds everything up to Fence.last_lsn durably
    PROMOTING = "PROMOTING"          # replica asked to become master; Promoted is due
    CLOSED = "CLOSED"                # no more messages except Goodbye; close the connection
    ERROR = "ERROR"                  # sticky: a protocol error happened


# -- the transition table (REP-18) ----------------------------------------------

M, R = Role.MASTER, Role.REPLICA
S = State
_BYE = {(M, Goodbye): S.CLOSED, (R, Goodbye): S.CLOSED}

#: The whole state machine: state -> {(sender, message type) -> next state}.
#: specs/replication.md quotes it (tests/replication/test_protocol_spec.py keeps them equal).
#: EOF at a frame boundary moves any state but ERROR to CLOSED (REP-17).
TRANSITIONS: dict[State, dict[tuple[Role, Input], State]] = {
    S.HELLO: {(R, Hello): S.CHALLENGE},
    S.CHALLENGE: {(M, Challenge): S.REPLICA_PROOF},
    S.REPLICA_PROOF: {(R, Proof): S.MASTER_PROOF, (R, AuthFailed): S.AUTH_FAILED},
    S.AUTH_FAILED: {(M, Refuse): S.CLOSED},
    S.MASTER_PROOF: {(M, Proof): S.REQUEST, (M, Refuse): S.CLOSED},
    S.REQUEST: {(R, Position): S.DECIDE, (R, SeedRequest): S.SEED, **_BYE},
    S.DECIDE: {(M, Accept): S.STREAMING, (M, Probe): S.PROBE, (M, Refuse): S.CLOSED, **_BYE},
    S.PROBE: {(R, ProbeReply): S.DECIDE, **_BYE},
    S.SEED: {(M, Accept): S.STREAMING, (M, SnapshotBegin): S.SNAPSHOT, (M, Heartbeat): S.SEED, (M, Refuse): S.CLOSED, **_BYE},
    S.SNAPSHOT: {(M, SnapshotChunk): S.SNAPSHOT, (M, SnapshotEnd): S.SNAPSHOT_DONE, (M, Heartbeat): S.SNAPSHOT, (M, Refuse): S.CLOSED, **_BYE},
    S.SNAPSHOT_DONE: {(M, Accept): S.STREAMING, (M, Refuse): S.CLOSED, **_BYE},
    S.STREAMING: {
        (M, AppendBatch): S.STREAMING, (M, Heartbeat): S.STREAMING, (R, Ack): S.STREAMING,
        (M, Fence): S.FENCING, (M, Promote): S.PROMOTING, **_BYE,
    },
    S.FENCING: {
        (M, AppendBatch): S.FENCING, (M, Heartbeat): S.FENCING, (R, Ack): S.FENCING, (R, Drained): S.DRAINED, **_BYE,
    },
    S.DRAINED: {(M, Heartbeat): S.DRAINED, (R, Ack): S.DRAINED, (M, Promote): S.PROMOTING, **_BYE},
    S.PROMOTING: {(R, Ack): S.PROMOTING, (R, Promoted): S.CLOSED, **_BYE},
    S.CLOSED: dict(_BYE),
    S.ERROR: {},
}
del M, R, S


# -- documentation generated from the table --------------------------------------------


def _input_name(item: Input) -> str:
    return item.__name__


def render_transition_table() -> str:
    """The Markdown table specs/replication.md quotes (kept equal by a test)."""
    lines = ["| state | sender | input | next state |", "|---|---|---|---|"]
    for state, moves in TRANSITIONS.items():
        if not moves:
            lines.append(f"| {state.value} | - | - | - |")
        for (sender, item), nxt in moves.items():
            lines.append(f"| {state.value} | {sender.value} | {_input_name(item)} | {nxt.value} |")
    return "\n".join(lines)


def render_state_diagram() -> str:
    """A Mermaid state diagram of :data:`TRANSITIONS` (Goodbye edges folded into a note)."""
    lines = ["stateDiagram-v2", "    [*] --> HELLO"]
    for state, moves in TRANSITIONS.items():
        for (sender, item), nxt in moves.items():
            if item is Goodbye:
                continue
            lines.append(f"    {state.value} --> {nxt.value}: {sender.value} {_input_name(item)}")
    lines.append("    CLOSED --> [*]")
    lines.append("    note right of CLOSED: Goodbye (either side) from REQUEST onwards also leads here; EOF leads here from any state but ERROR")
    return "\n".join(lines)

