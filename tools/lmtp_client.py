"""An LMTP client that reads every recipient's reply: for the tests, ``walctl torture``,
``make demo`` and ``walctl bench``.

LMTP (RFC 2033) answers DATA once per accepted recipient (4.2): the message
can be stored for one recipient and refused for another. smtplib's
``sendmail`` reads a single reply after DATA, so :meth:`LmtpClient.deliver`
drives the transaction itself and returns one :class:`Reply` per recipient:
the RCPT refusal for a refused one, the post-DATA reply for an accepted one.

Two faces, one transaction:

* :class:`LmtpClient`: blocking, one command at a time. It is smtplib's
  ``LMTP`` (every smtplib call stays available to tests that speak the
  protocol by hand) plus :meth:`~LmtpClient.deliver`.
* :class:`PipeliningLmtpClient`: asyncio, MAIL, every RCPT and DATA in one
  write (RFC 2920 PIPELINING), for load generation.

Both send the message as :func:`data_block` frames it: dot-stuffed
(RFC 5321 4.5.2), ended with CRLF and the ``.`` line. The message's bytes are
otherwise sent unchanged (no line-ending repair), so a test can send a bare
LF and see the server refuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
from dataclasses import dataclass

__all__ = ["Reply", "LmtpError", "TransactionInterrupted", "SessionRefused", "dot_stuff", "data_block",
           "LmtpClient", "PipeliningLmtpClient"]

_TERMINATOR = b".\r\n"
_MAX_REPLY_LINE = 8192  # smtplib's limit too


@dataclass(frozen=True)
class Reply:
    """One server reply. ``after_data`` is true for the reply to a recipient after the
    message was sent (the one that says whether it was stored for that recipient)."""

    code: int
    text: str
    after_data: bool = False

    @property
    def outcome(self) -> str:
        """``acked`` (2xx), ``perm`` (5xx) or ``temp`` (anything else: retry later)."""
        if 200 <= self.code < 300:
            return "acked"
        if 500 <= self.code < 600:
            return "perm"
        return "temp"


class LmtpError(OSError):
    """The LMTP conversation failed (connection lost, timeout, or a server that will not talk)."""


class TransactionInterrupted(LmtpError):
    """The connection failed in the middle of a transaction.

    ``replies`` holds the replies read before the failure. ``after_data`` is
    true once the server said 354 and the message began to go out: the
    message may then be stored for a recipient that has no reply here, and a
    retry may deliver it twice (the server answers a retry of stored bytes
    with "already delivered").
    """

    def __init__(self, message: str, replies: dict[str, Reply], after_data: bool):
        super().__init__(message)
        self.replies = replies
        self.after_data = after_data


class SessionRefused(LmtpError):
    """The server's greeting or its LHLO reply was not 2xx; ``reply`` is that reply."""

    def __init__(self, reply: Reply):
        super().__init__(f"the server refused the session: {reply.code} {reply.text}")
        self.reply = reply


def dot_stuff(message: bytes) -> bytes:
    """``message`` with one more period at the start of every line that starts with one.

    RFC 5321 4.5.2: the client doubles a leading period so that no line of
    the message reads as the end of the data; the server removes it. Lines
    end with CRLF; a period after a bare LF does not start a line.
    """
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def data_block(message: bytes) -> bytes:
    """What follows the 354 reply: the dot-stuffed message, a CRLF if it does not end
    with one, and the ``.`` line (RFC 5321 4.1.1.4)."""
    block = dot_stuff(message)
    if not block.endswith(b"\r\n"):
        block += b"\r\n"
    return block + _TERMINATOR


def _decode(text: bytes) -> str:
    return text.decode("utf-8", errors="replace")


class LmtpClient(smtplib.LMTP):
    """A blocking LMTP connection (smtplib's ``LMTP``) that delivers with :meth:`deliver`.

    Connects in the constructor; raises ``OSError`` when it cannot. Used as a
    context manager, it says QUIT (ignoring a connection already lost) and
    closes.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = smtplib.LMTP_PORT, *, timeout: float = 10.0,
                 local_hostname: str = "localhost"):
        super().__init__(host, port, local_hostname=local_hostname, timeout=timeout)

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError):  # smtplib's errors are OSErrors
            self.quit()
        self.close()

    def deliver(self, sender: str, recipients: list[str], message: bytes) -> dict[str, Reply]:
        """One transaction: LHLO if not said yet, MAIL, RCPT for each recipient, DATA.

        Returns:
            ``{recipient: Reply}`` for every recipient: the LHLO, MAIL or DATA
            refusal, the RCPT refusal, or the reply after the message. With
            no accepted recipient the transaction is reset (RSET) so the
            session can go on.

        Raises:
            TransactionInterrupted: the connection failed or timed out; it
                carries the replies read so far and whether the message began
                to go out.
        """
        replies: dict[str, Reply] = {}
        after_data = False
        try:
            if not self.does_esmtp:  # smtplib sets it when LHLO was answered 250
                code, text = self.ehlo()
                if not 200 <= code < 300:
                    return {r: Reply(code, _decode(text)) for r in recipients}
            code, text = self.mail(sender)
            if not 200 <= code < 300:
                return {r: Reply(code, _decode(text)) for r in recipients}
            accepted = []
            for r in recipients:
                code, text = self.rcpt(r)
                if 200 <= code < 300:
                    accepted.append(r)  # its reply comes after the message
                else:
                    replies[r] = Reply(code, _decode(text))
            if not accepted:
                self._reset()
                return replies
            self.putcmd("data")
            code, text = self.getreply()
            if code != 354:
                replies.update({r: Reply(code, _decode(text)) for r in accepted})
                self._reset()
                return replies
            after_data = True
            self.send(data_block(message))
            for r in accepted:
                code, text = self.getreply()
                replies[r] = Reply(code, _decode(text), after_data=True)
            return replies
        except OSError as exc:  # smtplib's errors, socket errors and timeouts
            raise TransactionInterrupted(f"{type(exc).__name__}: {exc}", replies, after_data) from exc

    def _reset(self) -> None:
        """RSET after a transaction that stopped before the message: the server keeps
        the transaction open until then (RFC 5321 4.1.1.5). Every reply is already
        read; a connection lost now shows on the next transaction."""
        with contextlib.suppress(OSError):
            self.rset()


class PipeliningLmtpClient:
    """An asyncio LMTP connection that sends each transaction's commands in one write.

    MAIL, every RCPT and DATA go out together and their replies are read
    in order (RFC 2920; the server refuses DATA when no recipient was
    accepted). Create it with :meth:`connect`.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, *, local_hostname: str = "localhost") -> "PipeliningLmtpClient":
        """Open the connection, read the greeting, say LHLO.

        Raises:
            SessionRefused: the greeting or the LHLO reply was not 2xx.
            OSError: the connection failed.
        """
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        try:
            for command in (None, f"LHLO {local_hostname}\r\n".encode()):
                if command is not None:
                    writer.write(command)
                reply = await client._reply()
                if not 200 <= reply.code < 300:
                    raise SessionRefused(reply)
        except BaseException:
            await client.close()
            raise
        return client

    async def _reply(self, after_data: bool = False) -> Reply:
        lines = []
        while True:
            line = await self._reader.readline()
            if not line:
                raise LmtpError("the server closed the connection")
            if len(line) > _MAX_REPLY_LINE:
                raise LmtpError("reply line too long")
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                try:
                    code = int(line[:3])
                except ValueError:
                    raise LmtpError(f"not a reply: {line[:80]!r}") from None
                return Reply(code, _decode(b"\n".join(lines)), after_data)

    async def deliver(self, sender: str, recipients: list[str], message: bytes) -> dict[str, Reply]:
        """One pipelined transaction; the same replies as :meth:`LmtpClient.deliver`.

        Raises:
            TransactionInterrupted: the connection failed (see :class:`TransactionInterrupted`).
        """
        replies: dict[str, Reply] = {}
        after_data = False
        try:
            envelope = [f"MAIL FROM:<{sender}>\r\n".encode()]
            envelope += [f"RCPT TO:<{r}>\r\n".encode() for r in recipients]
            self._writer.write(b"".join(envelope) + b"DATA\r\n")
            mail = await self._reply()
            rcpt = [await self._reply() for _ in recipients]
            data = await self._reply()
            accepted = []
            if 200 <= mail.code < 300:
                for r, reply in zip(recipients, rcpt):
                    if 200 <= reply.code < 300:
                        accepted.append(r)  # its reply comes after the message
                    else:
                        replies[r] = reply
            else:
                replies = {r: mail for r in recipients}
            if data.code != 354:
                replies.update({r: data for r in accepted})
                await self._reset()
                return replies
            if not accepted:
                # 354 to a transaction this client holds no recipient of (RFC 2033 4.2 says
                # 503): the session is out of step, and only closing it sends nothing.
                self._writer.close()
                raise LmtpError(f"the server said {data.code} to DATA with no recipient accepted")
            after_data = True
            self._writer.write(data_block(message))
            for r in accepted:
                replies[r] = await self._reply(after_data=True)
            return replies
        except OSError as exc:
            raise TransactionInterrupted(f"{type(exc).__name__}: {exc}", replies, after_data) from exc

    async def _reset(self) -> None:
        """RSET after a transaction that stopped before the message (see :meth:`LmtpClient._reset`)."""
        with contextlib.suppress(OSError):
            self._writer.write(b"RSET\r\n")
            await self._reply()

    async def close(self) -> None:
        """Say QUIT (if the connection still works) and close."""
        with contextlib.suppress(OSError):
            self._writer.write(b"QUIT\r\n")
            await self._writer.drain()
            await self._reply()
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
