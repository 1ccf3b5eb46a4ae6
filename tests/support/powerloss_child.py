"""The node process of ``tests/e2e/test_powerloss_fuse.py``.

``python tests/support/powerloss_child.py NODE WORKLOAD SEED ROUND ACK_FD`` opens the
node at NODE (on a lazyfs mount) and runs WORKLOAD until it is killed or its
file system fails. Every operation is announced on ACK_FD before it starts
(``"op": "try"``) and reported again only after the Node or Log call that
makes it durable returned (``deliver``, ``cursor``, ``checkpoint``): the
parent holds the node to exactly the operations reported as done.

Workloads:

* ``deliver``: four threads deliver distinct messages to three mailboxes.
* ``rollover``: the same with messages about the size of a segment (the test
  sets ``segment_max_bytes`` small), so segments roll over all the time.
* ``cursors``: two delivering threads and one moving two cursors
  (``Log.cursors.set``) to the log's last LSN in a loop.
* ``checkpoints``: two delivering threads and one calling
  ``Node.checkpoint()`` in a loop.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from engine.node import Node  # noqa: E402

MAILBOXES = ["user/ann/INBOX", "user/bob/INBOX", "user/bob/Archive"]
CURSOR_NAMES = ["replica.a", "replica.b"]
WORKLOADS = {"deliver": (4, False, False), "rollover": (3, False, False),
             "cursors": (2, True, False), "checkpoints": (2, False, True)}


def message_body(seed: int, key: str, workload: str) -> bytes:
    """The message delivered under ``key``: a function of the seed and the key only."""
    rng = random.Random(f"{seed}/{key}")
    size = rng.randint(1200, 2600) if workload == "rollover" else rng.randint(80, 900)
    head = f"From: <s@test>\r\nTo: <r@test>\r\nMessage-ID: <{seed}.{key}@test>\r\nSubject: {key}\r\n\r\n".encode()
    line = b"power loss makes what was not fsynced vanish.\r\n"
    return head + (line * (size // len(line) + 1))[: max(0, size - len(head))]


def message_mailbox(key: str) -> str:
    return MAILBOXES[sum(key.encode()) % len(MAILBOXES)]


class Reporter:
    def __init__(self, fd: int):
        self.fd = fd
        self.lock = threading.Lock()

    def __call__(self, **fields) -> None:
        line = (json.dumps(fields, sort_keys=True) + "\n").encode()
        with self.lock:
            os.write(self.fd, line)  # one write under PIPE_BUF bytes: never interleaved


def deliverer(node: Node, report: Reporter, seed: int, workload: str, prefix: str) -> None:
    i = 0
    while True:
        key = f"{prefix}-{i}"
        i += 1
        mailbox = message_mailbox(key)
        report(op="try", kind="deliver", key=key)
        try:
            r = node.deliver(mailbox, message_body(seed, key, workload), create=True)
        except Exception as exc:  # the file system "lost power": this one was not acknowledged
            report(op="error", key=key, error=repr(exc))
            return
        report(op="deliver", key=key, mailbox=mailbox, uid=r.uid, lsn=r.lsn, guid=r.guid)


def cursor_mover(node: Node, report: Reporter) -> None:
    j = 0
    while True:
        name = CURSOR_NAMES[j % len(CURSOR_NAMES)]
        j += 1
        value = node.log.last_lsn
        report(op="try", kind="cursor", name=name, lsn=value)
        try:
            node.log.cursors.set(name, value)
        except Exception as exc:
            report(op="error", name=name, error=repr(exc))
            return
        report(op="cursor", name=name, lsn=value)


def checkpointer(node: Node, report: Reporter) -> None:
    while True:
        report(op="try", kind="checkpoint")
        try:
            lsn = node.checkpoint()
        except Exception as exc:
            report(op="error", error=repr(exc))
            return
        report(op="checkpoint", lsn=lsn)


def main(argv: list[str]) -> int:
    path, workload, seed, round_no, fd = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    report = Reporter(fd)
    threads_n, cursors, checkpoints = WORKLOADS[workload]
    node = Node.open(path)
    report(op="opened", last_lsn=node.log.last_lsn, applied_lsn=node.store.applied_lsn)
    threads = [threading.Thread(target=deliverer, args=(node, report, seed, workload, f"r{round_no}t{t}"),
                                daemon=True) for t in range(threads_n)]
    if cursors:
        threads.append(threading.Thread(target=cursor_mover, args=(node, report), daemon=True))
    if checkpoints:
        threads.append(threading.Thread(target=checkpointer, args=(node, report), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report(op="stopped")
    os._exit(0)  # the file system is gone: closing the node would only fail


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
