"""The IMAP connection state machine at the pure level (no sockets, no store).

Rules: IMAP-2 (the state table), IMAP-3 (literal continuation), IMAP-6
(BAD for anything unknown, too many errors), IMAP-7 (IDLE), IMAP-8
(LOGINDISABLED), IMAP-22 (STARTTLS drops pipelined plaintext), IMAP-23
(sticky local error).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.imap.commands import Idle, Login, Noop, Select, StartTls
from engine.imap.responses import Code, Continuation, ExistsData, Status
from engine.imap.session import (
    COMMAND_STATES,
    NEED_DATA,
    PAUSED,
    TRANSITIONS,
    ConnectionClosed,
    IdleDone,
    ImapConnection,
    LocalProtocolError,
    State,
)
from tests.support.imap_abnf import check_responses


def pump(conn: ImapConnection, data: bytes = b"") -> list:
    """Feed bytes; collect events until NEED_DATA/PAUSED."""
    if data:
        conn.receive_data(data)
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is PAUSED:
            return out
        out.append(ev)


def lines(conn: ImapConnection) -> list[bytes]:
    data = conn.data_to_send()
    check_responses(data)
    return data.split(b"\r\n")[:-1]


def in_state(state: State, **kw) -> ImapConnection:
    """A connection driven into ``state`` through the table (the application answers OK)."""
    conn = ImapConnection(plaintext_login=True, **kw)
    lines(conn)
    if state is State.NOT_AUTHENTICATED:
        return conn
    (ev,) = pump(conn, b"l LOGIN u p\r\n")
    conn.send(Status("OK", "logged in", None, ev.tag))
    if state is State.SELECTED:
        (ev,) = pump(conn, b"s SELECT INBOX\r\n")
        conn.send(Status("OK", "selected", Code("READ-WRITE"), ev.tag))
    lines(conn)
    assert conn.state is state
    return conn


SAMPLES = {
    "CAPABILITY": b"CAPABILITY", "NOOP": b"NOOP", "LOGOUT": b"LOGOUT", "ID": b"ID NIL",
    "STARTTLS": b"STARTTLS", "AUTHENTICATE": b"AUTHENTICATE PLAIN AHUAcA==", "LOGIN": b"LOGIN u p",
    "ENABLE": b"ENABLE CONDSTORE", "SELECT": b"SELECT INBOX", "EXAMINE": b"EXAMINE INBOX", "CREATE": b"CREATE x",
    "DELETE": b"DELETE x", "RENAME": b"RENAME x y", "SUBSCRIBE": b"SUBSCRIBE x", "UNSUBSCRIBE": b"UNSUBSCRIBE x",
    "LIST": b'LIST "" *', "LSUB": b'LSUB "" *', "NAMESPACE": b"NAMESPACE", "STATUS": b"STATUS x (MESSAGES)",
    "APPEND": b"APPEND x {1+}\r\nm", "IDLE": b"IDLE", "CHECK": b"CHECK", "CLOSE": b"CLOSE", "UNSELECT": b"UNSELECT",
    "EXPUNGE": b"EXPUNGE", "SEARCH": b"SEARCH ALL", "FETCH": b"FETCH 1 FLAGS", "STORE": b"STORE 1 +FLAGS (a)",
    "COPY": b"COPY 1 x", "MOVE": b"MOVE 1 x",
}
LIVE_STATES = [State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED]
SELF_ANSWERED = {"CAPABILITY", "LOGOUT"}


def test_the_samples_cover_every_command_of_the_table():
    assert set(SAMPLES) == set(COMMAND_STATES)


@pytest.mark.parametrize("state", LIVE_STATES, ids=lambda s: s.name)
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_state_table_exhaustively(state, name):
    """IMAP-2: every (state, command) pair: allowed ones reach the application (or are answered by the
    connection itself), the others get a tagged BAD naming the state, and the state does not move."""
    conn = in_state(state, starttls=True)
    events = pump(conn, b"t " + SAMPLES[name] + b"\r\n")
    out = lines(conn)
    if state in COMMAND_STATES[name]:
        if name in SELF_ANSWERED:
            assert events == ([] if name == "CAPABILITY" else [ConnectionClosed("LOGOUT")])
            assert out[-1].startswith(b"t OK ")
        else:
            assert len(events) == 1 and events[0].tag == "t"
            assert conn.pending is events[0]
            assert not any(line.startswith(b"t ") for line in out)
    else:
        assert events == []
        assert out[-1].startswith(b"t BAD ") and b"not allowed in the " + state.value.encode() in out[-1]
        assert conn.state is state and conn.pending is None


@pytest.mark.parametrize("key,new_state", sorted(TRANSITIONS.items(), key=str), ids=str)
def test_every_transition_of_the_table(key, new_state):
    """IMAP-2: a tagged status for the pending command moves the state exactly as TRANSITIONS says."""
    state, name, status = key
    conn = in_state(state)
    sample = {"SELECT": b"SELECT INBOX"}.get(name, SAMPLES[name])
    if name == "LOGOUT":
        events = pump(conn, b"t " + sample + b"\r\n")
        assert isinstance(events[-1], ConnectionClosed) and conn.state is new_state
        return
    (ev,) = pump(conn, b"t " + sample + b"\r\n")
    conn.send(Status(status, "answer", None, "t"))
    assert conn.state is new_state


@pytest.mark.parametrize("state", LIVE_STATES, ids=lambda s: s.name)
@pytest.mark.parametrize("status", ["OK", "NO", "BAD"])
@pytest.mark.parametrize("name", sorted(set(SAMPLES) - SELF_ANSWERED - {"STARTTLS", "IDLE"}))
def test_statuses_not_in_the_table_keep_the_state(state, status, name):
    """IMAP-2: (state, command, status) pairs missing from TRANSITIONS leave the state alone."""
    if state not in COMMAND_STATES[name]:
        return
    conn = in_state(state)
    (ev,) = pump(conn, b"t " + SAMPLES[name] + b"\r\n")
    conn.send(Status(status, "answer", None, "t"))
    key = (state, "SELECT" if name == "EXAMINE" else name, status)
    assert conn.state is TRANSITIONS.get(key, state)


def test_greeting_and_capability_conform_and_list_the_extensions():
    """IMAP-1"""
    conn = ImapConnection(plaintext_login=True)
    (greeting,) = lines(conn)
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 IMAP4rev2 ")
    pump(conn, b"a CAPABILITY\r\n")
    caps = lines(conn)[0].split()[2:]
    for cap in (b"LITERAL+", b"IDLE", b"UIDPLUS", b"MOVE", b"CONDSTORE", b"QRESYNC", b"ENABLE", b"AUTH=PLAIN",
                b"NAMESPACE", b"UNSELECT", b"SPECIAL-USE", b"LIST-EXTENDED", b"ID", b"SASL-IR"):
        assert cap in caps


def test_logins_are_disabled_without_tls_unless_allowed():
    """IMAP-8: LOGINDISABLED, no AUTH=PLAIN; LOGIN and AUTHENTICATE answer NO [PRIVACYREQUIRED]."""
    conn = ImapConnection(starttls=True)
    greeting = lines(conn)[0]
    assert b"LOGINDISABLED" in greeting and b"AUTH=PLAIN" not in greeting and b"STARTTLS" in greeting
    assert pump(conn, b"a LOGIN u p\r\nb AUTHENTICATE PLAIN AHUAcA==\r\nc AUTHENTICATE PLAIN\r\n") == []
    out = lines(conn)
    assert [x[:23] for x in out] == [b"a NO [PRIVACYREQUIRED] ", b"b NO [PRIVACYREQUIRED] ",
                                     b"c NO [PRIVACYREQUIRED] "]
    assert conn.state is State.NOT_AUTHENTICATED
    tls = ImapConnection(tls=True)
    assert b"AUTH=PLAIN" in lines(tls)[0]
    assert pump(tls, b"a LOGIN u p\r\n") == [Login("a", "u", "p")]


def test_starttls_discards_pipelined_plaintext_and_waits_for_the_handshake():
    """IMAP-22: bytes that arrived with STARTTLS are never executed (CVE-2011-0411 style injection)."""
    conn = ImapConnection(starttls=True)
    lines(conn)
    events = pump(conn, b"a STARTTLS\r\nb LOGIN u p\r\n")
    assert events == [StartTls("a")]
    conn.send(Status("OK", "begin TLS now", None, "a"))
    assert conn.awaiting_tls and conn.next_event() is PAUSED
    conn.tls_started()
    assert pump(conn) == []
    assert lines(conn) == [b"a OK begin TLS now"]
    pump(conn, b"c CAPABILITY\r\n")
    caps = lines(conn)[0]
    assert b"STARTTLS" not in caps and b"AUTH=PLAIN" in caps
    assert pump(conn, b"d STARTTLS\r\n") == [] and lines(conn)[0].startswith(b"d BAD ")


def test_starttls_is_refused_where_it_is_not_offered():
    conn = ImapConnection(plaintext_login=True)
    lines(conn)
    assert pump(conn, b"a STARTTLS\r\n") == []
    assert lines(conn)[0].startswith(b"a BAD STARTTLS is not available")


def test_authenticate_plain_asks_for_the_response_and_handles_cancel():
    """IMAP-9: '+ ' then the base64 line; '*' cancels with BAD; bad base64 is BAD."""
    conn = ImapConnection(plaintext_login=True)
    lines(conn)
    assert pump(conn, b"a AUTHENTICATE PLAIN\r\n") == []
    assert lines(conn) == [b"+ "]
    (ev,) = pump(conn, b"AHVzZXIAcGFzcw==\r\n")
    assert ev.response == b"\0user\0pass" and ev.tag == "a"
    conn.send(Status("NO", "authentication failed", Code("AUTHENTICATIONFAILED"), "a"))
    assert pump(conn, b"b AUTHENTICATE PLAIN\r\n*\r\nc AUTHENTICATE PLAIN\r\n!!\r\n") == []
    assert lines(conn) == [b"a NO [AUTHENTICATIONFAILED] authentication failed", b"+ ",
                           b"b BAD AUTHENTICATE cancelled", b"+ ", b"c BAD the SASL response is not valid base64"]
    assert pump(conn, b"d AUTHENTICATE CRAM-MD5 x\r\n") == []
    assert lines(conn)[0].startswith(b"d NO SASL mechanism CRAM-MD5 is not supported")


def test_commands_wait_while_one_is_pending_and_then_run_in_order():
    """IMAP-2: pipelined commands are handed out one at a time, in order."""
    conn = in_state(State.AUTHENTICATED)
    events = pump(conn, b"a NOOP\r\nb NOOP\r\n")
    assert events == [Noop("a")] and conn.next_event() is PAUSED
    conn.send(Status("OK", "done", None, "a"))
    assert pump(conn) == [Noop("b")]


def test_idle_continuation_updates_and_done():
    """IMAP-7"""
    conn = in_state(State.SELECTED)
    (ev,) = pump(conn, b"i IDLE\r\n")
    assert ev == Idle("i")
    conn.send(Continuation("idling"))
    assert conn.idling
    conn.send(ExistsData(3))  # live updates while idling
    assert pump(conn, b"DONE\r\n") == [IdleDone("i")]
    conn.send(Status("OK", "IDLE terminated", None, "i"))
    assert lines(conn) == [b"+ idling", b"* 3 EXISTS", b"i OK IDLE terminated"]
    assert not conn.idling and conn.state is State.SELECTED


def test_anything_but_done_during_idle_ends_it_with_bad():
    """IMAP-7"""
    conn = in_state(State.SELECTED)
    pump(conn, b"i IDLE\r\n")
    conn.send(Continuation("idling"))
    assert pump(conn, b"x NOOP\r\ny NOOP\r\n") == [Noop("y")]
    assert lines(conn) == [b"+ idling", b"i BAD expected DONE to end IDLE"]


def test_unknown_commands_get_bad_and_too_many_errors_end_with_bye():
    """IMAP-6: never a dropped connection for junk, but a bounded number of errors."""
    conn = ImapConnection(plaintext_login=True, max_errors=3)
    lines(conn)
    events = pump(conn, b"a FROB\r\n\x00\x01junk\r\nb FETCH\r\nc NOOP\r\n")
    out = lines(conn)
    assert out[0] == b"a BAD unknown command 'FROB'"
    assert out[1].startswith(b"* BAD ") and out[2].startswith(b"b BAD ")
    assert out[3].startswith(b"* BYE ") and events == [ConnectionClosed("too many protocol errors")]
    assert conn.closed and pump(conn, b"d NOOP\r\n") == []


def test_a_synchronising_literal_gets_a_continuation_and_a_too_big_one_no_toobig():
    """IMAP-3: before login literals are capped at 8 KiB; after it at max_literal_bytes."""
    conn = ImapConnection(plaintext_login=True, max_literal_bytes=10000)
    lines(conn)
    assert pump(conn, b"a LOGIN {9000}\r\n") == []
    assert lines(conn) == [b"a NO [TOOBIG] literal of 9000 octets is over the limit of 8192"]
    assert pump(conn, b"b LOGIN {1}\r\n") == []
    assert lines(conn) == [b"+ Ready for literal data"]
    (ev,) = pump(conn, b"u p\r\n")
    conn.send(Status("OK", "in", None, "b"))
    assert pump(conn, b"c APPEND x {10001+}\r\n" + b"x" * 10001 + b"\r\nd NOOP\r\n") == [Noop("d")]
    assert lines(conn) == [b"b OK in", b"c NO [TOOBIG] literal of 10001 octets is over the limit of 10000"]


def test_end_of_input_closes_and_close_sends_bye():
    conn = in_state(State.AUTHENTICATED)
    assert pump(conn, b"") == []
    conn.receive_data(b"")
    assert pump(conn) == [ConnectionClosed("the client closed the connection")]
    other = in_state(State.SELECTED)
    other.close("server shutting down", "shutdown")
    assert lines(other) == [b"* BYE server shutting down"] and other.closed


def test_misuse_by_the_application_is_a_sticky_local_error():
    """IMAP-23: a tagged status for a command that is not pending is our bug: the connection refuses all work."""
    conn = in_state(State.AUTHENTICATED)
    with pytest.raises(LocalProtocolError):
        conn.send(Status("OK", "who asked?", None, "nobody"))
    assert conn.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"a NOOP\r\n")
    conn2 = in_state(State.AUTHENTICATED)
    with pytest.raises(LocalProtocolError):
        conn2.send(Continuation("no IDLE is pending"))


def test_a_failed_select_leaves_no_mailbox_selected():
    """IMAP-2 (RFC 9051 6.3.2)"""
    conn = in_state(State.SELECTED)
    (ev,) = pump(conn, b"s2 EXAMINE Nope\r\n")
    assert ev == Select("s2", "Nope", read_only=True)
    conn.send(Status("NO", "no such mailbox", Code("NONEXISTENT"), "s2"))
    assert conn.state is State.AUTHENTICATED


@settings(max_examples=150)
@given(st.lists(st.sampled_from([
    b"a NOOP\r\n", b"b LOGIN u p\r\n", b"c SELECT INBOX\r\n", b"d IDLE\r\n", b"DONE\r\n", b"e FETCH 1:* FLAGS\r\n",
    b"f LOGOUT\r\n", b"g APPEND x {3}\r\n", b"abc\r\n", b"h AUTHENTICATE PLAIN\r\n", b"*\r\n", b"{4+}\r\n",
    b"junk\r\n", b"i CLOSE\r\n", b"\r\n", b"j STARTTLS\r\n", b"k ENABLE QRESYNC\r\n", b"\xff\xfe",
]), max_size=25), st.sampled_from(["OK", "NO", "BAD"]))
def test_any_command_sequence_answered_by_any_status_keeps_the_machine_consistent(chunks, status):
    """IMAP-2, IMAP-6: random input with an application that answers every command: no exception, every
    output is grammatical, state is always one of the live states or LOGOUT."""
    conn = ImapConnection(plaintext_login=True, starttls=True)
    for chunk in chunks:
        for ev in pump(conn, chunk):
            if isinstance(ev, Idle):
                conn.send(Continuation("idling"))
            elif isinstance(ev, IdleDone):
                conn.send(Status("OK", "done", None, ev.tag))
            elif isinstance(ev, ConnectionClosed):
                break
            else:
                conn.send(Status(status, "answer", None, ev.tag))
                if conn.awaiting_tls:
                    conn.tls_started()
        check_responses(conn.data_to_send())
        assert conn.state in (State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED, State.LOGOUT)
