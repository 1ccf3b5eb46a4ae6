"""The IMAP front in real node processes: `walctl serve --imap` and `walctl follow --imap` (IMAP-13, IMAP-15).

A master and a replica run as processes on 127.0.0.1 with their IMAP fronts; a flag change made
through the master's IMAP front reaches a session open on the replica through real replication
(the replica's applier wakes the session: IDLE sees it at once), and the replica answers writes
with NO [UNAVAILABLE] naming its master.
"""

from __future__ import annotations

import imaplib
import re
import socket
import time

import pytest

from engine.node import Node
from tests.support.cluster import Cluster, walctl
from tools.ports import free_port

HOST = "127.0.0.1"
BODY = b"From: a@x.example\r\nSubject: replicated\r\n\r\nhello\r\n"


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, names=("a", "b"))
    a = c["a"]
    with Node.open(a.path) as n:  # users are records of the log: the replica gets them by replication
        n.add_user("alice", "apw")
        n.append_messages("user/alice/INBOX", [(BODY, (), None)])
    for node in c.nodes.values():
        node.imap = free_port()
    yield c
    c.stop()


def _connect(port: int) -> imaplib.IMAP4:
    deadline = time.monotonic() + 20
    while True:
        try:
            return imaplib.IMAP4(HOST, port, timeout=10)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _idle_until(conn: socket.socket, want: bytes, timeout: float = 15) -> bytes:
    conn.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while want not in data and time.monotonic() < deadline:
        data += conn.recv(65536)
    return data


def test_a_flag_change_on_the_master_reaches_an_idling_session_on_the_replica(cluster):
    """IMAP-13, IMAP-15: through `walctl serve --imap` and `walctl follow --imap` processes."""
    a, b = cluster["a"], cluster["b"]
    a.start("serve", extra=["--imap", f"{HOST}:{a.imap}"])
    b.start("follow", extra=["--master", f"{HOST}:{a.listen}", "--imap", f"{HOST}:{b.imap}"])
    cluster.wait_converged()
    replica = socket.create_connection((HOST, b.imap), timeout=10)
    replica.recv(4096)
    replica.sendall(b"a LOGIN alice apw\r\nb SELECT INBOX\r\n")
    got = _idle_until(replica, b"b OK")
    assert b"b OK [READ-ONLY] SELECT completed" in got
    replica.sendall(b"c STORE 1 +FLAGS (\\Seen)\r\n")
    got = _idle_until(replica, b"c NO")
    assert re.search(rb"c NO \[UNAVAILABLE\] this node is a read-only replica; the master is 127\.0\.0\.1:%d"
                     % a.listen, got), got
    replica.sendall(b"d IDLE\r\n")
    assert b"+ idling" in _idle_until(replica, b"+ idling")
    master = _connect(a.imap)
    master.login("alice", "apw")
    master.select("INBOX")
    assert master.store("1", "+FLAGS", "(\\Flagged)")[0] == "OK"
    got = _idle_until(replica, b"FLAGS")
    assert b"* 1 FETCH (FLAGS (\\Flagged))" in got
    replica.sendall(b"DONE\r\ne LOGOUT\r\n")
    _idle_until(replica, b"e OK")
    replica.close()
    master.logout()


def test_serve_refuses_imaps_without_a_certificate_and_a_readable_key(cluster, tmp_path):
    """An IMAPS address without certificate and key, or a key others can read, is one Error line, exit 1."""
    a = cluster["a"]
    p = walctl("serve", a.path, "--imaps", f"{HOST}:{free_port()}", check=False)
    assert p.returncode == 1 and "Error: --imaps (IMAP over TLS) needs --tls-cert and --tls-key" in p.stderr
    key = tmp_path / "key.pem"
    key.write_text("x")
    key.chmod(0o644)
    p = walctl("serve", a.path, "--imap", f"{HOST}:{free_port()}", "--tls-cert", str(key), "--tls-key", str(key),
               check=False)
    assert p.returncode == 1 and "is readable by other users" in p.stderr
