"""IMAP commands as immutable values: what the parser produces (pure).

Every command is a frozen dataclass that checks its own fields when it is
built, so an invalid command cannot exist: a parser bug that would build one
raises :class:`ValueError` instead of reaching the executor. Each class names
its command (``NAME``, the word the state table in ``engine/imap/session.py``
is keyed by; ``UID FETCH`` and ``FETCH`` share ``FETCH`` and differ by
``uid``).

Invariants
----------
* Numbers are 32-bit: sequence numbers and UIDs are ``1..2**32-1``
  (``nz-number``), MODSEQs ``1..2**63-1`` (RFC 7162 ``mod-sequence-value``).
* A :class:`SequenceSet` is a non-empty tuple of ranges ``(lo, hi)`` where
  ``None`` stands for ``*``; it is resolved against the largest value in use
  (the message count or the largest UID) only when it is used.
* Strings (mailbox names, search strings, passwords) are Python ``str``
  decoded from UTF-8; literal payloads that are message data stay ``bytes``.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import ClassVar, Iterator

__all__ = [
    "MAX_NUMBER", "MAX_MODSEQ", "SequenceSet", "Section", "FetchAtt", "SearchKey",
    "Command", "Capability", "Noop", "Logout", "StartTls", "Authenticate", "Login", "Enable", "Id", "Namespace",
    "ListCmd", "Lsub", "Subscribe", "Unsubscribe", "Status", "Create", "Delete", "Rename", "Select", "QResync",
    "Check", "Close", "Unselect", "Expunge", "Fetch", "Store", "Search", "Append", "AppendMessage", "Copy", "Move",
    "Idle", "STATUS_ITEMS", "FETCH_MACROS", "SIMPLE_FETCH_ATTS", "SEARCH_RETURN_OPTIONS", "LIST_SELECTION_OPTIONS",
    "LIST_RETURN_OPTIONS",
]

MAX_NUMBER = 0xFFFFFFFF
MAX_MODSEQ = 0x7FFFFFFFFFFFFFFF

STATUS_ITEMS = ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE", "HIGHESTMODSEQ", "RECENT")
SIMPLE_FETCH_ATTS = ("FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "BODY",
                     "RFC822", "RFC822.HEADER", "RFC822.TEXT", "MODSEQ")
FETCH_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
SEARCH_RETURN_OPTIONS = ("MIN", "MAX", "ALL", "COUNT")
LIST_SELECTION_OPTIONS = ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE")
LIST_RETURN_OPTIONS = ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE", "STATUS")


def _check_number(value, what: str, low: int = 1, high: int = MAX_NUMBER) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in {low}..{high}, got {value!r}")


# -- sequence sets --------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceSet:
    """``sequence-set`` (RFC 9051): ranges of numbers, ``None`` meaning ``*``.

    ``ranges`` keeps the client's order; :meth:`resolve` gives the sorted,
    merged ranges for a given largest value. A range ``a:b`` means the same
    as ``b:a`` (RFC 9051 9, ``seq-range``).
    """

    ranges: tuple[tuple[int | None, int | None], ...]

    def __post_init__(self):
        if not self.ranges:
            raise ValueError("a sequence set has at least one range")
        for lo, hi in self.ranges:
            for v in (lo, hi):
                if v is not None:
                    _check_number(v, "a sequence number or UID")

    @classmethod
    def of(cls, *numbers: int) -> "SequenceSet":
        """A set holding exactly ``numbers`` (compacted into ranges)."""
        return cls(tuple(compact_ranges(numbers)))

    @property
    def has_star(self) -> bool:
        return any(lo is None or hi is None for lo, hi in self.ranges)

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Sorted, merged, inclusive ranges with ``*`` replaced by ``largest``.

        With ``largest == 0`` (an empty mailbox) ``*`` is 0 and every range
        that touched it is dropped, as are the zeros.
        """
        spans = []
        for lo, hi in self.ranges:
            if largest < 1 and (lo is None or hi is None):
                continue
            a = largest if lo is None else lo
            b = largest if hi is None else hi
            if a > b:
                a, b = b, a
            if b < 1:
                continue
            spans.append((max(a, 1), b))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1] + 1:
                if b > merged[-1][1]:
                    merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        return merged

    def contains(self, value: int, largest: int) -> bool:
        return any(a <= value <= b for a, b in self.resolve(largest))

    def values(self, largest: int, limit: int | None = None) -> Iterator[int]:
        """Every number in the set (``*`` = ``largest``), ascending; ``limit`` caps the range ends."""
        for a, b in self.resolve(largest):
            if limit is not None:
                b = min(b, limit)
            yield from range(a, b + 1)

    def __str__(self) -> str:
        def one(v):
            return "*" if v is None else str(v)
        return ",".join(one(lo) if lo == hi else f"{one(lo)}:{one(hi)}" for lo, hi in self.ranges)


def compact_ranges(numbers) -> list[tuple[int, int]]:
    """Sorted unique ``numbers`` as inclusive ranges: [1,2,3,7] -> [(1,3),(7,7)]."""
    out: list[tuple[int, int]] = []
    for n in sorted(set(numbers)):
        if out and n == out[-1][1] + 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def format_set(numbers) -> str:
    """Numbers as a compact ``sequence-set`` string (``1:3,7``); the numbers must not be empty."""
    parts = [str(a) if a == b else f"{a}:{b}" for a, b in compact_ranges(numbers)]
    if not parts:
        raise ValueError("an empty set has no IMAP form")
    return ",".join(parts)


# -- fetch attributes -----------------------------------------------------------------

_SECTION_TEXTS = ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME")


@dataclass(frozen=True)
class Section:
    """A ``section`` of BODY[...]/BINARY[...]: part numbers plus an optional text specifier."""

    part: tuple[int, ...] = ()
    text: str | None = None  # HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT, MIME
    fields: tuple[str, ...] = ()  # upper-cased header field names of HEADER.FIELDS[.NOT]

    def __post_init__(self):
        for p in self.part:
            _check_number(p, "a part number")
        if self.text is not None and self.text not in _SECTION_TEXTS:
            raise ValueError(f"unknown section text {self.text!r}")
        if self.text == "MIME" and not self.part:
            raise ValueError("MIME needs a part number (RFC 9051 6.4.5)")
        if (self.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT")) != bool(self.fields):
            raise ValueError("HEADER.FIELDS[.NOT] and only they carry a non-empty field list")

    def __str__(self) -> str:
        out = ".".join(str(p) for p in self.part)
        if self.text:
            out = f"{out}.{self.text}" if out else self.text
            if self.fields:
                out += " (" + " ".join(self.fields) + ")"
        return out


@dataclass(frozen=True)
class FetchAtt:
    """One ``fetch-att``: a simple name, or BODY/BINARY with a section and a partial range.

    ``name`` is one of :data:`SIMPLE_FETCH_ATTS`, ``BODY[]`` (with
    ``section``), ``BINARY`` or ``BINARY.SIZE``. ``peek`` is BODY.PEEK /
    BINARY.PEEK (never sets ``\\Seen``). ``partial`` is ``(origin, length)``.
    """

    name: str
    section: Section | None = None
    partial: tuple[int, int] | None = None
    peek: bool = False

    def __post_init__(self):
        if self.name in ("BODY[]", "BINARY", "BINARY.SIZE"):
            if self.section is None:
                raise ValueError(f"{self.name} needs a section")
            if self.name != "BODY[]" and self.section.text is not None:
                raise ValueError("BINARY sections are part numbers only (RFC 3516)")
        elif self.name in SIMPLE_FETCH_ATTS:
            if self.section is not None or self.partial is not None or self.peek:
                raise ValueError(f"{self.name} takes no section, partial or PEEK")
        else:
            raise ValueError(f"unknown fetch attribute {self.name!r}")
        if self.partial is not None:
            if self.name == "BINARY.SIZE":
                raise ValueError("BINARY.SIZE takes no partial range")
            origin, length = self.partial
            _check_number(origin, "a partial origin", 0)
            _check_number(length, "a partial length", 1)

    @property
    def needs_body(self) -> bool:
        """True when answering needs the message's bytes (not just its stored structure)."""
        return self.name in ("BODY[]", "BINARY", "BINARY.SIZE", "RFC822", "RFC822.HEADER", "RFC822.TEXT")

    @property
    def sets_seen(self) -> bool:
        """RFC 9051 6.4.5: BODY[...] / BINARY[...] / RFC822 / RFC822.TEXT without PEEK set \\Seen."""
        return (self.name in ("BODY[]", "BINARY", "RFC822", "RFC822.TEXT")) and not self.peek

    def response_name(self) -> str:
        """The name the FETCH response carries (``BODY[1.TEXT]<0>`` for ``BODY.PEEK[1.TEXT]<0.100>``)."""
        if self.section is None:
            return self.name
        base = "BODY" if self.name == "BODY[]" else self.name
        out = f"{base}[{self.section}]"
        if self.partial is not None:
            out += f"<{self.partial[0]}>"
        return out


# -- search keys ----------------------------------------------------------------------

# op -> kind of argument
SEARCH_KEY_ARGS = {
    "ALL": None, "ANSWERED": None, "DELETED": None, "DRAFT": None, "FLAGGED": None, "SEEN": None,
    "NEW": None, "OLD": None, "RECENT": None,
    "UNANSWERED": None, "UNDELETED": None, "UNDRAFT": None, "UNFLAGGED": None, "UNSEEN": None,
    "KEYWORD": "flag", "UNKEYWORD": "flag",
    "BCC": "string", "CC": "string", "FROM": "string", "TO": "string", "SUBJECT": "string",
    "BODY": "string", "TEXT": "string",
    "HEADER": "header",
    "BEFORE": "date", "ON": "date", "SINCE": "date",
    "SENTBEFORE": "date", "SENTON": "date", "SENTSINCE": "date",
    "LARGER": "number", "SMALLER": "number",
    "UID": "set", "SEQ": "set",
    "NOT": "key", "OR": "keys2", "AND": "keys",
    "MODSEQ": "modseq",
}


@dataclass(frozen=True)
class SearchKey:
    """One search key (RFC 9051 6.4.4); ``AND`` is a parenthesised list, ``SEQ`` a bare sequence set.

    ``arg`` by kind: a flag or string (``str``), ``(name, value)`` for
    HEADER, a :class:`datetime.date`, an ``int`` (LARGER/SMALLER/MODSEQ), a
    :class:`SequenceSet`, a :class:`SearchKey` (NOT), a tuple of keys (OR:
    two; AND: one or more).
    """

    op: str
    arg: object = None

    def __post_init__(self):
        kind = SEARCH_KEY_ARGS.get(self.op, "?")
        a = self.arg
        ok = {
            None: a is None,
            "flag": isinstance(a, str) and bool(a),
            "string": isinstance(a, str),
            "header": isinstance(a, tuple) and len(a) == 2 and all(isinstance(x, str) for x in a) and bool(a[0]),
            "date": isinstance(a, _dt.date),
            "number": isinstance(a, int) and 0 <= a <= MAX_NUMBER,
            "modseq": isinstance(a, int) and 0 <= a <= MAX_MODSEQ,
            "set": isinstance(a, SequenceSet),
            "key": isinstance(a, SearchKey),
            "keys2": isinstance(a, tuple) and len(a) == 2 and all(isinstance(k, SearchKey) for k in a),
            "keys": isinstance(a, tuple) and len(a) >= 1 and all(isinstance(k, SearchKey) for k in a),
        }.get(kind, False)
        if not ok:
            raise ValueError(f"search key {self.op} with argument {a!r} is not valid")

    def walk(self) -> Iterator["SearchKey"]:
        yield self
        if self.op == "NOT":
            yield from self.arg.walk()
        elif self.op in ("OR", "AND"):
            for k in self.arg:
                yield from k.walk()


# -- commands -------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """Base of every command: ``tag`` is the client's tag (any ASTRING-CHAR but '+')."""

    NAME: ClassVar[str] = ""
    tag: str

    def __post_init__(self):
        if not self.tag or any(c in '(){ %*"\\+' or ord(c) < 0x21 or ord(c) > 0x7E for c in self.tag):
            raise ValueError(f"invalid tag {self.tag!r}")


def _check_mailbox(name) -> None:
    if not isinstance(name, str):
        raise ValueError("a mailbox name is a string")


@dataclass(frozen=True)
class Capability(Command):
    NAME: ClassVar[str] = "CAPABILITY"


@dataclass(frozen=True)
class Noop(Command):
    NAME: ClassVar[str] = "NOOP"


@dataclass(frozen=True)
class Check(Command):
    """IMAP4rev1 CHECK: the same as NOOP here (every write is already durable)."""

    NAME: ClassVar[str] = "CHECK"


@dataclass(frozen=True)
class Logout(Command):
    NAME: ClassVar[str] = "LOGOUT"


@dataclass(frozen=True)
class StartTls(Command):
    NAME: ClassVar[str] = "STARTTLS"


@dataclass(frozen=True)
class Authenticate(Command):
    """AUTHENTICATE with the client's SASL response already collected (initial or after ``+``)."""

    NAME: ClassVar[str] = "AUTHENTICATE"
    mechanism: str = "PLAIN"
    response: bytes | None = None  # decoded base64; None when the client cancelled with '*'

    def __post_init__(self):
        super().__post_init__()
        if not self.mechanism or self.mechanism != self.mechanism.upper():
            raise ValueError("the mechanism is an upper-case atom")


@dataclass(frozen=True)
class Login(Command):
    NAME: ClassVar[str] = "LOGIN"
    username: str = ""
    password: str = ""


@dataclass(frozen=True)
class Enable(Command):
    NAME: ClassVar[str] = "ENABLE"
    capabilities: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if not self.capabilities:
            raise ValueError("ENABLE needs at least one capability")


@dataclass(frozen=True)
class Id(Command):
    NAME: ClassVar[str] = "ID"
    params: tuple[tuple[str, str | None], ...] | None = None


@dataclass(frozen=True)
class Namespace(Command):
    NAME: ClassVar[str] = "NAMESPACE"


@dataclass(frozen=True)
class ListCmd(Command):
    """LIST, with the RFC 5258 selection and return options (``extended`` when any were given)."""

    NAME: ClassVar[str] = "LIST"
    reference: str = ""
    patterns: tuple[str, ...] = ("",)
    selection: tuple[str, ...] = ()
    returns: tuple[str, ...] = ()
    status_items: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if not self.patterns:
            raise ValueError("LIST needs a pattern")
        for opt in self.selection:
            if opt not in LIST_SELECTION_OPTIONS:
                raise ValueError(f"unknown LIST selection option {opt}")
        for opt in self.returns:
            if opt not in LIST_RETURN_OPTIONS:
                raise ValueError(f"unknown LIST return option {opt}")
        if ("STATUS" in self.returns) != bool(self.status_items):
            raise ValueError("RETURN (STATUS (...)) and only it carries status items")
        for item in self.status_items:
            if item not in STATUS_ITEMS:
                raise ValueError(f"unknown STATUS item {item}")

    @property
    def extended(self) -> bool:
        return bool(self.selection or self.returns or len(self.patterns) > 1)


@dataclass(frozen=True)
class Lsub(Command):
    NAME: ClassVar[str] = "LSUB"
    reference: str = ""
    pattern: str = ""


@dataclass(frozen=True)
class _MailboxCommand(Command):
    mailbox: str = ""

    def __post_init__(self):
        super().__post_init__()
        _check_mailbox(self.mailbox)


@dataclass(frozen=True)
class Subscribe(_MailboxCommand):
    NAME: ClassVar[str] = "SUBSCRIBE"


@dataclass(frozen=True)
class Unsubscribe(_MailboxCommand):
    NAME: ClassVar[str] = "UNSUBSCRIBE"


@dataclass(frozen=True)
class Delete(_MailboxCommand):
    NAME: ClassVar[str] = "DELETE"


@dataclass(frozen=True)
class Create(_MailboxCommand):
    """CREATE, with an optional RFC 6154 ``(USE (\\Sent ...))``."""

    NAME: ClassVar[str] = "CREATE"
    special_use: tuple[str, ...] = ()


@dataclass(frozen=True)
class Status(_MailboxCommand):
    NAME: ClassVar[str] = "STATUS"
    items: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if not self.items:
            raise ValueError("STATUS needs at least one item")
        for item in self.items:
            if item not in STATUS_ITEMS:
                raise ValueError(f"unknown STATUS item {item}")


@dataclass(frozen=True)
class Rename(Command):
    NAME: ClassVar[str] = "RENAME"
    old: str = ""
    new: str = ""


@dataclass(frozen=True)
class QResync:
    """The QRESYNC parameter of SELECT/EXAMINE (RFC 7162 3.2.5)."""

    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    seq_match: tuple[SequenceSet, SequenceSet] | None = None  # (known sequence numbers, their UIDs)

    def __post_init__(self):
        _check_number(self.uidvalidity, "UIDVALIDITY")
        _check_number(self.modseq, "a MODSEQ", 1, MAX_MODSEQ)
        if self.known_uids is not None and self.known_uids.has_star:
            raise ValueError("known UIDs cannot contain '*'")


@dataclass(frozen=True)
class Select(_MailboxCommand):
    """SELECT or (``read_only``) EXAMINE."""

    NAME: ClassVar[str] = "SELECT"
    read_only: bool = False
    condstore: bool = False
    qresync: QResync | None = None


@dataclass(frozen=True)
class Close(Command):
    NAME: ClassVar[str] = "CLOSE"


@dataclass(frozen=True)
class Unselect(Command):
    NAME: ClassVar[str] = "UNSELECT"


@dataclass(frozen=True)
class Expunge(Command):
    """EXPUNGE, or UID EXPUNGE (RFC 4315) with ``uids``."""

    NAME: ClassVar[str] = "EXPUNGE"
    uids: SequenceSet | None = None


@dataclass(frozen=True)
class Fetch(Command):
    NAME: ClassVar[str] = "FETCH"
    uid: bool = False
    sequence: SequenceSet = SequenceSet(((1, 1),))
    attributes: tuple[FetchAtt, ...] = ()
    changed_since: int | None = None
    vanished: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not self.attributes:
            raise ValueError("FETCH needs at least one attribute")
        if self.changed_since is not None:
            _check_number(self.changed_since, "CHANGEDSINCE", 0, MAX_MODSEQ)
        if self.vanished and (not self.uid or self.changed_since is None):
            raise ValueError("VANISHED needs UID FETCH with CHANGEDSINCE (RFC 7162 3.2.6)")


STORE_MODES = ("", "+", "-")


@dataclass(frozen=True)
class Store(Command):
    NAME: ClassVar[str] = "STORE"
    uid: bool = False
    sequence: SequenceSet = SequenceSet(((1, 1),))
    mode: str = ""  # "" replace, "+" add, "-" remove
    silent: bool = False
    flags: tuple[str, ...] = ()
    unchanged_since: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in STORE_MODES:
            raise ValueError(f"STORE mode must be one of {STORE_MODES}")
        if self.unchanged_since is not None:
            _check_number(self.unchanged_since, "UNCHANGEDSINCE", 0, MAX_MODSEQ)


@dataclass(frozen=True)
class Search(Command):
    NAME: ClassVar[str] = "SEARCH"
    uid: bool = False
    key: SearchKey = SearchKey("ALL")
    charset: str | None = None
    returns: tuple[str, ...] | None = None  # None: plain SEARCH; a tuple: ESEARCH (empty means ALL)

    def __post_init__(self):
        super().__post_init__()
        for opt in self.returns or ():
            if opt not in SEARCH_RETURN_OPTIONS:
                raise ValueError(f"unknown SEARCH return option {opt}")


@dataclass(frozen=True)
class AppendMessage:
    """One message of APPEND (MULTIAPPEND sends several)."""

    message: bytes
    flags: tuple[str, ...] = ()
    internaldate: _dt.datetime | None = None

    def __post_init__(self):
        if not isinstance(self.message, bytes):
            raise ValueError("the message is bytes")
        if self.internaldate is not None and self.internaldate.tzinfo is None:
            raise ValueError("an INTERNALDATE carries its zone")


@dataclass(frozen=True)
class Append(_MailboxCommand):
    NAME: ClassVar[str] = "APPEND"
    messages: tuple[AppendMessage, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if not self.messages:
            raise ValueError("APPEND needs a message")


@dataclass(frozen=True)
class Copy(_MailboxCommand):
    NAME: ClassVar[str] = "COPY"
    uid: bool = False
    sequence: SequenceSet = SequenceSet(((1, 1),))


@dataclass(frozen=True)
class Move(_MailboxCommand):
    NAME: ClassVar[str] = "MOVE"
    uid: bool = False
    sequence: SequenceSet = SequenceSet(((1, 1),))


@dataclass(frozen=True)
class Idle(Command):
    NAME: ClassVar[str] = "IDLE"
