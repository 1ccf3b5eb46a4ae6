"""engine.store.events.decode_event: every malformed payload is a ValueError naming the record type."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.store.events import EVENT_TYPES, decode_event, encode_event
from tests.support import ROOT


@pytest.mark.parametrize("payload", [b"", b"\xff", b"\x1c", b"\xa1\x61", b"\x5f\x41"])
def test_malformed_cbor_is_a_value_error(payload):
    type_ = next(iter(EVENT_TYPES))
    with pytest.raises(ValueError, match=f"record type {type_}"):
        decode_event(type_, payload)


@given(st.sampled_from(sorted(EVENT_TYPES)), st.binary(max_size=64))
def test_random_payloads_decode_or_raise_value_error(type_, payload):
    """Anything that decodes is a valid event of that type, and encodes back to an equal event."""
    try:
        event = decode_event(type_, payload)
    except ValueError:
        return
    assert event.TYPE == type_
    again_type, again_payload = encode_event(event)
    assert again_type == type_ and decode_event(again_type, again_payload) == event


def _vector_fields(fields: dict) -> dict:
    return {k: bytes.fromhex(v["hex"]) if isinstance(v, dict) else v for k, v in fields.items()}


def test_ms16_event_vectors_encode_and_decode():
    """specs/vectors/events.json: each payload is the canonical CBOR of its map, computed
    here with cbor2 alone; encode_event produces it and decode_event reads it back."""
    import json
    import os

    import cbor2

    from engine.store.events import MessageAppended, encode_event

    path = os.path.join(ROOT, "specs", "vectors", "events.json")
    with open(path) as f:
        cases = [c for c in json.load(f)["cases"] if c["type"] == MessageAppended.TYPE]
    assert {c["name"] for c in cases} == {"delivery", "move"}
    for case in cases:
        fields = _vector_fields(case["fields"])
        payload = bytes.fromhex(case["payload_hex"])
        assert cbor2.dumps(fields, canonical=True) == payload, case["name"]
        ev = decode_event(case["type"], payload)
        assert isinstance(ev, MessageAppended) and ev.replaces == fields.get("replaces", 0)
        assert encode_event(ev) == (case["type"], payload), case["name"]


def test_ms16_a_move_must_go_to_a_greater_uid():
    from engine.store.events import MessageAppended, body_guid

    body = b"x"
    with pytest.raises(ValueError, match="replaces"):
        MessageAppended("0" * 32, 5, 1, body_guid(body), body, (), 0, 0, replaces=5)
