"""Log-shipping replication: a sans-I/O protocol and the drivers that run it.

A master ships its log to replicas as the log's own frames; each replica
appends them to its log (same LSNs, same hashes), acknowledges what is
durable, and keeps its own cursor, so it resumes where it stopped after any
disconnect (specs/replication.md, REP-n).

Modules, bottom up:

* :mod:`.messages`: the wire messages, frozen and self-validating, and the
  protocol's limits (REP-1..3, REP-11).
* :mod:`.codec`: frames <-> messages (REP-2); :mod:`.auth`: what a Proof
  proves (REP-4).
* :mod:`.transitions`: the one state table (REP-18); :mod:`.session`:
  :class:`ReplicationSession`, one end of a connection over that table,
  bytes in and out, no I/O.
* :mod:`.decisions`: the master's pure decisions (where a replica resumes,
  how it is seeded, how records are batched).
* The I/O edge: :mod:`.channel` (a session on an anyio stream),
  :mod:`.tail` (the master's buffer of recent records), :mod:`.sender`
  (the master's side), :mod:`.receiver` (the replica's side), :mod:`.secret`
  (the shared secret file).

This package imports :mod:`wal` and :mod:`engine.errors`, nothing else of
the engine.
"""

from .auth import (
    auth_transcript,
)
from .codec import (
    decode_body,
    encode_message,
)
from .decisions import (
    SEED_WITH_SNAPSHOT,
    NeedMasterHashes,
    PositionCheck,
    answer_probe,
    batch_records,
    decide_seed,
    refusal_error,
)
from .messages import (
    BATCH_SOFT_MAX_BYTES,
    MAX_BATCH_RECORDS,
    MAX_FRAME_BYTES,
    MAX_PROBES,
    MESSAGE_TYPES,
    MIN_SECRET_BYTES,
    NONCE_BYTES,
    PREAMBLE,
    PREAUTH_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    REFUSE_CODES,
    SNAPSHOT_CHUNK_MAX_BYTES,
    Accept,
    Ack,
    AppendBatch,
    AuthFailed,
    Challenge,
    ConnectionClosed,
    Drained,
    Event,
    Fence,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
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
    valid_replica_name,
)
from .session import (
    NEED_DATA,
    ReplicationSession,
)
from .transitions import (
    TRANSITIONS,
    State,
    render_state_diagram,
    render_transition_table,
)

__all__ = [
    "PROTOCOL_VERSION",
    "PREAMBLE",
    "PREAUTH_MAX_FRAME_BYTES",
    "MAX_FRAME_BYTES",
    "BATCH_SOFT_MAX_BYTES",
    "MAX_BATCH_RECORDS",
    "SNAPSHOT_CHUNK_MAX_BYTES",
    "MAX_PROBES",
    "NONCE_BYTES",
    "MIN_SECRET_BYTES",
    "Role",
    "REFUSE_CODES",
    "Message",
    "Hello",
    "Challenge",
    "Proof",
    "Position",
    "SeedRequest",
    "Probe",
    "ProbeReply",
    "Accept",
    "Refuse",
    "SnapshotBegin",
    "SnapshotChunk",
    "SnapshotEnd",
    "AppendBatch",
    "Heartbeat",
    "Ack",
    "Fence",
    "Drained",
    "Promote",
    "Promoted",
    "Goodbye",
    "MESSAGE_TYPES",
    "Event",
    "AuthFailed",
    "ConnectionClosed",
    "valid_replica_name",
    "State",
    "TRANSITIONS",
    "render_transition_table",
    "render_state_diagram",
    "encode_message",
    "decode_body",
    "auth_transcript",
    "NEED_DATA",
    "ReplicationSession",
    "PositionCheck",
    "NeedMasterHashes",
    "decide_seed",
    "SEED_WITH_SNAPSHOT",
    "answer_probe",
    "refusal_error",
    "batch_records",
]
