"""Shared pieces for the LMTP and node tests: a node served in-process or as a
real ``walctl serve`` child, and LMTP clients (:mod:`tools.lmtp_client`: smtplib's
LMTP, which reads one reply per recipient after DATA) with a per-recipient send.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading

import anyio

from engine.node import Node
from engine.lmtp import LmtpConfig
from engine.runner import NodeRunner
from tools.lmtp_client import LmtpClient
from tests.support import ROOT


def make_message(tag: str, size: int = 4096) -> bytes:
    """A distinct CRLF message of about ``size`` octets (the tag makes its GUID unique)."""
    head = (f"From: <sender@test>\r\nTo: <rcpt@test>\r\nMessage-ID: <{tag}@test>\r\nSubject: {tag}\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.\r\n"
    body = bytearray(head)
    while len(body) + len(line) <= size:
        body += line
    return bytes(body)


def lmtp_send(client: LmtpClient, sender: str, recipients: list[str], message: bytes) -> dict[str, tuple[int, str]]:
    """Send one message; returns {recipient: (code, text)} for every recipient (RCPT or after-DATA reply)."""
    return {r: (reply.code, reply.text) for r, reply in client.deliver(sender, recipients, message).items()}


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def served_node(path: str, *, init: dict | None = None, **lmtp):
    """Init (unless it exists) and serve a node in a thread; yields the NodeRunner.

    ``runner.log_lines`` collects the LMTP log lines.
    """
    if not os.path.exists(os.path.join(path, "node.json")):
        Node.init(path, **(init or {})).close()
    lmtp.setdefault("port", 0)
    runner = NodeRunner(path, LmtpConfig(**lmtp), handle_signals=False, announce=lambda msg: None)
    capture = LogCapture()
    logger = logging.getLogger("mailwal.lmtp")
    logger.addHandler(capture)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    runner.log_lines = capture.lines
    errors: list[BaseException] = []

    def main():
        try:
            anyio.run(runner.run)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            runner.ready.set()

    thread = threading.Thread(target=main, name="node-runner", daemon=True)
    thread.start()
    try:
        assert runner.ready.wait(30), "the node runner did not start"
        if errors:
            raise errors[0]
        yield runner
    finally:
        runner.request_stop()
        thread.join(60)
        logger.removeHandler(capture)
        logger.setLevel(old_level)
        assert not thread.is_alive(), "the node runner did not stop"
        if errors:
            raise errors[0]


def client(runner_or_port, timeout: float = 20) -> LmtpClient:
    """An LMTP connection to a runner (or a port) on 127.0.0.1 that has said LHLO."""
    port = runner_or_port if isinstance(runner_or_port, int) else runner_or_port.lmtp_address[1]
    c = LmtpClient("127.0.0.1", port, timeout=timeout, local_hostname="client.test")
    c.ehlo()
    return c


def stored(path: str, mailbox: str) -> dict[str, int]:
    """{guid: uid} of a mailbox of the node at ``path``, read after its server stopped."""
    with Node.open(path) as n:
        return {m.guid: m.uid for m in n.list_messages(mailbox)}


class ServeProcess:
    """``walctl serve NODE --lmtp 127.0.0.1:0`` as a real child process."""

    def __init__(self, node: str, *extra: str, log_file: str | None = None):
        self.node = node
        self.log_file = log_file or os.path.join(os.path.dirname(os.path.abspath(node)),
                                                 os.path.basename(node) + ".serve.log")
        self._stderr = open(self.log_file, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools", "serve", node, "--lmtp", "127.0.0.1:0", *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
        )
        line = ""
        for _ in range(20):  # services may announce themselves first
            line = self.proc.stdout.readline().decode()
            if not line or "LMTP listening on" in line:
                break
        if "LMTP listening on" not in line:
            self.proc.kill()
            self.proc.wait()
            self._stderr.close()
            raise RuntimeError(f"walctl serve did not start: {line!r}; log: {open(self.log_file).read()[-2000:]}")
        self.port = int(line.rsplit(":", 1)[1])

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        self.proc.kill()
        return self.wait(30)

    def wait(self, timeout: float = 60) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._stderr.close()
            self.proc.stdout.close()
        from tests.support.helpers import assert_no_traceback

        assert_no_traceback(self.log(), self.proc.args, what="walctl serve:")
        return rc

    def log(self) -> str:
        with open(self.log_file, encoding="utf-8", errors="replace") as f:
            return f.read()

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()
