"""specs/replication.md and specs/vectors/messages.json agree with the code."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re

import pytest

from engine import replication as P
from engine.errors import RemoteProtocolError
from engine.replication import NEED_DATA, ReplicationSession, Role, State
from tests.support.replication import SessionPair, history
from wal.format import Record
from tests.support import ROOT
from tests.support import find_tests

SPEC = os.path.join(ROOT, "specs", "replication.md")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


VECTORS = json.loads(_read(os.path.join(ROOT, "specs", "vectors", "messages.json")))


def _generated(name: str) -> str:
    text = _read(SPEC)
    m = re.search(rf"<!-- BEGIN GENERATED: {name} .*?-->\n(.*?)\n<!-- END GENERATED: {name} -->", text, re.S)
    assert m, f"generated section {name!r} missing from specs/replication.md"
    return m.group(1)


def test_spec_quotes_the_transition_table():
    """REP-18: the spec's state table is the code's TRANSITIONS, rendered."""
    assert _generated("transitions") == P.render_transition_table()


def test_spec_diagram_is_generated_from_the_table():
    assert _generated("diagram") == "```mermaid\n" + P.render_state_diagram() + "\n```"


def test_spec_messages_table_lists_every_type_code():
    text = _read(SPEC)
    for code, cls in P.MESSAGE_TYPES.items():
        assert re.search(rf"^\| {code} \| `{cls.__name__}` \|", text, re.M), cls.__name__


def test_spec_constants_match_the_code():
    text = _read(SPEC)
    assert P.PREAMBLE.hex(" ") in text
    assert "| `PREAUTH_MAX_FRAME_BYTES` | 4096 |" in text and P.PREAUTH_MAX_FRAME_BYTES == 4096
    assert P.BATCH_SOFT_MAX_BYTES == 8 * 2**20 and P.MAX_BATCH_RECORDS == 16384 and P.MAX_PROBES == 64
    for code in P.REFUSE_CODES:
        assert f"| `{code}` |" in text


def test_every_rule_and_invariant_is_named_by_a_test():
    """STYLE: every rule ID in specs/ has at least one test that names it."""
    spec = _read(SPEC)
    rules = set(re.findall(r"\bREP-\d+\b", spec))
    invariants = set(re.findall(r"\bINV-[A-Za-z]+\b", spec))
    tests = "".join(_read(p) for p in find_tests("test_protocol*.py", "test_replication_*.py"))
    tests = tests.replace(_read(__file__), "")
    assert rules == {f"REP-{i}" for i in range(1, 21)}
    assert sorted(r for r in rules if r not in tests) == []
    assert sorted(i for i in invariants if i not in tests) == []


# -- vectors ----------------------------------------------------------------------


def _value(v):
    if isinstance(v, dict) and set(v) == {"hex"}:
        return bytes.fromhex(v["hex"])
    if isinstance(v, dict):
        return Record(v["lsn"], v["epoch"], v["type"], _value(v["payload"]), _value(v["hash"]))
    if isinstance(v, list):
        return tuple(_value(x) for x in v)
    return v


def _message(vector):
    cls = next(c for c in P.MESSAGE_TYPES.values() if c.__name__ == vector["message"])
    return cls(**{k: _value(v) for k, v in vector["fields"].items()})


def test_vectors_cover_every_message_type():
    assert {v["message"] for v in VECTORS["valid"]} == {c.__name__ for c in P.MESSAGE_TYPES.values()}
    assert VECTORS["protocol_version"] == P.PROTOCOL_VERSION
    assert bytes.fromhex(VECTORS["preamble_hex"]) == P.PREAMBLE


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid_vector(vector):
    """REP-2: exactly one encoding per message, both ways."""
    msg = _message(vector)
    frame = bytes.fromhex(vector["hex"])
    assert P.encode_message(msg) == frame
    assert P.decode_body(frame[4], frame[5:]) == msg


def _session_in(role: str, state: str) -> ReplicationSession:
    if state == "HELLO":
        return ReplicationSession(Role(role), b"vector-secret-0123456789abcdef")
    assert state == "STREAMING"
    pair = SessionPair()
    pair.stream_from(history(3))
    return pair.sessions[Role(role)]


@pytest.mark.parametrize("vector", VECTORS["reject"], ids=lambda v: v["name"])
def test_reject_vector(vector):
    s = _session_in(vector["role"], vector["state"])
    s.receive_data(bytes.fromhex(vector["hex"]))
    with pytest.raises(RemoteProtocolError) as info:
        while s.next_event() is not NEED_DATA:
            pass
    assert vector["error"] in str(info.value)
    assert s.state is State.ERROR


def test_auth_known_answer():
    """REP-4: the transcript bytes and both MACs."""
    a = VECTORS["auth"]
    secret, rn, mn = (bytes.fromhex(a[k]) for k in ("secret_hex", "replica_nonce_hex", "master_nonce_hex"))
    t = P.auth_transcript(Role.REPLICA, rn, mn)
    assert t.hex() == a["replica_transcript_hex"]
    assert t == b"mailwal-replication-v1\x00replica\x00" + rn + mn
    assert hmac.new(secret, t, hashlib.sha256).hexdigest() == a["replica_mac_hex"]
    # And the sessions compute the same proofs.
    m, r = ReplicationSession(Role.MASTER, secret), ReplicationSession(Role.REPLICA, secret)
    m.receive_data(r.send(P.Hello(rn)))
    assert isinstance(m.next_event(), P.Hello)
    r.receive_data(m.send(P.Challenge(mn)))
    assert isinstance(r.next_event(), P.Challenge)
    assert r.proof().mac.hex() == a["replica_mac_hex"]
    assert m.proof().mac.hex() == a["master_mac_hex"]
