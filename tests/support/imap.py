"""Helpers for the IMAP tests: a pure session (connection + executor + memory backend, no sockets)."""

from __future__ import annotations

from engine.imap.executor import Executor
from engine.imap.memory import MemoryBackend
from engine.imap.session import ConnectionClosed, IdleDone, ImapConnection, NEED_DATA, PAUSED, State
from tests.support.imap_abnf import check_responses

__all__ = ["run_now", "PureSession", "memory_backend", "MESSAGE"]

MESSAGE = (b"From: Alice <alice@x.example>\r\nTo: bob@y.example\r\nSubject: hello\r\n"
           b"Date: Mon, 3 Jan 2022 10:00:00 +0000\r\nMessage-ID: <1@x.example>\r\n\r\nHi Bob.\r\n")


def run_now(coro):
    """Run a coroutine that never suspends (the memory backend never waits) to completion."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the coroutine suspended: the pure driver runs only backends that never wait")


def memory_backend(**users: str) -> MemoryBackend:
    b = MemoryBackend()
    for name, password in (users or {"alice": "apw", "bob": "bpw"}).items():
        b.add_user(name, password)
    return b


class PureSession:
    """One client session driven without sockets: ``cmd(b"a NOOP")`` returns the response lines.

    ``runner`` runs the executor's coroutines: :func:`run_now` for a backend that never waits (the
    memory backend), a harness's event loop for one that does (``tests/support/imap_node.py``)."""

    def __init__(self, backend, runner=run_now, **kw):
        kw.setdefault("plaintext_login", True)
        self.run = runner
        self.conn = ImapConnection(**kw)
        self.ex = Executor(backend, capabilities=lambda: self.conn.capabilities(State.AUTHENTICATED))
        self.greeting = self._take()

    def _take(self) -> list[bytes]:
        data = self.conn.data_to_send()
        check_responses(data)
        return data.split(b"\r\n")[:-1]

    def raw(self, data: bytes) -> list[bytes]:
        self.conn.receive_data(data)
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA or ev is PAUSED:
                break
            if isinstance(ev, ConnectionClosed):
                self.ex.close()
                continue
            responses = self.run(self.ex.idle_done(ev.tag)) if isinstance(ev, IdleDone) else self.run(
                self.ex.execute(ev))
            for r in responses:
                self.conn.send(r)
        return self._take()

    def cmd(self, line: str | bytes) -> list[bytes]:
        if isinstance(line, str):
            line = line.encode()
        return self.raw(line + b"\r\n")

    def idle_poll(self) -> list[bytes]:
        for r in self.run(self.ex.idle_updates()):
            self.conn.send(r)
        return self._take()

    def login(self, user: str, password: str) -> "PureSession":
        out = self.cmd(f"L LOGIN {user} {password}")
        assert out[-1].startswith(b"L OK "), out
        return self
