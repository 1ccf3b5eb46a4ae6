"""tools/lmtp_client.py: dot-stuffing by RFC 5321 4.5.2, one reply per recipient (RFC 2033 4.2),
and what a broken connection tells the caller; against the real LMTP front on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.store.events import body_guid
from tests.support.lmtp import served_node
from tools.lmtp_client import (LmtpClient, PipeliningLmtpClient, Reply, TransactionInterrupted, data_block,
                               dot_stuff)


def unstuff(block: bytes) -> bytes:
    """The receiver's side of RFC 5321 4.5.2, line by line: the data ends at a line of
    one period; a line starting with a period loses that period."""
    lines = block.split(b"\r\n")
    out = []
    for line in lines:
        if line == b".":
            return b"".join(x + b"\r\n" for x in out)
        out.append(line[1:] if line.startswith(b".") else line)
    raise AssertionError(f"no end-of-data line in {block!r}")


# RFC 5321 4.5.2: "If it is a period, one additional period is inserted at the beginning of the line."
STUFFING = [
    ("no period", b"a\r\nb\r\n", b"a\r\nb\r\n"),
    ("a line of one period", b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n"),
    ("the first line", b".a\r\n", b"..a\r\n"),
    ("a line of two periods", b"..\r\n", b"...\r\n"),
    ("periods inside a line stay", b"a.b.\r\n", b"a.b.\r\n"),
    ("every line", b".\r\n.\r\n.", b"..\r\n..\r\n.."),
    ("a bare LF starts no line", b"a\n.b\r\n", b"a\n.b\r\n"),
    ("empty", b"", b""),
]


@pytest.mark.parametrize("name,message,stuffed", STUFFING, ids=[s[0] for s in STUFFING])
def test_dot_stuffing_follows_rfc_5321_4_5_2(name, message, stuffed):
    assert dot_stuff(message) == stuffed


def test_data_block_ends_with_crlf_and_the_period_line():
    assert data_block(b"x\r\n") == b"x\r\n.\r\n"
    assert data_block(b"x") == b"x\r\n.\r\n"  # RFC 5321 4.1.1.4: the data ends with CRLF . CRLF
    assert data_block(b".") == b"..\r\n.\r\n"
    assert data_block(b"") == b"\r\n.\r\n"


@given(st.lists(st.text(alphabet=".a \t", max_size=6).map(str.encode), min_size=1, max_size=8))
def test_the_receiver_rule_gives_back_every_crlf_message(lines):
    message = b"".join(line + b"\r\n" for line in lines)
    block = data_block(message)
    assert unstuff(block) == message
    assert block.split(b"\r\n").index(b".") == len(lines)  # no line of the message ends the data early


RCPT_PERIODS = b"Subject: periods\r\n\r\n.\r\n..\r\n.hidden\r\nend.\r\n"


def test_deliver_gives_every_recipient_its_reply_and_the_server_stores_the_exact_bytes(tmp_path):
    with served_node(str(tmp_path / "n"), unknown_recipients="create") as runner:
        with LmtpClient(port=runner.lmtp_address[1], timeout=20) as c:
            replies = c.deliver("a@x", ["ann@x", "bad/name@x", "bob@x"], RCPT_PERIODS)
            again = c.deliver("a@x", ["ann@x"], b".starts with a period\r\n")  # the session goes on
        node = runner.anode.node
        assert [m.guid for m in node.list_messages("user/ann/INBOX")] == [
            body_guid(RCPT_PERIODS).hex(), body_guid(b".starts with a period\r\n").hex()]
        assert [m.guid for m in node.list_messages("user/bob/INBOX")] == [body_guid(RCPT_PERIODS).hex()]
    assert replies["ann@x"].code == replies["bob@x"].code == 250
    assert replies["ann@x"].after_data and replies["bob@x"].after_data
    assert replies["bad/name@x"] == Reply(550, replies["bad/name@x"].text, after_data=False)
    assert replies["bad/name@x"].outcome == "perm" and replies["ann@x"].outcome == "acked"
    assert again["ann@x"].code == 250


def test_no_accepted_recipient_resets_and_the_session_goes_on(tmp_path):
    with served_node(str(tmp_path / "n")) as runner:
        with LmtpClient(port=runner.lmtp_address[1], timeout=20) as c:
            refused = c.deliver("a@x", ["bad/name@x"], b"x\r\n")
            assert refused["bad/name@x"].code == 550 and not refused["bad/name@x"].after_data
            assert c.deliver("a@x", ["ann@x"], b"y\r\n")["ann@x"].code == 250


def test_pipelining_client_reads_the_same_replies(tmp_path):
    async def run(port: int) -> list[dict[str, Reply]]:
        c = await PipeliningLmtpClient.connect("127.0.0.1", port)
        try:
            return [await c.deliver("a@x", ["ann@x", "bad/name@x", "bob@x"], RCPT_PERIODS),
                    await c.deliver("a@x", ["bad/name@x"], b"never sent\r\n"),
                    await c.deliver("a@x", ["ann@x"], b"second\r\n")]
        finally:
            await c.close()

    with served_node(str(tmp_path / "n")) as runner:
        first, refused, second = asyncio.run(run(runner.lmtp_address[1]))
        node = runner.anode.node
        assert [m.guid for m in node.list_messages("user/ann/INBOX")] == [body_guid(RCPT_PERIODS).hex(),
                                                                          body_guid(b"second\r\n").hex()]
    assert first["ann@x"].code == first["bob@x"].code == 250 and first["ann@x"].after_data
    assert first["bad/name@x"].code == 550 and not first["bad/name@x"].after_data
    assert refused["bad/name@x"].code == 550  # DATA was refused too (503): the RCPT reply says why
    assert second["ann@x"].code == 250


class _DyingServer:
    """A server on 127.0.0.1 that speaks LMTP until a given command, then closes the connection."""

    def __init__(self, die_after: bytes):
        self.die_after = die_after
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn, conn.makefile("rb") as f:
            conn.sendall(b"220 test LMTP\r\n")
            while line := f.readline():
                if line.upper().startswith(self.die_after):
                    return
                if line.upper().startswith(b"DATA"):
                    conn.sendall(b"354 go on\r\n")
                else:
                    conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self.thread.join(10)
        self.sock.close()


@pytest.mark.parametrize("die_after,after_data", [(b"RCPT", False), (b"DATA", False), (b"X", True)])
def test_a_lost_connection_says_whether_the_message_went_out(die_after, after_data):
    # b"X": the server dies while reading the message (its first line starts with X)
    server = _DyingServer(die_after)
    try:
        with LmtpClient(port=server.port, timeout=10) as c:
            with pytest.raises(TransactionInterrupted) as info:
                c.deliver("a@x", ["ann@x", "bob@x"], b"X-Header: 1\r\n\r\nbody\r\n")
    finally:
        server.close()
    assert info.value.after_data is after_data
    assert info.value.replies == {}  # no recipient has a final reply
