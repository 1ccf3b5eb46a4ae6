"""Every tagged OK of an IMAP write survives a kill -9 of the node's process (IMAP-10, MS-20).

A child process serves IMAP over a real node (``NodeBackend``: fsynced log, SQLite store); client
threads (imaplib) create mailboxes, APPEND, STORE, COPY, MOVE and EXPUNGE, each in its own
mailboxes, and record what every tagged OK promised (APPENDUID, COPYUID, the flags). The child is
killed with SIGKILL at a random moment; the node is reopened (the store catches up from the log)
and every promise must hold. Several kill points on one node, each round going on from the last.

kill -9 keeps the page cache: this checks "acknowledged => durable record => applied", not power loss.
"""

from __future__ import annotations

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

from engine.node import Node
from engine.store.events import body_guid
from tests.lmtp_support import ROOT

CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from engine.node import AsyncNode
    from engine.imap.node_backend import NodeBackend
    from engine.imap.server import serve_in_thread
    from engine.node import Node
    node = Node.open({path!r})
    if "alice" not in node.list_users():
        node.add_user("alice", "apw")
    srv = serve_in_thread(NodeBackend(AsyncNode(node)), failed_login_delay_s=0).__enter__()
    print(srv.port, flush=True)
    while True:
        time.sleep(1)
""")


def _message(tag: str) -> bytes:
    return (f"From: a@x.example\r\nSubject: {tag}\r\nMessage-ID: <{tag}@x>\r\n\r\n" + "body " * 60 + "\r\n").encode()


class Promises:
    """What the tagged OKs promised, appended by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.mailboxes: set[str] = set()
        self.present: dict[tuple[str, int], bytes] = {}  # (mailbox, uid) -> GUID
        self.flagged: set[tuple[str, int]] = set()
        self.gone: set[tuple[str, int]] = set()

    def add(self, mailbox: str, uid: int, guid: bytes) -> None:
        with self.lock:
            self.present[(mailbox, uid)] = guid

    def remove(self, mailbox: str, uid: int) -> None:
        with self.lock:
            self.present.pop((mailbox, uid), None)
            self.flagged.discard((mailbox, uid))
            self.gone.add((mailbox, uid))


def _worker(port: int, k: int, round_no: int, promises: Promises, stop: threading.Event) -> None:
    try:
        c = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        c.login("alice", "apw")
        own, copies, moved = f"T{k}", f"C{k}", f"M{k}"
        for name in (own, copies, moved):
            if c.create(name)[0] == "OK":
                promises.mailboxes.add(f"user/alice/{name}")
        c.select(own)
        i = 0
        while not stop.is_set():
            tag = f"r{round_no}-t{k}-m{i}"
            data = _message(tag)
            typ, resp = c.append(own, None, None, data)
            if typ != "OK":
                continue
            uid = int(re.search(rb"APPENDUID \d+ (\d+)", resp[0]).group(1))
            promises.add(f"user/alice/{own}", uid, body_guid(data))
            if c.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Flagged)")[0] == "OK":
                with promises.lock:
                    promises.flagged.add((f"user/alice/{own}", uid))
            if i % 3 == 0:
                typ, _ = c.uid("COPY", str(uid), copies)
                code = c.untagged_responses.pop("COPYUID", None) or []
                if typ == "OK" and code:
                    promises.add(f"user/alice/{copies}", int(code[-1].split()[-1]), body_guid(data))
            if i % 5 == 1:
                typ, _ = c.uid("MOVE", str(uid), moved)
                code = c.untagged_responses.pop("COPYUID", None) or []
                if typ == "OK" and code:
                    promises.remove(f"user/alice/{own}", uid)
                    promises.add(f"user/alice/{moved}", int(code[-1].split()[-1]), body_guid(data))
            if i % 7 == 2:
                c.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)")
                if c.uid("EXPUNGE", str(uid))[0] == "OK":
                    promises.remove(f"user/alice/{own}", uid)
            i += 1
    except (OSError, EOFError, imaplib.IMAP4.abort, imaplib.IMAP4.error):
        return  # the server died under us: what had no OK yet promised nothing


def test_kill_9_loses_no_tagged_ok_of_an_imap_write(tmp_path):
    """IMAP-10: after SIGKILL at random moments, every acknowledged APPEND, STORE, COPY, MOVE, EXPUNGE and
    CREATE is in the reopened node, exactly as answered."""
    path = str(tmp_path / "n")
    Node.init(path).close()
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=ROOT, path=path))
    rng = random.Random(int(os.environ.get("CRASH_SEED", "4242")))
    promises = Promises()
    rounds = 0
    for round_no in range(3):
        child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, cwd=ROOT)
        try:
            port = int(child.stdout.readline())
            stop = threading.Event()
            before = len(promises.present)
            threads = [threading.Thread(target=_worker, args=(port, k, round_no, promises, stop), daemon=True)
                       for k in range(4)]
            for t in threads:
                t.start()
            want = rng.randint(10, 60)
            deadline = time.monotonic() + 20
            while len(promises.present) - before < want and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.random() * 0.05)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
        stop.set()
        for t in threads:
            t.join(10)
        rounds += 1
        with Node.open(path) as node:
            names = {m.name for m in node.list_mailboxes()}
            assert promises.mailboxes <= names
            for name in {m for m, _ in promises.present}:
                rows = {r.uid: r for r in node.imap_snapshot(name)[1]}
                for (mailbox, uid), guid in list(promises.present.items()):
                    if mailbox != name:
                        continue
                    assert uid in rows and rows[uid].guid == guid, (mailbox, uid)
                    if (mailbox, uid) in promises.flagged:
                        assert "\\Flagged" in rows[uid].flags, (mailbox, uid)
            for mailbox, uid in promises.gone:
                if mailbox in names:
                    assert uid not in {r.uid for r in node.imap_snapshot(mailbox)[1]}, (mailbox, uid)
    assert rounds == 3 and len(promises.present) >= 30
