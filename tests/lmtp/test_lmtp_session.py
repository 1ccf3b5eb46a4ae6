"""The sans-I/O LMTP session (engine/lmtp.py): RFC 2033 / RFC 5321 behaviour, bytes in, replies out."""

from __future__ import annotations

import ast
import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.lmtp.session import (
    NEED_DATA,
    PAUSED,
    AddressError,
    ConnectionClosed,
    LmtpSession,
    MessageReceived,
    MessageRefused,
    Phase,
    RecipientRequested,
    Mailbox,
    Reply,
    parse_mailbox,
    parse_path,
    route_recipient,
    split_address,
)
from tests.support import ROOT

OK_RCPT = Reply(250, "2.1.5", "OK")


class Driver:
    """Feeds a session like a transport would and answers events like an application."""

    def __init__(self, **kw):
        kw.setdefault("max_message_bytes", 10_000)
        self.s = LmtpSession("mx.test", **kw)
        self.events: list = []
        self.messages: list[MessageReceived] = []
        self.rcpt_reply = OK_RCPT
        self.message_reply = Reply(250, "2.1.5", "delivered")

    def feed(self, data: bytes) -> list[str]:
        self.s.receive_data(data)
        self.pump()
        return self.replies()

    def pump(self) -> None:
        while True:
            ev = self.s.next_event()
            if ev is NEED_DATA or ev is PAUSED:
                return
            self.events.append(ev)
            if isinstance(ev, RecipientRequested):
                self.s.answer_recipient(self.rcpt_reply, info=ev.address)
            elif isinstance(ev, MessageReceived):
                self.messages.append(ev)
                self.s.answer_message([self.message_reply] * len(ev.recipients))

    def replies(self) -> list[str]:
        out = self.s.data_to_send().decode()
        return [line for line in out.split("\r\n") if line]


def codes(lines: list[str]) -> list[int]:
    return [int(line[:3]) for line in lines if line[3:4] == " "]


def ready(**kw) -> Driver:
    d = Driver(**kw)
    assert codes(d.replies()) == [220]
    d.feed(b"LHLO client.test\r\n")
    return d


def test_greeting_and_lhlo_advertise_extensions():
    """LMTP-1"""
    d = Driver()
    assert d.replies() == ["220 mx.test LMTP server ready"]
    lines = d.feed(b"LHLO client.test\r\n")
    assert lines[0] == "250-mx.test"
    assert lines[-1].startswith("250 ")
    advertised = {line[4:] for line in lines}
    assert {"PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SIZE 10000"} <= advertised


def test_helo_and_ehlo_are_refused_lmtp_uses_lhlo():
    """LMTP-1"""
    d = Driver()
    d.replies()
    assert codes(d.feed(b"HELO x\r\n")) == [500]
    assert codes(d.feed(b"EHLO x\r\n")) == [500]
    assert codes(d.feed(b"LHLO x\r\n")) == [250]


def test_single_delivery_round_trip_with_enhanced_codes():
    d = ready()
    lines = d.feed(b"MAIL FROM:<a@x>\r\nRCPT TO:<bob@y>\r\nDATA\r\n")
    assert lines == ["250 2.1.0 sender OK", "250 2.1.5 OK", "354 start mail input; end with <CRLF>.<CRLF>"]
    lines = d.feed(b"Subject: t\r\n\r\nbody\r\n.\r\n")
    assert lines == ["250 2.1.5 delivered"]
    (msg,) = d.messages
    assert msg.sender == "a@x"
    assert [r.address for r in msg.recipients] == ["bob@y"]
    assert msg.body == b"Subject: t\r\n\r\nbody\r\n"
    assert d.s.phase is Phase.READY


def test_one_reply_per_accepted_recipient_in_order():
    """LMTP-7"""
    d = ready()
    d.rcpt_reply = OK_RCPT
    d.feed(b"MAIL FROM:<a@x>\r\nRCPT TO:<r1@y>\r\nRCPT TO:<r2@y>\r\nRCPT TO:<r3@y>\r\nDATA\r\n")
    replies = iter([Reply(250, "2.1.5", "one"), Reply(451, "4.3.0", "two"), Reply(552, "5.3.4", "three")])
    d.s.receive_data(b"hi\r\n.\r\n")
    ev = d.s.next_event()
    assert isinstance(ev, MessageReceived) and len(ev.recipients) == 3
    assert d.s.next_event() is PAUSED
    d.s.answer_message([next(replies) for _ in range(3)])
    assert d.replies() == ["250 2.1.5 one", "451 4.3.0 two", "552 5.3.4 three"]


def test_rejected_recipients_get_no_reply_after_data():
    d = ready()
    d.s.receive_data(b"MAIL FROM:<a@x>\r\nRCPT TO:<good@y>\r\nRCPT TO:<bad@y>\r\nDATA\r\nx\r\n.\r\n")
    seen = []
    while True:
        ev = d.s.next_event()
        if ev is NEED_DATA:
            break
        seen.append(ev)
        if isinstance(ev, RecipientRequested):
            d.s.answer_recipient(OK_RCPT if ev.address == "good@y" else Reply(550, "5.1.1", "no such user"))
        elif isinstance(ev, MessageReceived):
            assert [r.address for r in ev.recipients] == ["good@y"]
            d.s.answer_message([Reply(250, "2.1.5", "ok")])
    assert codes(d.replies()) == [250, 250, 550, 354, 250]


def test_pipelined_commands_are_processed_in_order_and_pause_for_answers():
    """LMTP-7"""
    d = ready()
    d.s.receive_data(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nm\r\n.\r\nMAIL FROM:<c@x>\r\nRCPT TO:<d@y>\r\n"
                     b"DATA\r\nn\r\n.\r\nQUIT\r\n")
    ev = d.s.next_event()
    assert isinstance(ev, RecipientRequested) and ev.address == "b@y"
    assert d.s.next_event() is PAUSED  # nothing after RCPT is processed before the answer
    d.s.answer_recipient(OK_RCPT)
    ev = d.s.next_event()
    assert isinstance(ev, MessageReceived) and ev.body == b"m\r\n"
    assert d.s.next_event() is PAUSED
    d.s.answer_message([Reply(250, "2.1.5", "first")])
    d.pump()
    assert [m.body for m in d.messages] == [b"n\r\n"]
    assert codes(d.replies()) == [250, 250, 354, 250, 250, 250, 354, 250, 221]
    assert isinstance(d.events[-1], ConnectionClosed) and d.s.closed


def test_dot_stuffing_is_undone_and_only_crlf_dot_crlf_ends_data():
    """LMTP-4"""
    d = ready()
    d.feed(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
    d.feed(b"..leading dot\r\n...\r\n.x\r\nnot .\r\n end\r\n")
    assert d.messages == []
    d.feed(b".\r\n")
    assert d.messages[0].body == b".leading dot\r\n..\r\nx\r\nnot .\r\n end\r\n"


def test_empty_message_and_terminator_split_across_reads():
    d = ready()
    d.feed(b"MAIL FROM:<>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
    d.feed(b".")
    assert d.messages == []
    d.feed(b"\r\n")
    assert d.messages[0].body == b"" and d.messages[0].sender == ""
    d.feed(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nabc\r")
    for piece in (b"\n", b".", b"\r", b"\n"):
        d.feed(piece)
    assert d.messages[1].body == b"abc\r\n"


@given(st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=20),
       st.integers(min_value=1, max_value=17))
def test_dot_stuffed_body_round_trips_whatever_the_read_sizes(lines, chunk):
    """LMTP-4"""
    body = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    wire = b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n" + stuffed + b".\r\nNOOP\r\n"
    d = ready(max_message_bytes=100_000)
    for i in range(0, len(wire), chunk):
        d.feed(wire[i:i + chunk])
    assert [m.body for m in d.messages] == [body]
    assert d.s.phase is Phase.READY and d.s.errors == 0


def test_commands_out_of_order_get_503():
    """LMTP-2"""
    d = Driver()
    d.replies()
    assert codes(d.feed(b"MAIL FROM:<a@x>\r\n")) == [503]  # before LHLO
    d.feed(b"LHLO c\r\n")
    assert codes(d.feed(b"RCPT TO:<b@y>\r\n")) == [503]  # before MAIL
    assert codes(d.feed(b"DATA\r\n")) == [503]
    d.feed(b"MAIL FROM:<a@x>\r\n")
    assert codes(d.feed(b"MAIL FROM:<a@x>\r\n")) == [503]  # nested MAIL
    assert codes(d.feed(b"DATA\r\n")) == [503]  # no recipient yet
    d.rcpt_reply = Reply(550, "5.1.1", "no")
    d.feed(b"RCPT TO:<b@y>\r\n")
    assert codes(d.feed(b"DATA\r\n")) == [503]  # no *accepted* recipient
    assert d.messages == []


def test_rset_noop_vrfy_help_quit():
    """LMTP-2"""
    d = ready()
    d.feed(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n")
    assert d.feed(b"RSET\r\n") == ["250 2.0.0 reset"]
    assert codes(d.feed(b"DATA\r\n")) == [503]  # the transaction is gone
    assert d.feed(b"NOOP\r\n") == ["250 2.0.0 OK"]
    assert codes(d.feed(b"VRFY bob\r\n")) == [252]
    assert codes(d.feed(b"HELP\r\n")) == [214]
    assert codes(d.feed(b"noop\r\n")) == [250]  # verbs are case-insensitive
    assert codes(d.feed(b"QUIT\r\n")) == [221]
    assert d.s.closed
    assert d.feed(b"NOOP\r\n") == []  # nothing after QUIT


def test_mail_size_parameter_and_body_parameter():
    """LMTP-6"""
    d = ready()
    assert d.feed(b"MAIL FROM:<a@x> SIZE=10001\r\n")[0].startswith("552 5.3.4")
    assert codes(d.feed(b"MAIL FROM:<a@x> SIZE=abc\r\n")) == [501]
    assert codes(d.feed(b"MAIL FROM:<a@x> BODY=BINARYMIME\r\n")) == [555]
    assert codes(d.feed(b"MAIL FROM:<a@x> SMTPUTF8\r\n")) == [555]
    assert codes(d.feed(b"MAIL FROM:<a@x> SIZE=10000 BODY=8BITMIME\r\n")) == [250]


def test_message_over_the_limit_is_refused_per_recipient_and_memory_stays_bounded():
    """LMTP-6"""
    d = ready(max_message_bytes=1000)
    d.feed(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n")
    line = b"x" * 98 + b"\r\n"
    for _ in range(200):  # 20 kB streamed in small reads
        d.feed(line)
        assert d.s.buffered < 2000
    lines = d.feed(b".\r\n")
    assert codes(lines) == [552, 552]
    assert d.messages == []
    refused = [e for e in d.events if isinstance(e, MessageRefused)]
    assert len(refused) == 1 and refused[0].size >= 20000
    assert codes(d.feed(b"NOOP\r\n")) == [250]  # the session goes on


def test_message_exactly_at_the_limit_is_accepted_even_when_dot_stuffed():
    d = ready(max_message_bytes=1000)
    body = b"." * 998 + b"\r\n"  # 1000 octets; 1001 on the wire
    d.feed(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n." + body + b".\r\n")
    assert [m.body for m in d.messages] == [body]


def test_bare_lf_in_a_command_is_refused():
    """LMTP-3"""
    d = ready()
    assert d.feed(b"NOOP\n") == ["500 5.5.2 bare LF: command lines must end with CRLF"]
    assert codes(d.feed(b"NOOP\r\n")) == [250]


def test_bare_lf_in_the_body_refuses_the_message_and_lf_dot_lf_does_not_end_it():
    """LMTP-5"""
    d = ready()
    d.feed(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
    assert d.feed(b"line one\n.\nMAIL FROM:<evil@x>\r\n") == []  # still inside DATA: no smuggled command
    lines = d.feed(b"\r\n.\r\n")
    assert codes(lines) == [554] and "bare LF" in lines[0]
    assert d.messages == []


def test_over_long_command_line_is_refused_and_skipped():
    """LMTP-3"""
    d = ready(max_command_bytes=512)
    lines = d.feed(b"NOOP " + b"x" * 600)
    assert codes(lines) == [500] and "too long" in lines[0]
    assert d.feed(b"y" * 1000) == []  # still the same line: dropped
    assert d.feed(b"\r\nNOOP\r\n") == ["250 2.0.0 OK"]
    assert codes(d.feed(b"NOOP " + b"z" * 600 + b"\r\n")) == [500]  # complete but too long


def test_junk_gets_errors_then_the_session_closes():
    """LMTP-3"""
    d = ready(max_errors=5)
    lines = d.feed(b"\x00\x01\x02 garbage\r\n" * 3 + b"\xff\xfe\r\n" + b"GET / HTTP/1.1\r\n" + b"NOOP\r\n")
    assert codes(lines) == [500, 500, 500, 500, 500, 421]
    assert d.s.closed and isinstance(d.events[-1], ConnectionClosed)


def test_bad_addresses_get_501():
    d = ready()
    d.feed(b"MAIL FROM:<a@x>\r\n")
    assert codes(d.feed(b"RCPT TO:bob@y\r\n")) == [501]
    assert codes(d.feed(b"RCPT TO:<bob@y\r\n")) == [501]
    assert codes(d.feed(b"RCPT TO:<>\r\n")) == [501]
    assert codes(d.feed(b"RCPT TO:<@y>\r\n")) == [501]
    assert codes(d.feed(b"RCPT TO:<b@y> NOTIFY=NEVER\r\n")) == [555]
    assert codes(d.feed(b"RCPT TO: <bob@y>\r\n")) == [250]  # a space after the colon is tolerated


def test_too_many_recipients_get_452():
    """LMTP-6"""
    d = ready(max_recipients=2)
    d.feed(b"MAIL FROM:<a@x>\r\n")
    assert codes(d.feed(b"RCPT TO:<a@y>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\n")) == [250, 250, 452]


def test_end_of_input_mid_message_delivers_nothing():
    d = ready()
    d.feed(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nhalf a message\r\n")
    d.feed(b"")
    assert d.messages == [] and d.s.closed
    assert isinstance(d.events[-1], ConnectionClosed)


def test_8bit_body_is_kept_byte_for_byte():
    """LMTP-4"""
    d = ready()
    body = "Subject: caf\u00e9\r\n\r\n\u00fcber \u2603\r\n".encode() + bytes(range(128, 256)) + b"\r\n"
    d.feed(b"MAIL FROM:<a@x> BODY=8BITMIME\r\nRCPT TO:<b@y>\r\nDATA\r\n" + body + b".\r\n")
    assert d.messages[0].body == body


def test_answering_without_a_pending_event_is_a_programming_error():
    d = ready()
    with pytest.raises(RuntimeError):
        d.s.answer_recipient(OK_RCPT)
    with pytest.raises(RuntimeError):
        d.s.answer_message([])


def test_close_with_a_reply_at_a_boundary():
    d = ready()
    assert d.s.at_boundary
    d.s.close(Reply(421, "4.3.2", "shutting down"))
    assert d.replies() == ["421 4.3.2 shutting down"] and d.s.closed


# -- addresses and routing ----------------------------------------------------------


ADDRESSES = json.load(open(os.path.join(ROOT,
                                      "specs", "vectors", "addresses.json"), encoding="utf-8"))["cases"]


def _vector_id(case: dict) -> str:
    return case["path"].encode("unicode_escape").decode()[:40]


@pytest.mark.parametrize("case", ADDRESSES, ids=_vector_id)
def test_address_vectors_at_mail_and_rcpt(case):
    """LMTP-17: the session answers 501 for a path that is not RFC 5321 syntax, at MAIL and at RCPT."""
    d = ready()
    lines = d.feed(f"MAIL FROM:{case['path']}\r\n".encode())
    assert codes(lines) == [case["mail"]], lines
    if case["mail"] == 501:
        assert lines[0].startswith("501 5.1.7 bad sender address: ")
    d.feed(b"RSET\r\nMAIL FROM:<a@x.org>\r\n")
    lines = d.feed(f"RCPT TO:{case['path']}\r\n".encode())
    # the session only checks syntax; a recipient with no mailbox name (550) is refused by routing
    assert codes(lines) == [501 if case["rcpt"] == 501 else 250], lines
    if case["rcpt"] == 501:
        assert lines[0].startswith("501 5.1.3 bad recipient address: ")
        assert not [e for e in d.events if isinstance(e, RecipientRequested)]


@pytest.mark.parametrize("case", [c for c in ADDRESSES if c["rcpt"] != 501], ids=_vector_id)
def test_address_vectors_route_to_their_mailbox(case):
    """LMTP-9"""
    address, _ = parse_path(case["path"], forward=True)
    if case["rcpt"] == 550:
        with pytest.raises(AddressError, match="cannot name a mailbox|empty"):
            route_recipient(address, lambda name: False)
    else:
        assert route_recipient(address, lambda name: False).mailbox == case["mailbox"]


def test_quoted_and_dot_string_local_parts_have_the_same_value():
    """LMTP-9"""
    assert parse_mailbox('"bob"@x.org') == parse_mailbox("bob@x.org") == Mailbox("bob", "x.org")
    assert parse_mailbox('"a\\ b\\"c"@[IPv6:::1]') == Mailbox('a b"c', "[IPv6:::1]")
    assert split_address("Postmaster") == ("Postmaster", "")
    with pytest.raises(AddressError, match="quote it"):
        parse_mailbox("a b@x.org")
    with pytest.raises(AddressError, match="SMTPUTF8"):
        parse_path("<j\u00fcrgen@x.org>")
    with pytest.raises(AddressError, match="not a recipient"):
        parse_path("<>", forward=True)
    assert parse_path("<>") == ("", "")


def test_parse_path_and_split_address():
    assert parse_path("<a@b> SIZE=1") == ("a@b", "SIZE=1")
    assert parse_path("<@relay1,@relay2:joe@c>") == ("joe@c", "")
    assert parse_path('<"odd > name"@d>') == ('"odd > name"@d', "")
    assert split_address('"odd > name"@d') == ("odd > name", "d")
    assert split_address("postmaster") == ("postmaster", "")
    for bad in ("a@b", "<a@b", "<a@b>junk", "<a\x01b@c>"):
        with pytest.raises(AddressError):
            parse_path(bad)


def test_route_plain_detail_and_case():
    """LMTP-9"""
    existing = {"user/bob/lists"}
    assert route_recipient("Bob@Example.org", existing.__contains__).mailbox == "user/bob/INBOX"
    assert route_recipient("bob+lists@x", existing.__contains__).mailbox == "user/bob/lists"
    assert route_recipient("bob+nope@x", existing.__contains__).mailbox == "user/bob/INBOX"
    assert route_recipient("bob+@x", existing.__contains__).mailbox == "user/bob/INBOX"
    for bad in ("a/b@x", "a*@x", "%@x", "+detail@x", "..@x"):
        with pytest.raises(AddressError):
            route_recipient(bad, existing.__contains__)


def test_lmtp_module_is_sans_io():
    path = os.path.join(ROOT, "engine", "lmtp", "session.py")
    tree = ast.parse(open(path).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"asyncio", "anyio", "socket", "os", "time", "threading", "select"}
