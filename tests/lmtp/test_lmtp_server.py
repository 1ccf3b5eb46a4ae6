"""The LMTP front against a real client: smtplib.LMTP and raw sockets on 127.0.0.1.

A node is served in-process (NodeRunner in a thread); the assertions are
about replies and what the store holds. ``walctl serve`` as a real process is
in ``tests/e2e/test_lmtp_serve.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket

import anyio
import pytest

from engine.store.events import body_guid
from engine.lmtp.session import MessageReceived, Recipient
from engine.store.errors import ReadOnlyNodeError, StoreUnavailableError
from engine.node import Node, Receipt
from engine.lmtp import LmtpConfig, LmtpServer, reply_for
from tests.support.lmtp import ROOT, client, lmtp_send, make_message, served_node, stored


def raw_session(port: int, payload: bytes, *, expect_close: bool = False, timeout: float = 10) -> list[str]:
    """Send raw bytes after the greeting; return every reply line until the server closes or goes quiet."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(payload)
        if not expect_close:
            s.sendall(b"QUIT\r\n")
        lines = []
        while True:
            line = f.readline()
            if not line:
                break
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
        return lines
    finally:
        s.close()


def final_codes(lines: list[str]) -> list[int]:
    return [int(line[:3]) for line in lines if len(line) > 3 and line[3] == " "]


def test_single_delivery_is_stored_with_the_guid_of_the_bytes_sent(tmp_path):
    """LMTP-4, LMTP-13"""
    node = str(tmp_path / "n")
    msg = make_message("single")
    with served_node(node) as runner:
        c = client(runner)
        assert lmtp_send(c, "a@x", ["bob@example.org"], msg)["bob@example.org"][0] == 250
        c.quit()
        assert any(line.startswith("delivered rcpt=<bob@example.org> mailbox=user/bob/INBOX uid=1 guid="
                                   + body_guid(msg).hex()) and " lsn=" in line and "latency_ms=" in line
                   for line in runner.log_lines)
    assert stored(node, "user/bob/INBOX") == {body_guid(msg).hex(): 1}


def test_multi_recipient_message_gets_one_reply_each_and_one_fsync(tmp_path):
    """LMTP-7, LMTP-8"""
    node = str(tmp_path / "n")
    with served_node(node) as runner:
        c = client(runner)
        lmtp_send(c, "a@x", ["warmup@x"], make_message("warm"))  # the first delivery creates a mailbox
        log = runner.anode.node.log
        before = log.fsync_count
        rcpts = ["ann@x", "bob@x", "carl@x", "bad/name@x", "dan@x"]
        replies = lmtp_send(c, "a@x", rcpts, make_message("multi"))
        assert log.fsync_count - before == 1  # all recipients' records share one fdatasync
        c.quit()
    assert [replies[r][0] for r in rcpts] == [250, 250, 250, 550, 250]
    assert replies["bad/name@x"][1].startswith("5.1.3")
    for r in ("ann", "bob", "carl", "dan"):
        assert list(stored(node, f"user/{r}/INBOX").values()) == [1]


def test_recipient_reply_order_follows_rcpt_order_with_mixed_outcomes(tmp_path):
    """LMTP-7"""
    node = str(tmp_path / "n")
    Node.init(node).close()
    with Node.open(node) as n:
        n.create_mailbox("user/ann/INBOX")
        n.create_mailbox("user/bob/INBOX")
    with served_node(node, unknown_recipients="reject") as runner:
        c = client(runner)
        replies = lmtp_send(c, "a@x", ["bob@x", "nobody@x", "ann@x"], make_message("order"))
        c.quit()
    assert replies["nobody@x"][0] == 550 and replies["nobody@x"][1].startswith("5.1.1")
    assert replies["bob@x"][0] == replies["ann@x"][0] == 250


def test_unknown_recipient_policy_create_makes_the_inbox(tmp_path):
    """LMTP-10"""
    node = str(tmp_path / "n")
    with served_node(node, unknown_recipients="create") as runner:
        c = client(runner)
        assert lmtp_send(c, "a@x", ["New.User@x"], make_message("create"))["New.User@x"][0] == 250
        c.quit()
    with Node.open(node) as n:
        assert [mb.name for mb in n.list_mailboxes()] == ["user/new.user/INBOX"]


def test_unknown_recipient_policy_reject_answers_550_at_rcpt(tmp_path):
    """LMTP-10"""
    node = str(tmp_path / "n")
    Node.init(node).close()
    with Node.open(node) as n:
        n.create_mailbox("user/bob/INBOX")
    with served_node(node, unknown_recipients="reject") as runner:
        c = client(runner)
        c.mail("a@x")
        code, text = c.rcpt("stranger@x")
        assert (code, text[:5]) == (550, b"5.1.1")
        assert c.rcpt("bob@x")[0] == 250
        c.quit()
    with Node.open(node) as n:
        assert [mb.name for mb in n.list_mailboxes()] == ["user/bob/INBOX"]


def test_plus_detail_goes_to_the_detail_mailbox_only_when_it_exists(tmp_path):
    """LMTP-9"""
    node = str(tmp_path / "n")
    Node.init(node).close()
    with Node.open(node) as n:
        n.create_mailbox("user/bob/INBOX")
        n.create_mailbox("user/bob/lists")
    m1, m2 = make_message("detail-1"), make_message("detail-2")
    with served_node(node) as runner:
        c = client(runner)
        assert lmtp_send(c, "a@x", ["bob+lists@x"], m1)["bob+lists@x"][0] == 250
        assert lmtp_send(c, "a@x", ["bob+nothing@x"], m2)["bob+nothing@x"][0] == 250
        c.quit()
    assert set(stored(node, "user/bob/lists")) == {body_guid(m1).hex()}
    assert set(stored(node, "user/bob/INBOX")) == {body_guid(m2).hex()}


def test_address_vectors_over_a_real_socket_and_what_the_store_holds(tmp_path):
    """LMTP-17, LMTP-9: every path of specs/vectors/addresses.json, sent as written by smtplib.LMTP,
    gets its reply at MAIL and RCPT; the accepted recipients' mail lands in their mailboxes and
    no other mailbox is created."""
    with open(os.path.join(ROOT, "specs", "vectors", "addresses.json"), encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    node = str(tmp_path / "n")
    expected: dict[str, set[str]] = {}
    with served_node(node) as runner:
        for i, case in enumerate(cases):
            c = client(runner)
            c.command_encoding = "utf-8"  # the non-ASCII vector must reach the server as it is written
            code, text = c.docmd("MAIL", "FROM:" + case["path"])
            assert code == case["mail"], (case, text)
            if code == 501:
                assert text.startswith(b"5.1.7 ")
            c.rset()
            c.command_encoding = "utf-8"  # rset() sets it back to ASCII
            assert c.docmd("MAIL", "FROM:<sender@x.org>")[0] == 250
            code, text = c.docmd("RCPT", "TO:" + case["path"])
            assert code == case["rcpt"], (case, text)
            if code != 250:
                assert text.startswith(b"5.1.3 "), (case, text)
            else:
                msg = make_message(f"address-{i}")
                assert c.data(msg)[0] == 250
                expected.setdefault(case["mailbox"], set()).add(body_guid(msg).hex())
            c.quit()
    with Node.open(node) as n:
        assert sorted(mb.name for mb in n.list_mailboxes()) == sorted(expected)
    for mailbox, guids in expected.items():
        assert set(stored(node, mailbox)) == guids


def test_retry_of_the_same_message_is_250_duplicate_and_stored_once(tmp_path):
    """LMTP-12, LMTP-13"""
    node = str(tmp_path / "n")
    msg = make_message("retry")
    with served_node(node) as runner:
        c = client(runner)
        first = lmtp_send(c, "a@x", ["bob@x"], msg)["bob@x"]
        c.quit()
        c = client(runner)  # the MTA retries on a new connection
        again = lmtp_send(c, "a@x", ["bob@x"], msg)["bob@x"]
        c.quit()
        assert [line.split()[0] for line in runner.log_lines if "rcpt=<bob@x>" in line] == ["delivered", "duplicate"]
    assert first[0] == again[0] == 250
    assert "already delivered as UID 1" in again[1]
    assert stored(node, "user/bob/INBOX") == {body_guid(msg).hex(): 1}


def test_size_limit_at_mail_and_after_data(tmp_path):
    """LMTP-6"""
    node = str(tmp_path / "n")
    with served_node(node, max_message_bytes=10_000) as runner:
        c = client(runner)
        assert c.esmtp_features["size"] == "10000"
        code, text = c.mail("a@x", ["SIZE=20000"])
        assert (code, text[:5]) == (552, b"5.3.4")
        big = make_message("big", 30_000)
        replies = lmtp_send(c, "a@x", ["ann@x", "bob@x"], big)
        assert [replies[r][0] for r in ("ann@x", "bob@x")] == [552, 552]
        small = make_message("small", 5_000)
        assert lmtp_send(c, "a@x", ["ann@x"], small)["ann@x"][0] == 250  # the session goes on
        c.quit()
    assert set(stored(node, "user/ann/INBOX")) == {body_guid(small).hex()}


def test_node_size_limit_applies_when_serve_sets_none(tmp_path):
    node = str(tmp_path / "n")
    with served_node(node, init={"max_message_bytes": 8000}) as runner:
        c = client(runner)
        assert c.esmtp_features["size"] == "8000"
        assert lmtp_send(c, "a@x", ["ann@x"], make_message("x", 9000))["ann@x"][0] == 552
        c.quit()


def test_bare_lf_in_the_message_is_refused_and_nothing_stored(tmp_path):
    """LMTP-5"""
    node = str(tmp_path / "n")
    with served_node(node) as runner:
        c = client(runner)
        replies = lmtp_send(c, "a@x", ["ann@x"], b"Subject: x\n\nbare\nlines\r\n")
        assert replies["ann@x"][0] == 554 and "bare LF" in replies["ann@x"][1]
        c.quit()
        with pytest.raises(Exception):
            runner.anode.node.list_messages("user/ann/INBOX")


def test_raw_junk_bare_lf_long_lines_and_bad_sequence_never_crash_the_server(tmp_path):
    """LMTP-2, LMTP-3"""
    node = str(tmp_path / "n")
    with served_node(node) as runner:
        port = runner.lmtp_address[1]
        # binary junk until the session gives up
        lines = raw_session(port, os.urandom(3000).replace(b"\n", b"\r\n") + b"\r\n" * 30, expect_close=True)
        assert lines[-1].startswith("421 4.7.0")
        # bare LF command, over-long line, commands out of order
        lines = raw_session(port, b"LHLO x\nLHLO x\r\n" + b"NOOP " + b"A" * 5000 + b"\r\n"
                            + b"RCPT TO:<a@x>\r\nDATA\r\nMAIL FROM:<a@x>\r\nMAIL FROM:<a@x>\r\n")
        codes = final_codes(lines)
        assert codes == [500, 250, 500, 503, 503, 250, 503, 221]
        assert "bare LF" in lines[0] and "too long" in next(x for x in lines if x.startswith("500 5.5.2 command"))
        # half a command and a dropped connection
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.recv(100)
        s.sendall(b"MAIL FR")
        s.close()
        # HTTP at the LMTP port
        lines = raw_session(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert final_codes(lines)[:2] == [500, 500]
        # the server still delivers
        c = client(runner)
        assert lmtp_send(c, "a@x", ["ann@x"], make_message("after-junk"))["ann@x"][0] == 250
        c.quit()


def test_pipelined_transactions_on_a_raw_socket(tmp_path):
    """LMTP-7"""
    node = str(tmp_path / "n")
    m1, m2 = make_message("pipe-1", 600), make_message("pipe-2", 600)
    with served_node(node) as runner:
        payload = (b"LHLO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<ann@x>\r\nRCPT TO:<bob@x>\r\nDATA\r\n" + m1 + b".\r\n"
                   + b"MAIL FROM:<a@x>\r\nRCPT TO:<ann@x>\r\nDATA\r\n" + m2 + b".\r\n")
        lines = raw_session(runner.lmtp_address[1], payload)
    assert final_codes(lines) == [250, 250, 250, 250, 354, 250, 250, 250, 250, 354, 250, 221]
    assert set(stored(node, "user/ann/INBOX")) == {body_guid(m1).hex(), body_guid(m2).hex()}


def test_vrfy_noop_rset(tmp_path):
    with served_node(str(tmp_path / "n")) as runner:
        c = client(runner)
        assert c.verify("bob@x")[0] == 252
        assert c.noop()[0] == 250
        c.mail("a@x")
        c.rcpt("bob@x")
        assert c.rset()[0] == 250
        assert c.docmd("DATA")[0] == 503
        c.quit()


def test_replica_answers_4xx(tmp_path):
    """LMTP-11"""
    node = str(tmp_path / "r")
    with served_node(node, init={"role": "replica"}) as runner:
        c = client(runner)
        c.mail("a@x")
        code, text = c.rcpt("bob@x")
        assert code == 451 and text.startswith(b"4.3.2") and b"replica" in text
        c.quit()


def test_writes_paused_after_rcpt_gives_451_after_data(tmp_path):
    """LMTP-11"""
    node = str(tmp_path / "n")
    with served_node(node) as runner:
        c = client(runner)
        c.mail("a@x")
        assert c.rcpt("bob@x")[0] == 250
        runner.anode.node.pause_writes("draining for failover")
        c.putcmd("data")
        assert c.getreply()[0] == 354
        c.send(make_message("paused") + b".\r\n")
        code, text = c.getreply()
        assert code == 451 and text.startswith(b"4.3.2")
        c.quit()
        assert any(line.startswith("deferred rcpt=<bob@x>") for line in runner.log_lines)


# -- temporary failures from the store (fault injection through the backend) ------------


class FailingBackend:
    """A delivery backend that fails the way a broken node does."""

    role = "master"

    def __init__(self, exc: BaseException):
        self.exc = exc

    def mailbox_exists(self, name: str) -> bool:
        return True

    async def deliver_many(self, targets, body, *, create=False):
        raise self.exc


def _disk_full() -> StoreUnavailableError:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise StoreUnavailableError("log failed while syncing") from inner
    except StoreUnavailableError as exc:
        return exc


@pytest.mark.parametrize("exc,code,status", [
    (StoreUnavailableError("log failed: EIO"), 451, "4.3.0"),
    (_disk_full(), 452, "4.3.1"),
    (ReadOnlyNodeError("replica"), 451, "4.3.2"),
    (RuntimeError("sqlite exploded"), 451, "4.3.0"),
])
def test_store_failures_defer_every_recipient(exc, code, status):
    """LMTP-11"""
    async def main():
        server = LmtpServer(FailingBackend(exc), LmtpConfig(port=0))
        ev = MessageReceived("a@x", (Recipient("ann@x"), Recipient("bob@x")), b"x\r\n")
        replies, _results, mailboxes = await server.deliver(ev)
        return replies, mailboxes

    logging.getLogger("mailwal.lmtp").disabled = True
    try:
        replies, mailboxes = anyio.run(main)
    finally:
        logging.getLogger("mailwal.lmtp").disabled = False
    assert [(r.code, r.status) for r in replies] == [(code, status)] * 2
    assert mailboxes == ["user/ann/INBOX", "user/bob/INBOX"]


def test_reply_for_receipts():
    r = Receipt("user/a/INBOX", 7, 3, "ab" * 32, 10)
    assert (reply_for(r, "a@x").code, reply_for(r, "a@x").status) == (250, "2.1.5")
    d = Receipt("user/a/INBOX", 7, 3, "ab" * 32, 10, duplicate=True)
    assert (reply_for(d, "a@x").code, reply_for(d, "a@x").status) == (250, "2.0.0")


@pytest.mark.parametrize("faults,code,status", [
    ({"fail_fdatasync_at": 1}, 451, "4.3.0"),  # EIO from fdatasync: the log fails
    ({"fail_write_at": 1, "short_write": 100}, 452, "4.3.1"),  # ENOSPC mid-write: disk full
])
def test_log_failure_under_lmtp_defers_every_recipient_and_stays_failed(tmp_path, faults, code, status):
    """LMTP-11"""
    from tests.support.helpers import FaultyFileOps

    node = str(tmp_path / "n")
    with served_node(node) as runner:
        c = client(runner)
        assert lmtp_send(c, "a@x", ["ann@x", "bob@x"], make_message("before"))["ann@x"][0] == 250
        runner.anode.node.log._ops = FaultyFileOps(**faults)  # the next write or fdatasync fails
        replies = lmtp_send(c, "a@x", ["ann@x", "bob@x"], make_message("during"))
        assert [(replies[r][0], replies[r][1][:5]) for r in ("ann@x", "bob@x")] == [(code, status)] * 2
        later = lmtp_send(c, "a@x", ["ann@x"], make_message("later"))["ann@x"]
        assert later[0] in (451, 452)  # sticky: nothing is acknowledged until the node is reopened
        c.quit()
        assert sum(line.startswith("deferred rcpt=") for line in runner.log_lines) == 3
    with Node.open(node) as n:  # the acknowledged delivery is there
        assert body_guid(make_message("before")).hex() in {m.guid for m in n.list_messages("user/ann/INBOX")}


def test_runner_services_wrap_the_backend_and_a_failing_service_stops_everything(tmp_path):
    """LMTP-15"""
    from engine.runner import NodeRunner

    node = str(tmp_path / "n")
    Node.init(node).close()
    seen = {}

    async def wrapping_service(runner, task_status=anyio.TASK_STATUS_IGNORED):
        seen["backend"] = runner.lmtp.backend  # the service runs before LMTP listens
        seen["listening"] = runner.lmtp_address
        task_status.started()
        await anyio.sleep_forever()

    r = NodeRunner(node, LmtpConfig(port=0), handle_signals=False, announce=lambda m: None)
    r.add_service("wrap", wrapping_service)

    async def main():
        async with anyio.create_task_group() as tg:
            addr = await tg.start(r.run)
            c = await anyio.to_thread.run_sync(lambda: client(addr[1]))
            rep = await anyio.to_thread.run_sync(lambda: lmtp_send(c, "a@x", ["ann@x"], make_message("svc")))
            c.close()
            r.request_stop()
            return rep

    rep = anyio.run(main)
    assert rep["ann@x"][0] == 250 and seen["listening"] is None and seen["backend"] is r.anode

    async def broken(runner, task_status=anyio.TASK_STATUS_IGNORED):
        raise OSError("cannot bind the control socket")

    r2 = NodeRunner(node, LmtpConfig(port=0), handle_signals=False, announce=lambda m: None)
    r2.add_service("broken", broken)
    with pytest.raises(BaseException) as info:
        anyio.run(r2.run)
    assert "cannot bind" in repr(info.value) or any("cannot bind" in repr(e) for e in getattr(info.value, "exceptions", []))
    assert r2.lmtp_address is None  # never listened: no MTA got an answer from a half-started node
    with Node.open(node) as n:  # and the node was closed cleanly
        assert [m.name for m in n.list_mailboxes()] == ["user/ann/INBOX"]
