"""engine.events.decode_event: every malformed payload is a ValueError naming the record type."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.events import EVENT_TYPES, decode_event


@pytest.mark.parametrize("payload", [b"", b"\xff", b"\x1c", b"\xa1\x61", b"\x5f\x41"])
def test_malformed_cbor_is_a_value_error(payload):
    type_ = next(iter(EVENT_TYPES))
    with pytest.raises(ValueError, match=f"record type {type_}"):
        decode_event(type_, payload)


@given(st.sampled_from(sorted(EVENT_TYPES)), st.binary(max_size=64))
def test_random_payloads_decode_or_raise_value_error(type_, payload):
    try:
        decode_event(type_, payload)
    except ValueError:
        pass
