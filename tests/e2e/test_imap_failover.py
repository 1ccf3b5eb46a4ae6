"""IMAP sessions across role changes (IMAP-13, CTL-4, CTL-5).

* A session open on a replica stays open when its node is promoted and becomes writable: the
  next update says `* OK [READ-WRITE]` (with the new PERMANENTFLAGS) and a STORE succeeds.
* On a soft failover the old master's sessions end with `* BYE [REFERRAL imap://HOST:PORT/]`
  naming the new master's IMAP address (RFC 2221); new connections to the old master are served
  read-only.

The executor part runs on both backends; the failover part on real `walctl serve`/`follow`
processes on 127.0.0.1.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from engine.imap.server import referral
from engine.node import Node
from tests.support.cluster import Cluster, walctl
from tests.support.imap_node import HARNESSES, make_harness
from tests.support.imap import MESSAGE
from tools.ports import free_port

HOST = "127.0.0.1"
INBOX = "user/alice/INBOX"


@pytest.fixture(params=HARNESSES)
def h(request, tmp_path):
    harness = make_harness(request.param, tmp_path)
    yield harness
    harness.close()


def promote(h) -> None:
    if h.kind == "memory":
        h.backend.read_only_master = None
    else:
        h.node.set_role("master")


def test_a_session_selected_on_a_replica_becomes_writable_when_the_node_is_promoted(h):
    """IMAP-13: the session stays; READ-WRITE and PERMANENTFLAGS are told at the next update."""
    h.deliver(INBOX, MESSAGE)
    h.make_replica("imap.example:143")
    s = h.session().login("alice", "apw")
    assert s.cmd("a SELECT INBOX")[-1] == b"a OK [READ-ONLY] SELECT completed"
    e = h.session().login("alice", "apw")
    assert e.cmd("a EXAMINE INBOX")[-1] == b"a OK [READ-ONLY] EXAMINE completed"
    assert s.cmd("b STORE 1 +FLAGS (\\Seen)")[-1].startswith(b"b NO [UNAVAILABLE] this node is a read-only replica")
    promote(h)
    out = s.cmd("c STORE 1 +FLAGS (\\Flagged)")
    assert out[:2] == [b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] flags that can be "
                       b"changed", b"* OK [READ-WRITE] this node is the master now: the mailbox is writable"], out
    assert out[-1] == b"c OK STORE completed" and b"* 1 FETCH (FLAGS (\\Flagged))" in out
    assert s.cmd("d NOOP") == [b"d OK NOOP completed"]  # told once
    # A body FETCH now sets \Seen, as on any master; an EXAMINEd session stays read-only.
    s.cmd("e FETCH 1 BODY[]")
    assert h.flags(INBOX, 1) == {"\\Flagged", "\\Seen"}
    out = e.cmd("f STORE 1 -FLAGS (\\Seen)")
    assert out[-1].startswith(b"f NO [CANNOT] ") and not any(b"READ-WRITE" in x for x in out)


def test_the_referral_names_the_new_master_and_its_imap_address():
    """IMAP-13: RFC 2221 REFERRAL when the address fits a response code, else the text names it."""
    text, code = referral("b", ("10.0.0.2", 143), ("10.0.0.2", 993))
    assert code.encode() == b"[REFERRAL imap://10.0.0.2:143/]"
    assert text == ("this node is a read-only replica now; the master is b (IMAP at 10.0.0.2:143 and IMAPS at "
                    "10.0.0.2:993): reconnect there")
    text, code = referral("b", ("::1", 143), None)
    assert code.name == "UNAVAILABLE" and "IMAP at [::1]:143" in text
    text, code = referral("b", None, None)
    assert code.name == "UNAVAILABLE" and text == "this node is a read-only replica now; the master is b"


# -- real processes --------------------------------------------------------------------------


class Raw:
    """An IMAP connection read line by line (untagged BYE and unsolicited responses matter here)."""

    def __init__(self, port: int):
        deadline = time.monotonic() + 20
        while True:
            try:
                self.sock = socket.create_connection((HOST, port), timeout=15)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.buf = b""
        self.until(b"* OK")

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def until(self, want: bytes, timeout: float = 20) -> bytes:
        """Everything received up to the end of the first line that starts with ``want``."""
        deadline = time.monotonic() + timeout
        while True:
            start = 0
            while (end := self.buf.find(b"\r\n", start)) >= 0:
                if self.buf.startswith(want, start):
                    got, self.buf = self.buf[:end + 2], self.buf[end + 2:]
                    return got
                start = end + 2
            if time.monotonic() > deadline:
                raise AssertionError(f"{want!r} not received; got {self.buf!r}")
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed before {want!r}; got {self.buf!r}")
            self.buf += chunk

    def cmd(self, line: bytes) -> bytes:
        tag = line.split(b" ", 1)[0]
        self.send(line)
        return self.until(tag + b" ")

    def closed(self, timeout: float = 10) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, names=("a", "b"))
    with Node.open(c["a"].path) as n:
        n.add_user("alice", "apw")
        n.append_messages(INBOX, [(MESSAGE, (), None), (MESSAGE + b"2", (), None)])
    for node in c.nodes.values():
        node.imap = free_port()
    yield c
    c.stop()


def session(port: int, select: bool = True) -> Raw:
    r = Raw(port)
    assert b"a OK" in r.cmd(b"a LOGIN alice apw")
    if select:
        assert b"s OK" in r.cmd(b"s SELECT INBOX")
    return r


def test_soft_failover_refers_the_old_masters_sessions_and_makes_the_replicas_writable(cluster):
    """IMAP-13, CTL-4: BYE with the new master's IMAP address on the old master, writable sessions on the new."""
    a, b = cluster["a"], cluster["b"]
    a.start("serve", extra=["--imap", f"{HOST}:{a.imap}"])
    b.start("follow", extra=["--master", f"{HOST}:{a.listen}", "--imap", f"{HOST}:{b.imap}"])
    cluster.wait_converged()
    on_a = session(a.imap)
    idling = session(a.imap)
    idling.send(b"i IDLE")
    idling.until(b"+ idling")
    not_logged_in = Raw(a.imap)
    on_b = session(b.imap)
    assert b"NO [UNAVAILABLE]" in on_b.cmd(b"w STORE 1 +FLAGS (\\Seen)")

    walctl("failover", a.path, "--to", "b")
    for r in (on_a, idling, not_logged_in):
        bye = r.until(b"* BYE")
        assert bye.endswith(b"* BYE [REFERRAL imap://127.0.0.1:%d/] this node is a read-only replica now; the master "
                            b"is b (IMAP at 127.0.0.1:%d): reconnect there\r\n" % (b.imap, b.imap)), bye
        assert r.closed()
    out = on_b.cmd(b"x STORE 1:2 +FLAGS (\\Flagged)")
    assert b"* OK [READ-WRITE] this node is the master now" in out and out.endswith(b"x OK STORE completed\r\n"), out

    # A new connection to the old master is served, read-only, and names its master.
    late = session(a.imap, select=False)
    assert b"s OK [READ-ONLY] SELECT completed" in late.cmd(b"s SELECT INBOX")
    cluster.wait_converged()
    assert b"* 1 FETCH (FLAGS (\\Flagged))" in late.cmd(b"f FETCH 1 FLAGS")
    assert re.search(rb"t NO \[UNAVAILABLE\] this node is a read-only replica; the master is 127\.0\.0\.1:%d"
                     % b.listen, late.cmd(b"t STORE 1 +FLAGS (\\Seen)"))

    # Hard failover: the new master dies; the old one, promoted, makes that same session writable.
    b.kill()
    walctl("promote", a.path)
    out = late.cmd(b"u STORE 2 +FLAGS (\\Answered)")
    assert b"* OK [READ-WRITE]" in out and out.endswith(b"u OK STORE completed\r\n"), out
    for r in (on_b, late):
        r.close()
