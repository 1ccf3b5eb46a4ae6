"""SEARCH evaluation at the pure level (IMAP-16): every key, with a naive per-key oracle."""

from __future__ import annotations

import datetime as dt

import pytest

from engine.imap.backend import MessageInfo
from engine.imap.commands import SearchKey as K
from engine.imap.commands import SequenceSet as S
from engine.imap.search import SearchItem, compile_search, needs_body, uses_modseq
from engine.store.structure import analyze

UTC = dt.timezone.utc
MSGS = [
    (b"From: Alice <alice@x.example>\r\nTo: bob@y.example\r\nSubject: Lunch plans\r\n"
     b"Date: Mon, 3 Jan 2022 10:00:00 +0000\r\nX-Spam: no\r\n\r\nLet us eat at noon.\r\n",
     {"\\Seen"}, 5, dt.datetime(2022, 1, 3, 11, tzinfo=UTC)),
    (b"From: =?utf-8?q?J=C3=B6rg?= <j@z.example>\r\nCc: carol@x.example\r\nSubject: =?utf-8?b?R3LDvMOfZQ==?=\r\n"
     b"Date: Wed, 5 Jan 2022 23:30:00 -0500\r\nContent-Type: text/plain; charset=utf-8\r\n"
     b"Content-Transfer-Encoding: quoted-printable\r\n\r\nK=C3=A4se und Brot\r\n",
     {"\\Flagged", "$Work"}, 9, dt.datetime(2022, 1, 6, 5, tzinfo=UTC)),
    (b"From: bob@y.example\r\nBcc: secret@x.example\r\nSubject: big\r\n\r\n" + b"x" * 2000 + b"\r\n",
     {"\\Deleted", "\\Answered", "\\Draft"}, 12, dt.datetime(2022, 2, 1, tzinfo=UTC)),
]


def items():
    out = []
    for i, (raw, flags, modseq, date) in enumerate(MSGS):
        out.append(SearchItem(i + 1, MessageInfo(10 * (i + 1), frozenset(flags), modseq, date, len(raw),
                                                 analyze(raw)), raw))
    return out


def run(key) -> list[int]:
    pred = compile_search(key, largest_seq=3, largest_uid=30)
    return [m.seq for m in items() if pred(m)]


D = dt.date
CASES = [
    (K("ALL"), [1, 2, 3]), (K("SEEN"), [1]), (K("UNSEEN"), [2, 3]), (K("FLAGGED"), [2]), (K("UNFLAGGED"), [1, 3]),
    (K("DELETED"), [3]), (K("UNDELETED"), [1, 2]), (K("ANSWERED"), [3]), (K("UNANSWERED"), [1, 2]),
    (K("DRAFT"), [3]), (K("UNDRAFT"), [1, 2]), (K("NEW"), []), (K("RECENT"), []), (K("OLD"), [1, 2, 3]),
    (K("KEYWORD", "$Work"), [2]), (K("UNKEYWORD", "$Work"), [1, 3]),
    (K("FROM", "ALICE"), [1]), (K("FROM", "jörg"), [2]), (K("TO", "bob@"), [1]), (K("CC", "carol"), [2]),
    (K("BCC", "secret"), [3]), (K("SUBJECT", "GRÜSSE"), [2]), (K("SUBJECT", "lunch"), [1]),
    (K("HEADER", ("X-Spam", "NO")), [1]), (K("HEADER", ("x-spam", "")), [1]),
    (K("BODY", "käse"), [2]), (K("BODY", "noon"), [1]), (K("TEXT", "alice"), [1]), (K("TEXT", "brot"), [2]),
    (K("BEFORE", D(2022, 1, 6)), [1]), (K("ON", D(2022, 1, 6)), [2]), (K("SINCE", D(2022, 1, 6)), [2, 3]),
    (K("SENTON", D(2022, 1, 5)), [2]), (K("SENTBEFORE", D(2022, 1, 5)), [1]),
    (K("SENTSINCE", D(2022, 1, 5)), [2, 3]),  # no Date header: the internal date counts
    (K("LARGER", 1000), [3]), (K("SMALLER", 1000), [1, 2]),
    (K("UID", S(((20, None),))), [2, 3]), (K("SEQ", S(((2, 2),))), [2]), (K("SEQ", S(((None, None),))), [3]),
    (K("MODSEQ", 9), [2, 3]),
    (K("NOT", K("SEEN")), [2, 3]), (K("OR", (K("SEEN"), K("DELETED"))), [1, 3]),
    (K("AND", (K("UNSEEN"), K("LARGER", 1000))), [3]),
]


@pytest.mark.parametrize("key,expected", CASES, ids=[c[0].op for c in CASES])
def test_every_search_key(key, expected):
    """IMAP-16"""
    assert run(key) == expected


def test_only_keys_that_read_the_message_need_its_bytes():
    assert not needs_body(K("AND", (K("FROM", "x"), K("UNSEEN"), K("SUBJECT", "y"))))
    assert needs_body(K("NOT", K("BODY", "x"))) and needs_body(K("OR", (K("ALL"), K("HEADER", ("a", "b")))))
    assert uses_modseq(K("NOT", K("MODSEQ", 3))) and not uses_modseq(K("ALL"))
