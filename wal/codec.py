"""Canonical CBOR for record payloads (LOG-7).

The record hash covers payload bytes, so every writer MUST produce the same
bytes for the same value: RFC 8949 section 4.2 core deterministic encoding
(shortest forms, sorted map keys, no indefinite lengths). cbor2's
``canonical=True`` implements it.
"""

from __future__ import annotations

from typing import Any

import cbor2

__all__ = ["dumps", "loads"]


def dumps(value: Any) -> bytes:
    """Encode ``value`` as canonical CBOR."""
    return cbor2.dumps(value, canonical=True)


def loads(data: bytes) -> Any:
    """Decode CBOR bytes (raises ``cbor2.CBORDecodeError`` on malformed input)."""
    return cbor2.loads(data)
