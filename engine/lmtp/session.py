"""LMTP (RFC 2033) as a sans-I/O state machine: bytes in, events and replies out.

Theory of operation
-------------------
:class:`LmtpSession` never touches a socket, a clock or the mail store. The
transport (``engine/server.py``) feeds it whatever bytes arrive with
:meth:`LmtpSession.receive_data`, then calls :meth:`LmtpSession.next_event`
until it returns :data:`NEED_DATA` (or :data:`PAUSED`), and writes
:meth:`LmtpSession.data_to_send` to the peer. Commands the session can
answer alone (LHLO, MAIL, RSET, NOOP, VRFY, QUIT, errors) are answered
inside ``next_event``. Two things need the application, and the session
hands them out as events and *pauses* (ignoring later, pipelined commands)
until the application answers:

* :class:`RecipientRequested` (RCPT TO): answer with
  :meth:`LmtpSession.answer_recipient` (a 2xx reply accepts it).
* :class:`MessageReceived` (the end of DATA): answer with
  :meth:`LmtpSession.answer_message`, one reply per accepted recipient, in
  order (RFC 2033 4.2). The application must send a 2xx only once that
  recipient's delivery is durable.

:class:`MessageRefused` and :class:`ConnectionClosed` are informational.

Rules enforced here (tests in ``tests/lmtp/test_lmtp_session.py``):

* Command lines end in CRLF. A bare LF ends the line but the command is
  refused (``500 5.5.2``); a command line longer than ``max_command_bytes``
  is refused (``500 5.5.2``) and skipped up to its end. Too many errors in
  one session (``max_errors``) close it with ``421 4.7.0``.
* Only CRLF.CRLF ends DATA (no SMTP smuggling through ``LF.LF``). A
  message containing a bare LF, or larger than ``max_message_bytes`` after
  dot-unstuffing, is refused for every recipient (``554 5.6.0`` /
  ``552 5.3.4``) and nothing reaches the application; an over-sized body is
  discarded as it streams in, so memory stays bounded.
* Dot-unstuffing follows RFC 5321 4.5.2: a leading period is removed from
  every line. The body handed out is exactly the octets the client meant,
  CRLF line endings included; no header is added, so the same message sent
  twice has the same bytes (the store de-duplicates retries by content).
* Sequencing (RFC 5321 4.1.4): MAIL needs LHLO, RCPT needs MAIL, DATA needs
  an accepted recipient; otherwise ``503 5.5.1``. HELO/EHLO are refused
  (RFC 2033 4.1: LMTP uses LHLO).
* Addresses are RFC 5321 4.1.2 paths (:func:`parse_path`): a Mailbox whose
  local part is a Dot-string or a Quoted-string and whose domain is a
  Domain or an address literal, in ASCII, within the sizes of 4.5.3.1.
  Anything else is ``501 5.1.7`` (MAIL) or ``501 5.1.3`` (RCPT). The null
  path ``<>`` is a sender only; ``<Postmaster>`` a recipient only.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LmtpSession", "Reply", "Recipient", "RecipientRequested", "MessageReceived", "MessageRefused",
    "ConnectionClosed", "NEED_DATA", "PAUSED", "Phase", "AddressError", "Mailbox", "parse_mailbox", "parse_path",
    "split_address", "MAX_LOCAL_PART_OCTETS", "MAX_DOMAIN_OCTETS", "MAX_PATH_OCTETS",
    "route_recipient", "Route", "DEFAULT_MAX_COMMAND_BYTES", "DEFAULT_MAX_RECIPIENTS", "DEFAULT_MAX_ERRORS",
]

DEFAULT_MAX_COMMAND_BYTES = 2048  # RFC 5321 4.5.3.1.4 asks for >= 512; extensions lengthen MAIL/RCPT
DEFAULT_MAX_RECIPIENTS = 1000  # RFC 5321 4.5.3.1.8 asks for >= 100
DEFAULT_MAX_ERRORS = 20
_TERMINATOR = b"\r\n.\r\n"


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes with receive_data()
PAUSED = _Sentinel("PAUSED")  # answer the last event first


class Phase(enum.Enum):
    """Where the session is in RFC 5321's command sequence."""

    GREETED = "greeted"  # before LHLO
    READY = "ready"  # after LHLO, no transaction
    MAIL = "mail"  # MAIL accepted; RCPTs may follow
    DATA = "data"  # receiving the message body
    CLOSED = "closed"


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: code, enhanced status code (RFC 3463) and text lines."""

    code: int
    status: str
    text: str | tuple[str, ...]

    def encode(self) -> bytes:
        lines = (self.text,) if isinstance(self.text, str) else self.text
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            prefix = f"{self.status} " if self.status else ""
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        text = self.text if isinstance(self.text, str) else " / ".join(self.text)
        return f"{self.code} {self.status} {text}".strip()


@dataclass(frozen=True)
class Recipient:
    """An accepted recipient: its address and whatever the application attached."""

    address: str
    info: Any = None


@dataclass(frozen=True)
class RecipientRequested:
    """RCPT TO:<address>; answer with ``answer_recipient``."""

    address: str
    params: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class MessageReceived:
    """A complete message; answer with ``answer_message`` (one reply per recipient)."""

    sender: str
    recipients: tuple[Recipient, ...]
    body: bytes


@dataclass(frozen=True)
class MessageRefused:
    """The session refused a complete message itself (size, bare LF); already answered."""

    sender: str
    recipients: tuple[Recipient, ...]
    reply: Reply
    size: int


@dataclass(frozen=True)
class ConnectionClosed:
    """QUIT, end of input, too many errors or ``close()``; nothing more will happen."""

    reason: str


# -- addresses ---------------------------------------------------------------------
#
# RFC 5321 4.1.2, the productions a path is checked against (ASCII only: this
# server does not offer SMTPUTF8, RFC 6531):
#
#   Path          = "<" [ A-d-l ":" ] Mailbox ">"
#   A-d-l         = At-domain *( "," At-domain )      ; a source route, ignored
#   At-domain     = "@" Domain
#   Mailbox       = Local-part "@" ( Domain / address-literal )
#   Local-part    = Dot-string / Quoted-string
#   Dot-string    = Atom *( "." Atom ),  Atom = 1*atext
#   Quoted-string = DQUOTE *( qtextSMTP / "\" %d32-126 ) DQUOTE
#   qtextSMTP     = %d32-33 / %d35-91 / %d93-126       ; printable, not " or \
#   Domain        = sub-domain *( "." sub-domain )
#   sub-domain    = Let-dig [ *( ALPHA / DIGIT / "-" ) Let-dig ]
#   address-literal = "[" ( IPv4 / "IPv6:" IPv6-addr / Ldh-str ":" 1*dcontent ) "]"
#
# and the size limits of 4.5.3.1: a local part of at most 64 octets, a domain
# of at most 255, a path of at most 256 (its angle brackets included).

MAX_LOCAL_PART_OCTETS = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN_OCTETS = 255  # RFC 5321 4.5.3.1.2
MAX_PATH_OCTETS = 256  # RFC 5321 4.5.3.1.3

_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~"
_DOT_STRING = re.compile(f"[{_ATEXT}]+(?:\\.[{_ATEXT}]+)*")
_SUB_DOMAIN = "[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(f"{_SUB_DOMAIN}(?:\\.{_SUB_DOMAIN})*")
_IPV4 = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})")
_IPV6_HEX = re.compile(r"[0-9A-Fa-f]{1,4}")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")


class AddressError(ValueError):
    """A path or address that does not parse, or that cannot name a mailbox."""


@dataclass(frozen=True)
class Mailbox:
    """An RFC 5321 Mailbox, parsed.

    ``local`` is the Local-part's value: a Quoted-string without its quotes
    and with each quoted pair reduced to its character, so ``"bob"@x`` and
    ``bob@x`` have the same ``local``. ``domain`` is the Domain, or the
    address literal with its brackets; it is ``""`` only for the special
    recipient ``<Postmaster>`` (RFC 5321 4.5.1).
    """

    local: str
    domain: str


def _printable(text: str, what: str) -> None:
    for c in text:
        if ord(c) < 0x20 or ord(c) == 0x7F:
            raise AddressError(f"{what} contains a control character")
        if ord(c) > 0x7E:
            raise AddressError(f"{what} contains {c!r}: addresses must be ASCII (this server does not offer SMTPUTF8)")


def _quoted_local_part(text: str) -> tuple[str, int]:
    """The value of the Quoted-string at the start of ``text`` and where it ends."""
    value, i = [], 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return "".join(value), i + 1
        if ch == "\\":
            if i + 1 == len(text):
                break
            value.append(text[i + 1])
            i += 2
            continue
        value.append(ch)
        i += 1
    raise AddressError("the quoted local part has no closing '\"'")


def _check_dot_string(local: str) -> None:
    if _DOT_STRING.fullmatch(local):
        return
    if " " in local:
        raise AddressError(f"the local part {local!r} contains a space; quote it (\"{local}\"@...) or remove it")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise AddressError(f"the local part {local!r} has an empty atom (a leading, trailing or doubled '.'); "
                           "quote it or remove the dot")
    bad = next(c for c in local if c != "." and not re.fullmatch(f"[{_ATEXT}]", c))
    raise AddressError(f"the local part {local!r} contains {bad!r}, which is allowed only in a quoted local part")


def _check_ipv6(text: str) -> None:
    """RFC 5321 4.1.3 IPv6-addr: full, compressed (``::`` for at least two groups), or either with IPv4 last."""
    literal, groups_max = text, 8
    if "." in text:  # IPv6v4-full / IPv6v4-comp: the last 32 bits written as IPv4
        head, _, v4 = text.rpartition(":")
        _check_ipv4(v4)
        # "1::1.2.3.4" splits as "1:" + "1.2.3.4": give the "::" back its second colon
        text, groups_max = (head + ":" if head.endswith(":") else head), 6
    if "::" in text:
        left, _, right = text.partition("::")
        parts = (left.split(":") if left else []) + (right.split(":") if right else [])
        if "::" in right or len(parts) > groups_max - 2:
            raise AddressError(f"IPv6 address literal {literal!r} is malformed")
    else:
        parts = text.split(":")
        if len(parts) != groups_max:
            raise AddressError(f"IPv6 address literal {literal!r} needs {groups_max} groups or '::'")
    if not all(_IPV6_HEX.fullmatch(p) for p in parts):
        raise AddressError(f"IPv6 address literal {literal!r} is malformed")


def _check_ipv4(text: str) -> None:
    m = _IPV4.fullmatch(text)
    if not m or any(int(g) > 255 for g in m.groups()):
        raise AddressError(f"IPv4 address literal {text!r} is malformed")


def _check_domain(domain: str) -> None:
    if not domain:
        raise AddressError("the address has no domain after '@'")
    if len(domain.encode()) > MAX_DOMAIN_OCTETS:
        raise AddressError(f"the domain is longer than {MAX_DOMAIN_OCTETS} octets")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError("the address literal has no closing ']'")
        literal = domain[1:-1]
        if literal[:5].lower() == "ipv6:":
            _check_ipv6(literal[5:])
        elif _IPV4.fullmatch(literal):
            _check_ipv4(literal)
        elif not _GENERAL_LITERAL.fullmatch(literal):
            raise AddressError(f"the address literal {domain!r} is neither IPv4, IPv6: nor tag:content")
        return
    if not _DOMAIN.fullmatch(domain):
        raise AddressError(f"the domain {domain!r} is not a domain name (letters, digits and '-' in labels "
                           "separated by single dots, no '-' at either end of a label) or an address literal")


def parse_mailbox(address: str) -> Mailbox:
    """Parse an RFC 5321 ``Mailbox`` (``local@domain``, no angle brackets).

    Raises:
        AddressError: ``address`` is not Mailbox syntax (the message says
            what is wrong), or its local part is over 64 octets.
    """
    _printable(address, "the address")
    if address.startswith('"'):
        local, end = _quoted_local_part(address)
        written = address[:end]
    else:
        end = address.find("@")
        if end < 0:
            raise AddressError(f"the address {address!r} has no '@domain'")
        written = local = address[:end]
        if not local:
            raise AddressError("the address has an empty local part before '@'")
        _check_dot_string(local)
    if len(written) > MAX_LOCAL_PART_OCTETS:
        raise AddressError(f"the local part is longer than {MAX_LOCAL_PART_OCTETS} octets")
    if address[end:end + 1] != "@":
        raise AddressError(f"the address {address!r} has no '@domain' after its local part")
    domain = address[end + 1:]
    _check_domain(domain)
    return Mailbox(local, domain)


def _is_postmaster(address: str) -> bool:
    return address.lower() == "postmaster"


def parse_path(text: str, *, forward: bool = False) -> tuple[str, str]:
    """Split ``<path> params`` into (address, rest), checking the path's syntax.

    The address is returned as written, without its angle brackets and
    without a source route (RFC 5321 4.1.2: the route is checked, then
    ignored). A reverse path (``forward=False``, MAIL FROM) may be the null
    path ``<>``, returned as ``""``; a forward path (RCPT TO) may not, but
    may be ``<Postmaster>`` without a domain (RFC 5321 4.5.1).

    Raises:
        AddressError: the path is not RFC 5321 syntax; the message says why.
    """
    text = text.lstrip(" ")
    if not text.startswith("<"):
        raise AddressError("the address must be enclosed in <...>")
    i, quoted = 1, False
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quoted:
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            break
        i += 1
    else:
        raise AddressError("the address has no closing '>'")
    address, rest = text[1:i], text[i + 1:]
    if rest and not rest.startswith(" "):
        raise AddressError("parameters must be separated from the address by a space")
    if len(text[:i + 1].encode()) > MAX_PATH_OCTETS:
        raise AddressError(f"the path is longer than {MAX_PATH_OCTETS} octets")
    _printable(address, "the address")
    if not address:
        if forward:
            raise AddressError("the null path <> is not a recipient")
        return "", rest.strip(" ")
    if address.startswith("@"):  # obsolete source route: @a,@b:user@c
        route, colon, address = address.partition(":")
        if not colon:
            raise AddressError("malformed source route (@domain,...: with no ':')")
        for hop in route.split(","):
            if not hop.startswith("@") or not _DOMAIN.fullmatch(hop[1:]):
                raise AddressError(f"malformed source route: {hop!r} is not @domain")
    if not (forward and _is_postmaster(address)):
        parse_mailbox(address)
    return address, rest.strip(" ")


def split_address(address: str) -> tuple[str, str]:
    """``local@domain`` -> (the local part's value, domain); see :class:`Mailbox`.

    ``Postmaster`` without a domain gives ``("Postmaster", "")``.

    Raises:
        AddressError: ``address`` is not RFC 5321 Mailbox syntax.
    """
    if _is_postmaster(address):
        return address, ""
    mailbox = parse_mailbox(address)
    return mailbox.local, mailbox.domain


@dataclass(frozen=True)
class Route:
    """Where a recipient's mail goes: ``mailbox``; ``inbox`` is the user's INBOX."""

    user: str
    mailbox: str
    inbox: str


def _check_name_part(part: str, what: str, local: str) -> None:
    # One component of user/<user>/<detail>: MS-3 forbids '/' (a separator),
    # IMAP wildcards, '.' and '..'; control characters cannot get this far
    # (parse_mailbox refused them). Leading or trailing spaces are refused
    # so that no mailbox looks like another user's in a listing.
    if "/" in part or "*" in part or "%" in part or part in (".", ".."):
        raise AddressError(f"local part {local!r} cannot name a mailbox: its {what} {part!r} "
                           "contains '/', '*' or '%', or is '.' or '..'")
    if part != part.strip(" "):
        raise AddressError(f"local part {local!r} cannot name a mailbox: its {what} begins or ends with a space")


def route_recipient(address: str, exists) -> Route:
    """Map an address to a mailbox (pure; ``exists(name) -> bool`` asks the store).

    The mailbox is named from the local part's value (a quoted local part
    unquoted, see :class:`Mailbox`): ``local@domain`` goes to
    ``user/local/INBOX``; ``local+detail@domain`` to ``user/local/detail``
    when that mailbox exists, else to the INBOX. The user (before the first
    '+') is lower-cased; the detail is kept as written; the domain is
    ignored (one namespace per node).

    Raises:
        AddressError: the address is not Mailbox syntax, or its local part
            cannot name a mailbox: an empty user, a user or detail holding
            '/', '*' or '%', being '.' or '..', or beginning or ending with
            a space.
    """
    local, _domain = split_address(address)
    user, plus, detail = local.partition("+")
    user = user.lower()
    if not user:
        raise AddressError("the address has an empty user before '+'" if plus
                           else "the address has an empty local part")
    _check_name_part(user, "user", local)
    if detail:
        _check_name_part(detail, "detail", local)
    inbox = f"user/{user}/INBOX"
    if plus and detail:
        candidate = f"user/{user}/{detail}"
        if exists(candidate):
            return Route(user, candidate, inbox)
    return Route(user, inbox, inbox)


def _params(text: str) -> tuple[tuple[str, str | None], ...]:
    out = []
    for word in text.split():
        key, eq, value = word.partition("=")
        if not key:
            raise AddressError(f"malformed parameter {word!r}")
        out.append((key.upper(), value if eq else None))
    return tuple(out)


# -- the session -------------------------------------------------------------------


@dataclass
class _Transaction:
    sender: str
    recipients: list[Recipient] = field(default_factory=list)


class LmtpSession:
    """One LMTP connection's protocol state (server side). Not thread-safe.

    Args:
        hostname: the name this server gives in its greeting and LHLO reply.
        max_message_bytes: the largest message accepted (after unstuffing);
            advertised with SIZE (RFC 1870).
        max_recipients: recipients per transaction; more get ``452 4.5.3``.
        max_command_bytes: the longest command line, CRLF included.
        max_errors: protocol errors before the session closes itself.
    """

    def __init__(self, hostname: str, *, max_message_bytes: int, max_recipients: int = DEFAULT_MAX_RECIPIENTS,
                 max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES, max_errors: int = DEFAULT_MAX_ERRORS,
                 greeting: str = "LMTP server ready"):
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        self.hostname = hostname
        self.max_message_bytes = max_message_bytes
        self.max_recipients = max_recipients
        self.max_command_bytes = max_command_bytes
        self.max_errors = max_errors
        self.phase = Phase.GREETED
        self.errors = 0
        self._in = bytearray()
        self._out: list[bytes] = [Reply(220, "", f"{hostname} {greeting}").encode()]
        self._skip_line = False  # inside an over-long command line: drop bytes up to its LF
        self._eof = False
        self._txn: _Transaction | None = None
        self._awaiting: RecipientRequested | MessageReceived | None = None
        self._events: deque = deque()
        # DATA: the body so far, prefixed with the CRLF that ended the DATA line,
        # so the terminator is always CRLF.CRLF (an empty message included).
        self._body = bytearray()
        self._scan = 0
        self._body_too_large = False
        self._discarded = 0  # octets of an over-sized body dropped so far
        self._body_raw_limit = max_message_bytes + max_message_bytes // 3 + 16
        self._closed_reason: str | None = None

    # -- the transport's side ---------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if self.phase is Phase.CLOSED:
            return
        if not data:
            self._eof = True
            return
        self._in += data

    def data_to_send(self) -> bytes:
        """Replies queued since the last call (possibly empty)."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def awaiting(self) -> RecipientRequested | MessageReceived | None:
        return self._awaiting

    @property
    def at_boundary(self) -> bool:
        """True between transactions with nothing pending (a safe point to close)."""
        return self.phase in (Phase.GREETED, Phase.READY) and self._awaiting is None

    @property
    def buffered(self) -> int:
        """Bytes received but not processed yet (the transport pauses reading above a bound)."""
        return len(self._in) + (len(self._body) if self.phase is Phase.DATA else 0)

    def close(self, reply: Reply | None = None, reason: str = "closed by server") -> None:
        """Close the session (say, a server shutting down), optionally with a last reply."""
        if self.phase is Phase.CLOSED:
            return
        if reply is not None:
            self._out.append(reply.encode())
        self._close(reason)

    def next_event(self):
        """The next event, or NEED_DATA (feed more bytes) or PAUSED (answer first)."""
        if self._events:
            return self._events.popleft()
        if self.phase is Phase.CLOSED:
            return NEED_DATA
        if self._awaiting is not None:
            return PAUSED
        while True:
            if self.phase is Phase.DATA:
                ev = self._step_data()
            else:
                ev = self._step_command()
            if ev is NEED_DATA:
                if self._eof and self.phase is not Phase.CLOSED:
                    self._close("the client closed the connection")
                    return self._events.popleft()
                return NEED_DATA
            if ev is not None:
                return ev
            if self._events:
                return self._events.popleft()

    # -- the application's answers ---------------------------------------------------

    def answer_recipient(self, reply: Reply, info: Any = None) -> None:
        """Answer the pending RecipientRequested; a 2xx reply accepts the recipient."""
        ev = self._awaiting
        if not isinstance(ev, RecipientRequested):
            raise RuntimeError("no RCPT is waiting for an answer")
        self._awaiting = None
        if self.phase is Phase.CLOSED:
            return
        if reply.positive:
            assert self._txn is not None
            self._txn.recipients.append(Recipient(ev.address, info))
        self._out.append(reply.encode())

    def answer_message(self, replies: list[Reply]) -> None:
        """Answer the pending MessageReceived: one reply per recipient, in order."""
        ev = self._awaiting
        if not isinstance(ev, MessageReceived):
            raise RuntimeError("no message is waiting for an answer")
        if len(replies) != len(ev.recipients):
            raise ValueError(f"{len(ev.recipients)} recipients need {len(ev.recipients)} replies, got {len(replies)}")
        self._awaiting = None
        if self.phase is Phase.CLOSED:
            return
        self._out.extend(r.encode() for r in replies)

    # -- internals ------------------------------------------------------------------

    def _reply(self, code: int, status: str, text: str | tuple[str, ...]) -> None:
        self._out.append(Reply(code, status, text).encode())

    def _error(self, code: int, status: str, text: str) -> None:
        self._reply(code, status, text)
        self.errors += 1
        if self.errors >= self.max_errors:
            self._reply(421, "4.7.0", f"{self.hostname} too many errors, closing the connection")
            self._close("too many protocol errors")

    def _close(self, reason: str) -> None:
        self.phase = Phase.CLOSED
        self._txn = None
        self._in.clear()
        self._body.clear()
        self._closed_reason = reason
        self._events.append(ConnectionClosed(reason))

    def _step_command(self):
        buf = self._in
        nl = buf.find(b"\n")
        if self._skip_line:
            if nl < 0:
                buf.clear()
                return NEED_DATA
            del buf[:nl + 1]
            self._skip_line = False
            return None
        if nl < 0:
            if len(buf) > self.max_command_bytes:
                buf.clear()
                self._skip_line = True
                self._error(500, "5.5.2", f"command line too long (limit {self.max_command_bytes} octets)")
                return None
            return NEED_DATA
        raw = bytes(buf[:nl + 1])
        del buf[:nl + 1]
        if len(raw) > self.max_command_bytes:
            self._error(500, "5.5.2", f"command line too long (limit {self.max_command_bytes} octets)")
            return None
        if not raw.endswith(b"\r\n"):
            self._error(500, "5.5.2", "bare LF: command lines must end with CRLF")
            return None
        try:
            line = raw[:-2].decode("utf-8")
        except UnicodeDecodeError:
            self._error(500, "5.5.2", "command line is not valid UTF-8")
            return None
        if "\r" in line or "\0" in line:
            self._error(500, "5.5.2", "command line contains a bare CR or a NUL")
            return None
        return self._command(line)

    def _command(self, line: str):
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handler = _COMMANDS.get(verb)
        if handler is None:
            if verb in ("HELO", "EHLO"):
                self._error(500, "5.5.1", "this is an LMTP server: say LHLO (RFC 2033)")
            elif verb in ("BDAT", "STARTTLS", "AUTH", "ETRN", "TURN", "EXPN"):
                self._error(502, "5.5.1", f"{verb} is not implemented here")
            elif not verb:
                self._error(500, "5.5.2", "empty command line")
            else:
                self._error(500, "5.5.1", f"command {verb[:32]!r} not recognized")
            return None
        return handler(self, arg.strip(" "))

    def _lhlo(self, arg: str):
        if not arg:
            self._error(501, "5.5.4", "LHLO needs a host name: LHLO <domain>")
            return None
        self._txn = None
        self.phase = Phase.READY
        self._reply(250, "", (self.hostname, "PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME",
                              f"SIZE {self.max_message_bytes}"))
        return None

    def _mail(self, arg: str):
        if self.phase is Phase.GREETED:
            self._error(503, "5.5.1", "send LHLO first")
            return None
        if self.phase is not Phase.READY:
            self._error(503, "5.5.1", "nested MAIL command: a transaction is already open (RSET to start over)")
            return None
        if not arg.upper().startswith("FROM:"):
            self._error(501, "5.5.4", "syntax: MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME]")
            return None
        try:
            sender, rest = parse_path(arg[5:])
            params = _params(rest)
        except AddressError as exc:
            self._error(501, "5.1.7", f"bad sender address: {exc}")
            return None
        for key, value in params:
            if key == "SIZE":
                if value is None or not value.isdigit():
                    self._error(501, "5.5.4", "SIZE needs a number of octets")
                    return None
                if int(value) > self.max_message_bytes:
                    self._reply(552, "5.3.4", f"message size {value} exceeds the limit of {self.max_message_bytes} octets")
                    return None
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    self._error(555, "5.5.4", f"BODY={value} is not supported (7BIT or 8BITMIME)")
                    return None
            else:
                self._error(555, "5.5.4", f"MAIL parameter {key} is not supported")
                return None
        self._txn = _Transaction(sender)
        self.phase = Phase.MAIL
        self._reply(250, "2.1.0", "sender OK")
        return None

    def _rcpt(self, arg: str):
        if self.phase is not Phase.MAIL:
            self._error(503, "5.5.1", "send MAIL FROM first" if self.phase in (Phase.READY, Phase.GREETED)
                        else "bad sequence of commands")
            return None
        if not arg.upper().startswith("TO:"):
            self._error(501, "5.5.4", "syntax: RCPT TO:<address>")
            return None
        try:
            address, rest = parse_path(arg[3:], forward=True)
            params = _params(rest)
        except AddressError as exc:
            self._error(501, "5.1.3", f"bad recipient address: {exc}")
            return None
        if params:
            self._error(555, "5.5.4", f"RCPT parameter {params[0][0]} is not supported")
            return None
        assert self._txn is not None
        if len(self._txn.recipients) >= self.max_recipients:
            self._reply(452, "4.5.3", f"too many recipients (limit {self.max_recipients}); send the rest later")
            return None
        ev = RecipientRequested(address, params)
        self._awaiting = ev
        return ev

    def _data(self, arg: str):
        if arg:
            self._error(501, "5.5.4", "DATA takes no argument")
            return None
        if self.phase is not Phase.MAIL:
            self._error(503, "5.5.1", "send MAIL FROM and RCPT TO first")
            return None
        assert self._txn is not None
        if not self._txn.recipients:
            self._error(503, "5.5.1", "no valid recipients")
            return None
        self.phase = Phase.DATA
        self._body = bytearray(b"\r\n")
        self._scan = 0
        self._body_too_large = False
        self._discarded = 0
        self._reply(354, "", "start mail input; end with <CRLF>.<CRLF>")
        return None

    def _step_data(self):
        # Move input into the body and look for CRLF.CRLF from where the last
        # search stopped (minus the 4 octets a split terminator can span).
        if self._in:
            self._body += self._in
            self._in.clear()
        body = self._body
        end = body.find(_TERMINATOR, self._scan)
        if end < 0:
            if self._body_too_large or len(body) > self._body_raw_limit:
                # Keep only a tail long enough to spot a split terminator.
                self._body_too_large = True
                tail = bytes(body[-4:])
                self._discarded += len(body) - len(tail)
                self._body = bytearray(tail)
            self._scan = max(0, len(self._body) - 4)
            return NEED_DATA
        rest = body[end + 5:]
        raw = bytes(body[:end + 2])  # the leading CRLF + the message + its last CRLF
        self._body = bytearray()
        self._in[:0] = rest
        txn, self._txn = self._txn, None
        assert txn is not None
        self.phase = Phase.READY
        recipients = tuple(txn.recipients)
        if self._body_too_large:
            size = self._discarded + len(raw)
            self._discarded = 0
            return self._refuse(txn.sender, recipients, size,
                                Reply(552, "5.3.4", f"message exceeds the limit of {self.max_message_bytes} octets"))
        message = raw.replace(b"\r\n.", b"\r\n")[2:]
        if len(message) > self.max_message_bytes:
            return self._refuse(txn.sender, recipients, len(message),
                                Reply(552, "5.3.4", f"message of {len(message)} octets exceeds the limit of "
                                      f"{self.max_message_bytes} octets"))
        if message.count(b"\n") != message.count(b"\r\n"):
            return self._refuse(txn.sender, recipients, len(message),
                                Reply(554, "5.6.0", "message contains a bare LF (lines must end with CRLF); "
                                      "nothing was delivered"))
        ev = MessageReceived(txn.sender, recipients, message)
        self._awaiting = ev
        return ev

    def _refuse(self, sender: str, recipients: tuple[Recipient, ...], size: int, reply: Reply) -> MessageRefused:
        self._out.extend(reply.encode() for _ in recipients)
        return MessageRefused(sender, recipients, reply, size)

    def _rset(self, arg: str):
        self._txn = None
        if self.phase is Phase.MAIL:
            self.phase = Phase.READY
        self._reply(250, "2.0.0", "reset")
        return None

    def _noop(self, arg: str):
        self._reply(250, "2.0.0", "OK")
        return None

    def _vrfy(self, arg: str):
        if not arg:
            self._error(501, "5.5.4", "VRFY needs an argument")
            return None
        self._reply(252, "2.5.2", "cannot VRFY the user, but will accept the message and attempt delivery")
        return None

    def _help(self, arg: str):
        self._reply(214, "2.0.0", "commands: LHLO MAIL RCPT DATA RSET NOOP VRFY QUIT")
        return None

    def _quit(self, arg: str):
        self._reply(221, "2.0.0", f"{self.hostname} closing connection")
        self._close("QUIT")
        return None


_COMMANDS = {
    "LHLO": LmtpSession._lhlo,
    "MAIL": LmtpSession._mail,
    "RCPT": LmtpSession._rcpt,
    "DATA": LmtpSession._data,
    "RSET": LmtpSession._rset,
    "NOOP": LmtpSession._noop,
    "VRFY": LmtpSession._vrfy,
    "HELP": LmtpSession._help,
    "QUIT": LmtpSession._quit,
}
