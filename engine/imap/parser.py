"""IMAP command framing and grammar (pure: bytes in, command values out).

Theory of operation
-------------------
Two layers, both free of I/O:

* :class:`CommandReader` frames the byte stream into complete commands. A
  command is one or more CRLF-terminated lines; a line that ends in a
  literal announcement ``{n}`` (synchronising), ``{n+}`` (LITERAL+, RFC
  7888) or ``~{n}``/``~{n+}`` (literal8) is followed by exactly ``n`` octets
  and then by the rest of the command. :meth:`CommandReader.next_frame`
  returns :class:`Frame` (a complete command), :class:`LiteralRequest` (a
  synchronising literal the caller must accept with
  :meth:`CommandReader.accept_literal` -- the caller then sends ``+ ...`` --
  or refuse with :meth:`CommandReader.refuse_literal`),
  :class:`FramingError` (a line or literal over the limits: the caller
  answers it), or :data:`NEED_DATA`.
* :func:`parse_command` turns a :class:`Frame` into one of the frozen
  command values of ``engine/imap/commands.py``, or raises
  :class:`ParseError` carrying the tag (when one could be read) and a text
  for the ``BAD`` answer.

Invariants (IMAP-3, IMAP-4)
---------------------------
* Memory is bounded: at most ``max_line_bytes`` of an unterminated line,
  ``max_command_bytes`` of line text per command and ``max_literal_bytes``
  per accepted literal are ever buffered. A refused literal is never stored.
* The stream stays in sync after every error: an over-long line is skipped
  up to its LF; a refused non-synchronising literal is read and discarded,
  then the rest of its command is skipped the same way (further ``{n+}``
  literals discarded); a refused synchronising literal ends the command
  (the client does not send it after a tagged answer, RFC 9051 7.1).
* A line ends at LF; a CR before it is removed. Line text must be valid
  UTF-8 where it is parsed as a string.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import re
from dataclasses import dataclass

from .commands import (
    FETCH_MACROS,
    LIST_RETURN_OPTIONS,
    LIST_SELECTION_OPTIONS,
    MAX_MODSEQ,
    MAX_NUMBER,
    SEARCH_KEY_ARGS,
    SEARCH_RETURN_OPTIONS,
    SIMPLE_FETCH_ATTS,
    STATUS_ITEMS,
    Append,
    AppendMessage,
    Authenticate,
    Capability,
    Check,
    Close,
    Command,
    Copy,
    Create,
    Delete,
    Enable,
    Expunge,
    Fetch,
    FetchAtt,
    Id,
    Idle,
    ListCmd,
    Login,
    Logout,
    Lsub,
    Move,
    Namespace,
    Noop,
    QResync,
    Rename,
    Search,
    SearchKey,
    Section,
    Select,
    SequenceSet,
    StartTls,
    Status,
    Store,
    Subscribe,
    Unselect,
    Unsubscribe,
)

__all__ = [
    "CommandReader", "Frame", "LiteralRequest", "FramingError", "NEED_DATA", "ParseError", "parse_command",
    "parse_tag", "decode_sasl_response", "DEFAULT_MAX_LINE_BYTES", "DEFAULT_MAX_COMMAND_BYTES",
    "DEFAULT_MAX_LITERAL_BYTES", "KNOWN_COMMANDS",
]

DEFAULT_MAX_LINE_BYTES = 64 * 1024  # RFC 7162 4: servers SHOULD accept lines of at least 8192 octets
DEFAULT_MAX_COMMAND_BYTES = 256 * 1024  # line text of one command, literals not counted
DEFAULT_MAX_LITERAL_BYTES = 64 * 1024 * 1024
_LITERAL_AT_END = re.compile(rb"(~?)\{(\d{1,20})(\+?)\}$")
_LITERAL_TAIL_BYTES = 32  # enough of a skipped line's end to see its literal announcement


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")


@dataclass(frozen=True)
class Frame:
    """A complete command: ``lines[i]`` (i < len(literals)) ends with the announcement of ``literals[i]``."""

    lines: tuple[bytes, ...]
    literals: tuple[bytes, ...]

    @property
    def tag(self) -> str | None:
        return parse_tag(self.lines[0])


@dataclass(frozen=True)
class LiteralRequest:
    """A synchronising literal of ``size`` octets was announced: accept or refuse it."""

    tag: str | None
    size: int


@dataclass(frozen=True)
class FramingError:
    """A line or literal broke a limit; the reader already resynchronised.

    ``code`` is the response code for the answer (``TOOBIG`` or None), ``text``
    the human text; ``tag`` the command's tag when it could be read.
    """

    tag: str | None
    text: str
    code: str | None = None


class ParseError(Exception):
    """A command that does not parse: answer ``BAD`` (tag None means ``*``)."""

    def __init__(self, tag: str | None, text: str):
        super().__init__(text)
        self.tag = tag
        self.text = text


_TAG = re.compile(rb"^([\x21\x23\x24\x26\x27\x2C-\x5B\x5E-\x7A\x7C\x7E]+)(?: |$)")


def parse_tag(line: bytes) -> str | None:
    """The tag at the start of a command line, or None if there is no valid one."""
    m = _TAG.match(line)
    return m.group(1).decode("ascii") if m else None


class CommandReader:
    """Frames an IMAP client's byte stream into commands (see the module docstring)."""

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                 max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES,
                 max_literal_bytes: int = DEFAULT_MAX_LITERAL_BYTES):
        self.max_line_bytes = max_line_bytes
        self.max_command_bytes = max_command_bytes
        self.max_literal_bytes = max_literal_bytes
        self._buf = bytearray()
        self._scan = 0  # where to resume looking for LF
        self._lines: list[bytes] = []
        self._literals: list[bytes] = []
        self._line_bytes = 0
        self._literal_left = 0  # octets of the current literal still to come
        self._literal = bytearray()
        self._discard = False  # the current literal is being thrown away
        self._skip_line = False  # inside an over-long line: drop up to its LF
        self._skip_tail = b""  # the last bytes of the line being skipped
        self._skip_command = False  # the rest of the current command is thrown away
        self._pending: LiteralRequest | None = None
        self._tag: str | None = None

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Octets held (unparsed input plus the command so far): bounded by the limits."""
        return len(self._buf) + len(self._literal) + self._line_bytes + sum(len(x) for x in self._literals)

    @property
    def mid_command(self) -> bool:
        """True when part of a command has been read (so a line that comes next is not a new command)."""
        return bool(self._lines) or self._literal_left > 0 or self._skip_command or self._pending is not None

    def take_unread(self) -> bytes:
        """Remove and return every buffered byte not yet framed (STARTTLS drops them: IMAP-22)."""
        out = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return out

    def accept_literal(self) -> None:
        """Accept the pending synchronising literal (the caller sends the continuation request)."""
        req = self._pending
        if req is None:
            raise RuntimeError("no synchronising literal is pending")
        self._pending = None
        self._literal_left = req.size
        self._discard = False
        if req.size == 0:
            self._literals.append(b"")

    def refuse_literal(self) -> None:
        """Refuse the pending synchronising literal: the command ends here (the caller answers it)."""
        if self._pending is None:
            raise RuntimeError("no synchronising literal is pending")
        self._pending = None
        self._reset()

    def _reset(self) -> None:
        self._lines = []
        self._literals = []
        self._line_bytes = 0
        self._skip_command = False
        self._tag = None

    def next_frame(self):
        """The next :class:`Frame`, :class:`LiteralRequest`, :class:`FramingError`, or NEED_DATA."""
        if self._pending is not None:
            return NEED_DATA
        while True:
            if self._literal_left:
                take = min(self._literal_left, len(self._buf))
                if not take:
                    return NEED_DATA
                if not self._discard:
                    self._literal += self._buf[:take]
                del self._buf[:take]
                self._literal_left -= take
                if self._literal_left:
                    return NEED_DATA
                if not self._discard:
                    self._literals.append(bytes(self._literal))
                self._literal = bytearray()
                self._scan = 0
                continue
            nl = self._buf.find(b"\n", self._scan)
            if self._skip_line:
                if nl < 0:
                    self._skip_tail = (self._skip_tail + bytes(self._buf[-_LITERAL_TAIL_BYTES:]))[-_LITERAL_TAIL_BYTES:]
                    self._buf.clear()
                    self._scan = 0
                    return NEED_DATA
                tail = (self._skip_tail + bytes(self._buf[max(0, nl - _LITERAL_TAIL_BYTES):nl]))
                del self._buf[:nl + 1]
                self._scan = 0
                self._skip_line = False
                self._skip_tail = b""
                self._after_skipped_line(tail.rstrip(b"\r"))
                continue
            if nl < 0:
                self._scan = len(self._buf)
                if len(self._buf) > self.max_line_bytes:
                    tag = self._tag if self._lines else parse_tag(bytes(self._buf[:100]))
                    self._skip_tail = bytes(self._buf[-_LITERAL_TAIL_BYTES:])
                    self._buf.clear()
                    self._scan = 0
                    self._skip_line = True
                    self._skip_command = True
                    self._lines = []
                    self._literals = []
                    self._line_bytes = 0
                    return FramingError(tag, f"command line too long (limit {self.max_line_bytes} octets)")
                return NEED_DATA
            line = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            self._scan = 0
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.max_line_bytes and not self._skip_command:
                tag = self._tag if self._lines else parse_tag(line[:100])
                self._reset()
                self._after_skipped_line(line[-_LITERAL_TAIL_BYTES:])
                return FramingError(tag, f"command line too long (limit {self.max_line_bytes} octets)")
            if self._skip_command:
                self._after_skipped_line(line)
                continue
            if not self._lines:
                if not line.strip():
                    continue  # empty lines between commands are ignored
                self._tag = parse_tag(line)
            self._line_bytes += len(line)
            if self._line_bytes > self.max_command_bytes:
                tag = self._tag
                self._reset()
                self._skip_command = True
                self._after_skipped_line(line)
                return FramingError(tag, f"command too long (limit {self.max_command_bytes} octets of text)")
            m = _LITERAL_AT_END.search(line)
            if m is None:
                self._lines.append(line)
                frame = Frame(tuple(self._lines), tuple(self._literals))
                self._reset()
                return frame
            self._lines.append(line)
            size = int(m.group(2))
            sync = not m.group(3)
            if size > self.max_literal_bytes:
                tag = self._tag
                err = FramingError(tag, f"literal of {size} octets is over the limit of {self.max_literal_bytes}",
                                   "TOOBIG")
                self._reset()
                if not sync:  # LITERAL+: the octets come anyway; read and drop them, then the rest
                    self._skip_command = True
                    self._literal_left = size
                    self._discard = True
                return err
            if sync:
                self._pending = LiteralRequest(self._tag, size)
                return self._pending
            self._literal_left = size
            self._discard = False
            if size == 0:
                self._literals.append(b"")

    def _after_skipped_line(self, line: bytes) -> None:
        """A line of a command being skipped ended: follow its non-synchronising literal, if any."""
        m = _LITERAL_AT_END.search(line)
        if m is not None and m.group(3):
            self._skip_command = True
            self._literal_left = int(m.group(2))
            self._discard = True
        else:
            self._skip_command = False  # the command ended (or waits for a '+' we never send)


def decode_sasl_response(line: bytes) -> bytes | None:
    """An AUTHENTICATE continuation line: base64 -> bytes; ``*`` (cancel) -> None; '=' is empty."""
    text = line.strip()
    if text == b"*":
        return None
    if text == b"=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError(None, "the SASL response is not valid base64") from None


# -- the grammar ----------------------------------------------------------------------

_ATOM_SPECIALS = set(b'(){ %*"\\]') | set(range(0x00, 0x20)) | {0x7F}
_ASTRING_SPECIALS = _ATOM_SPECIALS - {ord("]")}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {m.upper(): i + 1 for i, m in enumerate(_MONTHS)}


class _Cursor:
    """Walks a Frame: text positions in its lines, literals where lines announce them."""

    def __init__(self, frame: Frame, tag: str | None):
        self.lines = frame.lines
        self.literals = frame.literals
        self.i = 0  # line index
        self.pos = 0
        self.tag = tag

    def fail(self, text: str):
        raise ParseError(self.tag, text)

    @property
    def line(self) -> bytes:
        return self.lines[self.i]

    def peek(self) -> int | None:
        line = self.line
        return line[self.pos] if self.pos < len(line) else None

    def at_end(self) -> bool:
        return self.i == len(self.lines) - 1 and self.pos >= len(self.line)

    def expect_end(self) -> None:
        if not self.at_end():
            rest = self.line[self.pos:self.pos + 40].decode("utf-8", "replace")
            self.fail(f"unexpected text at the end of the command: {rest!r}")

    def sp(self) -> None:
        if self.peek() != 0x20:
            self.fail("expected a space" if not self.at_end() else "missing arguments")
        self.pos += 1

    def maybe_sp(self) -> bool:
        if self.peek() == 0x20:
            self.pos += 1
            return True
        return False

    def char(self, c: bytes) -> None:
        if self.peek() != c[0]:
            self.fail(f"expected {c.decode()!r}")
        self.pos += 1

    def maybe_char(self, c: bytes) -> bool:
        if self.peek() == c[0]:
            self.pos += 1
            return True
        return False

    def _run(self, specials) -> bytes:
        line, start = self.line, self.pos
        end = start
        n = len(line)
        while end < n and line[end] not in specials:
            end += 1
        self.pos = end
        return line[start:end]

    def atom(self, what: str = "an atom") -> str:
        raw = self._run(_ATOM_SPECIALS)
        if not raw:
            self.fail(f"expected {what}")
        if any(b >= 0x80 for b in raw):
            self.fail(f"{what} must be ASCII")
        return raw.decode("ascii")

    def _literal_here(self) -> bytes | None:
        m = _LITERAL_AT_END.match(self.line, self.pos)
        if m is None or m.end() != len(self.line):
            return None
        if self.i >= len(self.literals):
            self.fail("literal without data")
        data = self.literals[self.i]
        self.i += 1
        self.pos = 0
        return data

    def string_bytes(self) -> bytes:
        """``string`` (quoted or literal) as raw octets."""
        if self.peek() == 0x22:
            return self._quoted()
        if self.peek() in (0x7B, 0x7E):
            data = self._literal_here()
            if data is None:
                self.fail("malformed literal")
            return data
        self.fail("expected a string")

    def _quoted(self) -> bytes:
        line = self.line
        self.pos += 1
        out = bytearray()
        while True:
            if self.pos >= len(line):
                self.fail("unterminated quoted string")
            b = line[self.pos]
            if b == 0x22:
                self.pos += 1
                return bytes(out)
            if b == 0x5C:
                self.pos += 1
                if self.pos >= len(line) or line[self.pos] not in (0x22, 0x5C):
                    self.fail("only \\\" and \\\\ may be escaped in a quoted string")
                b = line[self.pos]
            elif b in (0x0D, 0x0A, 0x00):
                self.fail("a quoted string cannot hold CR, LF or NUL")
            out.append(b)
            self.pos += 1

    def astring_bytes(self) -> bytes:
        b = self.peek()
        if b in (0x22, 0x7B, 0x7E):
            return self.string_bytes()
        raw = self._run(_ASTRING_SPECIALS)
        if not raw:
            self.fail("expected a string or an atom")
        return raw

    @staticmethod
    def _text(raw: bytes, cursor: "_Cursor", what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            cursor.fail(f"{what} is not valid UTF-8")

    def astring(self, what: str = "a string") -> str:
        return self._text(self.astring_bytes(), self, what)

    def string(self, what: str = "a string") -> str:
        return self._text(self.string_bytes(), self, what)

    def nstring(self) -> str | None:
        if self.line[self.pos:self.pos + 3].upper() == b"NIL" and not self._more_atom(3):
            self.pos += 3
            return None
        return self.string()

    def _more_atom(self, k: int) -> bool:
        nxt = self.line[self.pos + k:self.pos + k + 1]
        return bool(nxt) and nxt[0] not in _ATOM_SPECIALS

    def mailbox(self) -> str:
        return self.astring("the mailbox name")

    def list_mailbox(self) -> str:
        """``list-mailbox``: an atom that may hold % * ] or a string."""
        b = self.peek()
        if b in (0x22, 0x7B, 0x7E):
            return self.string("the pattern")
        raw = self._run(_ASTRING_SPECIALS - {ord("%"), ord("*")})
        if not raw:
            self.fail("expected a mailbox pattern")
        return self._text(raw, self, "the pattern")

    def number(self, what: str = "a number", high: int = MAX_NUMBER, low: int = 0) -> int:
        raw = self._run(set(range(256)) - set(b"0123456789"))
        if not raw:
            self.fail(f"expected {what}")
        if len(raw) > 20 or not low <= int(raw) <= high:
            self.fail(f"{what} is out of range")
        return int(raw)

    def nz_number(self, what: str = "a number") -> int:
        return self.number(what, low=1)

    def word(self) -> str:
        """An upper-cased keyword (atom)."""
        return self.atom("a keyword").upper()

    def paren_list(self, item, *, allow_empty: bool = True) -> list:
        self.char(b"(")
        out = []
        if self.maybe_char(b")"):
            if not allow_empty:
                self.fail("empty list")
            return out
        while True:
            out.append(item())
            if self.maybe_char(b")"):
                return out
            self.sp()

    def seq_set(self) -> SequenceSet:
        ranges = []
        while True:
            lo = self._seq_number()
            hi = lo
            if self.maybe_char(b":"):
                hi = self._seq_number()
            ranges.append((lo, hi))
            if not self.maybe_char(b","):
                break
        return SequenceSet(tuple(ranges))

    def _seq_number(self) -> int | None:
        if self.maybe_char(b"*"):
            return None
        return self.nz_number("a sequence number or UID")

    def flag(self) -> str:
        if self.maybe_char(b"\\"):
            if self.maybe_char(b"*"):
                return "\\*"
            return "\\" + self.atom("a flag name")
        return self.atom("a flag keyword")

    def flag_list(self) -> tuple[str, ...]:
        return tuple(self.paren_list(self.flag))

    def date(self) -> _dt.date:
        """``date``: d-Mon-yyyy, optionally quoted."""
        quoted = self.maybe_char(b'"')
        raw = self._run(set(b' ")'))
        if quoted:
            self.char(b'"')
        m = re.fullmatch(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})", raw)
        if not m or m.group(2).decode().upper() not in _MONTH_NUMBER:
            self.fail(f"malformed date {raw[:20]!r} (expected d-Mon-yyyy)")
        try:
            return _dt.date(int(m.group(3)), _MONTH_NUMBER[m.group(2).decode().upper()], int(m.group(1)))
        except ValueError:
            self.fail("no such date")

    def date_time(self) -> _dt.datetime:
        """``date-time``: "dd-Mon-yyyy hh:mm:ss +zzzz" (a quoted string)."""
        raw = self._quoted() if self.peek() == 0x22 else self.fail("expected a quoted date-time")
        m = re.fullmatch(rb"([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)", raw)
        if not m or m.group(2).decode().upper() not in _MONTH_NUMBER:
            self.fail("malformed date-time (expected \"dd-Mon-yyyy hh:mm:ss +zzzz\")")
        sign = 1 if m.group(7) == b"+" else -1
        try:
            zone = _dt.timezone(sign * _dt.timedelta(hours=int(m.group(8)), minutes=int(m.group(9))))
            return _dt.datetime(int(m.group(3)), _MONTH_NUMBER[m.group(2).decode().upper()], int(m.group(1)),
                                int(m.group(4)), int(m.group(5)), int(m.group(6)), tzinfo=zone)
        except ValueError:
            self.fail("no such date-time")


# -- per-command argument parsers --------------------------------------------------------


def _no_args(cls):
    def parse(c: _Cursor, tag: str, uid: bool):
        c.expect_end()
        return cls(tag)
    return parse


def _login(c, tag, uid):
    c.sp()
    user = c.astring("the user name")
    c.sp()
    password = c.astring("the password")
    c.expect_end()
    return Login(tag, user, password)


def _authenticate(c, tag, uid):
    c.sp()
    mech = c.atom("a SASL mechanism").upper()
    response = None
    initial = False
    if c.maybe_sp():
        raw = c._run({0x20})
        c.expect_end()
        initial = True
        if mech != "PLAIN":  # answered NO by the session: no need to decode
            return Authenticate(tag, mech, b"")
        try:
            response = decode_sasl_response(raw)
        except ParseError as exc:
            c.fail(exc.text)
        if response is None:
            c.fail("'*' cancels an exchange; it is not an initial response")
    else:
        c.expect_end()
    cmd = Authenticate(tag, mech, response)
    return cmd if initial else _NeedSasl(cmd)


@dataclass(frozen=True)
class _NeedSasl:
    """AUTHENTICATE without an initial response: the session asks for it with ``+``."""

    command: Authenticate


def _enable(c, tag, uid):
    caps = []
    while c.maybe_sp():
        caps.append(c.atom("a capability").upper())
    c.expect_end()
    if not caps:
        c.fail("ENABLE needs at least one capability")
    return Enable(tag, tuple(caps))


def _id(c, tag, uid):
    c.sp()
    if c.line[c.pos:c.pos + 3].upper() == b"NIL":
        c.pos += 3
        c.expect_end()
        return Id(tag, None)
    items = c.paren_list(lambda: _pair_from(c))
    c.expect_end()
    if len(items) > 30:
        c.fail("ID takes at most 30 field-value pairs (RFC 2971 3.3)")
    return Id(tag, tuple(items))


def _pair_from(c: _Cursor):
    key = c.string("an ID field name")
    c.sp()
    return key, c.nstring()


def _list(c, tag, uid):
    c.sp()
    selection: list[str] = []
    if c.peek() == 0x28:
        selection = [x.upper() for x in c.paren_list(lambda: c.atom("a selection option"))]
        for opt in selection:
            if opt not in LIST_SELECTION_OPTIONS:
                c.fail(f"unknown LIST selection option {opt}")
        c.sp()
    reference = c.mailbox()
    c.sp()
    if c.peek() == 0x28:
        patterns = c.paren_list(c.list_mailbox, allow_empty=False)
    else:
        patterns = [c.list_mailbox()]
    returns: list[str] = []
    status_items: list[str] = []
    if c.maybe_sp():
        if c.word() != "RETURN":
            c.fail("expected RETURN (...)")
        c.sp()

        def ret():
            opt = c.atom("a return option").upper()
            if opt not in LIST_RETURN_OPTIONS:
                c.fail(f"unknown LIST return option {opt}")
            if opt == "STATUS":
                c.sp()
                status_items.extend(_status_items(c))
            return opt
        returns = c.paren_list(ret)
    c.expect_end()
    return ListCmd(tag, reference, tuple(patterns), tuple(dict.fromkeys(selection)), tuple(dict.fromkeys(returns)),
                   tuple(dict.fromkeys(status_items)))


def _lsub(c, tag, uid):
    c.sp()
    reference = c.mailbox()
    c.sp()
    pattern = c.list_mailbox()
    c.expect_end()
    return Lsub(tag, reference, pattern)


def _mailbox_only(cls):
    def parse(c, tag, uid):
        c.sp()
        name = c.mailbox()
        c.expect_end()
        return cls(tag, name)
    return parse


def _create(c, tag, uid):
    c.sp()
    name = c.mailbox()
    use: list[str] = []
    if c.maybe_sp():
        c.char(b"(")
        if c.word() != "USE":
            c.fail("CREATE takes only (USE (...)) (RFC 6154)")
        c.sp()
        use = c.paren_list(c.flag, allow_empty=False)
        c.char(b")")
    c.expect_end()
    return Create(tag, name, tuple(use))


def _status_items(c):
    items = [x.upper() for x in c.paren_list(lambda: c.atom("a STATUS item"), allow_empty=False)]
    for item in items:
        if item not in STATUS_ITEMS:
            c.fail(f"unknown STATUS item {item}")
    return items


def _status(c, tag, uid):
    c.sp()
    name = c.mailbox()
    c.sp()
    items = _status_items(c)
    c.expect_end()
    return Status(tag, name, tuple(dict.fromkeys(items)))


def _rename(c, tag, uid):
    c.sp()
    old = c.mailbox()
    c.sp()
    new = c.mailbox()
    c.expect_end()
    return Rename(tag, old, new)


def _select(read_only: bool):
    def parse(c, tag, uid):
        c.sp()
        name = c.mailbox()
        condstore = False
        qresync = None
        if c.maybe_sp():
            c.char(b"(")
            while True:
                word = c.word()
                if word == "CONDSTORE":
                    condstore = True
                elif word == "QRESYNC":
                    c.sp()
                    qresync = _qresync(c)
                else:
                    c.fail(f"unknown SELECT parameter {word}")
                if c.maybe_char(b")"):
                    break
                c.sp()
        c.expect_end()
        return Select(tag, name, read_only, condstore, qresync)
    return parse


def _qresync(c: _Cursor) -> QResync:
    c.char(b"(")
    uidvalidity = c.nz_number("UIDVALIDITY")
    c.sp()
    modseq = c.number("a MODSEQ", MAX_MODSEQ, 1)
    known = None
    match = None
    if c.maybe_sp():
        if c.peek() != 0x28:
            known = c.seq_set()
            if known.has_star:
                c.fail("known UIDs cannot contain '*'")
            c.maybe_sp()
        if c.peek() == 0x28:
            c.char(b"(")
            seqs = c.seq_set()
            c.sp()
            uids = c.seq_set()
            c.char(b")")
            match = (seqs, uids)
    c.char(b")")
    return QResync(uidvalidity, modseq, known, match)


def _expunge(c, tag, uid):
    if uid:
        c.sp()
        uids = c.seq_set()
        c.expect_end()
        return Expunge(tag, uids)
    c.expect_end()
    return Expunge(tag)


def _fetch_att(c: _Cursor) -> list[FetchAtt]:
    word = c._run(set(b' ()[<')).decode("ascii", "replace").upper()
    if word in FETCH_MACROS:
        return [FetchAtt(n) for n in FETCH_MACROS[word]]
    if word in ("BODY", "BODY.PEEK", "BINARY", "BINARY.PEEK", "BINARY.SIZE"):
        if c.peek() != 0x5B:
            if word == "BODY":
                return [FetchAtt("BODY")]
            c.fail(f"{word} needs a section: {word}[...]")
        section = _section(c, binary=word.startswith("BINARY"))
        partial = None
        if c.maybe_char(b"<"):
            origin = c.number("a partial origin")
            c.char(b".")
            length = c.nz_number("a partial length")
            c.char(b">")
            partial = (origin, length)
        name = "BODY[]" if word.startswith("BODY") else ("BINARY.SIZE" if word == "BINARY.SIZE" else "BINARY")
        if name == "BINARY.SIZE" and partial is not None:
            c.fail("BINARY.SIZE takes no partial range")
        return [FetchAtt(name, section, partial, word.endswith(".PEEK"))]
    if word in SIMPLE_FETCH_ATTS:
        return [FetchAtt(word)]
    c.fail(f"unknown FETCH attribute {word[:40]!r}" if word else "expected a FETCH attribute")


def _section(c: _Cursor, binary: bool) -> Section:
    c.char(b"[")
    part: list[int] = []
    text = None
    fields: tuple[str, ...] = ()
    if not c.maybe_char(b"]"):
        while c.peek() is not None and 0x30 <= c.peek() <= 0x39:
            part.append(c.nz_number("a part number"))
            if not c.maybe_char(b"."):
                break
        if c.peek() != 0x5D:
            if binary:
                c.fail("a BINARY section is a part number")
            word = c._run(set(b' ]')).decode("ascii", "replace").upper()
            if word not in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"):
                c.fail(f"unknown section {word[:40]!r}")
            if word == "MIME" and not part:
                c.fail("MIME needs a part number")
            text = word
            if word.startswith("HEADER.FIELDS"):
                c.sp()
                fields = tuple(x.upper() for x in
                               c.paren_list(lambda: c.astring("a header field name"), allow_empty=False))
        c.char(b"]")
    return Section(tuple(part), text, fields)


def _fetch(c, tag, uid):
    c.sp()
    seq = c.seq_set()
    c.sp()
    atts: list[FetchAtt] = []
    if c.peek() == 0x28:
        for group in c.paren_list(lambda: _fetch_att(c), allow_empty=False):
            atts.extend(group)
    else:
        atts = _fetch_att(c)
    changed_since = None
    vanished = False
    if c.maybe_sp():
        c.char(b"(")
        while True:
            word = c.word()
            if word == "CHANGEDSINCE":
                c.sp()
                changed_since = c.number("a MODSEQ", MAX_MODSEQ)
            elif word == "VANISHED":
                vanished = True
            else:
                c.fail(f"unknown FETCH modifier {word}")
            if c.maybe_char(b")"):
                break
            c.sp()
        if vanished and (not uid or changed_since is None):
            c.fail("VANISHED needs UID FETCH with CHANGEDSINCE")
    c.expect_end()
    if uid and not any(a.name == "UID" for a in atts):
        atts.insert(0, FetchAtt("UID"))  # RFC 9051 6.4.9: UID FETCH always answers UID
    return Fetch(tag, uid, seq, tuple(dict.fromkeys(atts)), changed_since, vanished)


def _store(c, tag, uid):
    c.sp()
    seq = c.seq_set()
    c.sp()
    unchanged = None
    if c.peek() == 0x28:
        c.char(b"(")
        if c.word() != "UNCHANGEDSINCE":
            c.fail("STORE takes only (UNCHANGEDSINCE n)")
        c.sp()
        unchanged = c.number("a MODSEQ", MAX_MODSEQ)
        c.char(b")")
        c.sp()
    mode = ""
    if c.peek() in (0x2B, 0x2D):
        mode = chr(c.peek())
        c.pos += 1
    word = c.atom("FLAGS").upper()
    silent = word == "FLAGS.SILENT"
    if word not in ("FLAGS", "FLAGS.SILENT"):
        c.fail("STORE needs FLAGS, +FLAGS or -FLAGS (optionally .SILENT)")
    c.sp()
    if c.peek() == 0x28:
        flags = c.flag_list()
    else:
        flags = [c.flag()]
        while c.maybe_sp():
            flags.append(c.flag())
    c.expect_end()
    if "\\*" in flags:
        c.fail("\\* is not a flag")
    return Store(tag, uid, seq, mode, silent, tuple(flags), unchanged)


def _search(c, tag, uid):
    returns = None
    charset = None
    c.sp()
    if c.line[c.pos:c.pos + 6].upper() == b"RETURN":
        c.pos += 6
        c.sp()
        returns = tuple(x.upper() for x in c.paren_list(lambda: c.atom("a return option")))
        for opt in returns:
            if opt not in SEARCH_RETURN_OPTIONS:
                c.fail(f"unknown SEARCH return option {opt}")
        c.sp()
    if c.line[c.pos:c.pos + 8].upper() == b"CHARSET ":
        c.pos += 8
        charset = c.astring("the charset").upper()
        if charset not in ("UTF-8", "US-ASCII"):
            raise _BadCharset(tag, charset)
        c.sp()
    keys = [_search_key(c, 0)]
    while c.maybe_sp():
        keys.append(_search_key(c, 0))
    c.expect_end()
    key = keys[0] if len(keys) == 1 else SearchKey("AND", tuple(keys))
    return Search(tag, uid, key, charset, returns)


class _BadCharset(ParseError):
    """SEARCH CHARSET we do not support: answered NO [BADCHARSET (UTF-8 US-ASCII)]."""

    def __init__(self, tag, charset):
        super().__init__(tag, f"charset {charset} is not supported")


_MAX_SEARCH_DEPTH = 32


def _search_key(c: _Cursor, depth: int) -> SearchKey:
    if depth > _MAX_SEARCH_DEPTH:
        c.fail("search keys nested too deeply")
    b = c.peek()
    if b == 0x28:
        keys = c.paren_list(lambda: _search_key_seq(c, depth + 1), allow_empty=False)
        flat = [k for group in keys for k in group]
        return flat[0] if len(flat) == 1 else SearchKey("AND", tuple(flat))
    if b is not None and (0x30 <= b <= 0x39 or b == 0x2A):
        return SearchKey("SEQ", c.seq_set())
    word = c.atom("a search key").upper()
    kind = SEARCH_KEY_ARGS.get(word)
    if word not in SEARCH_KEY_ARGS or word in ("SEQ", "AND"):
        c.fail(f"unknown search key {word[:40]!r}")
    if kind is None:
        return SearchKey(word)
    c.sp()
    if kind == "flag":
        return SearchKey(word, c.flag())
    if kind == "string":
        return SearchKey(word, c.astring("a search string"))
    if kind == "header":
        name = c.astring("a header field name")
        c.sp()
        return SearchKey(word, (name, c.astring("a search string")))
    if kind == "date":
        return SearchKey(word, c.date())
    if kind == "number":
        return SearchKey(word, c.number())
    if kind == "set":
        return SearchKey(word, c.seq_set())
    if kind == "key":
        return SearchKey(word, _search_key(c, depth + 1))
    if kind == "keys2":
        a = _search_key(c, depth + 1)
        c.sp()
        return SearchKey(word, (a, _search_key(c, depth + 1)))
    if kind == "modseq":
        # MODSEQ [entry-name entry-type-req] mod-sequence-valzer (RFC 7162 3.1.5)
        if c.peek() == 0x22:
            c.string("an entry name")
            c.sp()
            entry_type = c.atom("an entry type").lower()
            if entry_type not in ("priv", "shared", "all"):
                c.fail("the entry type is priv, shared or all")
            c.sp()
        return SearchKey(word, c.number("a MODSEQ", MAX_MODSEQ))
    c.fail(f"unknown search key {word}")  # pragma: no cover - SEARCH_KEY_ARGS covers every kind


def _search_key_seq(c: _Cursor, depth: int) -> list[SearchKey]:
    return [_search_key(c, depth)]


def _append(c, tag, uid):
    c.sp()
    name = c.mailbox()
    messages = []
    while c.maybe_sp():
        flags: tuple[str, ...] = ()
        date = None
        if c.peek() == 0x28:
            flags = c.flag_list()
            if "\\*" in flags:
                c.fail("\\* is not a flag")
            c.sp()
        if c.peek() == 0x22:
            date = c.date_time()
            c.sp()
        if c.peek() == 0x7E:
            c.fail("APPEND of literal8 (BINARY) is not supported; send the message as a literal")
        if c.peek() != 0x7B:
            c.fail("expected the message as a literal")
        data = c.string_bytes()
        messages.append(AppendMessage(data, flags, date))
    c.expect_end()
    if not messages:
        c.fail("APPEND needs a message literal")
    return Append(tag, name, tuple(messages))


def _copy_move(cls):
    def parse(c, tag, uid):
        c.sp()
        seq = c.seq_set()
        c.sp()
        name = c.mailbox()
        c.expect_end()
        return cls(tag, name, uid, seq)
    return parse


_PARSERS = {
    "CAPABILITY": _no_args(Capability),
    "NOOP": _no_args(Noop),
    "CHECK": _no_args(Check),
    "LOGOUT": _no_args(Logout),
    "STARTTLS": _no_args(StartTls),
    "AUTHENTICATE": _authenticate,
    "LOGIN": _login,
    "ENABLE": _enable,
    "ID": _id,
    "NAMESPACE": _no_args(Namespace),
    "LIST": _list,
    "LSUB": _lsub,
    "SUBSCRIBE": _mailbox_only(Subscribe),
    "UNSUBSCRIBE": _mailbox_only(Unsubscribe),
    "STATUS": _status,
    "CREATE": _create,
    "DELETE": _mailbox_only(Delete),
    "RENAME": _rename,
    "SELECT": _select(False),
    "EXAMINE": _select(True),
    "CLOSE": _no_args(Close),
    "UNSELECT": _no_args(Unselect),
    "EXPUNGE": _expunge,
    "FETCH": _fetch,
    "STORE": _store,
    "SEARCH": _search,
    "APPEND": _append,
    "COPY": _copy_move(Copy),
    "MOVE": _copy_move(Move),
    "IDLE": _no_args(Idle),
}
_UID_COMMANDS = ("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE")
KNOWN_COMMANDS = tuple(_PARSERS)


def parse_command(frame: Frame):
    """Parse a complete command.

    Returns:
        A :class:`~engine.imap.commands.Command`, or, for AUTHENTICATE
        without an initial response, a ``_NeedSasl`` wrapper (the session
        asks for the response with ``+``).
    Raises:
        ParseError: the command is malformed or unknown (answer ``BAD``; the
            error's ``tag`` is None when no tag could be read).
    """
    line = frame.lines[0]
    tag = parse_tag(line)
    if tag is None:
        raise ParseError(None, "the line does not start with a valid tag")
    c = _Cursor(frame, tag)
    c.pos = len(tag)
    if not c.maybe_sp():
        c.fail("missing command")
    name = c._run(_ATOM_SPECIALS).decode("ascii", "replace").upper()
    uid = False
    if name == "UID":
        c.sp()
        name = c._run(_ATOM_SPECIALS).decode("ascii", "replace").upper()
        if name not in _UID_COMMANDS:
            c.fail(f"UID {name[:40]} is not a command (UID goes with {', '.join(_UID_COMMANDS)})")
        uid = True
    parser = _PARSERS.get(name)
    if parser is None:
        c.fail(f"unknown command {name[:40]!r}" if name else "missing command")
    try:
        return parser(c, tag, uid)
    except ValueError as exc:  # a command value refused its own fields
        if isinstance(exc, ParseError):
            raise
        raise ParseError(tag, str(exc)) from None
