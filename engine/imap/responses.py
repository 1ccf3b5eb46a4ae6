"""IMAP responses as immutable values, and their wire encoding (pure).

Every response class has ``encode() -> bytes`` producing one complete
response (CRLF included) that conforms to RFC 9051's ``response`` grammar
(IMAP-5). Values inside responses follow one mapping,
:func:`~engine.store.imap_values.encode_value` (re-exported here with
``Atom`` and ``Raw``): the stored message structures are made of the same values.

Text after a status (``resp-text``) must not hold CR or LF; a response code's
argument must not hold ``]``; both are checked when the value is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..store.imap_values import Atom, Raw, encode_string, encode_value, quote

__all__ = [
    "Atom", "Raw", "Code", "Status", "Continuation", "CapabilityData", "EnabledData", "FlagsData", "ExistsData",
    "RecentData", "ExpungeData", "VanishedData", "ListData", "StatusData", "SearchData", "ESearchData", "FetchData",
    "NamespaceData", "IdData", "FetchRaw", "encode_value", "quote", "encode_string", "STATUSES", "Response",
]

STATUSES = ("OK", "NO", "BAD", "BYE", "PREAUTH")


def _check_text(text: str) -> None:
    if "\r" in text or "\n" in text or "\0" in text:
        raise ValueError("response text cannot hold CR, LF or NUL")


@dataclass(frozen=True)
class Code:
    """A response code ``[NAME arg]``; ``arg`` is text (no ']', CR or LF)."""

    name: str
    arg: str | None = None

    def __post_init__(self):
        Atom(self.name)
        if self.arg is not None:
            _check_text(self.arg)
            if "]" in self.arg or not self.arg:
                raise ValueError("a response code's argument is non-empty and holds no ']'")

    def encode(self) -> bytes:
        if self.arg is None:
            return b"[" + self.name.encode("ascii") + b"]"
        return b"[" + self.name.encode("ascii") + b" " + self.arg.encode("utf-8") + b"]"


class Response:
    """Base of every response value."""

    def encode(self) -> bytes:  # pragma: no cover - every subclass defines it
        raise NotImplementedError


@dataclass(frozen=True)
class Status(Response):
    """``tag OK/NO/BAD [code] text`` (``tag`` None: untagged ``*``; BYE/PREAUTH are untagged only)."""

    status: str
    text: str
    code: Code | None = None
    tag: str | None = None

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        if self.tag is not None and self.status in ("BYE", "PREAUTH"):
            raise ValueError(f"{self.status} is untagged only")
        _check_text(self.text)
        if not self.text:
            raise ValueError("resp-text needs text (RFC 9051: text = 1*TEXT-CHAR)")

    @property
    def tagged(self) -> bool:
        return self.tag is not None

    def encode(self) -> bytes:
        head = (self.tag or "*").encode("ascii") + b" " + self.status.encode("ascii") + b" "
        if self.code is not None:
            head += self.code.encode() + b" "
        return head + self.text.encode("utf-8") + b"\r\n"


@dataclass(frozen=True)
class Continuation(Response):
    """``+ text`` (a continuation request: literal accepted, IDLE started, SASL challenge)."""

    text: str = "Ready"

    def __post_init__(self):
        _check_text(self.text)

    def encode(self) -> bytes:
        return b"+ " + self.text.encode("utf-8") + b"\r\n"


def _atoms(words: Iterable[str]) -> bytes:
    return b" ".join(Atom(w).text.encode("ascii") for w in words)


@dataclass(frozen=True)
class CapabilityData(Response):
    capabilities: tuple[str, ...]

    def encode(self) -> bytes:
        return b"* CAPABILITY " + _atoms(self.capabilities) + b"\r\n"


@dataclass(frozen=True)
class EnabledData(Response):
    capabilities: tuple[str, ...] = ()

    def encode(self) -> bytes:
        if not self.capabilities:
            return b"* ENABLED\r\n"
        return b"* ENABLED " + _atoms(self.capabilities) + b"\r\n"


@dataclass(frozen=True)
class FlagsData(Response):
    flags: tuple[str, ...]

    def encode(self) -> bytes:
        return b"* FLAGS (" + _atoms(self.flags) + b")\r\n"


@dataclass(frozen=True)
class ExistsData(Response):
    count: int

    def encode(self) -> bytes:
        return b"* %d EXISTS\r\n" % self.count


@dataclass(frozen=True)
class RecentData(Response):
    """IMAP4rev1 only (RFC 3501): always 0 here, there is no \\Recent."""

    count: int

    def encode(self) -> bytes:
        return b"* %d RECENT\r\n" % self.count


@dataclass(frozen=True)
class ExpungeData(Response):
    seq: int

    def __post_init__(self):
        if self.seq < 1:
            raise ValueError("EXPUNGE names a message sequence number >= 1")

    def encode(self) -> bytes:
        return b"* %d EXPUNGE\r\n" % self.seq


@dataclass(frozen=True)
class VanishedData(Response):
    """``* VANISHED [(EARLIER)] uid-set`` (RFC 7162 3.2.10); ``uids`` is a known-valid set string."""

    uids: str
    earlier: bool = False

    def __post_init__(self):
        if not self.uids or any(c not in "0123456789:," for c in self.uids):
            raise ValueError("VANISHED carries a UID set without '*'")

    def encode(self) -> bytes:
        return b"* VANISHED " + (b"(EARLIER) " if self.earlier else b"") + self.uids.encode("ascii") + b"\r\n"


@dataclass(frozen=True)
class ListData(Response):
    """``* LIST (attrs) "/" name [extended items]`` (or LSUB); ``name`` is already in wire form."""

    attributes: tuple[str, ...]
    delimiter: str | None
    name: str
    kind: str = "LIST"
    child_info: tuple[str, ...] = ()  # RFC 5258 CHILDINFO extended data

    def __post_init__(self):
        if self.kind not in ("LIST", "LSUB"):
            raise ValueError("kind is LIST or LSUB")

    def encode(self) -> bytes:
        delim = b"NIL" if self.delimiter is None else quote(self.delimiter)
        out = (b"* " + self.kind.encode() + b" (" + _atoms(self.attributes) + b") " + delim + b" "
               + encode_string(self.name))
        if self.child_info:
            out += b" (\"CHILDINFO\" (" + b" ".join(quote(x) for x in self.child_info) + b"))"
        return out + b"\r\n"


@dataclass(frozen=True)
class StatusData(Response):
    mailbox: str
    items: tuple[tuple[str, int], ...]

    def encode(self) -> bytes:
        body = b" ".join(Atom(k).text.encode() + b" %d" % v for k, v in self.items)
        return b"* STATUS " + encode_string(self.mailbox) + b" (" + body + b")\r\n"


@dataclass(frozen=True)
class SearchData(Response):
    """``* SEARCH n...`` with the RFC 7162 ``(MODSEQ n)`` when MODSEQ was searched."""

    numbers: tuple[int, ...]
    modseq: int | None = None

    def encode(self) -> bytes:
        out = b"* SEARCH"
        if self.numbers:
            out += b" " + b" ".join(b"%d" % n for n in self.numbers)
            if self.modseq is not None:
                out += b" (MODSEQ %d)" % self.modseq
        return out + b"\r\n"


@dataclass(frozen=True)
class ESearchData(Response):
    """``* ESEARCH (TAG "t") [UID] items`` (RFC 4731 / RFC 9051 7.3.4); values are ints or set strings."""

    tag: str
    uid: bool
    items: tuple[tuple[str, object], ...]

    def encode(self) -> bytes:
        out = b"* ESEARCH (TAG " + quote(self.tag) + b")"
        if self.uid:
            out += b" UID"
        for name, value in self.items:
            out += b" " + Atom(name).text.encode() + b" "
            out += (b"%d" % value) if isinstance(value, int) else str(value).encode("ascii")
        return out + b"\r\n"


@dataclass(frozen=True)
class FetchData(Response):
    """``* n FETCH (NAME value ...)``; values follow :func:`encode_value`."""

    seq: int
    items: tuple[tuple[str, object], ...]

    def encode(self) -> bytes:
        parts = [name.encode("ascii") + b" " + encode_value(value) for name, value in self.items]
        return b"* %d FETCH (" % self.seq + b" ".join(parts) + b")\r\n"


@dataclass(frozen=True)
class FetchRaw(Response):
    """``* n FETCH (...)`` whose item list is already encoded (the executor's fast path for big FETCHes:
    ENVELOPE and BODYSTRUCTURE are stored in wire form, so a response is a few joins)."""

    seq: int
    items: bytes

    def encode(self) -> bytes:
        return b"* %d FETCH (" % self.seq + self.items + b")\r\n"


@dataclass(frozen=True)
class NamespaceData(Response):
    """``* NAMESPACE personal other shared``, each None or ((prefix, delimiter), ...)."""

    personal: tuple[tuple[str, str], ...] | None
    other: tuple[tuple[str, str], ...] | None = None
    shared: tuple[tuple[str, str], ...] | None = None

    def encode(self) -> bytes:
        def one(ns):
            if not ns:
                return b"NIL"
            return b"(" + b"".join(b"(" + encode_string(p) + b" " + quote(d) + b")" for p, d in ns) + b")"
        return b"* NAMESPACE " + one(self.personal) + b" " + one(self.other) + b" " + one(self.shared) + b"\r\n"


@dataclass(frozen=True)
class IdData(Response):
    params: tuple[tuple[str, str | None], ...] | None

    def encode(self) -> bytes:
        if not self.params:
            return b"* ID NIL\r\n"
        return b"* ID (" + b" ".join(encode_string(k) + b" " + encode_value(v) for k, v in self.params) + b")\r\n"
