"""Postfix delivers to ``walctl serve`` over LMTP, with the settings the README recommends.

Each test runs a private Postfix instance (its own ``main.cf``/``master.cf``,
queue and data directories under a temporary directory, ``postfix -c DIR
start``) whose smtpd listens on a free port of 127.0.0.1, and a real
``walctl serve`` process as its LMTP destination. Mail goes in through
Postfix's SMTP port and must come out in the right mailbox: Postfix adds
headers (Received, Date), so each stored message's GUID is checked against
the blake3 of the bytes the node stored, which must contain the original
Message-ID and body. One test stops the node while mail is queued: Postfix
must defer (never bounce) and deliver once the node is back and the queue is
flushed.

Needs root (Postfix's master switches to the ``postfix`` user) and Postfix
3.4 or later (``maillog_file``, ``postqueue -j``): Debian package
``postfix``. Skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import blake3
import pytest

from engine.node import Node
from tools.ports import free_port

SBIN_PATH = os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
DOMAIN = "mail.test"
WAIT_S = 30.0


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: Postfix's master runs its daemons as the postfix user"
    for tool in ("postfix", "postqueue", "postconf"):
        if shutil.which(tool, path=SBIN_PATH) is None:
            return f"Postfix is not installed (no {tool}); Debian: apt-get install postfix"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no postfix user (the postfix package creates it)"
    out = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True,
                         env={**os.environ, "PATH": SBIN_PATH}).stdout.strip()
    m = re.match(r"(\d+)\.(\d+)", out)
    if not m or (int(m[1]), int(m[2])) < (3, 4):
        return f"needs Postfix 3.4 or later (maillog_file, postqueue -j); found {out or 'unknown'}"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PATH": SBIN_PATH}, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {p.returncode}: {p.stdout}{p.stderr}")
    return p


# The main.cf lines that hand mail for DOMAIN to the node, per way of doing it (README, "Postfix").
TRANSPORTS = {
    # The whole local domain goes to mailwal; any local part is accepted (mailwal creates its INBOX).
    "local_transport": {
        "mydestination": DOMAIN,
        "local_recipient_maps": "",
        "local_transport": "lmtp:inet:127.0.0.1:{lmtp_port}",
    },
    # local(8) keeps aliases and .forward, then hands mailbox delivery to mailwal.
    "mailbox_transport": {
        "mydestination": DOMAIN,
        "local_recipient_maps": "",
        "mailbox_transport": "lmtp:inet:127.0.0.1:{lmtp_port}",
    },
    # A virtual mailbox domain: Postfix rejects unlisted users at RCPT time.
    "virtual_transport": {
        "mydestination": "localhost",
        "virtual_mailbox_domains": DOMAIN,
        "virtual_mailbox_maps": "inline:{{ alice@%s=alice, bob@%s=bob, carol@%s=carol, sender@%s=sender }}"
                                % ((DOMAIN,) * 4),
        "virtual_transport": "lmtp:inet:127.0.0.1:{lmtp_port}",
    },
}

MASTER_CF = """\
127.0.0.1:{smtp_port} inet n - n - - smtpd
pickup    unix  n - n 60   1 pickup
cleanup   unix  n - n -    0 cleanup
qmgr      unix  n - n 300  1 qmgr
rewrite   unix  - - n -    - trivial-rewrite
bounce    unix  - - n -    0 bounce
defer     unix  - - n -    0 bounce
trace     unix  - - n -    0 bounce
verify    unix  - - n -    1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -    - proxymap
showq     unix  n - n -    - showq
error     unix  - - n -    - error
retry     unix  - - n -    - error
discard   unix  - - n -    - discard
local     unix  - n n -    - local
virtual   unix  - n n -    - virtual
lmtp      unix  - - n -    - lmtp
anvil     unix  - - n -    1 anvil
scache    unix  - - n -    1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixInstance:
    """A private Postfix: config, queue and data directories under ``base``; smtpd on 127.0.0.1:smtp_port."""

    def __init__(self, base: str, lmtp_port: int, transport: str):
        self.base = base
        self.config_dir = os.path.join(base, "etc")
        self.queue_dir = os.path.join(base, "spool")
        self.data_dir = os.path.join(base, "lib")
        self.maillog_path = os.path.join(base, "maillog")
        self.smtp_port = free_port()
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            os.makedirs(d, mode=0o755)
        pw = pwd.getpwnam("postfix")
        os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "myhostname": f"mx.{DOMAIN}",
            "mydomain": DOMAIN,
            "myorigin": DOMAIN,
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "maillog_file_prefixes": base,
            "maillog_file": self.maillog_path,
            "syslog_name": "postfix-mailwal-test",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "smtputf8_enable": "no",
            "lmtp_host_lookup": "native",
            # Nothing may leave the machine: anything not for DOMAIN fails at once.
            "default_transport": "error:this test instance delivers nothing outside",
            "relay_transport": "error:this test instance delivers nothing outside",
        }
        settings.update({k: v.format(lmtp_port=lmtp_port) for k, v in TRANSPORTS[transport].items()})
        with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
            f.writelines(f"{k} = {v}\n" for k, v in settings.items())
        with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(smtp_port=self.smtp_port))

    def start(self) -> None:
        _run("postfix", "-c", self.config_dir, "check")
        _run("postfix", "-c", self.config_dir, "start")
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"Postfix smtpd never listened on {self.smtp_port}:\n{self.maillog()}")
                time.sleep(0.05)

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        pid = self.master_pid()
        _run("postfix", "-c", self.config_dir, "stop", check=False)
        deadline = time.monotonic() + WAIT_S
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

    def send(self, sender: str, recipients: list[str], message: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as smtp:
            refused = smtp.sendmail(sender, recipients, message)
        assert refused == {}, refused

    def queue(self) -> list[dict]:
        out = _run("postqueue", "-c", self.config_dir, "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        _run("postqueue", "-c", self.config_dir, "-f")

    def maillog(self) -> str:
        try:
            with open(self.maillog_path) as f:
                return f.read()
        except FileNotFoundError:
            return "(no maillog)"


class MailNode:
    """``walctl serve NODE --lmtp 127.0.0.1:PORT`` as a process."""

    def __init__(self, path: str):
        self.path = path
        self.lmtp_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.output = os.path.join(os.path.dirname(path), "node.out")
        Node.init(path).close()

    def start(self) -> None:
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools", "serve", self.path, "--lmtp", f"127.0.0.1:{self.lmtp_port}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT_S
        while True:
            assert self.proc.poll() is None, f"walctl serve exited {self.proc.returncode}: {self.log()}"
            try:
                with socket.create_connection(("127.0.0.1", self.lmtp_port), timeout=1):
                    return
            except OSError:
                assert time.monotonic() < deadline, f"walctl serve never listened: {self.log()}"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(timeout=WAIT_S) == 0, self.log()
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self.proc = None

    def log(self) -> str:
        with open(self.output) as f:
            return f.read()[-4000:]

    def count(self, mailbox: str) -> int:
        """Messages in ``mailbox`` of the running node (read-only from its store), 0 if it does not exist."""
        p = subprocess.run([sys.executable, "-m", "tools", "messages", self.path, mailbox, "--json"],
                           capture_output=True, text=True)
        return len(json.loads(p.stdout)) if p.returncode == 0 else 0

    def stored(self) -> dict[str, list[tuple[str, bytes]]]:
        """Every mailbox's (GUID, stored bytes), read from the stopped node."""
        node = Node.open(self.path)
        try:
            node.catch_up()
            return {mb.name: [(m.guid, node.fetch(mb.name, m.uid)) for m in node.list_messages(mb.name)]
                    for mb in node.list_mailboxes()}
        finally:
            node.close()


@pytest.fixture
def base_dir():
    # Postfix daemons (user postfix) must reach the queue: not under pytest's 0700 tmp_path.
    base = tempfile.mkdtemp(prefix="mailwal-postfix-")
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cluster(base_dir, request):
    """(node, postfix) running; stopped in teardown whatever happens."""
    transport = getattr(request, "param", "local_transport")
    node = MailNode(os.path.join(base_dir, "node"))
    postfix = PostfixInstance(os.path.join(base_dir, "postfix"), node.lmtp_port, transport)
    node.start()
    try:
        postfix.start()
        yield node, postfix
    finally:
        try:
            postfix.stop()
        finally:
            node.stop()


def _message(subject: str, to: str) -> tuple[bytes, str, str]:
    """A message with a unique Message-ID and body line; (bytes, Message-ID, body line)."""
    token = uuid.uuid4().hex
    msgid = f"<{token}@client.{DOMAIN}>"
    line = f"body line {token}"
    msg = (f"From: sender@{DOMAIN}\r\nTo: {to}\r\nMessage-ID: {msgid}\r\nSubject: {subject}\r\n\r\n"
           f"{line}\r\n").encode()
    return msg, msgid, line


def _wait(what: str, predicate, postfix: PostfixInstance, node: MailNode) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\nqueue: {postfix.queue()}\n"
                                 f"maillog:\n{postfix.maillog()[-4000:]}\nnode:\n{node.log()}")
        time.sleep(0.1)


def _check_arrived(stored: dict, sent: list[tuple[str, bytes, str, str]]) -> None:
    """Each (mailbox, original, Message-ID, body line) is in its mailbox exactly once, GUID = blake3(stored bytes)."""
    for mailbox, original, msgid, line in sent:
        hits = [(guid, body) for guid, body in stored.get(mailbox, []) if msgid.encode() in body]
        assert len(hits) == 1, f"{msgid} is {len(hits)} times in {mailbox}"
        guid, body = hits[0]
        assert guid == blake3.blake3(body).hexdigest()  # the GUID is of the bytes as delivered
        assert line.encode() in body and body.endswith(original.split(b"\r\n\r\n", 1)[1])
        assert b"Received: " in body and guid != blake3.blake3(original).hexdigest()  # Postfix added headers
    for mailbox, messages in stored.items():
        wanted = [m for m in sent if m[0] == mailbox]
        assert len(messages) == len(wanted), f"{mailbox}: {len(messages)} stored, {len(wanted)} sent"


@pytest.mark.parametrize("cluster", list(TRANSPORTS), indirect=True)
def test_postfix_delivers_each_recipient_to_its_mailbox(cluster):
    node, postfix = cluster
    sent = []
    m1, id1, l1 = _message("to alice", f"alice@{DOMAIN}")
    postfix.send(f"sender@{DOMAIN}", [f"alice@{DOMAIN}"], m1)
    sent.append(("user/alice/INBOX", m1, id1, l1))
    # One message, three recipients: Postfix's LMTP client sends them in one transaction and
    # reads one reply per recipient after DATA; the local part is lower-cased (Bob -> bob).
    m2, id2, l2 = _message("to three", f"bob@{DOMAIN}, carol@{DOMAIN}")
    postfix.send(f"sender@{DOMAIN}", [f"Bob@{DOMAIN}", f"carol@{DOMAIN}", f"alice@{DOMAIN}"], m2)
    sent += [(f"user/{u}/INBOX", m2, id2, l2) for u in ("bob", "carol", "alice")]
    _wait("Postfix to deliver everything",
          lambda: not postfix.queue() and node.count("user/alice/INBOX") == 2 and node.count("user/bob/INBOX") == 1
          and node.count("user/carol/INBOX") == 1, postfix, node)
    assert "status=sent" in postfix.maillog() and "status=bounced" not in postfix.maillog()
    node.stop()
    _check_arrived(node.stored(), sent)


def test_postfix_defers_while_the_node_is_down_and_delivers_after_a_flush(cluster):
    node, postfix = cluster
    sent = []
    m1, id1, l1 = _message("before", f"alice@{DOMAIN}")
    postfix.send(f"sender@{DOMAIN}", [f"alice@{DOMAIN}"], m1)
    sent.append(("user/alice/INBOX", m1, id1, l1))
    _wait("the first message", lambda: not postfix.queue() and node.count("user/alice/INBOX") == 1, postfix, node)

    node.stop()
    later = []
    for user in ("alice", "bob"):
        m, msgid, line = _message("while down", f"{user}@{DOMAIN}")
        postfix.send(f"sender@{DOMAIN}", [f"{user}@{DOMAIN}"], m)
        later.append((f"user/{user}/INBOX", m, msgid, line))
    _wait("both messages to be deferred",
          lambda: [q["queue_name"] for q in postfix.queue()] == ["deferred", "deferred"], postfix, node)
    reasons = [r.get("delay_reason", "") for q in postfix.queue() for r in q["recipients"]]
    assert len(reasons) == 2 and all("refused" in r.lower() or "connect" in r.lower() for r in reasons), reasons
    assert "status=deferred" in postfix.maillog()

    node.start()
    postfix.flush()
    sent += later
    _wait("the deferred messages after the flush",
          lambda: not postfix.queue() and node.count("user/alice/INBOX") == 2 and node.count("user/bob/INBOX") == 1,
          postfix, node)
    log = postfix.maillog()
    assert "status=bounced" not in log, log  # deferred, never bounced
    assert log.count("status=sent") == 3
    node.stop()
    stored = node.stored()
    assert "user/sender/INBOX" not in stored  # no bounce came back to the sender either
    _check_arrived(stored, sent)
