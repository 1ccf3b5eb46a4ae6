"""Fuzzing the frame decoder (REP-1, REP-2, REP-3, REP-17): whatever bytes
arrive, the session returns events or NEED_DATA, or raises
RemoteProtocolError. Nothing else, and nothing beyond the size limits is
ever buffered as "needing more data"."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import replication as P
from engine.replication import messages
from engine.errors import ProtocolError, RemoteProtocolError
from engine.replication import NEED_DATA, PREAMBLE, AppendBatch, Heartbeat, ReplicationSession, State
from tests.support.replication import MASTER, REPLICA, SECRET, SessionPair, history


def drain(session, data: bytes, eof: bool) -> list:
    """Feed ``data`` (and EOF); return events. Only RemoteProtocolError may escape."""
    session.receive_data(data)
    if eof:
        session.receive_data(b"")
    events = []
    while True:
        ev = session.next_event()
        if ev is NEED_DATA or isinstance(ev, P.ConnectionClosed):
            return events
        events.append(ev)


def fresh(role):
    return ReplicationSession(role, SECRET)


def streaming_replica() -> ReplicationSession:
    pair = SessionPair()
    pair.stream_from(history(3))
    return pair.replica


@settings(max_examples=300)
@given(data=st.binary(max_size=5000), eof=st.booleans(), with_preamble=st.booleans(),
       role=st.sampled_from([MASTER, REPLICA]))
def test_random_bytes_only_typed_errors(data, eof, with_preamble, role):
    s = fresh(role)
    try:
        drain(s, (PREAMBLE if with_preamble else b"") + data, eof)
    except RemoteProtocolError:
        assert s.state is State.ERROR


@settings(max_examples=300)
@given(data=st.binary(max_size=3000), eof=st.booleans())
def test_random_bytes_after_authentication(data, eof):
    s = streaming_replica()
    try:
        drain(s, data, eof)
    except RemoteProtocolError:
        assert s.state is State.ERROR


@settings(max_examples=200)
@given(code=st.integers(0, 255), body=st.binary(max_size=200))
def test_random_frame_bodies(code, body):
    """Random type codes and CBOR-ish bodies in well-formed frames."""
    s = streaming_replica()
    try:
        drain(s, struct.pack(">IB", len(body), code) + body, False)
    except RemoteProtocolError:
        assert s.state is State.ERROR  # sticky: the session refuses everything after
        with pytest.raises(ProtocolError):
            s.receive_data(b"\x00")
            s.next_event()
    else:
        assert s.state is not State.ERROR


def _valid_stream() -> tuple[ReplicationSession, bytes]:
    pair = SessionPair()
    pair.stream_from(history(2))
    recs = history(40)[2:]
    data = b"".join(pair.master.send(b) for b in P.batch_records(recs, max_bytes=40))
    data += pair.master.send(Heartbeat(40))
    return pair.replica, data


@settings(max_examples=200)
@given(cut=st.integers(0, 10_000), eof=st.booleans())
def test_truncated_valid_streams(cut, eof):
    """A cut stream yields a prefix of the events; EOF mid-frame is a typed error."""
    replica, data = _valid_stream()
    cut = min(cut, len(data))
    try:
        events = drain(replica, data[:cut], eof)
    except RemoteProtocolError as exc:
        assert eof and "middle of a frame" in str(exc)
        return
    lsns = [r.lsn for e in events if isinstance(e, AppendBatch) for r in e.records]
    assert lsns == list(range(3, 3 + len(lsns)))


@settings(max_examples=200)
@given(pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_bit_flips_in_valid_streams(pos, bit):
    replica, data = _valid_stream()
    buf = bytearray(data)
    buf[pos % len(buf)] ^= 1 << bit
    try:
        drain(replica, bytes(buf), True)
    except RemoteProtocolError:
        assert replica.state is State.ERROR


@settings(max_examples=100)
@given(chunks=st.lists(st.integers(1, 97), min_size=1, max_size=200))
def test_any_split_gives_the_same_events(chunks):
    replica, data = _valid_stream()
    events, i, k = [], 0, 0
    while i < len(data):
        n = chunks[k % len(chunks)]
        events += drain(replica, data[i : i + n], False)
        i, k = i + n, k + 1
    assert sum(len(e.records) for e in events if isinstance(e, AppendBatch)) == 38
    assert isinstance(events[-1], Heartbeat)


@settings(max_examples=100)
@given(length=st.integers(P.PREAUTH_MAX_FRAME_BYTES - 4, 2**32 - 1), role=st.sampled_from([MASTER, REPLICA]))
def test_oversized_headers_fail_before_the_body(length, role):
    """REP-3: refused from the 5-byte header alone, without waiting for the body."""
    s = fresh(role)
    try:
        drain(s, PREAMBLE + struct.pack(">IB", length, 1), False)
    except RemoteProtocolError as exc:
        assert "exceeds" in str(exc)
    else:
        raise AssertionError("an oversized pre-auth frame was buffered")


@settings(max_examples=50)
@given(st.data())
def test_decode_body_on_random_cbor_values(data):
    """Structurally valid CBOR of the wrong shape is rejected with a typed error."""
    import cbor2

    leaf = st.one_of(st.integers(-2**70, 2**70), st.binary(max_size=40), st.text(max_size=10), st.none(), st.booleans(),
                     st.floats(allow_nan=True))
    value = data.draw(st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                             st.dictionaries(st.text(max_size=12), c, max_size=4)),
                                   max_leaves=12))
    code = data.draw(st.sampled_from(sorted(P.MESSAGE_TYPES)))
    # Half the time, use exactly the message's field names so field validation is reached.
    if data.draw(st.booleans()):
        names = sorted(messages._FIELD_NAMES[P.MESSAGE_TYPES[code]])
        value = {n: data.draw(st.one_of(leaf, st.lists(st.one_of(leaf, st.lists(leaf, max_size=6)), max_size=4)))
                 for n in names}
    for canonical in (False, True):
        try:
            msg = P.decode_body(code, cbor2.dumps(value, canonical=canonical))
        except RemoteProtocolError:
            continue
        assert P.encode_message(msg)[5:] == cbor2.dumps(value, canonical=True)


def test_fuzz_harness_reaches_streaming():
    """Guard: the post-authentication fuzz really starts in STREAMING."""
    assert streaming_replica().state is State.STREAMING
