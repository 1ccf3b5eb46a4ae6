"""Operators change users and mail on a running node, through its control channel (CTL-10).

The real `walctl user|mailbox|flags|expunge` against a master run by `walctl serve --imap` (and a
replica by `walctl follow`), and against the same node stopped. Each change must be seen by an
IMAP client (imaplib) at once; a failure is one `Error:` line and exit status 1; a password never
shows on a command line, in the node's output or in its log (only its hash).
"""

from __future__ import annotations

import glob
import imaplib
import os
import subprocess
import time

import argon2
import bcrypt
import pytest
from passlib.hash import sha512_crypt

from engine.node import Node
from tests.support.cluster import ROOT, WALCTL, Cluster
from tests.support.helpers import assert_no_traceback
from tools.ports import free_port

HOST = "127.0.0.1"
PASSWORD = "correct horse battery staple"
BODY = b"From: a@x.example\r\nSubject: operator\r\n\r\nhello\r\n"


def walctl(*args, input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(WALCTL + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       input=input if input is not None else "", env=dict(os.environ, PYTHONPATH=ROOT))
    assert_no_traceback(p.stderr, args)
    return p


def ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, f"exit {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


def error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 1, f"exit {p.returncode}, wanted 1:\n{p.stdout}\n{p.stderr}"
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, p.stderr
    return errors[0]


def imap(port: int) -> imaplib.IMAP4:
    deadline = time.monotonic() + 20
    while True:
        try:
            return imaplib.IMAP4(HOST, port, timeout=10)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def can_log_in(port: int, user: str, password: str) -> bool:
    c = imap(port)
    try:
        c.login(user, password)
        return True
    except imaplib.IMAP4.error:
        return False
    finally:
        c.shutdown()


def fetch(c: imaplib.IMAP4, what: str) -> list:
    """FETCH 1:* ``what`` after a NOOP took in the updates (imaplib would mix them into the answer)."""
    c.noop()
    c.response("FETCH")
    typ, data = c.fetch("1:*", what)
    assert typ == "OK"
    return data


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, names=("a", "b"))
    for node in c.nodes.values():
        node.imap = free_port()
    yield c
    c.stop()


def serve(cluster) -> None:
    a = cluster["a"]
    a.start("serve", extra=["--imap", f"{HOST}:{a.imap}"])
    imap(a.imap).shutdown()  # the IMAP front listens


def test_users_on_a_running_node_can_log_in_at_once_and_the_password_is_never_shown(cluster):
    """CTL-10: user add, passwd, list, del through `walctl serve`'s control socket."""
    serve(cluster)
    a = cluster["a"]
    out = ok(walctl("user", a.path, "add", "alice", "--password-stdin", input=PASSWORD + "\n"))
    assert "added user alice with user/alice/INBOX" in out
    assert can_log_in(a.imap, "alice", PASSWORD) and not can_log_in(a.imap, "alice", "wrong")
    assert "exists already" in error_line(walctl("user", a.path, "add", "alice", "--password-stdin", input="x\n"))
    # No terminal and no --password-stdin: nothing to prompt on, so nothing is asked or changed.
    assert "--password-stdin" in error_line(walctl("user", a.path, "add", "bob"))
    assert "BadUserName" not in error_line(walctl("user", a.path, "add", "Not Valid", "--password-stdin", input="x\n"))

    ok(walctl("user", a.path, "passwd", "alice", "--password-stdin", input="new " + PASSWORD + "\n"))
    assert can_log_in(a.imap, "alice", "new " + PASSWORD) and not can_log_in(a.imap, "alice", PASSWORD)
    assert "no user" in error_line(walctl("user", a.path, "passwd", "nobody", "--password-stdin",
                                          input="x\n")).lower()
    assert walctl("user", a.path, "list", "--json").stdout.count('"ARGON2ID"') == 1
    assert ok(walctl("user", a.path, "list")).split() == ["alice", "ARGON2ID"]

    ok(walctl("user", a.path, "del", "alice"))
    assert not can_log_in(a.imap, "alice", "new " + PASSWORD)
    assert "no user" in error_line(walctl("user", a.path, "del", "alice")).lower()
    # The password is in no log record (only its argon2id hash), nor in anything the node printed.
    a.kill()
    for path in glob.glob(os.path.join(a.path, "log.wal", "*")) + [a.log.name]:
        with open(path, "rb") as f:
            assert PASSWORD.encode() not in f.read(), path


def _dovecot_argon2id(password: str) -> str:
    return "{ARGON2ID}" + argon2.PasswordHasher(time_cost=1, memory_cost=8192).hash(password)


def test_import_of_a_dovecot_passwd_file_reports_each_line_and_exits_1_when_one_is_refused(cluster, tmp_path):
    """CTL-10: ARGON2ID, BLF-CRYPT ($2y$, as Dovecot writes it) and SHA512-CRYPT users log in over IMAP."""
    serve(cluster)
    a = cluster["a"]
    ok(walctl("user", a.path, "add", "erin", "--password-stdin", input="erin pw\n"))
    bcrypt_hash = "$2y$" + bcrypt.hashpw(b"bob pw", bcrypt.gensalt(rounds=4)).decode()[4:]
    passwd = tmp_path / "users"
    passwd.write_text("\n".join([
        "# exported from dovecot",
        f"ann:{_dovecot_argon2id('ann pw')}:1000:1000::/home/ann::",
        f"bob:{{BLF-CRYPT}}{bcrypt_hash}",
        f"Cid@example.org:{{SHA512-CRYPT}}{sha512_crypt.using(rounds=5000).hash('cid pw')}::::::",
        "dan:{PLAIN}dan pw",
        f"erin:{_dovecot_argon2id('other')}",
        "",
    ]))
    p = walctl("user", a.path, "import", "--passwd-file", passwd, "--strip-domain")
    line = error_line(p)
    assert "2 of 5 line(s) refused (lines 5, 6)" in line
    out = p.stdout.splitlines()
    assert out[0] == "line 2: ann: imported: added (ARGON2ID)"
    assert out[1] == "line 3: bob: imported: added (BLF-CRYPT)"
    assert out[2] == "line 4: cid: imported: added (SHA512-CRYPT)"
    assert out[3].startswith("line 5: dan: refused: password scheme {PLAIN} is not supported")
    assert out[4].startswith("line 6: erin: refused: user erin exists")
    for user in ("ann", "bob", "cid"):
        assert can_log_in(a.imap, user, f"{user} pw"), user
    assert can_log_in(a.imap, "erin", "erin pw")  # refused lines changed nothing
    # --replace gives an existing user the file's hash; a file whose every line imports exits 0.
    passwd.write_text(f"erin:{_dovecot_argon2id('other')}\n")
    assert ok(walctl("user", a.path, "import", "--passwd-file", passwd, "--replace")) == \
        "line 1: erin: imported: password replaced (ARGON2ID)\n"
    assert can_log_in(a.imap, "erin", "other")


def _deliver_two(path: str) -> None:
    with Node.open(path) as n:
        n.add_user("alice", "apw")
        n.append_messages("user/alice/INBOX", [(BODY, (), None), (BODY + b"2", (), None)])


def test_mailbox_flags_and_expunge_on_a_running_node_reach_an_open_imap_session(cluster):
    """CTL-10: each change is one durable record; the selected session sees it at its next command."""
    a = cluster["a"]
    _deliver_two(a.path)
    serve(cluster)
    c = imap(a.imap)
    c.login("alice", "apw")
    c.select("INBOX")
    out = ok(walctl("flags", a.path, "user/alice/INBOX", "1:*", "add", "\\Flagged", "work"))
    assert out.startswith("added \\Flagged work on UIDs 1:2 of user/alice/INBOX")
    assert fetch(c, "(FLAGS)") == [b"1 (FLAGS (\\Flagged work))", b"2 (FLAGS (\\Flagged work))"]
    ok(walctl("flags", a.path, "user/alice/INBOX", "2", "remove", "work"))
    ok(walctl("flags", a.path, "user/alice/INBOX", "*", "replace", "\\Seen"))
    assert fetch(c, "(FLAGS)") == [b"1 (FLAGS (\\Flagged work))", b"2 (FLAGS (\\Seen))"]

    ok(walctl("mailbox", a.path, "create", "user/alice/Archive"))
    assert any(b'"Archive"' in x or b" Archive" in x for x in c.list()[1])
    ok(walctl("mailbox", a.path, "rename", "user/alice/Archive", "user/alice/Old"))
    names = b" ".join(c.list()[1])
    assert b"Old" in names and b"Archive" not in names
    ok(walctl("mailbox", a.path, "delete", "user/alice/Old"))
    assert b"Old" not in b" ".join(c.list()[1])

    # Refused requests: one Error line, exit 1, nothing changed.
    assert "no message with UID 3" in error_line(walctl("expunge", a.path, "user/alice/INBOX", "1,3"))
    assert "no mailbox" in error_line(walctl("flags", a.path, "user/alice/Nope", "1", "add", "x"))
    assert "storable system flag" in error_line(walctl("flags", a.path, "user/alice/INBOX", "1", "add", "\\Bogus"))
    assert "exists" in error_line(walctl("mailbox", a.path, "create", "user/alice/INBOX"))
    assert fetch(c, "(UID)") == [b"1 (UID 1)", b"2 (UID 2)"]

    assert ok(walctl("expunge", a.path, "user/alice/INBOX", "1")).startswith("expunged UIDs 1 from user/alice/INBOX")
    c.noop()
    assert c.response("EXPUNGE")[1] == [b"1"]
    assert fetch(c, "(UID)") == [b"1 (UID 2)"]
    c.logout()


def test_a_running_replica_refuses_naming_its_master(cluster):
    """CTL-10: writes go to the master; the replica says where it is."""
    a, b = cluster["a"], cluster["b"]
    _deliver_two(a.path)
    serve(cluster)
    b.start("follow", extra=["--master", f"{HOST}:{a.listen}"])
    cluster.wait_converged()
    for args in (("user", b.path, "add", "zed", "--password-stdin"),
                 ("flags", b.path, "user/alice/INBOX", "1", "add", "x"),
                 ("expunge", b.path, "user/alice/INBOX", "1"),
                 ("mailbox", b.path, "create", "user/alice/X")):
        line = error_line(walctl(*args, input="pw\n"))
        assert f"node b is a read-only replica: run this on the master (127.0.0.1:{a.listen})" in line, line
    assert walctl("user", b.path, "list", "--json").stdout.count('"alice"') == 1  # reads work on a replica


def test_the_same_commands_on_a_stopped_node_open_it_directly(cluster):
    """CTL-10: the node stopped, walctl writes the same records; IMAP sees them once it serves."""
    a = cluster["a"]
    _deliver_two(a.path)
    ok(walctl("user", a.path, "add", "bob", "--password-stdin", input="bob pw\n"))
    ok(walctl("flags", a.path, "user/alice/INBOX", "2", "add", "\\Answered"))
    ok(walctl("expunge", a.path, "user/alice/INBOX", "1"))
    ok(walctl("mailbox", a.path, "create", "user/bob/Sent"))
    assert "no message with UID 1" in error_line(walctl("flags", a.path, "user/alice/INBOX", "1", "add", "x"))
    serve(cluster)
    assert can_log_in(a.imap, "bob", "bob pw")
    c = imap(a.imap)
    c.login("alice", "apw")
    c.select("INBOX")
    assert fetch(c, "(UID FLAGS)") == [b"1 (UID 2 FLAGS (\\Answered))"]
    c.logout()
    c = imap(a.imap)
    c.login("bob", "bob pw")
    assert any(b"Sent" in x for x in c.list()[1])
    c.logout()
