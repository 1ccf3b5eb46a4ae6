"""The IMAP connection state machine (pure: bytes in, commands out; responses in, bytes out).

Theory of operation
-------------------
:class:`ImapConnection` never touches a socket, a clock or the mail store.
The transport (``engine/imap/server.py``) feeds it bytes with
:meth:`~ImapConnection.receive_data` (``b""`` means end of input), calls
:meth:`~ImapConnection.next_event` until it returns :data:`NEED_DATA` or
:data:`PAUSED`, hands each command to the application (the executor), gives
every response the application produces to :meth:`~ImapConnection.send`,
and writes :meth:`~ImapConnection.data_to_send` to the peer.

The connection answers on its own everything that needs no mail store:
framing errors (``BAD``, ``NO [TOOBIG]``), commands that do not parse
(``BAD``), commands not allowed in the current state (``BAD``, from the one
table :data:`COMMAND_STATES`), CAPABILITY, LOGOUT, LOGIN/AUTHENTICATE while
LOGINDISABLED, STARTTLS where it is not offered, the ``+`` that accepts a
synchronising literal, and the ``+`` that asks for an AUTHENTICATE response.

Every other command is handed out as an event (the command value itself),
after which the connection is *paused* (it ignores pipelined input) until
the application sends the tagged status for that command. The tagged status
moves the state by the one table :data:`TRANSITIONS` (state, command,
status) -> state. IDLE is handed out too; the application answers with a
:class:`~engine.imap.responses.Continuation`, may then send untagged
updates at any time, and gets :class:`IdleDone` when the client sends
``DONE``; it then sends the tagged OK. STARTTLS, once answered ``OK``,
discards any input that arrived with it (no plaintext command injection)
and waits for :meth:`~ImapConnection.tls_started`.

Errors are split by fault: a client's error is answered and the session
goes on (after ``max_errors`` of them it says ``* BYE`` and closes); the
application misusing the machine (a tagged status for a command that is not
pending, a response after close) raises :class:`LocalProtocolError` and puts
the connection in the sticky ``ERROR`` state, where every later call raises
it again.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass

from .commands import Authenticate, Capability, Command, Idle, Login, Logout, Select, StartTls
from .parser import (
    DEFAULT_MAX_COMMAND_BYTES,
    DEFAULT_MAX_LINE_BYTES,
    DEFAULT_MAX_LITERAL_BYTES,
    KNOWN_COMMANDS,
    CommandReader,
    Frame,
    FramingError,
    LiteralRequest,
    ParseError,
    _BadCharset,
    _NeedSasl,
    decode_sasl_response,
    parse_command,
)
from .parser import NEED_DATA as _READER_NEED_DATA
from .responses import CapabilityData, Code, Continuation, Response, Status

__all__ = [
    "ImapConnection", "State", "IdleDone", "ConnectionClosed", "NEED_DATA", "PAUSED", "COMMAND_STATES",
    "TRANSITIONS", "LocalProtocolError", "BASE_CAPABILITIES", "DEFAULT_MAX_ERRORS",
    "NOT_AUTHENTICATED_MAX_LITERAL_BYTES", "state_table_markdown",
]

DEFAULT_MAX_ERRORS = 50
NOT_AUTHENTICATED_MAX_LITERAL_BYTES = 8192  # a user name or password; nothing bigger before login


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes with receive_data()
PAUSED = _Sentinel("PAUSED")  # answer the pending command first


class State(enum.Enum):
    """RFC 9051 3: the connection's state."""

    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"
    ERROR = "error"  # the application misused the machine; sticky


_NA, _AU, _SE = State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED
_ANY = frozenset({_NA, _AU, _SE})
_AUTHED = frozenset({_AU, _SE})

# IMAP-2: the one table of which command is allowed in which state (RFC 9051 6.1-6.4).
COMMAND_STATES: dict[str, frozenset[State]] = {
    "CAPABILITY": _ANY, "NOOP": _ANY, "LOGOUT": _ANY, "ID": _ANY,
    "STARTTLS": frozenset({_NA}), "AUTHENTICATE": frozenset({_NA}), "LOGIN": frozenset({_NA}),
    "ENABLE": frozenset({_AU}),
    "SELECT": _AUTHED, "EXAMINE": _AUTHED, "CREATE": _AUTHED, "DELETE": _AUTHED, "RENAME": _AUTHED,
    "SUBSCRIBE": _AUTHED, "UNSUBSCRIBE": _AUTHED, "LIST": _AUTHED, "LSUB": _AUTHED, "NAMESPACE": _AUTHED,
    "STATUS": _AUTHED, "APPEND": _AUTHED, "IDLE": _AUTHED,
    "CHECK": frozenset({_SE}), "CLOSE": frozenset({_SE}), "UNSELECT": frozenset({_SE}),
    "EXPUNGE": frozenset({_SE}), "SEARCH": frozenset({_SE}), "FETCH": frozenset({_SE}),
    "STORE": frozenset({_SE}), "COPY": frozenset({_SE}), "MOVE": frozenset({_SE}),
}
assert set(COMMAND_STATES) == set(KNOWN_COMMANDS), "every parsed command has a row in the state table"

# IMAP-2: (state, command NAME, tagged status) -> next state. Pairs not listed keep the state.
TRANSITIONS: dict[tuple[State, str, str], State] = {
    (_NA, "LOGIN", "OK"): _AU,
    (_NA, "AUTHENTICATE", "OK"): _AU,
    (_AU, "SELECT", "OK"): _SE,
    (_SE, "SELECT", "OK"): _SE,
    (_SE, "SELECT", "NO"): _AU,  # RFC 9051 6.3.2: a failed SELECT leaves no mailbox selected
    (_SE, "SELECT", "BAD"): _AU,
    (_SE, "CLOSE", "OK"): _AU,
    (_SE, "UNSELECT", "OK"): _AU,
    (_NA, "LOGOUT", "OK"): State.LOGOUT,
    (_AU, "LOGOUT", "OK"): State.LOGOUT,
    (_SE, "LOGOUT", "OK"): State.LOGOUT,
}



def state_table_markdown() -> str:
    """COMMAND_STATES as the Markdown table ``specs/imap.md`` quotes (a test keeps the two equal)."""
    order = (_NA, _AU, _SE)
    rows = ["| command | not authenticated | authenticated | selected |", "|---|---|---|---|"]
    for name in sorted(COMMAND_STATES):
        rows.append(f"| {name} | " + " | ".join("yes" if s in COMMAND_STATES[name] else "-" for s in order) + " |")
    return "\n".join(rows)


BASE_CAPABILITIES = (
    "IMAP4rev1", "IMAP4rev2", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT", "UIDPLUS",
    "MOVE", "CONDSTORE", "QRESYNC", "ESEARCH", "LIST-EXTENDED", "LIST-STATUS", "SPECIAL-USE", "CREATE-SPECIAL-USE",
    "CHILDREN", "MULTIAPPEND", "STATUS=SIZE",
)


@dataclass(frozen=True)
class IdleDone:
    """The client ended IDLE with DONE (answer with the tagged OK of the IDLE command)."""

    tag: str


@dataclass(frozen=True)
class ConnectionClosed:
    """LOGOUT, end of input, too many errors or ``close()``: nothing more will happen."""

    reason: str


class LocalProtocolError(Exception):
    """The application misused the connection (a bug on our side, never the client's)."""


class ImapConnection:
    """One IMAP connection's protocol state (server side). Not thread-safe.

    Args:
        tls: the connection is already encrypted (implicit TLS).
        starttls: STARTTLS can be offered (the edge has a certificate).
        plaintext_login: LOGIN/AUTHENTICATE PLAIN are allowed without TLS
            (loopback, or the operator allowed it); else LOGINDISABLED.
        max_line_bytes / max_command_bytes / max_literal_bytes: framing limits (IMAP-3).
        max_errors: client errors before ``* BYE``.
        hostname: named in the greeting.
    """

    def __init__(self, *, tls: bool = False, starttls: bool = False, plaintext_login: bool = False,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES,
                 max_literal_bytes: int = DEFAULT_MAX_LITERAL_BYTES, max_errors: int = DEFAULT_MAX_ERRORS,
                 hostname: str = "mailwal"):
        self.tls = tls
        self.starttls_offered = starttls
        self.plaintext_login = plaintext_login
        self.max_literal_bytes = max_literal_bytes
        self.max_errors = max_errors
        self.hostname = hostname
        self.state = State.NOT_AUTHENTICATED
        self.errors = 0
        self.reader = CommandReader(max_line_bytes=max_line_bytes, max_command_bytes=max_command_bytes,
                                    max_literal_bytes=min(max_literal_bytes, NOT_AUTHENTICATED_MAX_LITERAL_BYTES))
        self._out: list[bytes] = []
        self._events: deque = deque()
        self._pending: Command | None = None  # handed out, tagged status not yet sent
        self._idling = False  # IDLE's continuation was sent; waiting for DONE
        self._sasl: Authenticate | None = None  # waiting for the AUTHENTICATE response line
        self._tls_wait = False  # STARTTLS answered OK; waiting for tls_started()
        self._eof = False
        self.closed_reason: str | None = None
        # Every tagged status sent, by command name and status (OK/NO/BAD): ``(name, status) -> n``.
        # The edge moves them into its own counters (``/metrics``); unparsable commands count as
        # "(unknown)", so the names stay the command names (and that one).
        self.answered: Counter[tuple[str, str]] = Counter()
        self._queue(Status("OK", f"{hostname} IMAP4rev2 server ready", Code("CAPABILITY", " ".join(self.capabilities()))))

    # -- what the connection offers ----------------------------------------------------

    @property
    def login_allowed(self) -> bool:
        """LOGIN and AUTHENTICATE PLAIN are allowed (TLS, loopback or the operator's choice): IMAP-8."""
        return self.tls or self.plaintext_login

    def capabilities(self, state: State | None = None) -> tuple[str, ...]:
        """The capability list for the current state, or for ``state`` (RFC 9051 7.2.2)."""
        caps = list(BASE_CAPABILITIES)
        if (state or self.state) is State.NOT_AUTHENTICATED:
            if self.starttls_offered and not self.tls:
                caps.append("STARTTLS")
            if self.login_allowed:
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
        caps.append(f"APPENDLIMIT={self.max_literal_bytes}")
        return tuple(caps)

    # -- the transport's side ----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        self._check_usable()
        if self.state is State.LOGOUT:
            return
        if not data:
            self._eof = True
            return
        self.reader.receive_data(data)

    def data_to_send(self) -> bytes:
        """Responses queued since the last call (possibly empty)."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.state in (State.LOGOUT, State.ERROR)

    @property
    def pending(self) -> Command | None:
        """The command handed out and not yet answered."""
        return self._pending

    @property
    def idling(self) -> bool:
        return self._idling

    @property
    def buffered(self) -> int:
        """Input octets held (the transport stops reading above a bound while paused)."""
        return self.reader.buffered

    @property
    def awaiting_tls(self) -> bool:
        """STARTTLS was answered OK: the transport must start TLS, then call :meth:`tls_started`."""
        return self._tls_wait

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS succeeded: the capability list changes."""
        self._check_usable()
        if not self._tls_wait:
            raise self._misuse("tls_started() without an accepted STARTTLS")
        self._tls_wait = False
        self.tls = True

    def close(self, text: str | None = None, reason: str = "closed by server", code: Code | None = None) -> None:
        """End the session (shutdown, idle timeout, failover), optionally with ``* BYE text``."""
        if self.closed:
            return
        if text is not None:
            self._queue(Status("BYE", text, code))
        self._close(reason)

    def next_event(self):
        """The next command (a Command value), IdleDone, ConnectionClosed, NEED_DATA or PAUSED."""
        self._check_usable()
        if self._events:
            return self._events.popleft()
        if self.closed:
            return NEED_DATA
        if self._tls_wait:
            return PAUSED
        if self._pending is not None and not self._idling:
            return PAUSED
        while True:
            item = self.reader.next_frame()
            if item is _READER_NEED_DATA:
                if self._eof:
                    self._close("the client closed the connection")
                    return self._events.popleft()
                return NEED_DATA
            if isinstance(item, LiteralRequest):
                if self._idling or self._sasl is not None:
                    self.reader.refuse_literal()
                    self._client_error(item.tag, "a literal is not allowed here")
                else:
                    self.reader.accept_literal()
                    self._queue(Continuation("Ready for literal data"))
                continue
            if isinstance(item, FramingError):
                if item.code == "TOOBIG" and item.tag:
                    self._queue(Status("NO", item.text, Code("TOOBIG"), item.tag))
                else:
                    self._client_error(item.tag, item.text)
                if self._idling:
                    self._end_idle_with_error()
                if self.closed:
                    return self._events.popleft()
                continue
            ev = self._frame(item)
            if ev is not None:
                return ev
            if self._events:
                return self._events.popleft()

    # -- the application's answers -----------------------------------------------------

    def send(self, response: Response) -> None:
        """Queue one response. A tagged status answers the pending command and may move the state.

        Raises:
            LocalProtocolError: a tagged status whose tag is not the pending
                command's, anything after close, untagged data outside a
                command or IDLE in a way RFC 9051 forbids (see the module docstring).
        """
        self._check_usable()
        if self.state is State.LOGOUT:
            raise self._misuse("the connection is closed")
        if isinstance(response, Status) and response.tagged:
            cmd = self._pending
            if cmd is None or cmd.tag != response.tag:
                raise self._misuse(f"tagged {response.status} for {response.tag!r}, but the pending command is "
                                   f"{cmd.tag if cmd else None!r}")
            if self._idling and not isinstance(cmd, Idle):
                raise self._misuse("tagged status during IDLE")
            self._pending = None
            self._idling = False
            self._queue(response)
            self.answered[(_display(cmd), response.status)] += 1
            name = "SELECT" if cmd.NAME == "SELECT" else cmd.NAME
            nxt = TRANSITIONS.get((self.state, name, response.status))
            if nxt is not None:
                self.state = nxt
                if nxt is State.AUTHENTICATED and cmd.NAME in ("LOGIN", "AUTHENTICATE"):
                    self.reader.max_literal_bytes = self.max_literal_bytes
                if nxt is State.LOGOUT:
                    self._close("LOGOUT")
            if isinstance(cmd, StartTls) and response.status == "OK":
                self.reader.take_unread()  # IMAP-22: nothing sent before the handshake is a command
                self._tls_wait = True
            return
        if isinstance(response, Continuation):
            if isinstance(self._pending, Idle) and not self._idling:
                self._idling = True
                self._queue(response)
                return
            raise self._misuse("a continuation request is only the application's to send to start IDLE")
        if isinstance(response, Status) and response.status == "BYE":
            self._queue(response)
            return
        if (isinstance(response, Status) and response.code is not None and response.code.name == "CLOSED"
                and self.state is State.SELECTED and not isinstance(self._pending, Select)):
            # RFC 9051 7.1: OK [CLOSED] outside SELECT/EXAMINE (the selected mailbox was deleted):
            # no mailbox is selected any more, whatever the tagged status
            self.state = State.AUTHENTICATED
        self._queue(response)

    # -- internals ---------------------------------------------------------------------

    def _queue(self, response: Response) -> None:
        self._out.append(response.encode())

    def _misuse(self, text: str) -> LocalProtocolError:
        self.state = State.ERROR
        return LocalProtocolError(text)

    def _check_usable(self) -> None:
        if self.state is State.ERROR:
            raise LocalProtocolError("the connection failed earlier (a bug in its user) and cannot be used")

    def _close(self, reason: str) -> None:
        if self.state is not State.ERROR:
            self.state = State.LOGOUT
        self.closed_reason = reason
        self._events.append(ConnectionClosed(reason))

    def _client_error(self, tag: str | None, text: str, code: Code | None = None) -> None:
        self._queue(Status("BAD", text, code, tag))
        self.errors += 1
        if self.errors >= self.max_errors:
            self._queue(Status("BYE", "too many protocol errors; closing the connection"))
            self._close("too many protocol errors")

    def _end_idle_with_error(self) -> None:
        cmd = self._pending
        self._pending = None
        self._idling = False
        if cmd is not None:
            self._queue(Status("BAD", "expected DONE to end IDLE", None, cmd.tag))
            self.answered[("IDLE", "BAD")] += 1

    def _frame(self, frame: Frame):
        if self._idling:
            if frame.lines[0].strip().upper() == b"DONE" and not frame.literals:
                tag = self._pending.tag
                return IdleDone(tag)
            self._end_idle_with_error()
            self.errors += 1
            return None
        if self._sasl is not None:
            cmd, self._sasl = self._sasl, None
            try:
                response = decode_sasl_response(frame.lines[0])
            except ParseError as exc:
                self._client_error(cmd.tag, exc.text)
                self.answered[("AUTHENTICATE", "BAD")] += 1
                return None
            if response is None:
                self._queue(Status("BAD", "AUTHENTICATE cancelled", None, cmd.tag))
                self.answered[("AUTHENTICATE", "BAD")] += 1
                return None
            return self._dispatch(Authenticate(cmd.tag, cmd.mechanism, response))
        try:
            cmd = parse_command(frame)
        except _BadCharset as exc:
            self._queue(Status("NO", exc.text, Code("BADCHARSET", "(UTF-8 US-ASCII)"), exc.tag))
            self.answered[(_command_word(frame.lines[0]), "NO")] += 1
            return None
        except ParseError as exc:
            self._client_error(exc.tag, exc.text)
            if exc.tag is not None:
                self.answered[(_command_word(frame.lines[0]), "BAD")] += 1
            return None
        if isinstance(cmd, _NeedSasl):
            inner = cmd.command
            if not self._allowed(inner):
                return None
            if not self._login_gate(inner):
                return None
            self._sasl = inner
            self._queue(Continuation(""))  # RFC 4616: PLAIN has no challenge; '+ ' asks for the response
            return None
        return self._dispatch(cmd)

    def _allowed(self, cmd: Command) -> bool:
        if self.state not in COMMAND_STATES[cmd.NAME]:
            where = self.state.value
            self._client_error(cmd.tag, f"{_display(cmd)} is not allowed in the {where} state"
                               + (" (log in first)" if self.state is State.NOT_AUTHENTICATED else
                                  " (SELECT a mailbox first)" if self.state is State.AUTHENTICATED else ""))
            self.answered[(_display(cmd), "BAD")] += 1
            return False
        return True

    def _login_gate(self, cmd: Command) -> bool:
        if isinstance(cmd, Authenticate) and cmd.mechanism != "PLAIN":
            self._queue(Status("NO", f"SASL mechanism {cmd.mechanism} is not supported (use PLAIN)", None, cmd.tag))
            self.answered[(cmd.NAME, "NO")] += 1
            return False
        if not self.login_allowed:
            self._queue(Status("NO", "logins are disabled on an unencrypted connection: use STARTTLS or IMAPS",
                               Code("PRIVACYREQUIRED"), cmd.tag))
            self.answered[(cmd.NAME, "NO")] += 1
            return False
        return True

    def _dispatch(self, cmd: Command):
        if not self._allowed(cmd):
            return None
        if isinstance(cmd, Capability):
            self._queue(CapabilityData(self.capabilities()))
            self._queue(Status("OK", "CAPABILITY completed", None, cmd.tag))
            self.answered[("CAPABILITY", "OK")] += 1
            return None
        if isinstance(cmd, Logout):
            self._queue(Status("BYE", f"{self.hostname} logging out"))
            self._queue(Status("OK", "LOGOUT completed", None, cmd.tag))
            self.answered[("LOGOUT", "OK")] += 1
            self._close("LOGOUT")
            return None
        if isinstance(cmd, StartTls):
            if not self.starttls_offered or self.tls:
                self._queue(Status("BAD", "STARTTLS is not available on this connection" if not self.tls
                                   else "TLS is already active", None, cmd.tag))
                self.answered[("STARTTLS", "BAD")] += 1
                self.errors += 1
                return None
        if isinstance(cmd, (Login, Authenticate)) and not self._login_gate(cmd):
            return None
        self._pending = cmd
        return cmd


def _display(cmd: Command) -> str:
    """The command's name as the client wrote it: EXAMINE, UID FETCH, UID EXPUNGE ..."""
    uid = getattr(cmd, "uid", False)
    name = cmd.NAME
    if name == "SELECT" and getattr(cmd, "read_only", False):
        name = "EXAMINE"
    if name == "EXPUNGE" and getattr(cmd, "uids", None) is not None:
        uid = True
    return f"UID {name}" if uid is True else name


def _command_word(line: bytes) -> str:
    """The command name of a line that did not parse, if it names a known command, else "(unknown)"."""
    words = line.rstrip(b"\r\n").upper().split(b" ", 3)[1:3]
    name = words[0].decode("ascii", "replace") if words else ""
    if name == "UID" and len(words) > 1:
        inner = words[1].decode("ascii", "replace")
        return f"UID {inner}" if inner in COMMAND_STATES else "(unknown)"
    return name if name in COMMAND_STATES else "(unknown)"
