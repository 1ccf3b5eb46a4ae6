"""The IMAP wire layer at the pure level: command framing and grammar, response encoding.

Rules: IMAP-3 (framing, literals, limits, resynchronisation), IMAP-4 (the
command grammar), IMAP-5 (responses conform to RFC 9051's ABNF).
"""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.imap.commands import (
    Append,
    AppendMessage,
    Authenticate,
    Capability,
    Check,
    Close,
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
    format_set,
)
from engine.imap.parser import (
    NEED_DATA,
    CommandReader,
    Frame,
    FramingError,
    LiteralRequest,
    ParseError,
    parse_command,
)
from engine.imap.responses import (
    Atom,
    CapabilityData,
    Code,
    Continuation,
    EnabledData,
    ESearchData,
    ExistsData,
    ExpungeData,
    FetchData,
    FlagsData,
    IdData,
    ListData,
    NamespaceData,
    Raw,
    SearchData,
    Status as StatusResp,
    StatusData,
    VanishedData,
    encode_value,
)
from tests.support.imap_abnf import GrammarError, check_response, check_responses


def frames(data: bytes, reader: CommandReader | None = None, accept: bool = True) -> list:
    """Feed ``data`` and collect everything the reader produces (accepting sync literals)."""
    r = reader or CommandReader()
    r.receive_data(data)
    out = []
    while True:
        item = r.next_frame()
        if item is NEED_DATA:
            return out
        out.append(item)
        if isinstance(item, LiteralRequest):
            (r.accept_literal if accept else r.refuse_literal)()


def parse(line: bytes):
    got = [f for f in frames(line) if isinstance(f, Frame)]
    assert len(got) == 1, got
    return parse_command(got[0])


S = SequenceSet
NOW = dt.datetime(2021, 3, 4, 5, 6, 7, tzinfo=dt.timezone(dt.timedelta(hours=-7, minutes=-30)))

VECTORS = [
    (b"a CAPABILITY", Capability("a")),
    (b"a noop", Noop("a")),
    (b"a CHECK", Check("a")),
    (b"a LOGOUT", Logout("a")),
    (b"a STARTTLS", StartTls("a")),
    (b"a AUTHENTICATE PLAIN AGJvYgBzZWNyZXQ=", Authenticate("a", "PLAIN", b"\0bob\0secret")),
    (b"a AUTHENTICATE plain =", Authenticate("a", "PLAIN", b"")),
    (b'a LOGIN bob "se cr\\"et"', Login("a", "bob", 'se cr"et')),
    (b"a LOGIN {3+}\r\nbob {2+}\r\npw", Login("a", "bob", "pw")),
    (b"a ENABLE CONDSTORE qresync", Enable("a", ("CONDSTORE", "QRESYNC"))),
    (b'a ID ("name" "mutt" "version" NIL)', Id("a", (("name", "mutt"), ("version", None)))),
    (b"a ID NIL", Id("a", None)),
    (b"a NAMESPACE", Namespace("a")),
    (b'a LIST "" *', ListCmd("a", "", ("*",))),
    (b'a LIST "" %/x]', ListCmd("a", "", ("%/x]",))),
    (b'a LIST (SUBSCRIBED RECURSIVEMATCH) "" ("INBOX" "Sent*") RETURN (CHILDREN STATUS (MESSAGES UIDNEXT))',
     ListCmd("a", "", ("INBOX", "Sent*"), ("SUBSCRIBED", "RECURSIVEMATCH"), ("CHILDREN", "STATUS"),
             ("MESSAGES", "UIDNEXT"))),
    (b'a LIST "" "" RETURN (SPECIAL-USE)', ListCmd("a", "", ("",), (), ("SPECIAL-USE",))),
    (b'a LSUB "" *', Lsub("a", "", "*")),
    (b"a SUBSCRIBE INBOX/x", Subscribe("a", "INBOX/x")),
    (b'a UNSUBSCRIBE "a b"', Unsubscribe("a", "a b")),
    (b"a STATUS INBOX (MESSAGES UNSEEN HIGHESTMODSEQ size)",
     Status("a", "INBOX", ("MESSAGES", "UNSEEN", "HIGHESTMODSEQ", "SIZE"))),
    (b"a CREATE Sent", Create("a", "Sent")),
    (b"a CREATE Sent (USE (\\Sent))", Create("a", "Sent", ("\\Sent",))),
    (b"a DELETE x", Delete("a", "x")),
    (b"a RENAME x {1}\r\ny", Rename("a", "x", "y")),
    (b"a SELECT INBOX", Select("a", "INBOX")),
    (b"a EXAMINE INBOX (CONDSTORE)", Select("a", "INBOX", read_only=True, condstore=True)),
    (b"a SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))",
     Select("a", "INBOX", qresync=QResync(67890007, 20050715194045000, S(((41, 41), (43, 211), (214, 541)))))),
    (b"a SELECT M (QRESYNC (1 5 (1:3 7:9)))", Select("a", "M", qresync=QResync(1, 5, None, (S(((1, 3),)),
                                                                                           S(((7, 9),)))))),
    (b"a CLOSE", Close("a")),
    (b"a UNSELECT", Unselect("a")),
    (b"a EXPUNGE", Expunge("a")),
    (b"a UID EXPUNGE 3:5,*", Expunge("a", S(((3, 5), (None, None))))),
    (b"a FETCH 1:* FLAGS", Fetch("a", False, S(((1, None),)), (FetchAtt("FLAGS"),))),
    (b"a FETCH 2 ALL", Fetch("a", False, S(((2, 2),)), tuple(FetchAtt(n) for n in
                                                             ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE")))),
    (b"a FETCH 2 fast", Fetch("a", False, S(((2, 2),)), tuple(FetchAtt(n) for n in
                                                              ("FLAGS", "INTERNALDATE", "RFC822.SIZE")))),
    (b"a FETCH 2 FULL", Fetch("a", False, S(((2, 2),)), tuple(FetchAtt(n) for n in
                                                              ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE",
                                                               "BODY")))),
    (b"a FETCH 1 (BODY[] BODY.PEEK[1.2.TEXT]<0.100> BODY[HEADER.FIELDS (From Subject)] BODY[2.MIME])",
     Fetch("a", False, S(((1, 1),)), (
         FetchAtt("BODY[]", Section()),
         FetchAtt("BODY[]", Section((1, 2), "TEXT"), (0, 100), True),
         FetchAtt("BODY[]", Section((), "HEADER.FIELDS", ("FROM", "SUBJECT"))),
         FetchAtt("BODY[]", Section((2,), "MIME"))))),
    (b"a FETCH 1 (BODY.PEEK[HEADER.FIELDS.NOT (X-A)] BINARY.PEEK[1]<5.6> BINARY.SIZE[2] BODYSTRUCTURE BODY)",
     Fetch("a", False, S(((1, 1),)), (
         FetchAtt("BODY[]", Section((), "HEADER.FIELDS.NOT", ("X-A",)), None, True),
         FetchAtt("BINARY", Section((1,)), (5, 6), True),
         FetchAtt("BINARY.SIZE", Section((2,))),
         FetchAtt("BODYSTRUCTURE"), FetchAtt("BODY")))),
    (b"a FETCH 1 (RFC822 RFC822.HEADER RFC822.TEXT RFC822.SIZE INTERNALDATE ENVELOPE MODSEQ)",
     Fetch("a", False, S(((1, 1),)), tuple(FetchAtt(n) for n in (
         "RFC822", "RFC822.HEADER", "RFC822.TEXT", "RFC822.SIZE", "INTERNALDATE", "ENVELOPE", "MODSEQ")))),
    (b"a UID FETCH 1:* (FLAGS) (CHANGEDSINCE 12345 VANISHED)",
     Fetch("a", True, S(((1, None),)), (FetchAtt("UID"), FetchAtt("FLAGS")), 12345, True)),
    (b"a STORE 1:3 +FLAGS.SILENT (\\Seen $Junk)", Store("a", False, S(((1, 3),)), "+", True, ("\\Seen", "$Junk"))),
    (b"a UID STORE 5 (UNCHANGEDSINCE 7) FLAGS \\Deleted",
     Store("a", True, S(((5, 5),)), "", False, ("\\Deleted",), 7)),
    (b"a STORE 1 -FLAGS ()", Store("a", False, S(((1, 1),)), "-", False, ())),
    (b"a SEARCH ALL", Search("a", False, SearchKey("ALL"))),
    (b"a UID SEARCH CHARSET UTF-8 UNSEEN FROM {3}\r\nbob",
     Search("a", True, SearchKey("AND", (SearchKey("UNSEEN"), SearchKey("FROM", "bob"))), "UTF-8")),
    (b"a SEARCH RETURN () 1:5 NOT DELETED", Search("a", False, SearchKey("AND", (
        SearchKey("SEQ", S(((1, 5),))), SearchKey("NOT", SearchKey("DELETED")))), None, ())),
    (b'a SEARCH OR SUBJECT "x y" (LARGER 10 SMALLER 20) HEADER X-Spam yes',
     Search("a", False, SearchKey("AND", (
         SearchKey("OR", (SearchKey("SUBJECT", "x y"),
                          SearchKey("AND", (SearchKey("LARGER", 10), SearchKey("SMALLER", 20))))),
         SearchKey("HEADER", ("X-Spam", "yes")))))),
    (b"a SEARCH SINCE 1-Feb-1994 BEFORE \"03-mar-2000\" SENTON 4-Jul-2001 UID 2:* MODSEQ \"/flags/\\\\draft\" all 620",
     Search("a", False, SearchKey("AND", (
         SearchKey("SINCE", dt.date(1994, 2, 1)), SearchKey("BEFORE", dt.date(2000, 3, 3)),
         SearchKey("SENTON", dt.date(2001, 7, 4)), SearchKey("UID", S(((2, None),))), SearchKey("MODSEQ", 620))))),
    (b"a SEARCH KEYWORD $Forwarded UNKEYWORD x BODY hello TEXT \"w\" TO a CC b BCC c ON 1-Jan-2000 "
     b"SENTSINCE 1-Jan-2000 SENTBEFORE 1-Jan-2001 ANSWERED UNANSWERED DRAFT UNDRAFT FLAGGED UNFLAGGED SEEN "
     b"DELETED UNDELETED NEW OLD RECENT",
     None),
    (b'a APPEND INBOX (\\Seen) "04-Mar-2021 05:06:07 -0730" {5}\r\nhello',
     Append("a", "INBOX", (AppendMessage(b"hello", ("\\Seen",), NOW),))),
    (b"a APPEND INBOX {2+}\r\nhi () {0+}\r\n",
     Append("a", "INBOX", (AppendMessage(b"hi"), AppendMessage(b"", ())))),
    (b"a COPY 1:2 Archive", Copy("a", "Archive", False, S(((1, 2),)))),
    (b"a UID MOVE 4,6 Trash", Move("a", "Trash", True, S(((4, 4), (6, 6))))),
    (b"a IDLE", Idle("a")),
]


@pytest.mark.parametrize("line,expected", VECTORS, ids=[v[0][:40].decode("latin-1") for v in VECTORS])
def test_command_vectors(line, expected):
    """IMAP-4: every command's grammar, LITERAL+ and synchronising literals included."""
    cmd = parse(line + b"\r\n")
    if expected is not None:
        assert cmd == expected
    else:
        assert isinstance(cmd, Search) and cmd.key.op == "AND" and len(cmd.key.arg) == 22


BAD_VECTORS = [
    b"a FOO", b"a", b"+ NOOP", b"a UID NOOP", b"a LOGIN bob", b"a SELECT", b"a FETCH 0 FLAGS", b"a FETCH 1 BOGUS",
    b"a FETCH 1 BODY[4.BOGUS]", b"a FETCH 1 BINARY[HEADER]", b"a FETCH 1 BODY[]<1.0>", b"a FETCH 1 BODY[MIME]",
    b"a STORE 1 FLAGS.LOUD (\\Seen)", b"a STORE 1 FLAGS (\\*)", b"a SEARCH FROM", b"a SEARCH BOGUS",
    b"a SEARCH SINCE 31-Feb-2020", b'a APPEND INBOX "x"', b"a STATUS INBOX (BOGUS)", b"a STATUS INBOX ()",
    b"a NOOP extra", b"a FETCH 1 FLAGS (VANISHED)", b"a UID FETCH 1 FLAGS (VANISHED)",
    b'a LOGIN "unterminated', b'a LOGIN "bad\\escape" x', b"a ENABLE", b"a FETCH 4294967296 FLAGS",
    b"a LIST (BOGUS) \"\" *", b"a SELECT INBOX (QRESYNC (0 1))", b"a SELECT INBOX (QRESYNC (1 1 1:*))",
    b"a CREATE x (FOO (\\Sent))", b"a SEARCH " + b"(" * 40 + b"ALL" + b")" * 40, b"a APPEND INBOX ~{1+}\r\nx",
    b"a LOGIN \xff\xfe x",
]


@pytest.mark.parametrize("line", BAD_VECTORS, ids=[v[:30].decode("latin-1") for v in BAD_VECTORS])
def test_malformed_commands_raise_parse_error_with_the_tag(line):
    """IMAP-4: anything that does not parse is a ParseError (answered BAD), never another exception."""
    with pytest.raises(ParseError) as info:
        parse(line + b"\r\n")
    assert info.value.tag == (None if line.startswith(b"+") else "a")
    assert info.value.text


def test_a_synchronising_literal_waits_for_acceptance_and_then_reads_exactly_n_octets():
    """IMAP-3"""
    r = CommandReader()
    r.receive_data(b"a LOGIN {3}\r\n")
    req = r.next_frame()
    assert req == LiteralRequest("a", 3)
    assert r.next_frame() is NEED_DATA  # nothing more until accepted
    r.accept_literal()
    r.receive_data(b"b")
    assert r.next_frame() is NEED_DATA
    r.receive_data(b"ob {2}\r")
    assert r.next_frame() is NEED_DATA
    r.receive_data(b"\n")
    assert r.next_frame() == LiteralRequest("a", 2)
    r.accept_literal()
    r.receive_data(b"pw\r\nb NOOP\r\n")
    f = r.next_frame()
    assert f == Frame((b"a LOGIN {3}", b" {2}", b""), (b"bob", b"pw"))
    assert parse_command(f) == Login("a", "bob", "pw")
    assert parse_command(r.next_frame()) == Noop("b")


def test_literal_bytes_are_not_interpreted():
    """IMAP-3: CRLF, braces and quotes inside a literal are data."""
    msg = b"Subject: x {3}\r\n\r\n\"quoted\" {5+}\r\na NOOP\r\n"
    cmd = parse(b"a APPEND INBOX {%d+}\r\n" % len(msg) + msg + b"\r\n")
    assert cmd.messages[0].message == msg


def test_an_over_long_line_is_refused_and_the_next_command_is_read():
    """IMAP-3"""
    r = CommandReader(max_line_bytes=100)
    out = frames(b"a1 LOGIN " + b"x" * 500, r)
    assert len(out) == 1 and isinstance(out[0], FramingError) and out[0].tag == "a1" and "too long" in out[0].text
    assert r.buffered <= 100
    out = frames(b"y" * 300 + b"\r\na2 NOOP\r\n", r)
    assert [parse_command(f) for f in out] == [Noop("a2")]


def test_an_over_long_line_ending_in_a_non_synchronising_literal_skips_that_literal_too():
    """IMAP-3: the skipped line's {n+} is followed; its octets never parse as commands."""
    r = CommandReader(max_line_bytes=64)
    payload = b"a1 APPEND INBOX " + b"x" * 200 + b" {12+}\r\nb1 LOGOUT\r\n\r\na2 NOOP\r\n"
    out = frames(payload, r)
    assert isinstance(out[0], FramingError)
    assert [parse_command(f) for f in out[1:]] == [Noop("a2")]


def test_a_too_big_synchronising_literal_is_refused_and_the_command_ends():
    """IMAP-3: NO [TOOBIG]; the client does not send the literal; the next line is a new command."""
    r = CommandReader(max_literal_bytes=10)
    out = frames(b"a1 APPEND INBOX {11}\r\na2 NOOP\r\n", r)
    assert out[0] == FramingError("a1", "literal of 11 octets is over the limit of 10", "TOOBIG")
    assert [parse_command(f) for f in out[1:]] == [Noop("a2")]


def test_a_too_big_non_synchronising_literal_is_read_and_dropped_and_the_stream_stays_in_sync():
    """IMAP-3: LITERAL+ octets arrive anyway; they are discarded (not buffered), then the rest of the command."""
    r = CommandReader(max_literal_bytes=10)
    big = b"A1 NOOP\r\n" * 100
    out = frames(b"a1 APPEND INBOX {%d+}\r\n" % len(big), r)
    assert out == [FramingError("a1", f"literal of {len(big)} octets is over the limit of 10", "TOOBIG")]
    for i in range(0, len(big), 7):
        assert frames(big[i:i + 7], r) == []
        assert r.buffered <= 16
    out = frames(b" {3+}\r\nabc\r\na2 NOOP\r\n", r)
    assert [parse_command(f) for f in out] == [Noop("a2")]


def test_a_refused_synchronising_literal_from_the_caller_ends_the_command():
    """IMAP-3: refuse_literal(); the next line is a new command."""
    r = CommandReader()
    out = frames(b"a1 LOGIN {3}\r\na2 NOOP\r\n", r, accept=False)
    assert out[0] == LiteralRequest("a1", 3)
    assert [parse_command(f) for f in out[1:]] == [Noop("a2")]


def test_the_text_of_one_command_is_bounded_across_literals():
    """IMAP-3: max_command_bytes counts every line of a command."""
    r = CommandReader(max_line_bytes=100, max_command_bytes=150)
    out = frames(b"a1 SEARCH " + b"X" * 80 + b" {1+}\r\nx " + b"Y" * 80 + b" {1+}\r\ny\r\na2 NOOP\r\n", r)
    assert isinstance(out[0], FramingError) and out[0].tag == "a1"
    assert [parse_command(f) for f in out[1:]] == [Noop("a2")]


def test_empty_lines_are_ignored_and_bare_lf_ends_a_line():
    assert [parse_command(f) for f in frames(b"\r\n\r\na NOOP\nb NOOP\r\n")] == [Noop("a"), Noop("b")]


@pytest.mark.parametrize("text,largest,resolved", [
    ("1:*", 5, [(1, 5)]),
    ("*", 5, [(5, 5)]),
    ("*:3", 5, [(3, 5)]),
    ("7:*", 5, [(5, 7)]),  # RFC 9051: n:* includes the last, even when n is larger
    ("3,1:2,9:10", 10, [(1, 3), (9, 10)]),
    ("5:2,4", 9, [(2, 5)]),
    ("1:*", 0, []),
])
def test_sequence_sets_resolve_star_and_reversed_ranges(text, largest, resolved):
    """IMAP-4"""
    cmd = parse(b"a FETCH " + text.encode() + b" FLAGS\r\n")
    assert cmd.sequence.resolve(largest) == resolved
    assert str(cmd.sequence) == text


def test_format_set_is_compact():
    assert format_set([5, 1, 2, 3, 9, 10]) == "1:3,5,9:10"
    assert str(SequenceSet.of(4, 2, 3)) == "2:4"


def test_fetch_attribute_response_names():
    """RFC 9051 7.5.2: BODY.PEEK answers as BODY, a partial as <origin>."""
    cmd = parse(b"a FETCH 1 (BODY.PEEK[1.HEADER.FIELDS (A B)]<10.20> BINARY.PEEK[2]<0.3> BINARY.SIZE[1])\r\n")
    assert [a.response_name() for a in cmd.attributes] == [
        "BODY[1.HEADER.FIELDS (A B)]<10>", "BINARY[2]<0>", "BINARY.SIZE[1]"]


def test_command_values_validate_themselves():
    with pytest.raises(ValueError):
        FetchAtt("BODY[]")
    with pytest.raises(ValueError):
        Noop("a b")
    with pytest.raises(ValueError):
        SequenceSet(((0, 1),))
    with pytest.raises(ValueError):
        Fetch("a", False, S(((1, 1),)), (FetchAtt("FLAGS"),), None, True)
    with pytest.raises(ValueError):
        SearchKey("LARGER", "x")


# -- responses --------------------------------------------------------------------------


RESPONSES = [
    StatusResp("OK", "IMAP4rev2 ready", Code("CAPABILITY", "IMAP4rev1 IMAP4rev2 LITERAL+")),
    StatusResp("OK", "done", None, "a1"),
    StatusResp("NO", "no such mailbox", Code("NONEXISTENT"), "a1"),
    StatusResp("NO", "read-only replica; the master is imap://10.0.0.1:143/", Code("UNAVAILABLE"), "x"),
    StatusResp("OK", "appended", Code("APPENDUID", "38505 3955"), "a"),
    StatusResp("OK", "copied", Code("COPYUID", "38505 304,319:320 3956:3958"), "a"),
    StatusResp("OK", "flags", Code("PERMANENTFLAGS", "(\\Answered \\Seen \\*)")),
    StatusResp("OK", "x", Code("HIGHESTMODSEQ", "715194045007")),
    StatusResp("OK", "x", Code("UIDVALIDITY", "3857529045")),
    StatusResp("OK", "x", Code("MODIFIED", "7,9")),
    StatusResp("NO", "x", Code("BADCHARSET", "(UTF-8 US-ASCII)"), "t"),
    StatusResp("BYE", "going away"),
    StatusResp("OK", "x", Code("READ-ONLY"), "a"),
    Continuation("Ready for literal data"),
    Continuation(""),
    CapabilityData(("IMAP4rev1", "IMAP4rev2", "AUTH=PLAIN")),
    EnabledData(("CONDSTORE",)),
    EnabledData(()),
    FlagsData(("\\Answered", "\\Seen", "$Junk")),
    ExistsData(0), ExistsData(23), ExpungeData(3),
    VanishedData("41,43:116", True), VanishedData("5"),
    ListData(("\\HasNoChildren", "\\Sent"), "/", "Sent"),
    ListData((), "/", "Entwürfe"),
    ListData(("\\Subscribed",), "/", "INBOX", "LIST", ("SUBSCRIBED",)),
    ListData(("\\Noselect",), None, "", "LSUB"),
    StatusData("INBOX", (("MESSAGES", 17), ("HIGHESTMODSEQ", 2 ** 40))),
    SearchData(()), SearchData((2, 3, 5)), SearchData((1,), 917162500),
    ESearchData("a1", True, (("MIN", 2), ("COUNT", 3), ("ALL", "2:3,7"))),
    ESearchData("a1", False, (("COUNT", 0),)),
    NamespaceData((("", "/"),)),
    NamespaceData((("", "/"), ("x/", "/")), None, (("#shared/", "/"),)),
    IdData((("name", "mailwal"), ("version", None))),
    IdData(None),
    FetchData(12, (("FLAGS", (Atom("\\Seen"),)), ("UID", 4827313), ("MODSEQ", (12121231000,)))),
    FetchData(1, (("RFC822.SIZE", 44827), ("INTERNALDATE", "17-Jul-1996 02:44:25 -0700"),
                  ("BODY[HEADER.FIELDS (FROM)]<0>", b"From: x\r\n\r\n"), ("BODY[]", None),
                  ("BINARY.SIZE[1]", 4))),
    FetchData(1, (("ENVELOPE", Raw(b'("date" "subj" ((NIL NIL "a" "b")) NIL NIL NIL NIL NIL NIL "<id>")')),)),
    FetchData(1, (("BODY", Raw(b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92)')),)),
]


@pytest.mark.parametrize("resp", RESPONSES, ids=[type(r).__name__ for r in RESPONSES])
def test_every_response_kind_conforms_to_the_rfc9051_grammar(resp):
    """IMAP-5"""
    check_response(resp.encode())


def test_the_grammar_checker_rejects_what_rfc9051_forbids():
    for bad in [b"* 0 EXPUNGE x\r\n", b"a1 MAYBE done\r\n", b"* FETCH (UID 1)\r\n", b"* 1 FETCH (UID 0)\r\n",
                b'* 1 FETCH (BODY[] "a\rb")\r\n', b"* OK [NOSUCHCODE] x\r\n", b"* 1 FETCH (FLAGS (\\Seen)\r\n",
                b"* LIST () \"//\" x\r\n", b"* 1 FETCH (BODY[] {5}\r\nabc)\r\n"]:
        with pytest.raises(GrammarError):
            check_responses(bad)


def test_response_values_refuse_what_cannot_be_sent():
    with pytest.raises(ValueError):
        StatusResp("OK", "two\r\nlines", None, "a")
    with pytest.raises(ValueError):
        Code("X", "has ] bracket")
    with pytest.raises(ValueError):
        StatusResp("BYE", "x", None, "a")
    with pytest.raises(ValueError):
        Atom("has space")
    with pytest.raises(ValueError):
        encode_value(-1)


_values = st.recursive(
    st.one_of(st.none(), st.integers(0, 2 ** 32 - 1), st.text(max_size=40), st.binary(max_size=40)),
    lambda inner: st.lists(inner, max_size=4).map(tuple), max_leaves=12)


@given(st.lists(st.tuples(st.sampled_from(["BODY[]", "BODY[1.TEXT]<5>", "RFC822", "BODY[HEADER]"]),
                          st.one_of(st.none(), st.text(max_size=60), st.binary(max_size=60))),
                min_size=1, max_size=4, unique_by=lambda item: item[0]),
       st.integers(1, 2 ** 32 - 1))
def test_fetch_strings_encode_to_valid_nstrings_and_round_trip(items, seq):
    """IMAP-5: any text or octets (CR, LF, quotes, 8-bit) come out as a valid nstring holding the same octets."""
    data = FetchData(seq, tuple(items)).encode()
    check_response(data)
    for name, value in items:
        if value is not None:
            wire = encode_value(value)
            assert name.encode() + b" " + wire in data
            raw = value.encode() if isinstance(value, str) else value
            if wire.startswith(b"{"):
                assert wire.endswith(raw.replace(b"\0", b"\x80"))  # no literal may hold NUL (CHAR8)


@given(_values)
def test_any_value_encodes_and_parses_back_through_the_command_parser(value):
    """IMAP-5: encode_value's strings read back identically with the command grammar (quoting is symmetric)."""
    wire = encode_value(value)
    cmd = parse(b"a ID (\"k\" " + (wire if isinstance(value, (str, bytes)) and _idsafe(value) else b"NIL") + b")\r\n")
    got = cmd.params[0][1]
    if isinstance(value, (str, bytes)) and _idsafe(value):
        assert got == (value if isinstance(value, str) else value.decode())


def _idsafe(value) -> bool:
    raw = value.encode() if isinstance(value, str) else value
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@settings(max_examples=200)
@given(st.lists(st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"a NOOP\r\n", b"{5}\r\n", b"{3+}\r\n", b"~{2}\r\n", b"(", b")", b"\"", b"\\", b"*", b"\r\n",
                     b"a FETCH 1:* (BODY[", b"a LOGIN {999999999999}\r\n", b"{100+}\r\n", b" ", b"UID ",
                     b"SEARCH OR NOT ", b"a APPEND INBOX "])), max_size=30))
def test_fuzzed_input_yields_only_typed_results_and_bounded_buffers(chunks):
    """IMAP-3, IMAP-4: no exception but ParseError; buffering stays under the limits."""
    r = CommandReader(max_line_bytes=200, max_command_bytes=400, max_literal_bytes=50)
    for chunk in chunks:
        r.receive_data(chunk)
        while True:
            item = r.next_frame()
            if item is NEED_DATA:
                break
            if isinstance(item, LiteralRequest):
                r.accept_literal()
            elif isinstance(item, Frame):
                try:
                    parse_command(item)
                except ParseError:
                    pass
            else:
                assert isinstance(item, FramingError)
        assert r.buffered <= 200 + 400 + 50 + 64
