"""Real IMAP clients over 127.0.0.1 against the server on the in-memory backend and on a real node.

Every test that takes ``backend`` runs against both (``tests/support/imap_node.py``): the in-memory
model, and a node (fsynced log, SQLite store) behind ``NodeBackend``.

Python's ``imaplib`` and ``imapclient`` drive ``engine/imap/server.py``;
raw sockets check what clients cannot show (limits, junk, TLS). Rules:
IMAP-7, IMAP-8, IMAP-9, IMAP-13, IMAP-15, IMAP-17..IMAP-22, IMAP-25, IMAP-26.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import socket
import ssl
import subprocess
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from engine.imap.server import login_delay_s, serve_in_thread
from tests.support.imap_abnf import check_responses
from tests.support.imap_node import HARNESSES, make_harness
from tests.support.imap import MESSAGE

HOST = "127.0.0.1"


def message(n: int, body: str = "Hi Bob.") -> bytes:
    return MESSAGE.replace(b"Subject: hello", b"Subject: message %d" % n).replace(b"Hi Bob.", body.encode())


@pytest.fixture(params=HARNESSES)
def backend(request, tmp_path):
    """A backend harness (its ``.backend`` is what the server serves)."""
    harness = make_harness(request.param, tmp_path)
    yield harness
    harness.close()


@pytest.fixture
def server(backend):
    with serve_in_thread(backend.backend, failed_login_delay_s=0) as srv:
        yield srv


def deliver(srv, backend, n: int = 1, mailbox: str = "user/alice/INBOX") -> None:
    for i in range(n):
        if backend.kind == "memory":
            srv.call(backend.deliver, mailbox, message(i + 1))  # the memory backend is not thread-safe
        else:
            backend.deliver(mailbox, message(i + 1))


def raw_exchange(port: int, payload: bytes, *, until: bytes, timeout: float = 10) -> bytes:
    """Send ``payload`` after the greeting; read until ``until`` appears (or the server closes)."""
    s = socket.create_connection((HOST, port), timeout=timeout)
    try:
        data = b""
        while b"\r\n" not in data:
            data += s.recv(4096)
        s.sendall(payload)
        while until not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        s.close()


def test_imaplib_session(server, backend):
    """IMAP-17..IMAP-20 with imaplib: login, list, select, fetch, store, search, append, copy, move, expunge."""
    deliver(server, backend, 3)
    c = imaplib.IMAP4(HOST, server.port)
    assert c.login("alice", "apw")[0] == "OK"
    typ, boxes = c.list()
    assert typ == "OK" and boxes == [b'(\\HasNoChildren) "/" "INBOX"']
    assert c.select("INBOX") == ("OK", [b"3"])
    typ, data = c.fetch("1:2", "(UID FLAGS ENVELOPE BODY.PEEK[TEXT]<0.2>)")
    assert typ == "OK" and b"ENVELOPE (" in data[0][0] and data[0][1] == b"Hi"
    assert c.store("2", "+FLAGS", "(\\Seen \\Flagged)")[1] == [b"2 (FLAGS (\\Flagged \\Seen))"]
    assert c.search(None, "UNSEEN") == ("OK", [b"1 3"])
    assert c.uid("SEARCH", None, "FLAGGED") == ("OK", [b"2"])
    typ, data = c.append("INBOX", "(\\Draft)", None, message(4))
    assert typ == "OK" and data == [b"[APPENDUID %d 4] APPEND completed" % backend.uidvalidity("user/alice/INBOX")]
    assert c.create("Archive")[0] == "OK"
    typ, data = c.uid("COPY", "1:2", "Archive")
    assert typ == "OK"
    assert c.uid("MOVE", "3", "Archive")[0] == "OK"
    assert c.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"
    typ, data = c.expunge()
    assert typ == "OK" and data == [b"3", b"1"]  # imaplib keeps the MOVE's EXPUNGE too
    assert c.status("Archive", "(MESSAGES UIDNEXT)") == ("OK", [b'"Archive" (MESSAGES 3 UIDNEXT 4)'])
    assert c.select("Archive", readonly=True) == ("OK", [b"3"])
    assert c.close()[0] == "OK"
    assert c.logout()[0] == "BYE"


def test_imapclient_api_surface(server, backend):
    """IMAP-7, IMAP-17..IMAP-21 through imapclient's API: folders, fetch, flags, search, copy/move, IDLE,
    CONDSTORE and QRESYNC."""
    deliver(server, backend, 3)
    c = IMAPClient(HOST, port=server.port, ssl=False)
    c.login("alice", "apw")
    caps = c.capabilities()
    for cap in (b"IDLE", b"MOVE", b"UIDPLUS", b"CONDSTORE", b"QRESYNC", b"NAMESPACE", b"ID", b"LITERAL+"):
        assert cap in caps
    assert c.namespace().personal == (("", "/"),)
    assert c.id_({"name": "pytest"})[0][:2] == (b"name", b"mailwal")
    c.create_folder("Work")
    c.create_folder("INBOX/Sub")
    assert c.folder_exists("Work") and not c.folder_exists("Nope")
    assert sorted(f[2] for f in c.list_folders()) == ["INBOX", "INBOX/Sub", "Work"]
    c.subscribe_folder("Work")
    assert [f[2] for f in c.list_sub_folders()] == ["Work"]
    c.rename_folder("Work", "Play")
    assert c.folder_status("Play", ["MESSAGES", "UIDVALIDITY"])[b"MESSAGES"] == 0
    c.delete_folder("Play")
    info = c.select_folder("INBOX")
    assert info[b"EXISTS"] == 3 and info[b"UIDNEXT"] == 4 and b"HIGHESTMODSEQ" in info
    data = c.fetch(c.search(), ["UID", "FLAGS", "RFC822.SIZE", "INTERNALDATE", "ENVELOPE", "BODYSTRUCTURE",
                           "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
    assert sorted(data) == [1, 2, 3]
    assert data[2][b"ENVELOPE"].subject == b"message 2"
    assert data[2][b"BODY[HEADER.FIELDS (SUBJECT)]"] == b"Subject: message 2\r\n\r\n"
    assert c.add_flags([1, 2], [b"\\Seen", b"$Work"])[1] == (b"$Work", b"\\Seen")
    assert c.remove_flags(2, [b"$Work"])[2] == (b"\\Seen",)
    assert c.set_flags(3, [b"\\Flagged"])[3] == (b"\\Flagged",)
    assert c.get_flags([1, 3]) == {1: (b"$Work", b"\\Seen"), 3: (b"\\Flagged",)}
    assert c.search(["UNSEEN"]) == [3] and c.search(["FROM", "alice", "SUBJECT", "message 1"]) == [1]
    assert c.search(["OR", "FLAGGED", "KEYWORD", "$Work"]) == [1, 3]
    c.create_folder("Archive")
    c.copy([1], "Archive")
    c.move([2], "Archive")
    assert c.folder_status("Archive", ["MESSAGES"])[b"MESSAGES"] == 2
    assert c.search() == [1, 3]  # UIDs; the move expunged UID 2 from this view
    c.delete_messages([1])
    assert c.expunge()[0] == b"EXPUNGE completed"
    uid = c.append("INBOX", message(9), flags=[b"\\Seen"])
    assert uid.startswith(b"[APPENDUID ")
    # IDLE: a delivery by someone else shows up at once
    c.idle()
    deliver(server, backend, 1)
    responses = c.idle_check(timeout=10)
    assert (3, b"EXISTS") in responses
    c.idle_done()
    # CONDSTORE: MODSEQ and CHANGEDSINCE
    modseqs = c.fetch(c.search(), ["MODSEQ"])
    highest = max(v[b"MODSEQ"][0] for v in modseqs.values())
    c.add_flags([3], [b"\\Answered"])
    changed = c.fetch(c.search(), ["FLAGS"], modifiers=[f"CHANGEDSINCE {highest}"])
    assert list(changed) == [3]
    c.unselect_folder()
    c.logout()


def test_qresync_after_reconnect(server, backend):
    """IMAP-21: a client that saw HIGHESTMODSEQ resyncs with QRESYNC: VANISHED (EARLIER) plus changed flags only."""
    deliver(server, backend, 5)
    c = IMAPClient(HOST, port=server.port, ssl=False)
    c.login("alice", "apw")
    assert c.enable("QRESYNC") == [b"CONDSTORE", b"QRESYNC"]
    info = c.select_folder("INBOX")
    uidvalidity, highest = info[b"UIDVALIDITY"], info[b"HIGHESTMODSEQ"]
    c.logout()
    other = IMAPClient(HOST, port=server.port, ssl=False)
    other.login("alice", "apw")
    other.select_folder("INBOX")
    other.add_flags([2], [b"\\Seen"])
    other.delete_messages([4])
    other.expunge()
    other.logout()
    c = imaplib.IMAP4(HOST, server.port)
    c.login("alice", "apw")
    c._simple_command("ENABLE", "QRESYNC")
    typ, data = c._simple_command("SELECT", "INBOX", f"(QRESYNC ({uidvalidity} {highest} 1:5))")
    assert typ == "OK"
    assert c.untagged_responses.get("VANISHED") == [b"(EARLIER) 4"]
    fetches = c.untagged_responses.get("FETCH")
    assert len(fetches) == 1 and fetches[0].startswith(b"2 (UID 2 FLAGS (\\Seen) MODSEQ (")
    c.logout()


def test_live_updates_between_two_clients(server, backend):
    """IMAP-15: a second session's changes show up as EXISTS / FETCH / EXPUNGE at the allowed points."""
    deliver(server, backend, 2)
    a = imaplib.IMAP4(HOST, server.port)
    a.login("alice", "apw")
    a.select("INBOX")
    b = imaplib.IMAP4(HOST, server.port)
    b.login("alice", "apw")
    b.select("INBOX")
    b.store("1", "+FLAGS.SILENT", "(\\Deleted)")
    b.expunge()
    b.append("INBOX", None, None, message(3))
    typ, data = a.fetch("1", "(UID)")
    assert data == [b"1 (UID 1)"]  # no EXPUNGE during FETCH: 1 still names UID 1
    assert a.untagged_responses.get("EXISTS")[-1] == b"3"  # the first is SELECT's
    a.noop()
    assert a.untagged_responses.get("EXPUNGE") == [b"1"]
    assert a.fetch("1", "(UID)")[1] == [b"1 (UID 2)"]
    a.logout()
    b.logout()


def test_isolation_over_the_wire(server, backend):
    """IMAP-12: bob's mailboxes are invisible and unreachable for alice."""
    deliver(server, backend, 1, "user/bob/INBOX")
    c = imaplib.IMAP4(HOST, server.port)
    c.login("alice", "apw")
    assert c.list('""', "*")[1] == [b'(\\HasNoChildren) "/" "INBOX"']
    assert c.list("user/", "*")[1] == [None]
    for name in ('"user/bob/INBOX"', '"../bob/INBOX"', "bob/INBOX"):
        assert c.select(name)[0] == "NO"
        assert c.status(name, "(MESSAGES)")[0] == "NO"
    c.select("INBOX")
    assert c.copy("1:*", '"../bob/INBOX"')[0] == "NO"
    c.logout()
    assert len(backend.uids("user/bob/INBOX")) == 1


def test_read_only_replica_over_the_wire(server, backend):
    """IMAP-13"""
    deliver(server, backend, 1)
    backend.make_replica("master.example:1143")
    c = imaplib.IMAP4(HOST, server.port)
    c.login("alice", "apw")
    with pytest.raises(imaplib.IMAP4.readonly):  # imaplib's way of saying SELECT answered [READ-ONLY]
        c.select("INBOX")
    c.untagged_responses.pop("READ-ONLY")  # else imaplib refuses to even send the STORE
    typ, data = c.store("1", "+FLAGS", "(\\Seen)")
    assert typ == "NO" and data[0].startswith(b"[UNAVAILABLE] this node is a read-only replica; the master is "
                                              b"master.example:1143")
    c.logout()


def test_a_bug_answers_serverbug_and_the_session_goes_on(server, backend):
    """IMAP-25: no traceback on the wire; the session and the server carry on."""
    deliver(server, backend, 1)
    backend.fail_next("snapshot", RuntimeError("simulated bug"))
    data = raw_exchange(server.port, b"a LOGIN alice apw\r\nb SELECT INBOX\r\nc SELECT INBOX\r\n",
                        until=b"c OK")
    check_responses(data)
    assert b"b NO [SERVERBUG] internal server error (logged)" in data
    assert b"Traceback" not in data and b"simulated bug" not in data and b"c OK [READ-WRITE]" in data


def test_limits_sessions_per_user_and_address_and_failed_logins(backend):
    """IMAP-26: sessions per user and per address are bounded; failed logins are counted per address."""
    with serve_in_thread(backend.backend, max_sessions_per_user=1, max_sessions_per_address=2,
                         failed_login_delay_s=0) as srv:
        a = imaplib.IMAP4(HOST, srv.port)
        a.login("alice", "apw")
        b = imaplib.IMAP4(HOST, srv.port)
        with pytest.raises(imaplib.IMAP4.error, match=r"\[LIMIT\] too many sessions for this user"):
            b.login("alice", "apw")
        for _ in range(2):
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                b.login("bob", "wrong")
        assert srv.server.auth_failures["127.0.0.1"] == 2
        b.login("bob", "bpw")
        assert srv.server.auth_failures["127.0.0.1"] == 0
        data = raw_exchange(srv.port, b"", until=b"BYE")
        assert b"* BYE [LIMIT] too many connections from your address (limit 2)" in data
        a.logout()
        b.logout()
    assert [login_delay_s(n, 0.5, 8) for n in range(6)] == [0, 0.5, 1, 2, 4, 8]


def test_line_and_literal_limits_over_the_wire(backend):
    """IMAP-3: an over-long line gets BAD and a too-big literal NO [TOOBIG]; the session stays in sync."""
    with serve_in_thread(backend.backend, max_line_bytes=1000, max_literal_bytes=500, failed_login_delay_s=0) as srv:
        data = raw_exchange(srv.port, b"a LOGIN alice apw\r\nb NOOP " + b"x" * 5000 + b"\r\n"
                            b"c APPEND INBOX {501+}\r\n" + b"y" * 501 + b"\r\nd APPEND INBOX {501}\r\ne NOOP\r\n",
                            until=b"e OK")
        check_responses(data)
        assert b"b BAD command line too long (limit 1000 octets)" in data
        assert b"c NO [TOOBIG] literal of 501 octets is over the limit of 500" in data
        assert b"d NO [TOOBIG]" in data and b"e OK NOOP completed" in data


def test_logindisabled_for_non_loopback_is_decided_by_the_address():
    """IMAP-8: loopback clients may log in without TLS; the rule lives in one function."""
    from engine.imap.server import _is_loopback
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and not _is_loopback("192.0.2.1")
    assert not _is_loopback("?")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    os.chmod(key, 0o600)
    return str(cert), str(key)


def test_starttls_and_implicit_tls(backend, certificate):
    """IMAP-8, IMAP-22: STARTTLS upgrades and then allows LOGIN; IMAPS works from the first byte."""
    cert, key = certificate
    ctx = ssl.create_default_context(cafile=cert)
    with serve_in_thread(backend.backend, tls_port=0, certfile=cert, keyfile=key, failed_login_delay_s=0) as srv:
        c = imaplib.IMAP4(HOST, srv.port)
        assert "STARTTLS" in c.capabilities
        c.starttls(ssl_context=ctx)
        assert "AUTH=PLAIN" in c.capabilities and "STARTTLS" not in c.capabilities
        assert c.login("alice", "apw")[0] == "OK"
        c.logout()
        s = imaplib.IMAP4_SSL(HOST, srv.tls_port, ssl_context=ctx)
        assert s.login("bob", "bpw")[0] == "OK"
        s.logout()
        c = IMAPClient(HOST, port=srv.tls_port, ssl=True, ssl_context=ctx)
        c.login("alice", "apw")
        c.logout()


def test_plaintext_injection_after_starttls_is_dropped(backend, certificate):
    """IMAP-22: a command pipelined after STARTTLS in the same plaintext segment never runs."""
    cert, key = certificate
    ctx = ssl.create_default_context(cafile=cert)
    with serve_in_thread(backend.backend, certfile=cert, keyfile=key, failed_login_delay_s=0) as srv:
        s = socket.create_connection((HOST, srv.port), timeout=10)
        s.recv(4096)
        s.sendall(b"a STARTTLS\r\nb CREATE Injected\r\n")
        reply = b""
        while b"a OK" not in reply:
            reply += s.recv(4096)
        t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
        t.sendall(b"c LOGIN alice apw\r\nd LIST \"\" *\r\n")
        data = b""
        while b"d OK" not in data:
            data += t.recv(4096)
        assert b"Injected" not in data and b"b " not in data
        t.close()
    assert "user/alice/Injected" not in backend.mailboxes()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(st.one_of(st.binary(max_size=200), st.sampled_from([
    b"a LOGIN alice apw\r\n", b"b SELECT INBOX\r\n", b"{99999999999}\r\n", b"c FETCH 1:* (BODY[]\r\n",
    b"d IDLE\r\n", b"DONE\r\n", b"\r\n", b"e APPEND INBOX {5+}\r\n", b"f STARTTLS\r\n", b"\x00\xff"])), max_size=12))
def test_fuzzing_over_a_real_socket_never_hurts_the_server(server, backend, junk):
    """IMAP-6, IMAP-25: any bytes: no traceback on the wire, and another client is served afterwards."""
    s = socket.create_connection((HOST, server.port), timeout=10)
    try:
        s.settimeout(0.2)
        s.sendall(b"".join(junk))
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        assert b"Traceback" not in data and b"SERVERBUG" not in data
    finally:
        s.close()
    c = imaplib.IMAP4(HOST, server.port)
    assert c.login("bob", "bpw")[0] == "OK"
    c.logout()


def test_many_clients_in_parallel(server, backend):
    """Sessions are independent tasks: eight clients appending at once all get their APPENDUIDs."""
    results: list = []

    def worker(i):
        c = imaplib.IMAP4(HOST, server.port)
        c.login("alice", "apw")
        for k in range(5):
            typ, data = c.append("INBOX", None, None, message(100 * i + k))
            results.append((typ, data[0]))
        c.logout()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    uids = sorted(int(d.split()[2].rstrip(b"]")) for typ, d in results if typ == "OK")
    assert uids == list(range(1, 41))


def test_imapclient_reports_errors_as_exceptions(server, backend):
    c = IMAPClient(HOST, port=server.port, ssl=False)
    with pytest.raises(IMAPClientError):
        c.login("alice", "nope")
    c.login("alice", "apw")
    with pytest.raises(IMAPClientError, match="NONEXISTENT"):
        c.select_folder("Nope")
    c.logout()


def test_shutdown_says_bye_to_idle_and_idling_sessions(backend):
    """IMAP-26: a stopping server ends every session with * BYE, IDLE included."""
    srv = serve_in_thread(backend.backend, failed_login_delay_s=0).__enter__()
    try:
        quiet = socket.create_connection((HOST, srv.port), timeout=10)
        quiet.recv(4096)
        idler = socket.create_connection((HOST, srv.port), timeout=10)
        idler.recv(4096)
        idler.sendall(b"a LOGIN alice apw\r\nb SELECT INBOX\r\nc IDLE\r\n")
        got = b""
        while b"+ idling" not in got:
            got += idler.recv(4096)
    finally:
        srv.__exit__(None, None, None)

    def rest(sock):
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data
    assert rest(quiet).startswith(b"* BYE [UNAVAILABLE] mailwal shutting down")
    assert rest(idler).startswith(b"* BYE [UNAVAILABLE] mailwal shutting down")
