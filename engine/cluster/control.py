"""The control channel: how `walctl` talks to a running node (specs/control.md).

A client first sends the preamble ``MWCTL/1\n`` (so a node can serve
control and replication on one port: replication starts with ``MWREPL``),
then it is one JSON object per line, request then response. A node listens on a Unix
socket ``NODE/control.sock`` (mode 0600: file permissions are the
authentication) and, with ``--control HOST:PORT``, on TCP, where the client
must first answer a challenge with the node's shared secret (CTL-2):

    server: {"hello": "mailwal-control/1", "nonce": "<32 random bytes hex>"}
    client: {"auth": hex(HMAC-SHA256(secret, "mailwal-control-client" || nonce))}
    server: {"ok": true}          (or {"ok": false, "error": ...} and close)

Then requests ``{"op": NAME, "args": {...}}`` get ``{"ok": true, "result":
...}`` or ``{"ok": false, "error": MESSAGE, "type": EXCEPTION_CLASS}``.
Lines are at most 64 MiB (mailbox snapshots carry bodies, base64).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import socket
from typing import Any, Awaitable, Callable

import anyio
from anyio.abc import ByteStream

from ..errors import listen_error

__all__ = ["ControlClient", "serve_control", "serve_control_connection", "ControlError", "encode_bytes",
           "decode_bytes", "MAX_LINE_BYTES", "PREAMBLE"]

MAX_LINE_BYTES = 64 * 1024 * 1024
_HELLO = "mailwal-control/1"
PREAMBLE = b"MWCTL/1\n"
_CLIENT_TAG = b"mailwal-control-client"


class ControlError(Exception):
    """The node refused or failed a control request (message from the node)."""

    def __init__(self, message: str, type_: str = "ControlError"):
        super().__init__(message)
        self.type = type_


def encode_bytes(value: Any) -> Any:
    """JSON-safe copy: bytes become {"$b64": ...} recursively."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {k: encode_bytes(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_bytes(v) for v in value]
    return value


def decode_bytes(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$b64"}:
            return base64.b64decode(value["$b64"])
        return {k: decode_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_bytes(v) for v in value]
    return value


def _proof(secret: bytes, nonce_hex: str) -> str:
    return hmac.new(secret, _CLIENT_TAG + bytes.fromhex(nonce_hex), hashlib.sha256).hexdigest()


class _LineReader:
    def __init__(self, stream: ByteStream):
        self.stream = stream
        self.buf = bytearray()

    async def line(self) -> dict | None:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                raw = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return json.loads(raw)
            if len(self.buf) > MAX_LINE_BYTES:
                raise ControlError("control line too long")
            try:
                chunk = await self.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return None
            self.buf += chunk


async def _send(stream: ByteStream, obj: dict) -> None:
    await stream.send(json.dumps(obj, separators=(",", ":")).encode() + b"\n")


Handler = Callable[[str, dict], Awaitable[Any]]


async def serve_control_connection(stream: ByteStream, handler: Handler, secret: bytes | None,
                                   *, preamble_read: bool = False) -> None:
    """Serve one control connection (``preamble_read``: the caller consumed it)."""
    async with stream:
        reader = _LineReader(stream)
        try:
            if not preamble_read:
                with anyio.fail_after(10):
                    while len(reader.buf) < len(PREAMBLE):
                        reader.buf += await stream.receive(len(PREAMBLE) - len(reader.buf))
                if bytes(reader.buf[:len(PREAMBLE)]) != PREAMBLE:
                    return
                del reader.buf[:len(PREAMBLE)]
            if secret is not None:
                nonce = secrets.token_hex(32)
                await _send(stream, {"hello": _HELLO, "nonce": nonce})
                with anyio.fail_after(10):
                    msg = await reader.line()
                if not isinstance(msg, dict) or not hmac.compare_digest(str(msg.get("auth", "")), _proof(secret, nonce)):
                    await _send(stream, {"ok": False, "error": "authentication failed", "type": "AuthenticationError"})
                    return
                await _send(stream, {"ok": True})
            else:
                await _send(stream, {"hello": _HELLO})
            while True:
                msg = await reader.line()
                if msg is None:
                    return
                if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
                    await _send(stream, {"ok": False, "error": "request must be {\"op\": ..., \"args\": {...}}",
                                         "type": "ControlError"})
                    continue
                try:
                    result = await handler(msg["op"], decode_bytes(msg.get("args") or {}))
                    await _send(stream, {"ok": True, "result": encode_bytes(result)})
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:  # reported to the client, the node goes on
                    await _send(stream, {"ok": False, "error": str(exc), "type": type(exc).__name__})
        except (ValueError, ControlError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream,
                TimeoutError, OSError):
            return


async def serve_control(handler: Handler, *, unix_path: str | None = None, tcp: tuple[str, int] | None = None,
                        secret: bytes | None = None, task_status=anyio.TASK_STATUS_IGNORED) -> None:
    """Serve control requests until cancelled. Reports the TCP port via task_status.

    The Unix socket exists exactly while the node serves: it is removed when
    this returns or is cancelled (a clean stop, or a start that failed), so
    a socket file found without a node is one a killed process left behind
    (clients then say the node is not running, CTL-1).
    """
    listeners = []
    socket_id = None
    try:
        if unix_path is not None:
            _remove_socket(unix_path)
            old = os.umask(0o177)
            try:
                listeners.append((await anyio.create_unix_listener(unix_path), None))
            finally:
                os.umask(old)
            st = os.stat(unix_path)
            socket_id = (st.st_dev, st.st_ino)
        port = None
        if tcp is not None:
            if secret is None:
                raise ValueError("a TCP control listener needs a shared secret")
            try:
                tl = await anyio.create_tcp_listener(local_host=tcp[0], local_port=tcp[1])
            except OSError as exc:
                raise listen_error("control", tcp, exc) from exc
            port = tl.extra(anyio.abc.SocketAttribute.local_port)
            listeners.append((tl, secret))
        async with anyio.create_task_group() as tg:
            for listener, sec in listeners:
                tg.start_soon(listener.serve, lambda s, sec=sec: serve_control_connection(s, handler, sec))
            task_status.started(port)
    finally:
        if socket_id is not None:
            _remove_socket(unix_path, only=socket_id)


def _remove_socket(path: str, only: tuple[int, int] | None = None) -> None:
    """Unlink the socket file ``path`` if it exists (``only``: if it is still that (dev, inode))."""
    try:
        if only is not None:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) != only:
                return
        os.unlink(path)
    except FileNotFoundError:
        pass


class ControlClient:
    """Blocking client for walctl. ``ControlClient.unix(path)`` or ``.tcp(host, port, secret)``."""

    def __init__(self, sock: socket.socket, secret: bytes | None, timeout: float):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.sock.sendall(PREAMBLE)
        self.file = sock.makefile("rwb")
        hello = self._read()
        if hello.get("hello") != _HELLO:
            raise ControlError(f"not a mailwal control endpoint (got {hello!r})")
        if "nonce" in hello:
            if secret is None:
                raise ControlError("this endpoint needs the shared secret (--secret-file)")
            self._write({"auth": _proof(secret, hello["nonce"])})
            reply = self._read()
            if not reply.get("ok"):
                raise ControlError(reply.get("error", "authentication failed"), reply.get("type", "AuthenticationError"))

    @classmethod
    def unix(cls, path: str, timeout: float = 60.0) -> "ControlClient":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError:
            s.close()
            raise
        return cls(s, None, timeout)

    @classmethod
    def tcp(cls, host: str, port: int, secret: bytes | None, timeout: float = 60.0) -> "ControlClient":
        return cls(socket.create_connection((host, port), timeout=timeout), secret, timeout)

    def _write(self, obj: dict) -> None:
        self.file.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        self.file.flush()

    def _read(self) -> dict:
        line = self.file.readline(MAX_LINE_BYTES + 1)
        if not line:
            raise ControlError("the node closed the control connection")
        return json.loads(line)

    def call(self, op: str, **args) -> Any:
        self._write({"op": op, "args": encode_bytes(args)})
        reply = self._read()
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "request failed"), reply.get("type", "ControlError"))
        return decode_bytes(reply.get("result"))

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
