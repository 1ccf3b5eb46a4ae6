"""The IMAP front in `walctl status` (text and --json) and on `/metrics` of a running `walctl serve`.

Sessions open and in IDLE, connections and failed logins since start, and commands answered per
name and tagged status, as a client's own sessions made them (imaplib and a raw socket).
"""

from __future__ import annotations

import imaplib
import json
import socket
import time
import urllib.request

import pytest

from engine.node import Node
from tests.support.cluster import Cluster, walctl
from tools.ports import free_port

HOST = "127.0.0.1"
BODY = b"From: a@x.example\r\nSubject: counted\r\n\r\nhello\r\n"


@pytest.fixture
def node(tmp_path):
    c = Cluster(tmp_path, names=("a",))
    a = c["a"]
    with Node.open(a.path) as n:
        n.add_user("alice", "apw")
        n.append_messages("user/alice/INBOX", [(BODY, (), None)])
    a.imap, a.metrics = free_port(), free_port()
    a.start("serve", extra=["--imap", f"{HOST}:{a.imap}", "--metrics", f"{HOST}:{a.metrics}"])
    yield a
    c.stop()


def imap_status(a) -> dict:
    return json.loads(walctl("status", a.path, "--json").stdout)["imap"]


def scrape(a) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{HOST}:{a.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("mailwal_imap_")}


def wait_for(what, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return got


def test_sessions_idle_commands_and_failed_logins_are_in_status_and_metrics(node):
    a = node
    bad = imaplib.IMAP4(HOST, a.imap)
    with pytest.raises(imaplib.IMAP4.error):
        bad.login("alice", "wrong")
    bad.logout()
    c = imaplib.IMAP4(HOST, a.imap)
    c.login("alice", "apw")
    c.capability()
    c.select("INBOX")
    c.fetch("1", "(FLAGS)")
    c.store("1", "+FLAGS", "(\\Seen)")
    with pytest.raises(imaplib.IMAP4.error):
        c.store("1", "+FLAGS", "(\\Bogus)")  # BAD: not a system flag
    idler = socket.create_connection((HOST, a.imap), timeout=10)
    idler.recv(4096)
    idler.sendall(b"x BOGUS\r\ny FETCH 1\r\nz UID FETCH (\r\na LOGIN alice apw\r\nb IDLE\r\n")
    got = b""
    while b"+ idling" not in got:
        got += idler.recv(4096)

    st = imap_status(a)
    assert st["listen"] == {"imap": f"{HOST}:{a.imap}"}
    assert (st["sessions"], st["idle"], st["connections"], st["auth_failures"]) == (2, 1, 3, 1)
    assert st["commands"]["LOGIN"] == {"OK": 2, "NO": 1}
    assert st["commands"]["SELECT"] == {"OK": 1}
    assert st["commands"]["STORE"] == {"OK": 1, "BAD": 1}
    # Answered by the protocol layer itself: unknown (the names stay bounded), not allowed yet, malformed.
    assert st["commands"]["(unknown)"] == {"BAD": 1} and st["commands"]["FETCH"] == {"OK": 1, "BAD": 1}
    assert st["commands"]["UID FETCH"] == {"BAD": 1} and st["commands"]["CAPABILITY"] == {"OK": 3}  # imaplib asks at connect
    m = scrape(a)
    assert m["mailwal_imap_sessions"] == 2 and m["mailwal_imap_idle_sessions"] == 1
    assert m["mailwal_imap_connections_total"] == 3 and m["mailwal_imap_auth_failures_total"] == 1
    assert m['mailwal_imap_commands_total{command="LOGIN",outcome="NO"}'] == 1
    assert m['mailwal_imap_commands_total{command="STORE",outcome="BAD"}'] == 1
    text = walctl("status", a.path).stdout
    assert "2 open (1 in IDLE); 3 connections and 1 failed logins since start" in text
    assert "LOGIN 1 NO 2 OK" in text and "STORE 1 BAD 1 OK" in text

    # A session that goes away in IDLE no longer counts; one that logs out no longer is open.
    idler.close()
    wait_for(lambda: imap_status(a)["idle"] == 0)
    c.logout()
    st = wait_for(lambda: (s := imap_status(a))["sessions"] == 0 and s)
    assert st["commands"]["LOGOUT"] == {"OK": 2} and "IDLE" not in st["commands"]  # IDLE never answered
    assert scrape(a)["mailwal_imap_sessions"] == 0
