"""Backend harnesses for the IMAP tests: one API over the memory backend (the model) and over a real node.

The executor-level and client tests run the same scenarios against both (``harness`` fixtures):
:class:`MemoryHarness` wraps :class:`~engine.imap.memory.MemoryBackend`; :class:`NodeHarness`
runs a real node (log with fsync, SQLite store) under :class:`~engine.imap.node_backend.NodeBackend`,
with the node's async face on an event loop thread (an anyio blocking portal), so blocking test
code can drive it. Mail set up "from outside IMAP" goes in through the node's own write path.
"""

from __future__ import annotations

import functools
import os

import anyio.from_thread

from engine.node import AsyncNode
from engine.imap.memory import MemoryBackend
from engine.imap.node_backend import NodeBackend
from engine.node import Node
from engine.store.passwords import hash_password
from tests.support.imap import PureSession, run_now

__all__ = ["MemoryHarness", "NodeHarness", "make_harness", "HARNESSES"]

HARNESSES = ("memory", "node")
USERS = {"alice": "apw", "bob": "bpw"}


@functools.lru_cache(maxsize=None)
def _hash(password: str) -> str:
    return hash_password(password)


class MemoryHarness:
    kind = "memory"

    def __init__(self, users=USERS):
        self.backend = MemoryBackend()
        for name, password in users.items():
            self.backend.add_user(name, password)
        self.run = run_now

    def session(self, **kw) -> PureSession:
        return PureSession(self.backend, runner=self.run, **kw)

    def deliver(self, mailbox: str, data: bytes, flags=()) -> int:
        return self.backend.deliver(mailbox, data, flags)

    def create(self, name: str) -> None:
        run_now(MemoryBackend.create(self.backend, name))

    def uids(self, mailbox: str) -> list[int]:
        return list(self.backend.mailboxes[mailbox].messages)

    def flags(self, mailbox: str, uid: int) -> frozenset[str]:
        return self.backend.mailboxes[mailbox].messages[uid].info.flags

    def bodies(self, mailbox: str) -> list[bytes]:
        return [m.data for m in self.backend.mailboxes[mailbox].messages.values()]

    def mailboxes(self) -> list[str]:
        return sorted(self.backend.mailboxes)

    def subscribed(self, user: str) -> set[str]:
        return set(self.backend.subscribed.get(user, ()))

    def subscribe(self, user: str, name: str) -> None:
        self.backend.subscribed.setdefault(user, set()).add(name)

    def uidvalidity(self, mailbox: str) -> int:
        return self.backend.mailboxes[mailbox].uidvalidity

    def fail_next(self, method: str, error: BaseException) -> None:
        self.backend.fail_next(method, error)

    def make_replica(self, master: str) -> None:
        self.backend.read_only_master = master

    def close(self) -> None:
        pass


class NodeHarness:
    kind = "node"

    def __init__(self, path: str, users=USERS):
        self._portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
        self.portal = self._portal_cm.__enter__()
        self.node = Node.init(os.path.join(path, "node"))
        self.anode = AsyncNode(self.node)
        self.master: str | None = None
        self.backend = NodeBackend(self.anode, master_address=lambda: self.master)
        for name, password in users.items():
            self.node.add_user(name, password_hash=_hash(password))

    def run(self, coro):
        return self.portal.call(lambda: coro)

    def session(self, **kw) -> PureSession:
        return PureSession(self.backend, runner=self.run, **kw)

    def deliver(self, mailbox: str, data: bytes, flags=()) -> int:
        # the memory backend's clock: 2000-01-01 00:00:00 UTC
        return self.node.append_messages(mailbox, [(data, tuple(flags), 946684800.0)]).uids[0]

    def create(self, name: str) -> None:
        self.node.create_mailbox(name)

    def uids(self, mailbox: str) -> list[int]:
        return [r.uid for r in self.node.imap_snapshot(mailbox)[1]]

    def flags(self, mailbox: str, uid: int) -> frozenset[str]:
        return frozenset(self.node.imap_rows(mailbox, [uid])[1][0].flags)

    def bodies(self, mailbox: str) -> list[bytes]:
        uids = self.uids(mailbox)
        got = self.node.imap_bodies(mailbox, uids)
        return [got[u] for u in uids]

    def mailboxes(self) -> list[str]:
        return sorted(m.name for m in self.node.list_mailboxes())

    def subscribed(self, user: str) -> set[str]:
        return set(self.node.subscriptions(user))

    def subscribe(self, user: str, name: str) -> None:
        self.node.set_subscribed(user, name, True)

    def uidvalidity(self, mailbox: str) -> int:
        return self.node.imap_snapshot(mailbox)[0].uidvalidity

    def fail_next(self, method: str, error: BaseException) -> None:
        """Fault injection: the next call of the backend's ``method`` raises ``error``, changing nothing."""
        original = getattr(self.backend, method)

        async def failing(*args, **kw):
            setattr(self.backend, method, original)
            raise error
        setattr(self.backend, method, failing)

    def make_replica(self, master: str) -> None:
        self.master = master
        self.node.set_role("replica")

    def close(self) -> None:
        try:
            self._portal_cm.__exit__(None, None, None)
        finally:
            self.node.close()


def make_harness(kind: str, tmp_path, users=USERS):
    return MemoryHarness(users) if kind == "memory" else NodeHarness(str(tmp_path), users)
