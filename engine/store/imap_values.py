"""IMAP values and their wire encoding (pure): what a stored message structure is made of.

The stored structure of a message (:mod:`engine.store.structure`) keeps
ENVELOPE and BODYSTRUCTURE in their IMAP wire form, computed once when the
store applies the delivery; this module is the one definition of that form.
The IMAP front's responses (``engine/imap/responses.py``) use and re-export it.

:func:`encode_value` maps Python values to IMAP forms:

=====================  ==============================================
Python value           IMAP form
=====================  ==============================================
``None``               ``NIL``
``int``                ``number``
``str``                ``string``: quoted when it is short 7-bit text
                       without CR/LF/NUL, else a literal (UTF-8)
``bytes``              ``string``: always a literal ``{n}\\r\\n...`` (a NUL octet,
                       which no literal may hold, is sent as 0x80)
``Atom``               the atom as is (validated: no atom-specials)
``Raw``                pre-encoded bytes, copied verbatim
``tuple`` / ``list``   parenthesised list of the encoded items
=====================  ==============================================
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Atom", "Raw", "quote", "encode_string", "encode_value"]

_ATOM_SPECIALS = frozenset('(){ %*"\\]') | frozenset(chr(i) for i in range(0x20)) | {"\x7f"}
_QUOTED_MAX = 1024


@dataclass(frozen=True)
class Atom:
    """An atom (or a flag such as ``\\Seen``, a number-like keyword ...), sent without quotes."""

    text: str

    def __post_init__(self):
        t = self.text
        body = t[1:] if t.startswith("\\") else t
        if t == "\\*":
            return
        if not body or any(c in _ATOM_SPECIALS or ord(c) > 0x7E for c in body):
            raise ValueError(f"{t!r} is not an atom")


@dataclass(frozen=True)
class Raw:
    """Bytes that are already a valid IMAP value (copied verbatim)."""

    data: bytes


def quote(text: str) -> bytes:
    """A ``quoted`` string; raises ValueError if it cannot be one (use :func:`encode_string`)."""
    if any(c in "\r\n\0" or ord(c) > 0x7E for c in text):
        raise ValueError("a quoted string holds 7-bit text without CR, LF or NUL")
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode("ascii") + b'"'


def encode_string(value: str | bytes) -> bytes:
    """A ``string``: quoted when it can be, else a literal."""
    if isinstance(value, str):
        # isprintable() is False for every control character, CR, LF and NUL among them
        if len(value) <= _QUOTED_MAX and value.isascii() and value.isprintable():
            return b'"' + value.replace("\\", "\\\\").replace('"', '\\"').encode("ascii") + b'"'
        value = value.encode("utf-8")
    if b"\0" in value:
        # a literal holds CHAR8 (%x01-ff): NUL cannot be sent; like other servers, show it as 0x80
        value = value.replace(b"\0", b"\x80")
    return b"{%d}\r\n" % len(value) + value


def encode_value(value) -> bytes:
    """Encode one value by the table in the module docstring."""
    if value is None:
        return b"NIL"
    t = type(value)
    if t is int:
        if value < 0:
            raise ValueError("IMAP numbers are unsigned")
        return b"%d" % value
    if t is Raw:
        return value.data
    if t is Atom:
        return value.text.encode("ascii")
    if t is str or t is bytes:
        return encode_string(value)
    if t is tuple or t is list:
        return b"(" + b" ".join(encode_value(v) for v in value) + b")"
    if t is bool:
        raise ValueError("booleans have no IMAP form")
    raise ValueError(f"cannot encode {value!r} as an IMAP value")
