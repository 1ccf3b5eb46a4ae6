"""Crash safety of deliveries with real processes and kill -9.

* LMTP: a child runs ``walctl serve``; client threads deliver distinct
  messages and record every 250; the child is killed with SIGKILL at a random
  moment, the node is reopened, and every message that got a 250 must be
  there exactly once with the GUID of the bytes sent. Several kill points on
  the same node (each round goes on from the last).
* Node API: a child delivers in threads and prints each receipt after
  ``deliver`` returned; SIGKILL; every printed receipt is in the reopened
  store exactly once (UID and GUID), the store having caught up from the log.
* Log written, store not applied (the applier never ran): reopening applies
  every acknowledged operation exactly once.

kill -9 keeps the page cache (FAULTS.md P1): these tests check recovery and
"acknowledged => durable record => applied once", not power loss.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

from engine.store.events import body_guid
from engine.node import Node
from tests.support.lmtp import ROOT, ServeProcess, client, lmtp_send, make_message

RECIPIENTS = ["ann@x", "bob@x", "carl@x"]


def _guids_per_mailbox(path: str) -> dict[str, collections.Counter]:
    with Node.open(path) as n:
        return {mb.name: collections.Counter(m.guid for m in n.list_messages(mb.name)) for mb in n.list_mailboxes()}


def _deliver_until_killed(port: int, round_no: int, acked: list, stop: threading.Event, threads: int = 6) -> None:
    def worker(k: int) -> None:
        try:
            c = client(port, timeout=10)
        except OSError:
            return
        i = 0
        while not stop.is_set():
            rcpt = RECIPIENTS[(k + i) % len(RECIPIENTS)]
            msg = make_message(f"r{round_no}-t{k}-m{i}", 1500)
            i += 1
            try:
                code, _ = lmtp_send(c, "a@x", [rcpt], msg)[rcpt]
            except (OSError, EOFError, Exception):  # the server died under us: that message was not acked
                return
            if code == 250:
                acked.append((rcpt, body_guid(msg).hex()))

    ts = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in ts:
        t.start()
    return ts


def test_kill_9_of_walctl_serve_loses_no_acknowledged_message(tmp_path):
    """LMTP-16"""
    node = str(tmp_path / "n")
    Node.init(node).close()
    rng = random.Random(int(os.environ.get("CRASH_SEED", "2033")))
    acked: list[tuple[str, str]] = []
    for round_no in range(4):
        with ServeProcess(node) as srv:
            stop = threading.Event()
            before = len(acked)
            threads = _deliver_until_killed(srv.port, round_no, acked, stop)
            deadline = time.monotonic() + 15
            # kill at a random moment once this round has had some deliveries acknowledged
            want = rng.randint(5, 200)
            while len(acked) - before < want and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.random() * 0.05)
            srv.proc.send_signal(signal.SIGKILL)
            assert srv.wait(30) == -signal.SIGKILL
            stop.set()
            for t in threads:
                t.join(30)
        assert len(acked) > before, f"round {round_no}: no delivery was acknowledged"
        boxes = _guids_per_mailbox(node)
        for rcpt, guid in acked:
            mailbox = f"user/{rcpt.split('@')[0]}/INBOX"
            assert boxes[mailbox][guid] == 1, f"round {round_no}: {guid} acked to {rcpt}, found {boxes[mailbox][guid]}x"
        for counter in boxes.values():  # nothing, acked or not, is stored twice
            assert max(counter.values(), default=1) == 1
    # and the store is still the function of the log
    with Node.open(node) as n:
        live = n.digest()
    from engine.node import rebuild_store

    assert rebuild_store(node) == live


CHILD = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, {root!r})
    from engine.node import Node
    node = Node.open({path!r})
    lock = threading.Lock()
    def worker(k):
        i = 0
        while True:
            body = b"Subject: %d-%d\\r\\n\\r\\n" % (k, i) + b"x" * 1500 + b"\\r\\n"
            r = node.deliver("user/u%d/INBOX" % (k % 3), body, create=True)
            with lock:
                sys.stdout.write("%s %d %s\\n" % (r.mailbox, r.uid, r.guid))
                sys.stdout.flush()
            i += 1
    for k in range(6):
        threading.Thread(target=worker, args=(k,), daemon=True).start()
    threading.Event().wait()
""")


def test_kill_9_of_a_node_api_client_keeps_every_receipt(tmp_path):
    path = str(tmp_path / "n")
    Node.init(path).close()
    rng = random.Random(5321)
    receipts: list[tuple[str, int, str]] = []
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=ROOT, path=path)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        want = rng.randint(20, 400)
        got = 0
        deadline = time.monotonic() + 20
        while got < want and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            mailbox, uid, guid = line.decode().split()
            receipts.append((mailbox, int(uid), guid))
            got += 1
        proc.send_signal(signal.SIGKILL)
        for line in proc.stdout:  # receipts printed before the kill landed are acknowledgements too
            parts = line.decode().split()
            if len(parts) == 3:
                receipts.append((parts[0], int(parts[1]), parts[2]))
        assert proc.wait(30) == -signal.SIGKILL
        assert got > 0
        with Node.open(path) as n:
            have = {(mb.name, m.uid): m.guid for mb in n.list_mailboxes() for m in n.list_messages(mb.name)}
            for mailbox, uid, guid in receipts:
                assert have.get((mailbox, uid)) == guid
            per_box = collections.Counter((mb, g) for (mb, _), g in have.items())
            assert max(per_box.values()) == 1


def test_log_written_store_not_applied_is_applied_exactly_once_on_reopen(tmp_path):
    path = str(tmp_path / "n")
    Node.init(path).close()
    n = Node.open(path, start_applier=False)
    lsns = [n.create_mailbox("user/a/INBOX")]
    r1 = n.deliver("user/a/INBOX", b"one\r\n")
    r2 = n.deliver("user/a/INBOX", b"two\r\n", flags=["\\Seen"])
    lsns.append(n.store_flags("user/a/INBOX", [r1.uid], "add", ["\\Flagged"]))
    lsns.append(n.expunge("user/a/INBOX", [r2.uid]))
    lsns.append(n.rename_mailbox("user/a/INBOX", "user/a/Old"))
    assert n.store.applied_lsn == 0  # nothing applied: as if the process died right after the fsyncs
    n.close()
    with Node.open(path) as n:
        assert n.store.applied_lsn == n.log.last_lsn == max(lsns)
        (mb,) = n.list_mailboxes()
        assert (mb.name, mb.uidnext, mb.messages, mb.highestmodseq) == ("user/a/Old", 3, 1, 4)
        (m,) = n.list_messages("user/a/Old")
        assert (m.uid, m.guid, m.flags) == (1, r1.guid, ("\\Flagged",))
        # a second reopen applies nothing again
        applied = n.store.applied_lsn
    with Node.open(path) as n:
        assert n.store.applied_lsn == applied
        assert [x.uid for x in n.list_messages("user/a/Old")] == [1]
        # the decision state was rebuilt from the store: UIDs go on, never reused
        assert n.deliver("user/a/Old", b"three\r\n").uid == 3
