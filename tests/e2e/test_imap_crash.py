"""Every tagged OK of an IMAP write survives a kill -9 of the node's process (IMAP-10, IMAP-11, MS-20).

A child process serves IMAP over a real node (``NodeBackend``: fsynced log, SQLite store); client
threads (imaplib) create mailboxes, APPEND, STORE, COPY, MOVE and EXPUNGE, each in its own
mailboxes, and keep an exact model of those mailboxes (:class:`Model`) from the answers. The
child is killed with SIGKILL at a random moment; the node is reopened (the store catches up from
the log) and must hold exactly what the model says. Several kill points on one node, each round
going on from the last.

A command whose answer never came (the server died first) may or may not have taken effect: its
record may be durable with the OK not sent yet. The model keeps each client's one unanswered
command and settles it from the reopened node, all or nothing (an APPEND's message is there once
or not at all; a MOVE's message is in the target or still in the source, never both, never
neither). Everything else must match exactly: the same UIDs naming the same messages with the
same flags, no message that was not appended, no UID that ever named another message.

kill -9 keeps the page cache: this checks "acknowledged => durable record => applied", not power loss.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field

import pytest

from engine.node import Node
from engine.store.events import body_guid
from tests.support.lmtp import ROOT

USER = "user/alice/"

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    from engine.node import AsyncNode
    from engine.imap.node_backend import NodeBackend
    from engine.imap.server import serve_in_thread
    from engine.node import Node

    class Backend(NodeBackend):
        # Fault injection: SIGKILL right after the first {die_after!r} write returned (durable),
        # before the server answered it.
        pass

    if {die_after!r}:
        write = getattr(NodeBackend, {die_after!r})

        async def write_then_die(self, *args, **kwargs):
            result = await write(self, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
            return result
        setattr(Backend, {die_after!r}, write_then_die)

    node = Node.open({path!r})
    if "alice" not in node.list_users():
        node.add_user("alice", "apw")
    srv = serve_in_thread(Backend(AsyncNode(node)), failed_login_delay_s=0).__enter__()
    print(srv.port, flush=True)
    while True:
        time.sleep(1)
""")


def _message(tag: str) -> bytes:
    return (f"From: a@x.example\r\nSubject: {tag}\r\nMessage-ID: <{tag}@x>\r\n\r\n" + "body " * 60 + "\r\n").encode()


@dataclass
class Message:
    guid: bytes
    flags: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Unanswered:
    """A write sent whose tagged answer never came. ``kind``: CREATE (``mailbox``), APPEND
    (``mailbox``, ``guid``), STORE (``mailbox``, ``uid``, ``flag`` added), COPY and MOVE
    (``mailbox``, ``uid`` to ``target``), EXPUNGE (``mailbox``, ``uid``)."""

    kind: str
    mailbox: str
    uid: int = 0
    guid: bytes = b""
    flag: str = ""
    target: str = ""


class Model:
    """alice's mailboxes as the answers left them, exactly; shared by the client threads.

    Each client owns its mailboxes, so the clients' updates never touch the same entries.
    ``unanswered[k]`` is client k's write whose answer never came (at most one: a client waits
    for each answer); :meth:`settle` decides each from the reopened node.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.mailboxes: dict[str, dict[int, Message]] = {}  # full name -> UID -> message
        self.named: dict[tuple[str, int], bytes] = {}  # every (mailbox, UID) ever known -> its GUID
        self.unanswered: dict[int, Unanswered] = {}
        self.settled: list[tuple[Unanswered, bool]] = []  # each unanswered write and whether it took effect
        self.appends = 0  # acknowledged APPENDs
        self.failures: list[BaseException] = []  # a client thread's own failure (a model assertion)

    @contextlib.contextmanager
    def write(self, k: int, op: Unanswered):
        """Client k sends ``op``: it is unanswered until the block ends without an exception."""
        self.unanswered[k] = op
        yield
        del self.unanswered[k]

    def created(self, mailbox: str) -> None:
        with self.lock:
            self.mailboxes.setdefault(mailbox, {})

    def add(self, mailbox: str, uid: int, message: Message) -> None:
        with self.lock:
            assert uid not in self.mailboxes[mailbox], ("a UID given twice", mailbox, uid)
            assert self.named.setdefault((mailbox, uid), message.guid) == message.guid, ("a UID reused", mailbox, uid)
            self.mailboxes[mailbox][uid] = message

    def remove(self, mailbox: str, uid: int) -> Message | None:
        with self.lock:
            return self.mailboxes[mailbox].pop(uid, None)

    def message(self, mailbox: str, uid: int) -> Message | None:
        return self.mailboxes.get(mailbox, {}).get(uid)

    def settle(self, node: Node) -> None:
        """Decide every unanswered write from the reopened node: it took effect wholly or not at
        all. What it left in the node becomes part of the model; :meth:`check` then compares."""
        names = {m.name for m in node.list_mailboxes()}
        rows = {name: {r.uid: r for r in node.imap_snapshot(name)[1]} for name in names if name in self.mailboxes}

        def new_with(mailbox: str, guid: bytes) -> list:
            return [r for uid, r in rows[mailbox].items() if uid not in self.mailboxes[mailbox] and r.guid == guid]

        for op in self.unanswered.values():
            done = False
            if op.kind == "CREATE":
                done = op.mailbox in names
                if done:
                    self.created(op.mailbox)
            elif op.kind == "APPEND":
                found = new_with(op.mailbox, op.guid)
                assert len(found) <= 1, ("an unanswered APPEND stored more than once", op, found)
                if found:
                    done = True
                    self.add(op.mailbox, found[0].uid, Message(op.guid))
            elif op.kind == "STORE":
                msg, row = self.message(op.mailbox, op.uid), rows[op.mailbox].get(op.uid)
                if msg is not None and row is not None and op.flag in row.flags and op.flag not in msg.flags:
                    done = True
                    msg.flags.add(op.flag)
            elif op.kind in ("COPY", "MOVE"):
                msg = self.message(op.mailbox, op.uid)
                found = new_with(op.target, msg.guid) if msg is not None else []
                assert len(found) <= 1, ("an unanswered COPY or MOVE stored more than once", op, found)
                if found:
                    done = True
                    self.add(op.target, found[0].uid, Message(msg.guid, set(msg.flags)))
                    if op.kind == "MOVE":
                        self.remove(op.mailbox, op.uid)
            elif op.kind == "EXPUNGE":
                if self.message(op.mailbox, op.uid) is not None and op.uid not in rows[op.mailbox]:
                    done = True
                    self.remove(op.mailbox, op.uid)
            else:
                raise AssertionError(f"unknown write {op}")
            self.settled.append((op, done))
        self.unanswered.clear()

    def check(self, node: Node) -> None:
        """The node holds exactly the model: alice's mailboxes, and in each the same UIDs naming
        the same messages with the same flags; no UID ever named two messages."""
        names = {m.name for m in node.list_mailboxes() if m.name.startswith(USER)}
        assert names == set(self.mailboxes) | {USER + "INBOX"}
        for name, want in self.mailboxes.items():
            rows = {r.uid: r for r in node.imap_snapshot(name)[1]}
            for uid, row in rows.items():
                assert self.named.setdefault((name, uid), row.guid) == row.guid, ("a UID reused", name, uid)
            have = {uid: (r.guid, set(r.flags)) for uid, r in rows.items()}
            assert have == {uid: (m.guid, m.flags) for uid, m in want.items()}, name


def _worker(port: int, k: int, round_no: int, model: Model, stop: threading.Event) -> None:
    """Client k: APPEND to its own mailbox, flag, now and then COPY, MOVE, or delete and EXPUNGE;
    each answer goes into the model."""
    own, copies, moved = f"T{k}", f"C{k}", f"M{k}"
    try:
        c = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        c.login("alice", "apw")
        for name in (own, copies, moved):
            with model.write(k, Unanswered("CREATE", USER + name)):
                if c.create(name)[0] == "OK":
                    model.created(USER + name)
        c.select(own)
        i = 0
        while not stop.is_set():
            data = _message(f"r{round_no}-t{k}-m{i}")
            guid = body_guid(data)
            with model.write(k, Unanswered("APPEND", USER + own, guid=guid)):
                typ, resp = c.append(own, None, None, data)
                if typ != "OK":
                    continue
                uid = int(re.search(rb"APPENDUID \d+ (\d+)", resp[0]).group(1))
                model.add(USER + own, uid, Message(guid))
                model.appends += 1
            with model.write(k, Unanswered("STORE", USER + own, uid, flag="\\Flagged")):
                if c.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Flagged)")[0] == "OK":
                    model.message(USER + own, uid).flags.add("\\Flagged")
            if i % 3 == 0:
                with model.write(k, Unanswered("COPY", USER + own, uid, target=USER + copies)):
                    typ, _ = c.uid("COPY", str(uid), copies)
                    code = c.untagged_responses.pop("COPYUID", None) or []
                    if typ == "OK" and code:
                        msg = model.message(USER + own, uid)
                        model.add(USER + copies, int(code[-1].split()[-1]), Message(msg.guid, set(msg.flags)))
            if i % 5 == 1:
                with model.write(k, Unanswered("MOVE", USER + own, uid, target=USER + moved)):
                    typ, _ = c.uid("MOVE", str(uid), moved)
                    code = c.untagged_responses.pop("COPYUID", None) or []
                    if typ == "OK" and code:
                        msg = model.remove(USER + own, uid)
                        model.add(USER + moved, int(code[-1].split()[-1]), msg)
            if i % 7 == 2:
                with model.write(k, Unanswered("STORE", USER + own, uid, flag="\\Deleted")):
                    if c.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK":
                        if (msg := model.message(USER + own, uid)) is not None:  # not if it was moved
                            msg.flags.add("\\Deleted")
                with model.write(k, Unanswered("EXPUNGE", USER + own, uid)):
                    if c.uid("EXPUNGE", str(uid))[0] == "OK":
                        msg = model.message(USER + own, uid)
                        if msg is not None and "\\Deleted" in msg.flags:
                            model.remove(USER + own, uid)
            i += 1
    except (OSError, EOFError, imaplib.IMAP4.abort, imaplib.IMAP4.error):
        return  # the server died under us: the write in model.unanswered[k] may or may not be durable
    except BaseException as exc:
        model.failures.append(exc)
        raise


def _start_child(tmp_path, path: str, die_after: str = "") -> tuple[subprocess.Popen, int]:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=ROOT, path=path, die_after=die_after))
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, cwd=ROOT)
    return child, int(child.stdout.readline())


def _reopen_and_check(path: str, model: Model) -> None:
    with Node.open(path) as node:
        model.settle(node)
        model.check(node)


def test_kill_9_loses_no_tagged_ok_of_an_imap_write(tmp_path):
    """IMAP-10: after SIGKILL at random moments, the reopened node holds exactly what the acknowledged
    APPENDs, STOREs, COPYs, MOVEs, EXPUNGEs and CREATEs made, plus the unanswered writes wholly or not at all."""
    path = str(tmp_path / "n")
    Node.init(path).close()
    rng = random.Random(int(os.environ.get("CRASH_SEED", "4242")))
    model = Model()
    for round_no in range(3):
        child, port = _start_child(tmp_path, path)
        try:
            stop = threading.Event()
            before = model.appends
            threads = [threading.Thread(target=_worker, args=(port, k, round_no, model, stop), daemon=True)
                       for k in range(4)]
            for t in threads:
                t.start()
            want = rng.randint(10, 60)
            deadline = time.monotonic() + 20
            while model.appends - before < want and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.random() * 0.05)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
        stop.set()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads) and not model.failures
        _reopen_and_check(path, model)
    assert model.appends >= 30


@pytest.mark.parametrize("command", ["create", "append", "store", "copy", "move", "expunge"])
def test_a_write_killed_after_its_fsync_before_its_ok_is_in_the_reopened_node(tmp_path, command):
    """IMAP-10: the server dies (SIGKILL) after a write's record is durable and before its tagged OK is
    sent. The client never saw an answer; the reopened node has the write, applied from the log, and
    nothing else changed (an earlier APPEND's UID that a durable MOVE or EXPUNGE took away is gone,
    not lost)."""
    path = str(tmp_path / "n")
    Node.init(path).close()
    model = Model()
    child, port = _start_child(tmp_path, path, die_after=command)
    try:
        # One client: APPEND, STORE, COPY (i=0), then MOVE (i=1), then STORE \Deleted and EXPUNGE (i=2).
        _worker(port, 0, 0, model, threading.Event())
        assert child.wait(10) == -signal.SIGKILL and not model.failures
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    (unanswered,) = model.unanswered.values()
    assert unanswered.kind == command.upper()
    _reopen_and_check(path, model)
    assert model.settled == [(unanswered, True)]
