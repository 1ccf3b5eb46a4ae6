"""The sans-I/O replication protocol (engine/replication/), without sockets.

Tests name the rules (REP-n) and invariants (INV-...) of specs/replication.md.
"""

from __future__ import annotations

import ast
import os
import struct

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import replication as P
from engine.errors import (
    AuthenticationError,
    BehindRetentionError,
    DivergedError,
    LocalProtocolError,
    MasterUnavailableError,
    ProtocolError,
    RemoteProtocolError,
    ReplicaAheadError,
    SeedUnavailableError,
    WrongLogError,
)
from engine.replication import (
    NEED_DATA,
    PREAMBLE,
    Accept,
    Ack,
    AppendBatch,
    AuthFailed,
    Challenge,
    ConnectionClosed,
    Drained,
    Fence,
    Goodbye,
    Heartbeat,
    Hello,
    Position,
    PositionCheck,
    Probe,
    ProbeReply,
    Promote,
    Promoted,
    Proof,
    Refuse,
    ReplicationSession,
    SeedRequest,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    State,
)
from tests.support.replication import LOG_ID, MASTER, REPLICA, SECRET, SessionPair, chain, history
from wal.format import ZERO_HASH, Record

H = b"\x11" * 32
OTHER_LOG = b"\x99" * 16

# -- errors ----------------------------------------------------------------------


def test_protocol_error_is_abstract():
    with pytest.raises(TypeError):
        ProtocolError("x")
    assert issubclass(LocalProtocolError, ProtocolError) and issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(AuthenticationError, RemoteProtocolError)


PURE_MODULES = ["messages", "transitions", "codec", "auth", "session", "decisions"]


def test_session_says_it_does_no_io():
    """STYLE 1: the session's docstring says it (REP-18)."""
    from engine.replication import session

    assert "no networking" in session.__doc__


@pytest.mark.parametrize("module", PURE_MODULES)
def test_protocol_modules_do_no_io(module):
    """Nothing I/O-ish is imported by the sans-I/O half of the package (REP-18)."""
    import importlib

    mod = importlib.import_module(f"engine.replication.{module}")
    with open(mod.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    assert not names & {"os", "socket", "time", "anyio", "asyncio", "threading", "random", "secrets", "wal.writer"}


# -- messages validate themselves -------------------------------------------------

INVALID = [
    ("short nonce", lambda: Hello(b"x" * 31)),
    ("nonce not bytes", lambda: Challenge("x" * 32)),
    ("short mac", lambda: Proof(b"x")),
    ("epoch 0", lambda: Position("r1", LOG_ID, 0, 1, 0, H)),
    ("last below first-1", lambda: Position("r1", LOG_ID, 1, 10, 8, H)),
    ("bad name", lambda: Position("../etc", LOG_ID, 1, 1, 0, H)),
    ("long name", lambda: SeedRequest("a" * 49, False)),
    ("bool as int", lambda: Heartbeat(True)),
    ("negative lsn", lambda: Heartbeat(-1)),
    ("u64 overflow", lambda: Heartbeat(2**64)),
    ("accepts_snapshot not bool", lambda: SeedRequest("r1", 1)),
    ("log id length", lambda: Accept(b"x" * 15, 1, 1, H, 0)),
    ("master below start-1", lambda: Accept(LOG_ID, 1, 10, H, 5)),
    ("probe not increasing", lambda: Probe((3, 3))),
    ("probe empty", lambda: Probe(())),
    ("probe list", lambda: Probe([1, 2])),
    ("too many probes", lambda: Probe(tuple(range(65)))),
    ("reply hash length", lambda: ProbeReply((b"x",))),
    ("unknown refusal", lambda: Refuse("nope", "x")),
    ("auth refusal leaks", lambda: Refuse("auth", "x", master_lsn=5)),
    ("long detail", lambda: Refuse("ahead", "x" * 1025)),
    ("empty chunk", lambda: SnapshotChunk(b"")),
    ("huge chunk", lambda: SnapshotChunk(b"x" * (P.SNAPSHOT_CHUNK_MAX_BYTES + 1))),
    ("digest length", lambda: SnapshotEnd(0, 0, b"x")),
    ("empty batch", lambda: AppendBatch(())),
    ("gap in batch", lambda: AppendBatch((history(3)[0], history(3)[2]))),
    ("epoch goes back", lambda: AppendBatch(tuple(chain(1, [b"a"], epoch=2) + chain(2, [b"b"], epoch=1)))),
    ("epoch 0 record", lambda: AppendBatch((Record(1, 0, 1, b"", H),))),
    ("batch over soft limit", lambda: AppendBatch(tuple(chain(1, [b"x" * (P.BATCH_SOFT_MAX_BYTES // 2 + 1)] * 2)))),
    ("applied above durable", lambda: Ack(3, 4)),
    ("promote to epoch 1", lambda: Promote(1)),
    ("fence epoch 0", lambda: Fence(0, 1)),
]


@pytest.mark.parametrize("name,make", INVALID, ids=[n for n, _ in INVALID])
def test_invalid_messages_cannot_be_built(name, make):
    with pytest.raises(LocalProtocolError):
        make()


def test_one_big_record_is_a_valid_batch():
    """REP-11: the soft limit never stops a single record."""
    big = chain(1, [b"x" * (P.BATCH_SOFT_MAX_BYTES + 10)])
    assert AppendBatch(tuple(big)).last_lsn == 1


def test_batch_records_respects_rep11():
    recs = chain(1, [b"x" * 1000] * 50)
    batches = P.batch_records(recs, max_bytes=4500, max_records=3)
    assert [r for b in batches for r in b.records] == recs
    assert all(len(b.records) <= 3 and sum(len(r.payload) for r in b.records) <= 4500 for b in batches)


SAMPLES = [
    Hello(b"\x01" * 32), Challenge(b"\x02" * 32), Proof(b"\x03" * 32),
    Position("replica-1", LOG_ID, 3, 5, 9, H), SeedRequest("r.2", True), Probe((0, 7, 2**63)),
    ProbeReply((H, None)), Accept(LOG_ID, 2, 10, H, 12), Refuse("diverged", "x", 4, 9), Refuse("auth", "no"),
    SnapshotBegin(LOG_ID, 1, 0, ZERO_HASH), SnapshotChunk(b"\x00\xff"), SnapshotEnd(1, 2, H),
    AppendBatch(tuple(history(3))), Heartbeat(2**64 - 1), Ack(5, 3), Fence(2, 7), Drained(7, H), Promote(3),
    Promoted(3, 7, H), Goodbye("shutting down ✓"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_encoding_round_trips(msg):
    """REP-2: frame = u32 length, u8 type, canonical CBOR map."""
    frame = P.encode_message(msg)
    length, code = struct.unpack(">IB", frame[:5])
    assert length == len(frame) - 5 and code == msg.TYPE
    assert P.decode_body(code, frame[5:]) == msg


def test_every_message_type_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(P.MESSAGE_TYPES.values())


# -- decoding rejects anything not exactly canonical (REP-2) -----------------------


def _body(msg):
    return P.encode_message(msg)[5:]


@pytest.mark.parametrize("code,body,needle", [
    (1, b"\xa1\x65nonce\x58\x20" + b"\x00" * 32 + b"\x00", "not canonical"),  # trailing byte
    (1, b"\xa1\x65nonce\x59\x00\x20" + b"\x00" * 32, "not canonical"),  # non-shortest length
    (1, b"\xa2\x65nonce\x58\x20" + b"\x00" * 32 + b"\x61x\x01", "map of"),  # extra field
    (1, b"\xa0", "map of"),  # missing field
    (1, b"\x80", "map of"),  # not a map
    (1, b"\xff", "not valid CBOR"),
    (14, b"\xa1\x6amaster_lsn\x20", "is outside"),  # a negative integer
    (14, b"\xa1\x6amaster_lsn\xf5", "must be an int"),  # bool
    (99, b"\xa0", "unknown message type"),
])
def test_decode_rejects(code, body, needle):
    with pytest.raises(RemoteProtocolError) as info:
        P.decode_body(code, body)
    assert needle in str(info.value)


# -- the happy path through a SessionPair -----------------------------------------------


def test_streaming_conversation():
    """REP-4, REP-6, REP-7, REP-11, REP-12 and REP-16 (Goodbye) in one conversation."""
    pair = SessionPair()
    pos = pair.stream_from(history(5), master_lsn=9)
    assert pair.master.position == pos and pair.master.state is State.STREAMING
    more = history(9)[5:]
    [ev] = pair.send(MASTER, AppendBatch(tuple(more[:2])))
    assert ev.records == tuple(more[:2])
    pair.send(MASTER, AppendBatch(tuple(more[2:])))
    [ack] = pair.send(REPLICA, Ack(9, 8))
    assert ack == Ack(9, 8) and pair.master.acked_lsn == 9
    [hb] = pair.send(MASTER, Heartbeat(12))
    assert hb.master_lsn == 12
    [bye] = pair.send(REPLICA, Goodbye("stopping"))
    assert pair.master.state is State.CLOSED and pair.master.peer_goodbye == bye


def test_preamble_is_sent_once_first():
    """REP-1."""
    s = ReplicationSession(REPLICA, SECRET)
    first = s.send(Hello(b"\x01" * 32))
    assert first.startswith(PREAMBLE) and first[len(PREAMBLE):] == P.encode_message(Hello(b"\x01" * 32))


def test_events_are_the_same_however_the_bytes_are_split():
    pair = SessionPair()
    pair.stream_from(history(2))
    data = b"".join(pair.master.send(AppendBatch((r,))) for r in history(8)[2:])
    r = pair.replica
    got = []
    for i in range(len(data)):
        r.receive_data(data[i : i + 1])
        while (ev := r.next_event()) is not NEED_DATA:
            got.append(ev)
    assert [e.first_lsn for e in got] == [3, 4, 5, 6, 7, 8]


# -- authentication (REP-4, REP-5, INV-AuthFirst) -------------------------------------------


def test_transcript_is_role_tagged():
    assert P.auth_transcript(MASTER, b"a" * 32, b"b" * 32) != P.auth_transcript(REPLICA, b"a" * 32, b"b" * 32)


def test_wrong_secret_is_refused_and_learns_nothing():
    """REP-5, INV-AuthFirst: the master answers a bad proof with Refuse(auth) only."""
    pair = SessionPair(replica_secret=b"another-secret-of-enough-length")
    pair.send(REPLICA, Hello(os.urandom(32)))
    pair.send(MASTER, Challenge(os.urandom(32)))
    [ev] = pair.send(REPLICA, pair.replica.proof())
    assert isinstance(ev, AuthFailed) and pair.master.state is State.AUTH_FAILED
    assert not pair.master.authenticated
    with pytest.raises(LocalProtocolError):  # the only way on is Refuse(auth)
        SessionPair_after_bad_proof().master.send(Proof(b"\x00" * 32))
    with pytest.raises(LocalProtocolError):  # which carries nothing about the log
        SessionPair_after_bad_proof().master.send(Refuse("diverged", "x", 3))
    data = pair.master.send(Refuse("auth", "authentication failed"))
    [refuse] = pair.deliver(REPLICA, data)
    assert pair.replica.state is State.CLOSED and pair.master.state is State.CLOSED
    assert isinstance(P.refusal_error(refuse), AuthenticationError)


def SessionPair_after_bad_proof() -> SessionPair:
    pair = SessionPair(replica_secret=b"another-secret-of-enough-length")
    pair.send(REPLICA, Hello(os.urandom(32)))
    pair.send(MASTER, Challenge(os.urandom(32)))
    pair.send(REPLICA, pair.replica.proof())
    return pair


def test_master_without_the_secret_is_detected_by_the_replica():
    """REP-5: the replica checks the master's proof too (mutual)."""
    pair = SessionPair()
    pair.send(REPLICA, Hello(os.urandom(32)))
    pair.send(MASTER, Challenge(os.urandom(32)))
    pair.send(REPLICA, pair.replica.proof())
    forged = P.encode_message(Proof(os.urandom(32)))
    pair.replica.receive_data(forged)
    with pytest.raises(AuthenticationError):
        pair.replica.next_event()
    assert pair.replica.state is State.ERROR


def test_a_recorded_proof_does_not_replay():
    """REP-4: fresh nonces on both sides make an old proof worthless."""
    old = SessionPair()
    old.send(REPLICA, Hello(os.urandom(32)))
    old.send(MASTER, Challenge(os.urandom(32)))
    recorded = old.replica.proof()
    new = SessionPair()
    new.send(REPLICA, Hello(old.replica.replica_nonce))  # even with the same replica nonce
    new.send(MASTER, Challenge(os.urandom(32)))
    new.replica.send(new.replica.proof())  # keep the replica's state in step; deliver the old proof instead
    [ev] = new.deliver(MASTER, P.encode_message(recorded))
    assert isinstance(ev, AuthFailed)


def test_reflected_nonce_is_rejected():
    pair = SessionPair()
    nonce = os.urandom(32)
    pair.send(REPLICA, Hello(nonce))
    pair.replica.receive_data(PREAMBLE + P.encode_message(Challenge(nonce)))
    with pytest.raises(RemoteProtocolError, match="reflection"):
        pair.replica.next_event()


def test_master_proof_cannot_be_reflected_as_replica_proof():
    """REP-4: role tags make the master's proof useless as the replica's."""
    pair = SessionPair()
    pair.send(REPLICA, Hello(os.urandom(32)))
    pair.send(MASTER, Challenge(os.urandom(32)))
    [ev] = pair.deliver(MASTER, P.encode_message(Proof(pair.master.proof().mac)))
    assert isinstance(ev, AuthFailed)


def test_frame_limit_before_authentication():
    """REP-3: the header of an oversized frame is enough to refuse it."""
    s = ReplicationSession(MASTER, SECRET)
    s.receive_data(PREAMBLE + struct.pack(">IB", P.PREAUTH_MAX_FRAME_BYTES, 1))
    with pytest.raises(RemoteProtocolError, match="before authentication"):
        s.next_event()
    assert s.state is State.ERROR


def test_frame_limit_after_authentication():
    pair = SessionPair()
    pair.stream_from([])
    big = AppendBatch(tuple(chain(1, [b"x" * 100_000])))
    [ev] = pair.send(MASTER, big)
    assert ev == big
    pair.replica.receive_data(struct.pack(">IB", P.MAX_FRAME_BYTES, AppendBatch.TYPE))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        pair.replica.next_event()


def test_secret_must_be_long_enough():
    with pytest.raises(LocalProtocolError):
        ReplicationSession(MASTER, b"short")


# -- preamble, junk, EOF (REP-1, REP-17) -----------------------------------------------


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.1\r\n\r\n", b"\x00" * 8, b"MWRX", b"\x16\x03\x01\x02\x00"])
def test_junk_is_refused_at_once(junk):
    s = ReplicationSession(MASTER, SECRET)
    s.receive_data(junk)
    with pytest.raises(RemoteProtocolError, match="preamble"):
        s.next_event()


def test_other_version_is_named():
    s = ReplicationSession(MASTER, SECRET)
    s.receive_data(b"MWREPL\x00\x07")
    with pytest.raises(RemoteProtocolError, match="version 7"):
        s.next_event()


def test_partial_preamble_needs_data():
    s = ReplicationSession(MASTER, SECRET)
    s.receive_data(b"MWR")
    assert s.next_event() is NEED_DATA


def test_eof_at_a_frame_boundary_closes():
    pair = SessionPair()
    pair.stream_from(history(1))
    pair.replica.receive_data(b"")
    assert isinstance(pair.replica.next_event(), ConnectionClosed)
    assert pair.replica.state is State.CLOSED
    assert isinstance(pair.replica.next_event(), ConnectionClosed)


def test_eof_mid_frame_is_a_remote_error():
    pair = SessionPair()
    pair.stream_from(history(1))
    data = pair.master.send(AppendBatch(tuple(history(3)[1:])))
    pair.replica.receive_data(data[:-1])
    assert pair.replica.next_event() is NEED_DATA
    pair.replica.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        pair.replica.next_event()


def test_zero_length_and_unknown_type_frames():
    for header in (struct.pack(">IB", 0, 1), struct.pack(">IB", 1, 200)):
        s = ReplicationSession(MASTER, SECRET)
        s.receive_data(PREAMBLE + header)
        with pytest.raises(RemoteProtocolError):
            s.next_event()


def test_data_after_eof_is_caller_misuse():
    s = ReplicationSession(MASTER, SECRET)
    s.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        s.receive_data(b"x")


# -- sticky errors and send_failed (REP-18) -------------------------------------------------


def test_errors_are_sticky():
    s = ReplicationSession(MASTER, SECRET)
    s.receive_data(b"junk....")
    with pytest.raises(RemoteProtocolError):
        s.next_event()
    with pytest.raises(RemoteProtocolError):
        s.next_event()
    with pytest.raises(LocalProtocolError):
        s.send(Challenge(b"\x01" * 32))
    assert s.state is State.ERROR


def test_local_misuse_is_local_and_sticky():
    s = ReplicationSession(REPLICA, SECRET)
    with pytest.raises(LocalProtocolError, match="may not send Accept"):
        s.send(Accept(LOG_ID, 1, 1, ZERO_HASH, 0))
    assert s.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        s.send(Hello(b"\x01" * 32))


def test_send_failed_enters_error():
    pair = SessionPair()
    pair.stream_from(history(1))
    pair.master.send_failed()
    assert pair.master.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        pair.master.send(Heartbeat(1))


def test_proof_needs_both_nonces():
    with pytest.raises(LocalProtocolError):
        ReplicationSession(REPLICA, SECRET).proof()


# -- context checks ------------------------------------------------------------------------


def _streaming(n=3):
    pair = SessionPair()
    pair.stream_from(history(n))
    return pair


def _remote_error(pair, sender, msg, match):
    pair.sessions[sender.peer].receive_data(P.encode_message(msg))
    with pytest.raises(RemoteProtocolError, match=match):
        pair.sessions[sender.peer].next_event()


def test_accept_must_continue_the_replicas_log():
    """REP-7, INV-NoSilentTruncate: a master cannot make a replica skip or rewind."""
    for bad in (Accept(LOG_ID, 1, 3, H, 5), Accept(LOG_ID, 1, 6, H, 5), Accept(OTHER_LOG, 1, 6, history(5)[-1].hash, 5)):
        pair = SessionPair()
        pair.authenticate()
        pair.send(REPLICA, Position("r1", LOG_ID, 1, 1, 5, history(5)[-1].hash))
        _remote_error(pair, MASTER, bad, "INV-NoSilentTruncate")
        mine = SessionPair()
        mine.authenticate()
        mine.send(REPLICA, Position("r1", LOG_ID, 1, 1, 5, history(5)[-1].hash))
        with pytest.raises(LocalProtocolError):  # and the master's own session would not send it
            mine.master.send(bad)


@pytest.mark.parametrize("first", [2, 3, 5])
def test_batches_have_no_gaps_and_no_duplicates(first):
    """REP-11, INV-NoGapNoDuplicate."""
    pair = _streaming(3)
    recs = history(6)
    _remote_error(pair, MASTER, AppendBatch(tuple(recs[first - 1 : first + 1])), "LSN 4 is next")


def test_ack_cannot_cover_unsent_records_or_go_back():
    """REP-12, INV-NoAckBeforeDurable (protocol half), INV-CursorMonotonic."""
    pair = _streaming(3)
    _remote_error(pair, REPLICA, Ack(4, 0), "only up to 3")
    pair = _streaming(3)
    pair.send(MASTER, AppendBatch(tuple(history(5)[3:])))
    pair.send(REPLICA, Ack(5, 5))
    _remote_error(pair, REPLICA, Ack(4, 4), "goes back")


def test_heartbeat_cannot_be_behind_what_was_sent():
    pair = _streaming(3)
    _remote_error(pair, MASTER, Heartbeat(2), "REP-12")


def test_probe_beyond_the_replicas_log_and_misaligned_reply():
    """REP-8."""
    pair = SessionPair()
    pair.authenticate()
    pair.send(REPLICA, Position("r1", LOG_ID, 1, 1, 5, H))
    _remote_error(pair, MASTER, Probe((6,)), "beyond")
    pair = SessionPair()
    pair.authenticate()
    pair.send(REPLICA, Position("r1", LOG_ID, 1, 1, 5, H))
    pair.send(MASTER, Probe((1, 2)))
    _remote_error(pair, REPLICA, ProbeReply((H,)), "answer 2 probes")


def test_snapshot_seeding_conversation():
    """REP-10: Begin, chunks, End (counts and digest checked), Accept after the snapshot."""
    pair = SessionPair()
    pair.authenticate()
    pair.send(REPLICA, SeedRequest("fresh", True))
    pair.send(MASTER, Heartbeat(0))
    pair.send(MASTER, SnapshotBegin(LOG_ID, 2, 41, H))
    pair.send(MASTER, SnapshotChunk(b"abc"))
    pair.send(MASTER, SnapshotChunk(b"de"))
    end = pair.master.snapshot_end()
    assert end == SnapshotEnd(2, 5, blake3.blake3(b"abcde").digest())
    pair.send(MASTER, end)
    [acc] = pair.send(MASTER, Accept(LOG_ID, 2, 42, H, 50))
    assert pair.replica.state is State.STREAMING and pair.replica.next_lsn == 42 and acc.start_lsn == 42


def test_snapshot_end_must_match_what_was_received():
    pair = SessionPair()
    pair.authenticate()
    pair.send(REPLICA, SeedRequest("fresh", True))
    pair.send(MASTER, SnapshotBegin(LOG_ID, 1, 4, H))
    pair.send(MASTER, SnapshotChunk(b"abc"))
    _remote_error(pair, MASTER, SnapshotEnd(1, 3, b"\x00" * 32), "were sent")


def test_snapshot_to_a_replica_that_cannot_take_one():
    pair = SessionPair()
    pair.authenticate()
    pair.send(REPLICA, SeedRequest("fresh", False))
    _remote_error(pair, MASTER, SnapshotBegin(LOG_ID, 1, 4, H), "cannot take a snapshot")


def test_seed_without_snapshot_starts_at_one():
    pair = SessionPair()
    pair.authenticate()
    pair.send(REPLICA, SeedRequest("fresh", False))
    _remote_error(pair, MASTER, Accept(LOG_ID, 1, 5, H, 9), "REP-10")


def test_fence_drain_promote_conversation():
    """REP-14, REP-15."""
    pair = _streaming(3)
    pair.send(MASTER, Fence(1, 5))
    _remote_error(pair, MASTER, AppendBatch(tuple(history(6)[3:])), "past the fence")
    pair = _streaming(3)
    pair.send(MASTER, Fence(1, 5))
    pair.send(MASTER, AppendBatch(tuple(history(5)[3:])))
    pair.send(REPLICA, Ack(5, 5))
    pair.send(REPLICA, Drained(5, history(5)[-1].hash))
    assert pair.master.state is State.DRAINED
    with pytest.raises(LocalProtocolError):
        SessionPair().master.send(Promote(2))
    pair.send(MASTER, Promote(2))
    [p] = pair.send(REPLICA, Promoted(2, 5, history(5)[-1].hash))
    assert p.epoch == 2 and pair.master.state is State.CLOSED


def test_drained_needs_the_ack_first_and_promote_needs_a_higher_epoch():
    pair = _streaming(3)
    pair.send(MASTER, Fence(1, 5))
    pair.send(MASTER, AppendBatch(tuple(history(5)[3:])))
    with pytest.raises(LocalProtocolError, match="needs an Ack"):
        pair.replica.send(Drained(5, H))
    pair = _streaming(3)
    pair.send(MASTER, Fence(1, 3))
    pair.send(REPLICA, Ack(3, 3))
    pair.send(REPLICA, Drained(3, history(3)[-1].hash))
    _remote_error(pair, REPLICA, Promoted(2, 3, H), "may not send Promoted")
    pair = _streaming(3)
    pair.send(MASTER, Promote(2))
    _remote_error(pair, REPLICA, Promoted(3, 3, H), "must name epoch 2")


# -- refusals map to typed errors (REP-9) -------------------------------------------------------


@pytest.mark.parametrize("refuse,cls", [
    (Refuse("diverged", "d", last_common_lsn=7), DivergedError),
    (Refuse("ahead", "a", master_lsn=3), ReplicaAheadError),
    (Refuse("wrong-log", "w"), WrongLogError),
    (Refuse("behind-retention", "b", master_lsn=9), BehindRetentionError),
    (Refuse("no-seed", "n"), SeedUnavailableError),
    (Refuse("unavailable", "u"), MasterUnavailableError),
    (Refuse("auth", "x"), AuthenticationError),
])
def test_refusals_become_typed_errors(refuse, cls):
    err = P.refusal_error(refuse, position=Position("r1", LOG_ID, 1, 1, 9, H))
    assert type(err) is cls
    if cls is DivergedError:
        assert err.last_common_lsn == 7 and err.replica_lsn == 9 and "7" in str(err)


# -- the position check (REP-7, REP-8, REP-9) ----------------------------------------------------


def run_check(master: list[Record], replica: list[Record], *, master_first: int = 1, replica_first: int | None = None,
              log_id: bytes = LOG_ID, probes_per_round: int = 32):
    """Drive PositionCheck through a SessionPair with in-memory logs; return (answer, rounds).

    The logs hold ``master``/``replica`` records from ``*_first`` on; like
    ``Log.hash_at``, each can also give the hash just before its first record.
    """
    r_first = replica_first if replica_first is not None else 1
    m_hashes = {0: ZERO_HASH, **{r.lsn: r.hash for r in master}}
    r_hashes = {0: ZERO_HASH, **{r.lsn: r.hash for r in replica}}
    m_last = master[-1].lsn if master else 0
    r_last = replica[-1].lsn if replica else r_first - 1
    pair = SessionPair()
    pair.authenticate()
    pos = Position("r1", log_id, 1, r_first, r_last, r_hashes[r_last])
    pair.send(REPLICA, pos)
    check = PositionCheck(pos, log_id=LOG_ID, first_lsn=master_first, last_lsn=m_last, epoch=1,
                          probes_per_round=probes_per_round)
    while True:
        action = check.next_action()
        if isinstance(action, P.NeedMasterHashes):
            assert all(master_first - 1 <= n <= m_last for n in action.lsns)
            check.add_master_hashes({n: m_hashes[n] for n in action.lsns})
        elif isinstance(action, Probe):
            pair.send(MASTER, action)
            reply = P.answer_probe(action, first_lsn=r_first, last_lsn=r_last, hash_at=lambda n: r_hashes[n])
            [ev] = pair.send(REPLICA, reply)
            check.add_reply(ev)
        else:
            pair.send(MASTER, action)
            return action, check.rounds


def test_check_accepts_a_prefix():
    m = history(50)
    ans, rounds = run_check(m, m[:20])
    assert isinstance(ans, Accept) and ans.start_lsn == 21 and rounds == 0


def test_check_accepts_an_empty_replica_and_an_equal_one():
    m = history(5)
    assert run_check(m, [])[0].start_lsn == 1
    assert run_check(m, m)[0].start_lsn == 6


def test_check_finds_the_last_common_lsn():
    """REP-8: diverged replica refused with the right last common LSN."""
    m = history(1000)
    r = m[:637] + history(200, b"r", 638, m[636].hash)
    ans, rounds = run_check(m, r)
    assert ans.code == "diverged" and ans.last_common_lsn == 637
    assert rounds <= 3


def test_check_refuses_a_replica_ahead():
    """REP-9: never rolled back."""
    m = history(10)
    ans, rounds = run_check(m, history(15))
    assert ans.code == "ahead" and ans.master_lsn == 10 and rounds == 1


def test_check_a_replica_both_ahead_and_diverged_is_diverged():
    m = history(10)
    r = m[:4] + history(20, b"x", 5, m[3].hash)
    ans, _ = run_check(m, r)
    assert ans.code == "diverged" and ans.last_common_lsn == 4


def test_check_refuses_another_log():
    ans, _ = run_check(history(3), history(3), log_id=OTHER_LOG)
    assert ans.code == "wrong-log"


def test_check_refuses_a_replica_behind_retention():
    ans, _ = run_check(history(100), history(10), master_first=50)
    assert ans.code == "behind-retention" and ans.master_lsn == 100


def test_check_divergence_below_the_retained_range_has_no_common_lsn():
    m = history(100)
    r = history(30, b"z")
    ans, _ = run_check(m, r, master_first=20)
    assert ans.code == "diverged" and ans.last_common_lsn is None


def test_check_diverged_at_the_first_record():
    ans, _ = run_check(history(10), history(10, b"q"))
    assert ans.code == "diverged" and ans.last_common_lsn == 0


@settings(max_examples=150)
@given(
    m_len=st.integers(0, 300), common=st.integers(0, 300), r_extra=st.integers(0, 300),
    m_first=st.integers(1, 40), r_first=st.integers(1, 40), k=st.integers(2, 64),
)
def test_check_agrees_with_a_linear_scan(m_len, common, r_extra, m_first, r_first, k):
    """Property: the answer equals what comparing every LSN would say."""
    common = min(common, m_len)
    m = history(m_len)
    r = m[:common] + history(r_extra, b"r", common + 1, m[common - 1].hash if common else ZERO_HASH)
    m_first = min(m_first, m_len + 1)
    r_first = min(r_first, len(r) + 1)
    ans, _ = run_check(m, r, master_first=m_first, replica_first=r_first, probes_per_round=k)
    r_last = len(r)
    floor = max(m_first - 1, r_first - 1)
    if r_last <= m_len:
        if r_last < m_first - 1:
            assert ans.code == "behind-retention"
        elif r_last <= common:
            assert isinstance(ans, Accept) and ans.start_lsn == r_last + 1
        else:
            assert ans.code == "diverged"
            assert ans.last_common_lsn == (common if common >= floor else None)
    else:
        if m_len < floor:
            assert ans.code == "ahead"
        elif m_len <= common:
            assert ans.code == "ahead"
        else:
            assert ans.code == "diverged"
            assert ans.last_common_lsn == (common if common >= floor else None)


def test_decide_seed():
    """REP-10: from LSN 1 by default, else snapshot if both can, else refuse."""
    req = SeedRequest("n", True)
    kw = dict(log_id=LOG_ID, last_lsn=9, epoch=1)
    assert P.decide_seed(req, first_lsn=1, hash_before_first=ZERO_HASH, has_snapshot=True, **kw) == Accept(LOG_ID, 1, 1, ZERO_HASH, 9)
    assert P.decide_seed(req, first_lsn=5, hash_before_first=H, has_snapshot=True, **kw) is P.SEED_WITH_SNAPSHOT
    no = P.decide_seed(SeedRequest("n", False), first_lsn=5, hash_before_first=H, has_snapshot=True, **kw)
    assert no.code == "no-seed" and "cannot take" in no.detail
    assert P.decide_seed(req, first_lsn=5, hash_before_first=H, has_snapshot=False, **kw).code == "no-seed"
