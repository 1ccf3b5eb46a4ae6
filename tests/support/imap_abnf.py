"""A checker for the RFC 9051 ``response`` productions the server emits (tests only).

``check_responses(data)`` splits a server's output into responses and checks
each one against the ABNF of RFC 9051 section 9 (plus the codes and data of
RFC 4315 UIDPLUS, RFC 7162 CONDSTORE/QRESYNC, RFC 4731 ESEARCH, RFC 5258
LIST-EXTENDED, RFC 2971 ID, RFC 2342 NAMESPACE). It raises
``GrammarError`` naming the offset and the production that failed. It is
written from the RFC text, independently of ``engine/imap/responses.py``.
"""

from __future__ import annotations

import re

__all__ = ["GrammarError", "check_responses", "check_response"]


class GrammarError(AssertionError):
    pass


_ATOM_SPECIALS = set(b'(){ %*"\\]') | set(range(0x20)) | {0x7F}
_ASTRING_CHAR = set(range(0x21, 0x7F)) - (_ATOM_SPECIALS - {ord("]")})
_TAG_CHAR = _ASTRING_CHAR - {ord("+")}
_CODES_NO_ARG = {
    "ALERT", "PARSE", "READ-ONLY", "READ-WRITE", "TRYCREATE", "UIDNOTSTICKY", "CLOSED", "NOMODSEQ",
    "UNAVAILABLE", "AUTHENTICATIONFAILED", "AUTHORIZATIONFAILED", "EXPIRED", "PRIVACYREQUIRED", "CONTACTADMIN",
    "NOPERM", "INUSE", "EXPUNGEISSUED", "CORRUPTION", "SERVERBUG", "CLIENTBUG", "CANNOT", "LIMIT", "OVERQUOTA",
    "ALREADYEXISTS", "NONEXISTENT", "NOTSAVED", "HASCHILDREN", "UNKNOWN-CTE", "TOOBIG", "USEATTR",
}


class _P:
    def __init__(self, data: bytes):
        self.d = data
        self.i = 0

    def fail(self, what: str):
        ctx = self.d[max(0, self.i - 30):self.i + 30]
        raise GrammarError(f"expected {what} at offset {self.i}: {ctx!r}")

    def peek(self, n: int = 1) -> bytes:
        return self.d[self.i:self.i + n]

    def lit(self, s: bytes, ci: bool = False) -> None:
        got = self.d[self.i:self.i + len(s)]
        if (got.upper() if ci else got) != (s.upper() if ci else s):
            self.fail(repr(s))
        self.i += len(s)

    def maybe(self, s: bytes, ci: bool = False) -> bool:
        got = self.d[self.i:self.i + len(s)]
        if (got.upper() if ci else got) == (s.upper() if ci else s):
            self.i += len(s)
            return True
        return False

    def sp(self):
        self.lit(b" ")

    def crlf(self):
        self.lit(b"\r\n")

    def run(self, allowed, what: str, minimum: int = 1) -> bytes:
        start = self.i
        while self.i < len(self.d) and self.d[self.i] in allowed:
            self.i += 1
        if self.i - start < minimum:
            self.fail(what)
        return self.d[start:self.i]

    # -- basic productions ----------------------------------------------------------

    def number(self) -> int:
        raw = self.run(set(b"0123456789"), "a number")
        if int(raw) > 0xFFFFFFFF:
            self.fail("a 32-bit number")
        return int(raw)

    def nz_number(self) -> int:
        if self.peek() == b"0":
            self.fail("nz-number")
        return self.number()

    def number64(self) -> int:
        raw = self.run(set(b"0123456789"), "a number64")
        if int(raw) > 0x7FFFFFFFFFFFFFFF:
            self.fail("a 63-bit number")
        return int(raw)

    def atom(self) -> bytes:
        return self.run(set(range(0x21, 0x7F)) - _ATOM_SPECIALS, "an atom")

    def quoted(self) -> bytes:
        self.lit(b'"')
        out = bytearray()
        while True:
            c = self.peek()
            if not c:
                self.fail("end of quoted string")
            if c == b'"':
                self.i += 1
                return bytes(out)
            if c == b"\\":
                self.i += 1
                if self.peek() not in (b'"', b"\\"):
                    self.fail("quoted-special after backslash")
            elif c[0] in (0x0D, 0x0A, 0x00) or c[0] >= 0x80:
                self.fail("QUOTED-CHAR (7-bit, no CR/LF/NUL)")
            out += self.peek()
            self.i += 1

    def literal(self, allow_nul: bool = False) -> bytes:
        m = re.compile(rb"(~?)\{(\d+)\}\r\n").match(self.d, self.i)
        if not m:
            self.fail("a literal")
        n = int(m.group(2))
        self.i = m.end()
        data = self.d[self.i:self.i + n]
        if len(data) != n:
            self.fail(f"{n} literal octets")
        if b"\0" in data and not (allow_nul or m.group(1)):
            self.fail("literal without NUL")
        self.i += n
        return data

    def string(self) -> bytes:
        if self.peek() == b'"':
            return self.quoted()
        if self.peek() in (b"{", b"~"):
            return self.literal()
        self.fail("a string")

    def nil(self) -> bool:
        return self.maybe(b"NIL")

    def nstring(self):
        if self.nil():
            return None
        return self.string()

    def astring(self) -> bytes:
        if self.peek() in (b'"', b"{"):
            return self.string()
        return self.run(_ASTRING_CHAR, "an astring")

    def mailbox(self) -> bytes:
        return self.astring()

    def flag(self, fetch: bool = False, perm: bool = False) -> None:
        if self.maybe(b"\\"):
            if perm and self.maybe(b"*"):
                return
            self.atom()
        else:
            self.atom()

    def paren(self, item, allow_empty: bool = True) -> int:
        self.lit(b"(")
        if self.maybe(b")"):
            if not allow_empty:
                self.fail("a non-empty list")
            return 0
        n = 0
        while True:
            item()
            n += 1
            if self.maybe(b")"):
                return n
            self.sp()

    def seq_set(self, star: bool = False) -> None:
        while True:
            for _ in range(2):
                if star and self.maybe(b"*"):
                    pass
                else:
                    self.nz_number()
                if not self.maybe(b":"):
                    break
            if not self.maybe(b","):
                return

    def text(self, optional: bool = True) -> None:
        start = self.i
        while self.i < len(self.d) and self.d[self.i] not in (0x0D, 0x0A):
            if self.d[self.i] == 0:
                self.fail("TEXT-CHAR")
            self.i += 1
        if not optional and self.i == start:
            self.fail("text")

    # -- responses -------------------------------------------------------------------

    def resp_text(self) -> None:
        if self.maybe(b"["):
            self.resp_text_code()
            self.lit(b"]")
            if self.peek() == b"\r":
                return
            self.sp()
        self.text()

    def resp_text_code(self) -> None:
        name = self.atom().decode()
        if name in _CODES_NO_ARG:
            return
        if name == "CAPABILITY":
            self.sp()
            self.capability_list()
        elif name == "BADCHARSET":
            if self.maybe(b" "):
                self.paren(self.astring, allow_empty=False)
        elif name == "PERMANENTFLAGS":
            self.sp()
            self.paren(lambda: self.flag(perm=True))
        elif name in ("UIDNEXT", "UIDVALIDITY", "UNSEEN"):
            self.sp()
            self.nz_number()
        elif name == "HIGHESTMODSEQ":
            self.sp()
            self.number64()
        elif name == "APPENDUID":
            self.sp()
            self.nz_number()
            self.sp()
            self.seq_set()
        elif name == "COPYUID":
            self.sp()
            self.nz_number()
            self.sp()
            self.seq_set()
            self.sp()
            self.seq_set()
        elif name == "MODIFIED":
            self.sp()
            self.seq_set()
        elif name == "REFERRAL":
            self.sp()
            self.run(set(range(0x21, 0x7F)) - {ord("]")}, "a URL")
        else:
            self.fail(f"a response code this server sends (got {name})")

    def capability_list(self) -> None:
        caps = [self.atom()]
        while self.peek() == b" " and self.d[self.i + 1:self.i + 2] not in (b"", b"\r"):
            self.sp()
            caps.append(self.atom())
        if b"IMAP4rev1" not in caps and b"IMAP4rev2" not in caps:
            self.fail("IMAP4rev1 or IMAP4rev2 in the capability list")

    def response(self) -> str:
        if self.maybe(b"+"):
            if self.maybe(b" "):
                self.resp_text()
            self.crlf()
            return "continue"
        if self.maybe(b"* "):
            kind = self.response_data()
            self.crlf()
            return kind
        self.run(_TAG_CHAR, "a tag")
        self.sp()
        word = self.atom()
        if word not in (b"OK", b"NO", b"BAD"):
            self.fail("OK, NO or BAD after a tag")
        self.sp()
        self.resp_text()
        self.crlf()
        return "tagged"

    def response_data(self) -> str:
        if self.peek().isdigit():
            self.number()
            self.sp()
            word = self.atom()
            if word == b"EXISTS" or word == b"RECENT":
                return word.decode()
            if word == b"EXPUNGE":
                return "EXPUNGE"
            if word == b"FETCH":
                self.sp()
                self.msg_att()
                return "FETCH"
            self.fail("EXISTS, RECENT, EXPUNGE or FETCH")
        word = self.atom().decode()
        if word in ("OK", "NO", "BAD", "BYE", "PREAUTH"):
            self.sp()
            self.resp_text()
        elif word == "CAPABILITY":
            self.sp()
            self.capability_list()
        elif word == "ENABLED":
            while self.maybe(b" "):
                self.atom()
        elif word == "FLAGS":
            self.sp()
            self.paren(self.flag)
        elif word in ("LIST", "LSUB"):
            self.sp()
            self.mailbox_list()
        elif word == "STATUS":
            self.sp()
            self.mailbox()
            self.sp()

            def att():
                name = self.atom()
                if name not in (b"MESSAGES", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN", b"DELETED", b"SIZE",
                                b"HIGHESTMODSEQ", b"RECENT"):
                    self.fail("a status-att")
                self.sp()
                self.number64()
            self.paren(att)
        elif word == "SEARCH":
            n = 0
            while self.peek() == b" " and self.d[self.i + 1:self.i + 2].isdigit():
                self.sp()
                self.nz_number()
                n += 1
            if n and self.maybe(b" (MODSEQ "):
                self.number64()
                self.lit(b")")
        elif word == "ESEARCH":
            if self.maybe(b" (TAG "):
                self.string()
                self.lit(b")")
            self.maybe(b" UID")
            while self.maybe(b" "):
                name = self.atom()
                self.sp()
                if name in (b"MIN", b"MAX", b"COUNT"):
                    self.number()
                elif name == b"ALL":
                    self.seq_set()
                elif name == b"MODSEQ":
                    self.number64()
                else:
                    self.fail("an ESEARCH return item")
        elif word == "VANISHED":
            self.sp()
            self.maybe(b"(EARLIER) ")
            self.seq_set()
        elif word == "NAMESPACE":
            for k in range(3):
                self.sp()
                if not self.nil():
                    def desc():
                        self.lit(b"(")
                        self.string()
                        self.sp()
                        if not self.nil():
                            self.quoted()
                        self.lit(b")")
                    self.lit(b"(")
                    desc()
                    while self.peek() == b"(":
                        desc()
                    self.lit(b")")
        elif word == "ID":
            self.sp()
            if not self.nil():
                def pair():
                    self.string()
                    self.sp()
                    self.nstring()
                self.paren(pair, allow_empty=False)
        else:
            self.fail(f"a response this server sends (got {word})")
        return word

    def mailbox_list(self) -> None:
        self.paren(lambda: self.flag())
        self.sp()
        if not self.nil():
            q = self.quoted()
            if len(q) != 1:
                self.fail("a one-character delimiter")
        self.sp()
        self.mailbox()
        if self.maybe(b" "):
            def ext():
                self.string()
                self.sp()
                self.paren(self.string, allow_empty=False)
            self.paren(ext, allow_empty=False)

    # -- FETCH -----------------------------------------------------------------------

    def msg_att(self) -> None:
        seen = set()

        def item():
            m = re.compile(rb"[A-Z0-9.]+").match(self.d, self.i)
            if not m:
                self.fail("a fetch item name")
            name = m.group(0).decode()
            self.i = m.end()
            if name in seen and not name.startswith(("BODY", "BINARY")):
                self.fail(f"{name} only once")
            seen.add(name)
            if name == "FLAGS":
                self.sp()
                self.paren(self.flag)
            elif name == "UID":
                self.sp()
                self.nz_number()
            elif name == "RFC822.SIZE":
                self.sp()
                self.number64()
            elif name == "INTERNALDATE":
                self.sp()
                raw = self.quoted()
                if not re.fullmatch(rb"[ \d]\d-(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)-\d{4} "
                                    rb"\d\d:\d\d:\d\d [+-]\d{4}", raw):
                    self.fail("date-time")
            elif name == "MODSEQ":
                self.lit(b" (")
                self.number64()
                self.lit(b")")
            elif name == "ENVELOPE":
                self.sp()
                self.envelope()
            elif name in ("BODYSTRUCTURE",) or (name == "BODY" and self.peek() == b" "):
                self.sp()
                self.body(extensible=name == "BODYSTRUCTURE")
            elif name in ("BODY", "BINARY", "BINARY.SIZE"):
                self.lit(b"[")
                if name == "BODY":
                    self.section_spec()
                else:
                    if self.peek() != b"]":
                        self.nz_number()
                        while self.maybe(b"."):
                            self.nz_number()
                self.lit(b"]")
                if name != "BINARY.SIZE" and self.maybe(b"<"):
                    self.number()
                    self.lit(b">")
                self.sp()
                if name == "BINARY.SIZE":
                    self.number()
                elif name == "BINARY":
                    if not self.nil():
                        if self.peek() == b"~":
                            self.literal(allow_nul=True)
                        else:
                            self.string()
                else:
                    self.nstring()
            elif name in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
                self.sp()
                self.nstring()
            else:
                self.fail(f"a fetch item this server sends (got {name})")
        self.paren(item, allow_empty=False)

    def section_spec(self) -> None:
        if self.peek() == b"]":
            return
        part = False
        while self.peek().isdigit():
            self.nz_number()
            part = True
            if not self.maybe(b"."):
                return
        for word in (b"HEADER.FIELDS.NOT", b"HEADER.FIELDS", b"HEADER", b"TEXT", b"MIME"):
            if self.maybe(word):
                if word == b"MIME" and not part:
                    self.fail("MIME only after a part")
                if word.startswith(b"HEADER.FIELDS"):
                    self.sp()
                    self.paren(self.astring, allow_empty=False)
                return
        self.fail("a section-msgtext")

    def envelope(self) -> None:
        self.lit(b"(")
        self.nstring()  # date
        self.sp()
        self.nstring()  # subject
        for _ in range(6):
            self.sp()
            self.addresses()
        self.sp()
        self.nstring()  # in-reply-to
        self.sp()
        self.nstring()  # message-id
        self.lit(b")")

    def addresses(self) -> None:
        if self.nil():
            return
        self.lit(b"(")
        while True:
            self.lit(b"(")
            for k in range(4):
                if k:
                    self.sp()
                self.nstring()
            self.lit(b")")
            if self.maybe(b")"):
                return

    def body(self, extensible: bool) -> None:
        self.lit(b"(")
        if self.peek() == b"(":
            while self.peek() == b"(":
                self.body(extensible)
            self.sp()
            self.string()  # media-subtype
            if extensible and self.maybe(b" "):
                self.body_fld_param()
                if self.maybe(b" "):
                    self.body_fld_dsp()
                    if self.maybe(b" "):
                        self.body_fld_lang()
                        if self.maybe(b" "):
                            self.nstring()
        else:
            mtype = self.string().upper()
            self.sp()
            subtype = self.string().upper()
            self.sp()
            self.body_fld_param()
            self.sp()
            self.nstring()  # id
            self.sp()
            self.nstring()  # description
            self.sp()
            self.string()  # encoding
            self.sp()
            self.number64()  # octets
            if mtype == b"MESSAGE" and subtype in (b"RFC822", b"GLOBAL"):
                self.sp()
                self.envelope()
                self.sp()
                self.body(extensible)
                self.sp()
                self.number64()
            elif mtype == b"TEXT":
                self.sp()
                self.number64()
            if extensible and self.maybe(b" "):
                self.nstring()  # md5
                if self.maybe(b" "):
                    self.body_fld_dsp()
                    if self.maybe(b" "):
                        self.body_fld_lang()
                        if self.maybe(b" "):
                            self.nstring()
        self.lit(b")")

    def body_fld_param(self) -> None:
        if self.nil():
            return

        def pair():
            self.string()
            self.sp()
            self.string()
        self.paren(pair, allow_empty=False)

    def body_fld_dsp(self) -> None:
        if self.nil():
            return
        self.lit(b"(")
        self.string()
        self.sp()
        self.body_fld_param()
        self.lit(b")")

    def body_fld_lang(self) -> None:
        if self.peek() == b"(":
            self.paren(self.string, allow_empty=False)
        else:
            self.nstring()


def check_response(data: bytes) -> str:
    """Check exactly one response; returns its kind (``tagged``, ``continue``, ``FETCH`` ...)."""
    p = _P(data)
    kind = p.response()
    if p.i != len(data):
        p.fail("the end of the response")
    return kind


def check_responses(data: bytes) -> list[str]:
    """Check a stream of responses; returns their kinds in order."""
    p = _P(data)
    kinds = []
    while p.i < len(data):
        kinds.append(p.response())
    return kinds
