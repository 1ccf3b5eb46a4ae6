"""Debian sync clients against the IMAP front: ``mbsync`` (isync) and ``offlineimap3`` to a local Maildir.

Each client syncs a user's mailboxes (``INBOX`` and ``INBOX/Archive``) over
127.0.0.1 to a Maildir in ``tmp_path``, and the tests check what a person
would find there, both ways:

* a full sync: every server message exactly once, with the server's flags;
* a second sync after new mail and flag changes on the server: only the new
  messages are downloaded (counted by a byte-forwarding proxy between client
  and server), flags follow the server;
* changes made in the Maildir reach the server: a flag (a renamed file)
  becomes a STORE, a deleted file an expunge, a new file an APPEND; and the
  next sync leaves the Maildir holding each message exactly once.

The server side is the :func:`imap_server` fixture: it yields a
:class:`ServerSide` (host, port, user, password, and the server's mailboxes
reached through the :class:`~engine.imap.backend.Backend` protocol), so the
same tests run against every server in :data:`SERVERS`: the in-memory
backend (the model) and a real node (fsynced log, SQLite store) behind
``NodeBackend``. A client whose
binary is missing skips with the reason (CI installs ``isync`` and
``offlineimap3``). Rules: IMAP-7, IMAP-17..IMAP-20, IMAP-24.
"""

from __future__ import annotations

import email.parser
import os
import re
import select
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from engine.imap.backend import Backend, NewMessage
from engine.imap.memory import MemoryBackend
from engine.imap.names import encode_mutf7, store_name
from engine.imap.server import serve_in_thread

HOST = "127.0.0.1"
USER, PASSWORD = "alice", "sync-pw"
MAILBOXES = ("INBOX", "INBOX/Archive")
SYNC_TIMEOUT_S = 120

# Maildir info letters (the ":2," suffix) and the IMAP system flags they stand for.
MAILDIR_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}


def message(n: int, subject: str | None = None) -> bytes:
    """A small message identified by its Message-ID ``<n@sync.example>``."""
    return (f"From: Alice <alice@x.example>\r\nTo: bob@y.example\r\nSubject: {subject or f'message {n}'}\r\n"
            f"Date: Mon, 3 Jan 2022 10:{n % 60:02d}:00 +0000\r\nMessage-ID: <{n}@sync.example>\r\n\r\n"
            f"Body of message {n}.\r\n").encode()


def message_id(data: bytes) -> str:
    return email.parser.BytesHeaderParser().parsebytes(data)["Message-ID"].strip()


# -- the server side ------------------------------------------------------------------------------------------


@dataclass
class ServerSide:
    """An IMAP server the clients sync with, and its mailboxes seen through the Backend protocol.

    ``run(fn, *args)`` calls ``fn`` (a coroutine function or a plain one) on
    the server's own event loop and returns its result, so a test changes and
    inspects the store as the server itself would.
    """

    host: str
    port: int
    user: str
    password: str
    backend: Backend
    run: Callable[..., Any]

    def store_name(self, mailbox: str) -> str:
        return store_name(self.user, mailbox)

    def append(self, mailbox: str, data: bytes, flags: tuple[str, ...] = ()) -> int:
        result = self.run(self.backend.append, self.store_name(mailbox), [NewMessage(data, flags)])
        return result.uids[0]

    def uid_of(self, mailbox: str, mid: str) -> int:
        (uid,) = [u for u, (m, _) in self.messages_by_uid(mailbox).items() if m == mid]
        return uid

    def store(self, mailbox: str, mid: str, mode: str, flags: set[str]) -> None:
        self.run(self.backend.store, self.store_name(mailbox), [self.uid_of(mailbox, mid)], mode, frozenset(flags))

    def expunge(self, mailbox: str, mid: str) -> None:
        self.run(self.backend.expunge, self.store_name(mailbox), [self.uid_of(mailbox, mid)])

    def messages_by_uid(self, mailbox: str) -> dict[int, tuple[str, frozenset[str]]]:
        name = self.store_name(mailbox)
        snap = self.run(self.backend.snapshot, name)
        bodies = self.run(self.backend.fetch_bodies, name, [m.uid for m in snap.messages])
        return {m.uid: (message_id(bodies[m.uid]), frozenset(m.flags)) for m in snap.messages}

    def messages(self, mailbox: str) -> dict[str, frozenset[str]]:
        """Message-ID -> flags of every message in ``mailbox``; fails if a Message-ID is there twice."""
        found = list(self.messages_by_uid(mailbox).values())
        ids = [mid for mid, _ in found]
        assert len(ids) == len(set(ids)), f"server {mailbox} holds a message twice: {sorted(ids)}"
        return dict(found)

    def uidvalidity(self, mailbox: str) -> int:
        return self.run(self.backend.snapshot, self.store_name(mailbox)).uidvalidity

    def create(self, mailbox: str) -> None:
        self.run(self.backend.create, self.store_name(mailbox))


def _memory_server():
    backend = MemoryBackend()
    backend.add_user(USER, PASSWORD)
    with serve_in_thread(backend, failed_login_delay_s=0) as srv:
        srv.call(backend.create, store_name(USER, "INBOX/Archive"))
        yield ServerSide(HOST, srv.port, USER, PASSWORD, backend, srv.call)


def _node_server(tmp_path: Path):
    """A real node (fsynced log, SQLite store) behind NodeBackend, the IMAP front on its own loop thread."""
    from engine.node import AsyncNode
    from engine.imap.node_backend import NodeBackend
    from engine.node import Node

    node = Node.init(str(tmp_path / "node"))
    try:
        node.add_user(USER, PASSWORD)
        node.create_mailbox(store_name(USER, "INBOX/Archive"))
        backend = NodeBackend(AsyncNode(node))
        with serve_in_thread(backend, failed_login_delay_s=0) as srv:
            yield ServerSide(HOST, srv.port, USER, PASSWORD, backend, srv.call)
    finally:
        node.close()


# Servers the clients are run against, by name: each a generator (given a scratch directory)
# yielding a ServerSide for a user owning INBOX and INBOX/Archive.
SERVERS: dict[str, Callable[[Path], Any]] = {"memory": lambda tmp_path: _memory_server(), "node": _node_server}


@pytest.fixture(params=sorted(SERVERS))
def imap_server(request, tmp_path_factory) -> ServerSide:
    yield from SERVERS[request.param](tmp_path_factory.mktemp(f"server-{request.param}"))


# -- a proxy that counts what the client downloads ------------------------------------------------------------


class CountingProxy:
    """Forwards 127.0.0.1:``port`` to the server and keeps every byte the server sent.

    :meth:`bodies_downloaded` counts the full message bodies (``BODY[] {n}``
    literals in FETCH responses) sent since the last :meth:`reset`.
    """

    _BODY = re.compile(rb"\* \d+ FETCH \([^\r\n]*BODY\[\] \{\d+\}\r\n")

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._lock = threading.Lock()
        self._from_server = bytearray()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream = socket.create_connection(proxy.target, timeout=30)
                try:
                    proxy._pump(self.request, upstream)
                finally:
                    upstream.close()

        self._server = socketserver.ThreadingTCPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        ends = {client: upstream, upstream: client}
        while True:
            readable, _, _ = select.select(list(ends), [], [], 30)
            if not readable:
                return
            for s in readable:
                data = s.recv(65536)
                if not data:
                    return
                ends[s].sendall(data)
                if s is upstream:
                    with self._lock:
                        self._from_server += data

    def bodies_downloaded(self) -> int:
        with self._lock:
            return len(self._BODY.findall(bytes(self._from_server)))

    def reset(self) -> None:
        with self._lock:
            self._from_server.clear()

    def __enter__(self) -> "CountingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- the clients ----------------------------------------------------------------------------------------------


class SyncClient:
    """One sync client with its config and Maildir under ``root``."""

    binary: str
    package: str

    def __init__(self, root: Path, port: int, server: ServerSide):
        self.root = root
        self.mail = root / "mail"
        self.mail.mkdir(parents=True)
        self.port = port
        self.server = server
        self.env = {**os.environ, "HOME": str(root)}  # no ~/.mbsyncrc or ~/.offlineimaprc of the machine's user

    def command(self) -> list[str]:
        raise NotImplementedError

    def sync(self) -> str:
        done = subprocess.run(self.command(), env=self.env, capture_output=True, text=True, timeout=SYNC_TIMEOUT_S)
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"{self.binary} failed ({done.returncode}):\n{out}"
        return out

    def local_name(self, part: str) -> str:
        """The Maildir directory name this client gives one level of a mailbox name."""
        return part

    def folder(self, mailbox: str) -> Path:
        return self.mail.joinpath(*(self.local_name(p) for p in mailbox.split("/")))

    def make_folder(self, mailbox: str) -> None:
        for sub in ("new", "cur", "tmp"):
            (self.folder(mailbox) / sub).mkdir(parents=True)

    def files(self, mailbox: str) -> dict[str, Path]:
        """Message-ID -> file of every message in the Maildir folder; fails if a message is there twice."""
        found: dict[str, Path] = {}
        for sub in ("new", "cur"):
            for path in sorted((self.folder(mailbox) / sub).iterdir()):
                mid = message_id(path.read_bytes())
                assert mid not in found, f"{self.binary}'s Maildir {mailbox} holds {mid} twice: {found[mid]}, {path}"
                found[mid] = path
        return found

    def messages(self, mailbox: str) -> dict[str, frozenset[str]]:
        """Message-ID -> IMAP flags, read from each file's Maildir info (``:2,FS``)."""
        return {mid: maildir_flags(p) for mid, p in self.files(mailbox).items()}

    def set_flags(self, mailbox: str, mid: str, letters: str) -> None:
        """Give a message exactly the Maildir flags ``letters``, as a mail reader does (rename into cur/)."""
        path = self.files(mailbox)[mid]
        base = path.name.split(":2,")[0]
        path.rename(path.parent.parent / "cur" / f"{base}:2,{''.join(sorted(letters))}")

    def delete(self, mailbox: str, mid: str) -> None:
        self.files(mailbox)[mid].unlink()

    def add(self, mailbox: str, data: bytes, n: int) -> None:
        """Deliver a message into the Maildir as a local program does (write in tmp/, rename into new/)."""
        folder = self.folder(mailbox)
        name = f"1700000000.P{os.getpid()}Q{n}.localhost"
        (folder / "tmp" / name).write_bytes(data)
        (folder / "tmp" / name).rename(folder / "new" / name)


def maildir_flags(path: Path) -> frozenset[str]:
    info = path.name.split(":2,", 1)[1] if ":2," in path.name else ""
    return frozenset(MAILDIR_FLAGS[c] for c in info if c in MAILDIR_FLAGS)


class Mbsync(SyncClient):
    binary, package = "mbsync", "isync"

    def __init__(self, root: Path, port: int, server: ServerSide):
        super().__init__(root, port, server)
        self.config = root / "mbsyncrc"
        self.config.write_text(f"""\
IMAPAccount test
Host {server.host}
Port {port}
User {server.user}
Pass {server.password}
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account test

MaildirStore local
Path {self.mail}/
Inbox {self.mail}/INBOX
SubFolders Verbatim

Channel test
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
""")
        self.config.chmod(0o600)

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.config), "-a"]

    def local_name(self, part: str) -> str:
        return encode_mutf7(part)  # mbsync 1.4 keeps the wire names (modified UTF-7) as they are


class OfflineImap(SyncClient):
    binary, package = "offlineimap", "offlineimap3"

    def __init__(self, root: Path, port: int, server: ServerSide):
        super().__init__(root, port, server)
        self.config = root / "offlineimaprc"
        (root / "metadata").mkdir()
        self.config.write_text(f"""\
[general]
accounts = test
metadata = {root / "metadata"}

[Account test]
localrepository = local
remoterepository = remote
utf8foldernames = yes

[Repository local]
type = Maildir
localfolders = {self.mail}
sep = /

[Repository remote]
type = IMAP
remotehost = {server.host}
remoteport = {port}
remoteuser = {server.user}
remotepass = {server.password}
ssl = no
starttls = no
""")
        self.config.chmod(0o600)

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.config), "-o", "-u", "basic"]

    def sync(self) -> str:
        out = super().sync()
        # offlineimap exits 0 after errors in single folders: its log says ERROR then
        assert "ERROR" not in out, out
        return out


CLIENTS = {"mbsync": Mbsync, "offlineimap": OfflineImap}


@pytest.fixture(params=sorted(CLIENTS))
def client(request, imap_server, tmp_path):
    cls = CLIENTS[request.param]
    if shutil.which(cls.binary) is None:
        pytest.skip(f"{cls.binary} is missing: apt-get install {cls.package}")
    with CountingProxy((imap_server.host, imap_server.port)) as proxy:
        c = cls(tmp_path, proxy.port, imap_server)
        c.proxy = proxy
        yield c


def assert_in_step(client: SyncClient, server: ServerSide) -> None:
    """The Maildir holds exactly the server's messages, each once, with the server's flags."""
    for mailbox in MAILBOXES:
        assert client.messages(mailbox) == server.messages(mailbox), mailbox


# -- the tests ------------------------------------------------------------------------------------------------


def fill(server: ServerSide) -> None:
    server.append("INBOX", message(1))
    server.append("INBOX", message(2), ("\\Seen",))
    server.append("INBOX", message(3), ("\\Flagged", "\\Answered"))
    server.append("INBOX/Archive", message(4), ("\\Seen",))


def test_full_sync(client, imap_server):
    """IMAP-17, IMAP-18, IMAP-24: a first sync downloads every message once, with its flags, into each folder."""
    fill(imap_server)
    client.sync()
    assert_in_step(client, imap_server)
    assert set(client.messages("INBOX")) == {"<1@sync.example>", "<2@sync.example>", "<3@sync.example>"}
    assert client.proxy.bodies_downloaded() == 4


def test_server_changes_arrive_and_only_they(client, imap_server):
    """IMAP-18, IMAP-19: after new mail and flag changes on the server, the next sync downloads only the new
    messages, and the Maildir's flags follow the server's; a message expunged on the server goes away."""
    fill(imap_server)
    client.sync()
    before = {mid: p.stat().st_ino for mid, p in client.files("INBOX").items()}
    imap_server.append("INBOX", message(5))
    imap_server.append("INBOX/Archive", message(6), ("\\Flagged",))
    imap_server.store("INBOX", "<1@sync.example>", "add", {"\\Seen", "\\Flagged"})
    imap_server.store("INBOX", "<3@sync.example>", "remove", {"\\Flagged"})
    imap_server.expunge("INBOX", "<2@sync.example>")
    client.proxy.reset()
    client.sync()
    assert client.proxy.bodies_downloaded() == 2
    assert_in_step(client, imap_server)
    assert client.messages("INBOX")["<1@sync.example>"] == {"\\Seen", "\\Flagged"}
    assert "<2@sync.example>" not in client.messages("INBOX")
    after = {mid: p.stat().st_ino for mid, p in client.files("INBOX").items()}
    assert after["<1@sync.example>"] == before["<1@sync.example>"]  # renamed for its flags, not fetched again
    assert after["<3@sync.example>"] == before["<3@sync.example>"]
    client.proxy.reset()
    client.sync()  # nothing changed: nothing downloaded, nothing moves
    assert client.proxy.bodies_downloaded() == 0
    assert_in_step(client, imap_server)


def test_maildir_changes_reach_the_server(client, imap_server):
    """IMAP-19, IMAP-20: a flag set in the Maildir becomes a STORE, a deleted file an expunge, a new file an
    APPEND (with UIDPLUS the client learns its UID: the next sync neither downloads it nor duplicates it)."""
    fill(imap_server)
    client.sync()
    uidvalidity = imap_server.uidvalidity("INBOX")
    client.set_flags("INBOX", "<1@sync.example>", "FS")
    client.set_flags("INBOX", "<3@sync.example>", "R")  # \Flagged removed, \Answered kept
    client.delete("INBOX", "<2@sync.example>")
    client.add("INBOX", message(7), 7)
    client.add("INBOX/Archive", message(8), 8)
    client.sync()
    inbox = imap_server.messages("INBOX")
    assert inbox == {"<1@sync.example>": {"\\Seen", "\\Flagged"}, "<3@sync.example>": {"\\Answered"},
                     "<7@sync.example>": frozenset()}
    assert imap_server.messages("INBOX/Archive") == {"<4@sync.example>": {"\\Seen"}, "<8@sync.example>": frozenset()}
    assert imap_server.uidvalidity("INBOX") == uidvalidity
    client.proxy.reset()
    client.sync()
    assert client.proxy.bodies_downloaded() == 0
    assert_in_step(client, imap_server)


def test_folder_names_beyond_ascii(client, imap_server):
    """IMAP-24 and RFC 3501 5.1.3: a folder whose name is not ASCII syncs both ways (on the wire in
    modified UTF-7; offlineimap shows it in UTF-8, mbsync keeps the wire form); a folder made in the
    Maildir is created on the server under its Unicode name, and its message is appended there."""
    imap_server.create("INBOX/Entwürfe")
    imap_server.append("INBOX/Entwürfe", message(11), ("\\Draft",))
    client.sync()
    assert client.messages("INBOX/Entwürfe") == {"<11@sync.example>": {"\\Draft"}}
    client.make_folder("Ärger")
    client.add("Ärger", message(12), 12)
    client.sync()
    assert imap_server.messages("Ärger") == {"<12@sync.example>": frozenset()}
    client.proxy.reset()
    client.sync()
    assert client.proxy.bodies_downloaded() == 0
    assert client.messages("Ärger") == imap_server.messages("Ärger")


def test_offlineimap_idle_pulls_new_mail(imap_server, tmp_path):
    """IMAP-7: offlineimap waiting in IDLE on INBOX hears of a delivery at once and pulls it (its own
    refresh timer is an hour, so nothing but the server's push can bring the message before the deadline)."""
    if shutil.which(OfflineImap.binary) is None:
        pytest.skip(f"{OfflineImap.binary} is missing: apt-get install {OfflineImap.package}")
    fill(imap_server)
    client = OfflineImap(tmp_path, imap_server.port, imap_server)
    text = client.config.read_text()
    text = text.replace("remoterepository = remote\n", "remoterepository = remote\nautorefresh = 60\nquick = 0\n")
    client.config.write_text(text + "idlefolders = ['INBOX']\nholdconnectionopen = yes\nkeepalive = 600\n")
    log = (tmp_path / "offlineimap.log").open("w")
    # -d imap: its protocol log says when the server has answered IDLE with a continuation
    proc = subprocess.Popen([client.binary, "-c", str(client.config), "-u", "basic", "-d", "imap"], env=client.env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(client.files("INBOX")) == 3 and idling(tmp_path / "offlineimap.log"), proc, tmp_path)
        imap_server.append("INBOX", message(9), ("\\Flagged",))
        wait_for(lambda: "<9@sync.example>" in client.files("INBOX"), proc, tmp_path)
        assert client.messages("INBOX")["<9@sync.example>"] == {"\\Flagged"}
    finally:
        proc.kill()  # it would finish its IDLE round first on SIGTERM (about 10 s); nothing of it is needed
        proc.wait()
        log.close()


def idling(log: Path) -> bool:
    """offlineimap sent IDLE and read the server's continuation (a delivery from now on is pushed to it)."""
    return "server IDLE started" in log.read_text(errors="replace")  # imaplib2 logs it on the continuation


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, tmp_path: Path, timeout_s: float = 60) -> None:
    """Poll ``condition`` until it holds; fail with the client's log if it never does or the client exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except (FileNotFoundError, ValueError):
            pass  # the Maildir is being created, or a file is being renamed while read
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"offlineimap (exit {proc.returncode}) never got there:\n"
                        + (tmp_path / "offlineimap.log").read_text()[-4000:])
        time.sleep(0.1)
