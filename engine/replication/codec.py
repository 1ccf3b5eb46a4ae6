"""Replication frames <-> messages (REP-2), sans I/O.

A frame is a u32 body length, a u8 message type and a canonical CBOR map;
decoding refuses anything else (unknown type, non-canonical or malformed CBOR,
a missing or extra field, a field out of range) with
:class:`~engine.errors.RemoteProtocolError`. :class:`~.messages.AppendBatch`
bodies are parsed without a general CBOR pass over their megabytes.
"""

from __future__ import annotations

import cbor2

from ..errors import LocalProtocolError, RemoteProtocolError
from .messages import (
    _FIELD_NAMES,
    _FRAME_HEADER,
    MESSAGE_TYPES,
    AppendBatch,
    Message,
    _frames_envelope,
)


def _decode_append_batch(body: bytes) -> "AppendBatch":
    """REP-2 for AppendBatch without a general CBOR pass over megabytes: the
    body must be exactly the canonical envelope followed by the frames."""
    if body[:8] != b"\xa1\x66frames" or len(body) < 9:
        raise RemoteProtocolError("AppendBatch body must be the canonical CBOR map {\"frames\": bytes}")
    for n in (0, 1, 2, 4, 8):  # the byte string's head: 1 byte plus n length bytes
        size = len(body) - 9 - n
        if size >= 0 and _frames_envelope(size) == body[: 9 + n]:
            break
    else:
        raise RemoteProtocolError("AppendBatch body is not canonical CBOR of {\"frames\": bytes} (REP-2)")
    try:
        return AppendBatch._parse_frames(memoryview(body)[9 + n :])
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc)) from None


# -- wire encoding (REP-2) ------------------------------------------------------


def encode_message(msg: Message) -> bytes:
    """The frame for ``msg``: u32 body length, u8 type, canonical CBOR body (REP-2)."""
    if type(msg) is AppendBatch:
        return msg.encoded()  # computed once per batch, whoever it is sent to
    body = cbor2.dumps(msg._wire(), canonical=True)
    return _FRAME_HEADER.pack(len(body), msg.TYPE) + body


_CBOR_ERRORS = (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError, KeyError, IndexError, AttributeError)


def decode_body(type_code: int, body: bytes) -> Message:
    """Decode one frame body into a message.

    Raises:
        RemoteProtocolError: unknown type, malformed or non-canonical CBOR, a
            missing or extra field, or a field out of range (REP-2).
    """
    cls = MESSAGE_TYPES.get(type_code)
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {type_code}")
    if cls is AppendBatch:
        return _decode_append_batch(body)
    try:
        value = cbor2.loads(body)
    except _CBOR_ERRORS as exc:
        raise RemoteProtocolError(f"{cls.__name__} body is not valid CBOR: {exc}") from None
    if type(value) is not dict or set(value) != _FIELD_NAMES[cls] or not all(type(k) is str for k in value):
        got = sorted(map(str, value)) if type(value) is dict else type(value).__name__
        raise RemoteProtocolError(f"{cls.__name__} body must be a map of {sorted(_FIELD_NAMES[cls])}, got {got}")
    try:
        msg = cls._from_wire(value)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc)) from None
    except TypeError as exc:  # a field of the wrong shape reached a constructor
        raise RemoteProtocolError(f"invalid {cls.__name__}: {exc}") from None
    if cbor2.dumps(msg._wire(), canonical=True) != body:
        raise RemoteProtocolError(f"{cls.__name__} body is not canonical CBOR (REP-2)")
    return msg


