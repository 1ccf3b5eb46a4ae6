"""The IMAP executor over the in-memory backend and over a real node, driven through the pure connection.

Each test runs against both backends (the ``h`` fixture, ``tests/support/imap_node.py``): the
in-memory model, and a node with its fsynced log and SQLite store behind ``NodeBackend``.

Rules: IMAP-9 (login), IMAP-10 (write answers), IMAP-11 (backend errors), IMAP-12
(isolation), IMAP-13 (read-only replicas), IMAP-15 (live updates), IMAP-17
(SELECT/EXAMINE), IMAP-18 (FETCH), IMAP-19 (STORE/CONDSTORE), IMAP-20
(APPEND/COPY/MOVE/EXPUNGE with UIDPLUS), IMAP-21 (QRESYNC), IMAP-24 (LIST).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine.imap.backend import Unavailable
from tests.support.imap_node import HARNESSES, MemoryHarness, make_harness
from tests.support.imap import MESSAGE, PureSession

INBOX = "user/alice/INBOX"


@pytest.fixture(params=HARNESSES)
def h(request, tmp_path):
    harness = make_harness(request.param, tmp_path)
    yield harness
    harness.close()


def session(h, user="alice", password="apw", select: str | None = None) -> PureSession:
    s = h.session().login(user, password)
    if select:
        out = s.cmd(f"S SELECT {select}")
        assert out[-1].startswith(b"S OK "), out
    return s


def msg(n: int) -> bytes:
    return MESSAGE.replace(b"Subject: hello", b"Subject: message %d" % n)


def filled(h, n: int = 3):
    for i in range(1, n + 1):
        h.deliver(INBOX, msg(i))
    return h


def test_login_and_authenticate(h):
    """IMAP-9: wrong passwords fail without saying which part; AUTHENTICATE PLAIN with and without SASL-IR."""
    b = h
    s = b.session()
    assert s.cmd("a LOGIN alice wrong") == [b"a NO [AUTHENTICATIONFAILED] invalid user name or password"]
    assert s.cmd("a LOGIN nobody x") == [b"a NO [AUTHENTICATIONFAILED] invalid user name or password"]
    out = s.cmd("b AUTHENTICATE PLAIN AGFsaWNlAGFwdw==")  # \0alice\0apw
    assert out[-1].startswith(b"b OK [CAPABILITY IMAP4rev1 ") and b"AUTH=PLAIN" not in out[-1]
    s2 = b.session()
    assert s2.cmd("c AUTHENTICATE PLAIN") == [b"+ "]
    assert s2.cmd("Ym9iAGFsaWNlAGFwdw==")[-1].startswith(b"c NO [AUTHORIZATIONFAILED]")  # bob\0alice\0apw


def test_select_and_examine_responses(h):
    """IMAP-17"""
    b = filled(h, 2)
    s = session(b)
    out = s.cmd("a SELECT inbox")
    assert out[:3] == [b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)",
                       b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] flags that can be "
                       b"changed", b"* 2 EXISTS"]
    assert b"* OK [UIDVALIDITY %d] UIDs valid" % b.uidvalidity(INBOX) in out
    assert b"* OK [UIDNEXT 3] predicted next UID" in out
    assert any(x.startswith(b"* OK [HIGHESTMODSEQ ") for x in out)
    assert out[-1] == b"a OK [READ-WRITE] SELECT completed"
    out = s.cmd("b EXAMINE INBOX")
    assert out[0] == b"* OK [CLOSED] previous mailbox closed" and out[-1] == b"b OK [READ-ONLY] EXAMINE completed"
    assert s.cmd("c STORE 1 +FLAGS (\\Seen)")[-1].startswith(b"c NO [CANNOT] ")
    assert s.cmd("d FETCH 1 BODY[]")[-1] == b"d OK FETCH completed"
    assert s.cmd("e FETCH 1 FLAGS") == [b"* 1 FETCH (FLAGS ())", b"e OK FETCH completed"]  # EXAMINE never sets \Seen


def test_fetch_attributes_partial_and_seen(h):
    """IMAP-18: macros, BODY[section]<partial>, PEEK, RFC822.*, BINARY; a non-PEEK body fetch sets \\Seen."""
    b = filled(h, 1)
    s = session(b, select="INBOX")
    out = s.cmd("a FETCH 1 FAST")
    assert out[0] == b'* 1 FETCH (FLAGS () INTERNALDATE " 1-Jan-2000 00:00:00 +0000" RFC822.SIZE %d)' % len(msg(1))
    out = s.cmd("b FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)]<0.8> BINARY.PEEK[1] BINARY.SIZE[1])")
    assert out[0] == b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT)]<0> {8}"
    assert out[1:4] == [b"Subject: BINARY[1] {9}", b"Hi Bob.", b" BINARY.SIZE[1] 9)"]
    assert s.cmd("c FETCH 1 FLAGS")[0] == b"* 1 FETCH (FLAGS ())"
    out = s.cmd("d FETCH 1 BODY[TEXT]")
    assert out[0] == b"* 1 FETCH (BODY[TEXT] {9}" and out[2] == b" FLAGS (\\Seen))"
    out = s.cmd("e UID FETCH 1 (RFC822.HEADER)")
    assert out[0].startswith(b"* 1 FETCH (UID 1 RFC822.HEADER {")
    assert s.cmd("f FETCH 1 BODY[9]")[:2] == [b'* 1 FETCH (BODY[9] {0}', b')']
    assert s.cmd("g FETCH 5 FLAGS") == [b"g OK FETCH completed"]


def test_binary_content_with_nul_goes_out_as_literal8_and_body_as_a_valid_literal(h):
    """IMAP-18, IMAP-5: BINARY of a part holding NUL uses ~{n}; BODY[] never puts NUL in a literal."""
    b = h
    raw = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
           b"--x\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           b"AAEC\r\n--x--\r\n")
    b.deliver(INBOX, raw)
    s = session(b, select="INBOX")
    out = s.raw(b"a FETCH 1 (BINARY.PEEK[2] BINARY.SIZE[2])\r\n")
    assert out[0] == b"* 1 FETCH (BINARY[2] ~{3}" and out[1] == b"\x00\x01\x02 BINARY.SIZE[2] 3)"


def test_store_variants_and_unchangedsince(h):
    """IMAP-19: +FLAGS/-FLAGS/FLAGS, .SILENT, MODSEQ once CONDSTORE is on, [MODIFIED] for UNCHANGEDSINCE."""
    b = filled(h, 3)
    s = session(b, select="INBOX")
    assert s.cmd("a STORE 1:2 +FLAGS (\\Seen $Work)") == [
        b"* 1 FETCH (FLAGS ($Work \\Seen))", b"* 2 FETCH (FLAGS ($Work \\Seen))", b"a OK STORE completed"]
    assert s.cmd("b STORE 1 -FLAGS.SILENT ($Work)") == [b"b OK STORE completed"]
    assert s.cmd("c UID STORE 3 FLAGS (\\flagged)") == [b"* 3 FETCH (UID 3 FLAGS (\\Flagged))",
                                                         b"c OK STORE completed"]
    assert s.cmd("d STORE 1 +FLAGS (\\Recent)")[-1].startswith(b"d BAD ")
    out = s.cmd("e FETCH 1:3 (MODSEQ)")
    modseqs = [int(m) for m in re.findall(rb"MODSEQ \((\d+)\)", b"\n".join(out))]
    assert len(modseqs) == 3
    out = s.cmd(f"f STORE 1:3 (UNCHANGEDSINCE {modseqs[1]}) +FLAGS (\\Deleted)")
    # message 1 was changed after message 2's MODSEQ? only those whose MODSEQ is above the value are refused
    refused = [i + 1 for i, m in enumerate(modseqs) if m > modseqs[1]]
    if refused:
        assert out[-1] == b"f OK [MODIFIED %s] conditional STORE failed for some messages" % ",".join(
            str(r) for r in refused).encode()
    assert all(b"MODSEQ" in line for line in out[:-1])
    assert s.cmd("g STORE 1 (UNCHANGEDSINCE 1) FLAGS ()")[-1] == b"g OK [MODIFIED 1] conditional STORE failed for " \
                                                                  b"some messages"


def test_search_and_esearch(h):
    """IMAP-16"""
    b = filled(h, 3)
    s = session(b, select="INBOX")
    s.cmd("a STORE 2 +FLAGS (\\Seen)")
    assert s.cmd("b SEARCH UNSEEN") == [b"* SEARCH 1 3", b"b OK SEARCH completed"]
    assert s.cmd("c UID SEARCH SUBJECT \"message 3\"") == [b"* SEARCH 3", b"c OK SEARCH completed"]
    assert s.cmd("d SEARCH RETURN (MIN MAX COUNT) NOT SEEN")[0] == b'* ESEARCH (TAG "d") MIN 1 MAX 3 COUNT 2'
    assert s.cmd("e SEARCH BODY bob")[0] == b"* SEARCH 1 2 3"
    out = s.cmd("f SEARCH MODSEQ 1 SEEN")
    assert re.fullmatch(rb"\* SEARCH 2 \(MODSEQ \d+\)", out[0])
    assert s.cmd("g SEARCH CHARSET KOI8-R ALL") == [b"g NO [BADCHARSET (UTF-8 US-ASCII)] charset KOI8-R is not "
                                                    b"supported"]


def test_append_copy_move_expunge_with_uidplus(h):
    """IMAP-20"""
    b = filled(h, 2)
    s = session(b, select="INBOX")
    assert s.cmd("a APPEND Nope {3+}\r\nabc")[-1].startswith(b"a NO [TRYCREATE] ")
    assert s.cmd("b CREATE Archive") == [b"b OK CREATE completed"]
    out = s.cmd('c APPEND INBOX (\\Seen) "05-Jan-2022 10:00:00 +0100" {3+}\r\nabc {3+}\r\ndef')
    inbox, archive = b.uidvalidity(INBOX), b.uidvalidity("user/alice/Archive")
    assert out == [b"* 4 EXISTS", b"c OK [APPENDUID %d 3:4] APPEND completed" % inbox]
    assert s.cmd("d COPY 1:2 Archive") == [b"d OK [COPYUID %d 1:2 1:2] COPY completed" % archive]
    assert s.cmd("e COPY 1 Missing")[-1].startswith(b"e NO [TRYCREATE] ")
    assert s.cmd("f UID MOVE 2 Archive") == [b"* OK [COPYUID %d 2 3] moved" % archive, b"* 2 EXPUNGE",
                                             b"f OK MOVE completed"]
    s.cmd("g STORE 1:3 +FLAGS.SILENT (\\Deleted)")
    assert s.cmd("h UID EXPUNGE 4") == [b"* 3 EXPUNGE", b"h OK EXPUNGE completed"]
    assert s.cmd("i EXPUNGE") == [b"* 2 EXPUNGE", b"* 1 EXPUNGE", b"i OK EXPUNGE completed"]
    assert s.cmd("j STATUS INBOX (MESSAGES UIDNEXT)") == [b'* STATUS "INBOX" (MESSAGES 0 UIDNEXT 5)',
                                                          b"j OK STATUS completed"]
    assert s.cmd("k CLOSE") == [b"k OK CLOSE completed"]


def test_close_expunges_silently_and_unselect_does_not(h):
    b = filled(h, 2)
    s = session(b, select="INBOX")
    s.cmd("a STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert s.cmd("b UNSELECT") == [b"b OK UNSELECT completed"]
    assert b.uids(INBOX) == [1, 2]
    s.cmd("c SELECT INBOX")
    s.cmd("d STORE 2 +FLAGS.SILENT (\\Deleted)")
    assert s.cmd("e CLOSE") == [b"e OK CLOSE completed"]
    assert b.uids(INBOX) == []


def test_live_updates_reach_a_second_session_only_at_allowed_points(h):
    """IMAP-15: EXISTS and FETCH FLAGS after any command; EXPUNGE never during FETCH/STORE/SEARCH."""
    b = filled(h, 3)
    a = session(b, select="INBOX")
    other = session(b, select="INBOX")
    b.deliver(INBOX, msg(4))
    other.cmd("x STORE 2 +FLAGS.SILENT (\\Flagged)")
    other.cmd("y STORE 1 +FLAGS.SILENT (\\Deleted)")
    other.cmd("z EXPUNGE")
    out = a.cmd("f FETCH 1:* (UID)")
    assert out[:3] == [b"* 4 EXISTS", b"* 2 FETCH (FLAGS (\\Flagged))", b"* 1 FETCH (UID 1)"]
    assert b"EXPUNGE" not in b"".join(out)  # message 1 is still number 1 for this client
    assert a.cmd("s SEARCH ALL") == [b"* SEARCH 1 2 3 4", b"s OK SEARCH completed"]
    assert a.cmd("n NOOP") == [b"* 1 EXPUNGE", b"n OK NOOP completed"]
    assert a.cmd("g FETCH 1 (UID)")[0] == b"* 1 FETCH (UID 2)"


def test_idle_gets_updates_immediately(h):
    """IMAP-7, IMAP-15"""
    b = filled(h, 1)
    a = session(b, select="INBOX")
    assert a.cmd("i IDLE") == [b"+ idling"]
    b.deliver(INBOX, msg(2))
    assert a.idle_poll() == [b"* 2 EXISTS"]
    assert a.cmd("DONE") == [b"i OK IDLE terminated"]


def test_condstore_and_qresync_resync(h):
    """IMAP-21: CHANGEDSINCE, VANISHED (EARLIER) on SELECT and UID FETCH, HIGHESTMODSEQ."""
    b = filled(h, 4)
    s = session(b)
    assert s.cmd("e ENABLE QRESYNC") == [b"* ENABLED CONDSTORE QRESYNC", b"e OK ENABLE completed"]
    out = s.cmd("a SELECT INBOX")
    highest = int(re.search(rb"HIGHESTMODSEQ (\d+)", b"".join(out)).group(1))
    s.cmd("u UNSELECT")
    other = session(b, select="INBOX")
    other.cmd("x STORE 2 +FLAGS.SILENT (\\Seen)")
    other.cmd("y STORE 3 +FLAGS.SILENT (\\Deleted)")
    other.cmd("z EXPUNGE")
    out = s.cmd(f"b SELECT INBOX (QRESYNC ({b.uidvalidity(INBOX)} {highest} 1:4))")
    assert b"* VANISHED (EARLIER) 3" in out
    assert any(re.fullmatch(rb"\* 2 FETCH \(UID 2 FLAGS \(\\Seen\) MODSEQ \(\d+\)\)", x) for x in out)
    out = s.cmd(f"c UID FETCH 1:* (FLAGS) (CHANGEDSINCE {highest} VANISHED)")
    assert out[0] == b"* VANISHED (EARLIER) 3"
    assert re.fullmatch(rb"\* 2 FETCH \(UID 2 FLAGS \(\\Seen\) MODSEQ \(\d+\)\)", out[1])
    assert out[-1] == b"c OK FETCH completed" and len(out) == 3
    other.cmd("w STORE 1 +FLAGS.SILENT (\\Deleted)")
    other.cmd("v EXPUNGE")
    assert s.cmd("n NOOP") == [b"* VANISHED 1", b"n OK NOOP completed"]
    assert s.cmd("q SELECT INBOX (QRESYNC (99 1))")[-1] == b"q OK [READ-WRITE] SELECT completed"  # other UIDVALIDITY
    plain = session(b, select="INBOX")
    assert plain.cmd("p SELECT INBOX (QRESYNC (1 1))")[-1].startswith(b"p BAD ")


def test_read_only_replica_names_its_master(h):
    """IMAP-13: SELECT says READ-ONLY; every write says NO [UNAVAILABLE] with the master's address."""
    b = filled(h, 1)
    b.make_replica("imap.example:143")
    s = session(b)
    assert s.cmd("a SELECT INBOX")[-1] == b"a OK [READ-ONLY] SELECT completed"
    for line in ["b STORE 1 +FLAGS (\\Seen)", "c EXPUNGE", "d UID MOVE 1 INBOX", "e APPEND INBOX {1+}\r\nx",
                 "f CREATE x", "g DELETE x", "h RENAME a b", "i SUBSCRIBE INBOX"]:
        out = s.cmd(line)
        assert out[-1].startswith(line[0].encode() + b" NO [UNAVAILABLE] this node is a read-only replica; "
                                                      b"the master is imap.example:143"), (line, out)
    assert s.cmd("j FETCH 1 BODY[]")[-1] == b"j OK FETCH completed"
    assert s.cmd("k FETCH 1 FLAGS")[0] == b"* 1 FETCH (FLAGS ())"


def test_backend_failures_are_no_unavailable_and_change_nothing(h):
    """IMAP-11"""
    b = filled(h, 1)
    s = session(b, select="INBOX")
    b.fail_next("store", Unavailable("the log failed: disk full; try again later"))
    assert s.cmd("a STORE 1 +FLAGS (\\Seen)") == [
        b"a NO [UNAVAILABLE] the log failed: disk full; try again later"]
    assert s.cmd("b FETCH 1 FLAGS")[0] == b"* 1 FETCH (FLAGS ())"
    b.fail_next("append", Unavailable("writes are paused"))
    assert s.cmd("c APPEND INBOX {1+}\r\nx")[-1] == b"c NO [UNAVAILABLE] writes are paused"
    assert len(b.uids(INBOX)) == 1


def test_list_lsub_subscriptions_special_use_and_hierarchy(h):
    """IMAP-24"""
    b = h
    s = session(b)
    for line in ["a CREATE Sent (USE (\\Sent))", "b CREATE INBOX/Work/2024", "c CREATE Entw&APw-rfe",
                 "d SUBSCRIBE Sent", "e SUBSCRIBE Gone"]:
        assert s.cmd(line)[-1].endswith(b"completed"), line
    assert s.cmd('f LIST "" ""') == [b'* LIST (\\Noselect) "/" ""', b"f OK LIST completed"]
    assert s.cmd('g LIST "" *') == [
        b'* LIST (\\HasChildren) "/" "INBOX"', b'* LIST (\\HasNoChildren) "/" "Entw&APw-rfe"',
        b'* LIST (\\Noselect \\HasChildren) "/" "INBOX/Work"', b'* LIST (\\HasNoChildren) "/" "INBOX/Work/2024"',
        b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"', b"g OK LIST completed"]
    assert s.cmd('h LIST "" %') == [
        b'* LIST (\\HasChildren) "/" "INBOX"', b'* LIST (\\HasNoChildren) "/" "Entw&APw-rfe"',
        b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"', b"h OK LIST completed"]
    assert s.cmd('i LSUB "" *') == [b'* LSUB (\\Noselect) "/" "Gone"', b'* LSUB () "/" "Sent"',
                                    b"i OK LSUB completed"]
    out = s.cmd('j LIST (SUBSCRIBED) "" * RETURN (STATUS (MESSAGES))')
    assert out == [b'* LIST (\\NonExistent \\HasNoChildren \\Subscribed) "/" "Gone"',
                   b'* LIST (\\HasNoChildren \\Sent \\Subscribed) "/" "Sent"',
                   b'* STATUS "Sent" (MESSAGES 0)', b"j OK LIST completed"]
    assert s.cmd('k LIST (SPECIAL-USE) "" *') == [b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"',
                                                 b"k OK LIST completed"]
    assert s.cmd("l CREATE x (USE (\\Bogus))")[-1].startswith(b"l NO [USEATTR] ")
    assert s.cmd("m RENAME INBOX/Work/2024 Projects/2024") == [b"m OK RENAME completed"]
    assert s.cmd('n LIST "" Projects/*') == [b'* LIST (\\HasNoChildren) "/" "Projects/2024"',
                                             b"n OK LIST completed"]
    assert s.cmd("o DELETE INBOX")[-1].startswith(b"o NO [CANNOT] ")
    assert s.cmd("p CREATE inbox")[-1].startswith(b"p NO [ALREADYEXISTS] ")
    assert s.cmd("q NAMESPACE") == [b'* NAMESPACE (("" "/")) NIL NIL', b"q OK NAMESPACE completed"]


def test_isolation_names_never_reach_another_user(h):
    """IMAP-12: whatever name alice gives, the backend is only ever asked about user/alice/..."""
    b = h
    b.deliver("user/bob/INBOX", MESSAGE)
    s = session(b)
    seen_names = []
    for method in ("snapshot", "status", "create", "delete", "rename", "set_subscribed", "append", "copy"):
        orig = getattr(b.backend, method)

        async def spy(*args, _orig=orig, **kw):
            seen_names.extend(a for a in args if isinstance(a, str) and a.startswith("user/"))
            return await _orig(*args, **kw)
        setattr(b.backend, method, spy)
    for name in ["user/bob/INBOX", "../bob/INBOX", "/user/bob/INBOX", "INBOX/../../bob/INBOX", "%", "*", "bob",
                 "~bob/INBOX", "#shared/x", "user/bob"]:
        for tpl in ['SELECT "{n}"', 'STATUS "{n}" (MESSAGES)', 'CREATE "{n}"', 'DELETE "{n}"',
                    'RENAME "{n}" "x{n}"', 'SUBSCRIBE "{n}"', 'APPEND "{n}" {{1+}}\r\nx']:
            s.cmd("t " + tpl.format(n=name))
    s.cmd("s SELECT INBOX")
    s.cmd("c COPY 1:* user/bob/INBOX")
    assert seen_names and all(n.startswith("user/alice/") for n in seen_names), seen_names
    assert len(b.uids("user/bob/INBOX")) == 1
    assert b"bob" not in b"".join(s.cmd('l LIST "" *')) and b"bob" not in b"".join(s.cmd('l LIST "" user/*'))


class TwoUsers(RuleBasedStateMachine):
    """IMAP-12: two users issue random commands; neither ever sees or changes the other's mail.

    Each user's messages carry her name in the subject; the invariant reads everything alice can reach
    through IMAP and finds none of bob's mail, and bob's store is changed only by bob's sessions.
    """

    NAMES = st.sampled_from(["INBOX", "x", "INBOX/y", "../bob/INBOX", "user/bob/INBOX", "bob", "*", "%",
                             "../alice/INBOX", "user/alice/INBOX"])

    def __init__(self):
        super().__init__()
        self.h = MemoryHarness()
        self.b = self.h.backend
        self.sessions = {"alice": session(self.h, "alice", "apw"), "bob": session(self.h, "bob", "bpw")}
        self.counter = 0
        self.b.deliver("user/alice/INBOX", MESSAGE.replace(b"hello", b"owner-alice"))
        self.b.deliver("user/bob/INBOX", MESSAGE.replace(b"hello", b"owner-bob"))

    def _cmd(self, user, line):
        self.counter += 1
        return self.sessions[user].cmd(f"t{self.counter} {line}")

    @rule(user=st.sampled_from(["alice", "bob"]), name=NAMES)
    def select(self, user, name):
        self._cmd(user, f'SELECT "{name}"')

    @rule(user=st.sampled_from(["alice", "bob"]), name=NAMES)
    def create(self, user, name):
        self._cmd(user, f'CREATE "{name}"')

    @rule(user=st.sampled_from(["alice", "bob"]), name=NAMES)
    def append(self, user, name):
        body = MESSAGE.replace(b"hello", b"owner-" + user.encode())
        self._cmd(user, f'APPEND "{name}" {{{len(body)}+}}\r\n'.encode().decode() + body.decode())

    @rule(user=st.sampled_from(["alice", "bob"]), name=NAMES, move=st.booleans())
    def copy(self, user, name, move):
        self._cmd(user, f'UID {"MOVE" if move else "COPY"} 1:* "{name}"')

    @rule(user=st.sampled_from(["alice", "bob"]), name=NAMES, new=NAMES)
    def rename(self, user, name, new):
        self._cmd(user, f'RENAME "{name}" "{new}"')

    @rule(user=st.sampled_from(["alice", "bob"]), name=NAMES)
    def delete(self, user, name):
        self._cmd(user, f'DELETE "{name}"')

    @rule(user=st.sampled_from(["alice", "bob"]))
    def store_expunge(self, user):
        self._cmd(user, "STORE 1:* +FLAGS (\\Deleted)")
        self._cmd(user, "EXPUNGE")

    @invariant()
    def nobody_sees_or_holds_the_other_users_mail(self):
        for user, other in (("alice", "bob"), ("bob", "alice")):
            for name, box in self.b.mailboxes.items():
                if name.startswith(f"user/{user}/"):
                    for m in box.messages.values():
                        assert b"owner-" + other.encode() not in m.data, (name, user)
            for line in self._cmd(user, 'LIST "" *'):
                m = re.match(rb'\* LIST \(([^)]*)\) "/" "(.*)"', line)
                if m and b"Noselect" not in m.group(1):
                    self._cmd(user, f'EXAMINE "{m.group(2).decode()}"')
                    data = b"\n".join(self._cmd(user, "FETCH 1:* (BODY.PEEK[HEADER])"))
                    assert b"owner-" + other.encode() not in data


TwoUsers.TestCase.settings = settings(max_examples=40, stateful_step_count=15, deadline=None)
test_two_users_never_see_each_other = TwoUsers.TestCase


def test_deleting_the_selected_mailbox_leaves_no_mailbox_selected(h):
    """IMAP-2, RFC 9051 7.1: after OK [CLOSED] of a DELETE, a FETCH is refused as in the authenticated state."""
    s = session(h)
    s.cmd("a CREATE Scratch")
    s.cmd("b SELECT Scratch")
    assert s.cmd("c DELETE Scratch") == [b"* OK [CLOSED] the selected mailbox was deleted", b"c OK DELETE completed"]
    out = s.cmd("d FETCH 1:* (FLAGS)")
    assert len(out) == 1 and out[0].startswith(b"d BAD "), out

