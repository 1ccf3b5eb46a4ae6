"""Message structure computed once at delivery: ENVELOPE, BODYSTRUCTURE, section offsets (IMAP-14).

The oracle for part contents is the standard library's own MIME parser
(``email.message_from_bytes``), which the structure code does not use for
splitting parts.
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.imap.responses import FetchData, Raw
from engine.store.structure import analyze, binary_bytes, header_values, parse_addresses, section_bytes
from tests.support.imap_abnf import check_response

SIMPLE = (b"Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\r\n"
          b"From: Fred Foobar <foobar@Blurdybloop.example>\r\n"
          b"Subject: afternoon meeting\r\n"
          b"To: mooch@owatagu.example, \"Smith, J\" <js@x.example>\r\n"
          b"Message-Id: <B27397-0100000@Blurdybloop.example>\r\n"
          b"MIME-Version: 1.0\r\n"
          b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
          b"\r\n"
          b"Hello Joe, do you think we can meet at 3:30 tomorrow?\r\n")


def fetch_wire(name: str, value) -> bytes:
    data = FetchData(1, ((name, value),)).encode()
    check_response(data)
    return data


def test_envelope_of_rfc9051_example():
    """IMAP-14: the ENVELOPE of RFC 9051's example message, Sender and Reply-To defaulting to From."""
    s = analyze(SIMPLE)
    assert s["env"] == (b'("Mon, 7 Feb 1994 21:52:25 -0800 (PST)" "afternoon meeting" '
                        b'(("Fred Foobar" NIL "foobar" "Blurdybloop.example")) '
                        b'(("Fred Foobar" NIL "foobar" "Blurdybloop.example")) '
                        b'(("Fred Foobar" NIL "foobar" "Blurdybloop.example")) '
                        b'((NIL NIL "mooch" "owatagu.example")("Smith, J" NIL "js" "x.example")) '
                        b'NIL NIL NIL "<B27397-0100000@Blurdybloop.example>")')
    fetch_wire("ENVELOPE", Raw(s["env"]))
    assert s["bs"] == b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 55 1 NIL NIL NIL NIL)'
    assert s["body"] == b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 55 1)'
    assert s["size"] == len(SIMPLE)


def test_address_groups_routes_and_odd_forms():
    assert parse_addresses('undisclosed-recipients: ;') == [(None, None, "undisclosed-recipients", None),
                                                           (None, None, None, None)]
    assert parse_addresses("team: a@b.example, \"C D\" <c@d.example>; e@f.example") == [
        (None, None, "team", None), (None, None, "a", "b.example"), ("C D", None, "c", "d.example"),
        (None, None, None, None), (None, None, "e", "f.example")]
    assert parse_addresses("<@route.example:x@y.example>") == [(None, "@route.example", "x", "y.example")]
    assert parse_addresses("x@y.example (Comment Name)") == [(None, None, "x", "y.example")]
    assert parse_addresses("=?utf-8?q?J=C3=B6rg?= <j@x.example>") == [("=?utf-8?q?J=C3=B6rg?=", None, "j",
                                                                        "x.example")]
    assert parse_addresses("") == [] and parse_addresses(",,,<>") == []


def build_nested() -> bytes:
    inner = EmailMessage()
    inner["From"] = "in@x.example"
    inner["Subject"] = "inner"
    inner.set_content("inner text\n")
    inner.add_attachment(b"\x00\x01binary" * 20, maintype="application", subtype="octet-stream",
                         filename="b.bin")
    outer = EmailMessage()
    outer["From"] = "Out <out@x.example>"
    outer["To"] = "a@x.example"
    outer["Subject"] = "=?utf-8?q?Gr=C3=BC=C3=9Fe?="
    outer["Date"] = "Tue, 1 Mar 2022 10:00:00 +0100"
    outer.set_content("plain body\n")
    outer.add_alternative("<p>html body</p>\n", subtype="html")
    outer.make_mixed()
    outer.add_attachment(inner)  # message/rfc822
    outer.add_attachment("caf\u00e9 quoted\n".encode() * 3, maintype="text", subtype="plain",
                         cte="quoted-printable", filename="q.txt", disposition="inline")
    return outer.as_bytes(policy=email.policy.SMTP)


def oracle_parts(raw: bytes):
    """(section path, payload bytes) for every leaf, numbered as RFC 9051 6.4.5 does, via the stdlib parser."""
    msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
    out = []

    def walk(m, path):
        if m.get_content_type() == "message/rfc822":
            out.append((path, m))
            embedded = m.get_payload(0)
            if embedded.is_multipart():
                for i, sub in enumerate(embedded.iter_parts(), 1):
                    walk(sub, path + (i,))
            else:
                out.append((path + (1,), embedded))
        elif m.is_multipart():
            for i, sub in enumerate(m.iter_parts(), 1):
                walk(sub, path + (i,))
        else:
            out.append((path, m))
    if msg.is_multipart():
        walk(msg, ())
    else:
        out.append(((1,), msg))
    return out


def test_sections_of_a_nested_message_match_the_stdlib_parser():
    """IMAP-14: numeric parts, MIME, HEADER/TEXT of an embedded message, BINARY decoding."""
    raw = build_nested()
    s = analyze(raw)
    fetch_wire("BODYSTRUCTURE", Raw(s["bs"]))
    fetch_wire("BODY", Raw(s["body"]))
    parts = oracle_parts(raw)
    assert [p for p, _ in parts] == [(1, 1), (1, 2), (2,), (2, 1), (2, 2), (3,)]
    for path, m in parts:
        if m.get_content_type() == "message/rfc822":
            embedded = section_bytes(raw, s, path)
            assert embedded.startswith(b"From: in@x.example") or b"From: in@x.example" in embedded[:200]
            assert section_bytes(raw, s, path, "HEADER").endswith(b"\r\n\r\n")
            assert b"Subject: inner" in section_bytes(raw, s, path, "HEADER")
            assert section_bytes(raw, s, path, "TEXT") == embedded[len(section_bytes(raw, s, path, "HEADER")):]
            continue
        decoded = binary_bytes(raw, s, path)
        assert decoded == m.get_payload(decode=True), path
        mime = section_bytes(raw, s, path, "MIME")
        assert mime.lower().startswith(b"content-type: " + m.get_content_type().encode())
        assert mime.endswith(b"\r\n\r\n")
    assert section_bytes(raw, s, ()) == raw
    assert section_bytes(raw, s, (), "HEADER") + section_bytes(raw, s, (), "TEXT") == raw
    assert section_bytes(raw, s, (9,)) is None and section_bytes(raw, s, (1, 1, 1)) is None
    assert section_bytes(raw, s, (1, 1), "HEADER") is None  # a text part has no HEADER
    assert section_bytes(raw, s, (), "HEADER.FIELDS", ("SUBJECT", "TO")) == (
        b"To: a@x.example\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\n")
    assert b"Subject" not in section_bytes(raw, s, (), "HEADER.FIELDS.NOT", ("SUBJECT",))
    assert s["find"]["subject"] == "grüße".casefold() and "out@x.example" in s["find"]["from"]
    bs = s["bs"]
    assert bs.startswith(b'(((') and b'"ALTERNATIVE"' in bs and b'"MESSAGE" "RFC822"' in bs and b'"MIXED"' in bs


def test_structure_is_cbor_serialisable_and_deterministic():
    """IMAP-14: computed once at delivery, stored, and the same for the same bytes."""
    raw = build_nested()
    s = analyze(raw)
    assert cbor2.loads(cbor2.dumps(s)) == s
    assert analyze(raw) == s


def test_header_values_unfold():
    block = b"Subject: a\r\n b\r\nX-A: 1\r\nx-a: 2\r\n\r\n"
    assert header_values(block, "subject") == ["a b"]
    assert header_values(block, "X-A") == ["1", "2"]


def test_malformed_messages_never_raise():
    for raw in [b"", b"\r\n", b"no header at all", b"Content-Type: multipart/mixed\r\n\r\nno boundary",
                b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nunterminated",
                b"Content-Type: message/rfc822\r\n\r\n", b"Subject: \xff\xfe\r\n\r\nbody",
                b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"--a\r\nContent-Type: multipart/mixed;"
                b" boundary=a\r\n\r\n" * 40]:
        s = analyze(raw)
        fetch_wire("BODYSTRUCTURE", Raw(s["bs"]))
        fetch_wire("ENVELOPE", Raw(s["env"]))
        assert section_bytes(raw, s, ()) == raw


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)


@st.composite
def messages(draw, depth=0):
    m = EmailMessage()
    if draw(st.booleans()):
        m["Subject"] = " ".join(draw(_text).split())
    m["From"] = draw(st.sampled_from(["a@b.example", "\"Q, R\" <q@r.example>", "g: x@y.example;"]))
    m.set_content(draw(_text) + "\n")
    if depth < 2:
        for _ in range(draw(st.integers(0, 2))):
            kind = draw(st.sampled_from(["bytes", "text", "message"]))
            if kind == "bytes":
                m.add_attachment(draw(st.binary(max_size=40)), maintype="application", subtype="x-test")
            elif kind == "text":
                m.add_attachment(draw(_text), subtype="plain")
            else:
                m.add_attachment(draw(messages(depth + 1)))
    return m


@settings(max_examples=40)
@given(messages())
def test_generated_mime_messages_agree_with_the_stdlib_parser(m):
    """IMAP-14, IMAP-5: every leaf's decoded content equals the stdlib's; the wire forms are grammatical."""
    raw = m.as_bytes(policy=email.policy.SMTP)
    s = analyze(raw)
    fetch_wire("BODYSTRUCTURE", Raw(s["bs"]))
    fetch_wire("BODY", Raw(s["body"]))
    fetch_wire("ENVELOPE", Raw(s["env"]))
    for path, part in oracle_parts(raw):
        if part.get_content_type() != "message/rfc822":
            assert binary_bytes(raw, s, path) == part.get_payload(decode=True), path
