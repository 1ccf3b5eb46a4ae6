"""Maildir export/import against a real Dovecot (doveadm), both ways (MS-15).

Dovecot writes a Maildir (mailboxes, saves, flags, keywords, expunges) and
``walctl import`` must see exactly its UIDs, UIDVALIDITY, UIDNEXT, flags,
dates and bytes; ``walctl export`` writes a Maildir and doveadm must read
our UIDs, flags and keywords, change a flag, and the tree must import back.

Needs the Debian package ``dovecot-core`` (doveadm); skipped without it.
doveadm refuses mail access as root, so as root the tree belongs to
``nobody`` and doveadm runs as that user (runuser).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile

import pytest
from click.testing import CliRunner

from engine.node import Node
from tools.walctl import cli

DOVEADM = shutil.which("doveadm")
pytestmark = pytest.mark.skipif(DOVEADM is None, reason="doveadm is missing: apt-get install dovecot-core")


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


class Dovecot:
    """doveadm on one user's Maildir (no daemons: the mail storage is opened in-process)."""

    def __init__(self, base: str, maildir: str):
        self.base = base
        self.maildir = maildir
        self.as_nobody = os.geteuid() == 0
        self.conf = os.path.join(base, "dovecot.conf")
        os.makedirs(os.path.join(base, "run"), exist_ok=True)
        os.makedirs(os.path.join(base, "home"), exist_ok=True)
        with open(self.conf, "w") as f:
            f.write(f"protocols =\nssl = no\nbase_dir = {base}/run\nlog_path = /dev/stderr\n"
                    f"mail_location = maildir:{maildir}\n")
        self.chown()

    def chown(self) -> None:
        if not self.as_nobody:
            return
        nobody = pwd.getpwnam("nobody")
        for dirpath, dirs, files in os.walk(self.base):
            for name in [dirpath] + [os.path.join(dirpath, x) for x in dirs + files]:
                os.lchown(name, nobody.pw_uid, nobody.pw_gid)

    def __call__(self, *args: str, input: bytes | None = None) -> str:
        user = "nobody" if self.as_nobody else pwd.getpwuid(os.geteuid()).pw_name
        argv = [DOVEADM, "-c", self.conf, *args]
        if self.as_nobody:
            argv = ["runuser", "-u", "nobody", "--"] + argv
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "USER": user, "HOME": os.path.join(self.base, "home")}
        proc = subprocess.run(argv, input=input, capture_output=True, env=env, timeout=120)
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
        return proc.stdout.decode()

    def json(self, *args: str):
        return json.loads(self("-f", "json", *args) or "[]")

    def status(self) -> dict:
        return {r["mailbox"]: (int(r["uidvalidity"]), int(r["uidnext"]), int(r["messages"]))
                for r in self.json("mailbox", "status", "messages uidvalidity uidnext", "*")}

    def messages(self) -> dict:
        """mailbox -> [(uid, flags without \\Recent, received unixtime, text)]."""
        out: dict = {}
        for r in self.json("fetch", "mailbox uid flags date.received.unixtime text", "ALL"):
            flags = tuple(sorted(f for f in r["flags"].split() if f != "\\Recent"))
            out.setdefault(r["mailbox"], []).append((int(r["uid"]), flags, int(r["date.received.unixtime"]),
                                                     r["text"]))
        return {k: sorted(v) for k, v in out.items()}


@pytest.fixture
def shared_tmp():
    """A directory ``nobody`` can reach (pytest's tmp_path is private to root)."""
    d = tempfile.mkdtemp(prefix="mailwal-dovecot-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _node_view(node_dir: str, prefix: str) -> tuple[dict, dict]:
    """(status, messages) of a node's mailboxes below ``prefix``, named as Dovecot names them."""
    status, messages = {}, {}
    with Node.open(node_dir) as n:
        for mb in n.list_mailboxes():
            name = mb.name[len(prefix):].replace("/", ".")
            status[name] = (mb.uidvalidity, mb.uidnext, mb.messages)
            msgs = [(m.uid, tuple(sorted(m.flags)), m.internaldate_ms // 1000,
                     n.fetch(mb.name, m.uid).decode()) for m in n.list_messages(mb.name)]
            if msgs:
                messages[name] = sorted(msgs)
    return status, messages


def test_import_a_maildir_that_dovecot_wrote(shared_tmp, tmp_path):
    dove = Dovecot(shared_tmp, os.path.join(shared_tmp, "Maildir"))
    dove("mailbox", "create", "Sent", "Archive.2020", "Entwürfe", "Empty")
    for i in range(1, 8):
        dove("save", "-m", "INBOX", input=f"Subject: m{i}\n\nbody {i}\n".encode())
    dove("save", "-m", "Sent", input=b"Subject: sent\r\n\r\nwith CRLF\r\n")
    dove("save", "-m", "Archive.2020", input=b"Subject: old\n\narchived\n")
    dove("save", "-m", "Entwürfe", input=b"Subject: draft\n\ndraft\n")
    dove("flags", "add", "\\Seen $Junk", "mailbox", "INBOX", "uid", "2")
    dove("flags", "add", "\\Flagged \\Answered \\Draft \\Deleted", "mailbox", "INBOX", "uid", "3")
    dove("flags", "add", "Later $Forwarded", "mailbox", "INBOX", "uid", "4")
    dove("flags", "add", "\\Seen", "mailbox", "Entwürfe", "uid", "1")
    dove("expunge", "mailbox", "INBOX", "uid", "1")
    dove("expunge", "mailbox", "INBOX", "uid", "5")
    dove("expunge", "mailbox", "INBOX", "uid", "7")  # the last UID: UIDNEXT 8 stays above UID 6
    want_status, want_messages = dove.status(), dove.messages()
    assert want_status["INBOX"][1:] == (8, 4)

    node = str(tmp_path / "n")
    run("init", node)
    run("import", node, "--maildir", os.path.join(shared_tmp, "Maildir"), "--user", "bob")
    got_status, got_messages = _node_view(node, "user/bob/")
    assert got_status == want_status
    assert got_messages == want_messages


def test_dovecot_reads_an_export_changes_it_and_it_imports_back(shared_tmp, tmp_path):
    src = str(tmp_path / "src")
    with Node.init(src) as n:
        for i in range(1, 7):
            n.deliver("user/bob/INBOX", f"Subject: m{i}\n\nbody {i}\n".encode(), create=True,
                      internaldate=1_600_000_000 + i * 60)
        n.store_flags("user/bob/INBOX", [1], "add", ["\\Seen", "\\Answered"])
        n.store_flags("user/bob/INBOX", [2], "add", ["\\Flagged", "\\Draft", "\\Deleted", "$Junk", "work"])
        n.store_flags("user/bob/INBOX", [3], "add", ["$Forwarded"])
        n.expunge("user/bob/INBOX", [4, 6])
        n.deliver("user/bob/Archive/2020", b"Subject: a\r\n\r\nCRLF body\r\n", create=True, flags=["Later"],
                  internaldate=1_500_000_000)
        n.deliver("user/bob/Entwürfe & Notizen", b"Subject: d\n\ndraft\n", create=True, flags=["\\Draft"])
        n.create_mailbox("user/bob/Empty")
    maildir = os.path.join(shared_tmp, "Maildir")
    run("export", src, "--maildir", maildir, "--user", "bob")
    dove = Dovecot(shared_tmp, maildir)
    want_status, want_messages = _node_view(src, "user/bob/")
    assert dove.status() == want_status
    assert dove.messages() == want_messages

    # Dovecot serves the copy for a while: a flag changes (the file is renamed), a message is
    # delivered (UID 7, only in Dovecot's uidlist or not yet), one is expunged.
    dove("flags", "add", "\\Seen Later", "mailbox", "INBOX", "uid", "5")
    dove("save", "-m", "INBOX", input=b"Subject: new\n\ndelivered by dovecot\n")
    dove("expunge", "mailbox", "INBOX", "uid", "1")
    want_status, want_messages = dove.status(), dove.messages()
    assert want_status["INBOX"][1:] == (8, 4)

    back = str(tmp_path / "back")
    run("init", back)
    run("import", back, "--maildir", maildir, "--user", "bob")
    assert _node_view(back, "user/bob/") == (want_status, want_messages)
