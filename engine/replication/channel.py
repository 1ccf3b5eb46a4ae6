"""A :class:`~engine.replication.ReplicationSession` bound to an anyio byte stream.

The thin I/O layer both drivers share: it writes the session's bytes under a
lock (so frames leave in the order the session produced them), shields each
write from cancellation so that a frame is never half-written (with its own
timeout, so a hung peer cannot hold it forever), and reads until the session
has a whole event.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from ..errors import ConnectionLostError
from .messages import Event, Message
from .session import NEED_DATA, ReplicationSession
from .transitions import State

__all__ = ["Channel", "PrefixedStream", "READ_SIZE", "logger"]

READ_SIZE = 1024 * 1024
logger = logging.getLogger("mailwal.replication")

_STREAM_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)


class Channel:
    """One connection: a session plus the stream it speaks over."""

    def __init__(self, stream: anyio.abc.ByteStream, session: ReplicationSession, *, write_timeout_s: float):
        self.stream = stream
        self.session = session
        self.write_timeout_s = write_timeout_s
        self._lock = anyio.Lock()
        self.peer = _peer_name(stream)

    async def send(self, msg: Message) -> None:
        """Send one message; the write is shielded but bounded by ``write_timeout_s``.

        Raises:
            ConnectionLostError: the write failed or timed out (the session is
                then in ERROR via ``send_failed``).
            LocalProtocolError: the session does not allow ``msg`` now (a bug).
        """
        async with self._lock:
            if self.session.state is State.ERROR:
                raise ConnectionLostError(f"the connection to {self.peer} already failed")
            data = self.session.send(msg)
            try:
                with anyio.fail_after(self.write_timeout_s, shield=True):
                    await self.stream.send(data)
            except (TimeoutError, *_STREAM_ERRORS) as exc:
                self.session.send_failed()
                raise ConnectionLostError(f"sending {type(msg).__name__} to {self.peer} failed: {exc!r}") from exc

    async def receive(self) -> Message | Event:
        """The next event from the peer (reads as needed). Apply your own timeout.

        Raises:
            RemoteProtocolError: the peer broke the protocol.
            ConnectionLostError: the stream broke.
        """
        while True:
            ev = self.session.next_event()
            if ev is not NEED_DATA:
                return ev  # type: ignore[return-value]
            try:
                data = await self.stream.receive(READ_SIZE)
            except anyio.EndOfStream:
                data = b""
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise ConnectionLostError(f"connection to {self.peer} broke: {exc!r}") from exc
            self.session.receive_data(data)

    def receive_nowait(self):
        """The next event if a whole one is buffered already, else NEED_DATA."""
        return self.session.next_event()

    async def aclose(self) -> None:
        with anyio.move_on_after(1, shield=True):
            try:
                await self.stream.aclose()
            except _STREAM_ERRORS:
                pass


def _peer_name(stream: anyio.abc.ByteStream) -> str:
    try:
        addr = stream.extra(anyio.abc.SocketAttribute.remote_address)
    except anyio.TypedAttributeLookupError:  # not a socket stream
        return "peer"
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


class PrefixedStream(anyio.abc.ByteStream):
    """A byte stream that first yields ``prefix`` (bytes already read to
    decide which protocol a connection speaks), then the wrapped stream."""

    def __init__(self, stream: anyio.abc.ByteStream, prefix: bytes):
        self._stream = stream
        self._prefix = prefix

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    @property
    def extra_attributes(self):
        return self._stream.extra_attributes
