"""Fuzzing the LMTP front of a real ``walctl serve`` with malformed input.

Never a crash of the server, only protocol errors, and it keeps serving other
clients; the log it wrote verifies afterwards.

The default run is short; `pytest --run-slow -k fuzz` runs the long mode
(FUZZ_EXAMPLES examples, default 2000, a quarter of them here).
"""

import os
import smtplib
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import LONG_FUZZ_EXAMPLES as LONG
from tests.support import ROOT
from tools.ports import free_port
from wal import verify


# -- the LMTP front over a real socket ------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    node = str(tmp_path_factory.mktemp("lmtpfz") / "n")
    subprocess.run([sys.executable, "-m", "tools", "init", node], cwd=ROOT, check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tools", "serve", node, "--lmtp", f"127.0.0.1:{port}", "--quiet",
                             "--max-message-bytes", "100000"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield node, port, proc
    proc.terminate()
    proc.wait(timeout=30)


COMMANDS = [b"LHLO x", b"MAIL FROM:<a@b>", b"RCPT TO:<u@example.org>", b"DATA", b"RSET", b"NOOP", b"VRFY u",
            b"MAIL FROM:<a@b> SIZE=999999999", b"RCPT TO:<>", b"RCPT TO:<a b@c>", b"EHLO x", b"HELO x", b"BDAT 10"]
chunk = st.one_of(
    st.sampled_from(COMMANDS).map(lambda c: c + b"\r\n"),
    st.binary(max_size=300),
    st.sampled_from([b"\n", b"\r", b"\r\n.\r\n", b".\r\n", b"\x00", b"x" * 5000 + b"\r\n"]),
)


def _lmtp_still_serves(port: int, n: int) -> None:
    c = smtplib.LMTP("127.0.0.1", port, timeout=10)
    try:
        c.sendmail("a@b", ["probe@example.org"], b"Subject: probe %d\r\n\r\nstill here\r\n" % n)
    finally:
        c.close()


def _send_junk(port: int, chunks) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(2)
        try:
            s.recv(4096)  # greeting
            for ch in chunks:
                s.sendall(ch)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except (OSError, socket.timeout):
            pass  # the server may close on junk: that is allowed


def _check_lmtp(server, chunks, counter=[0]):
    node, port, proc = server
    _send_junk(port, chunks)
    assert proc.poll() is None, "the LMTP server died"
    counter[0] += 1
    _lmtp_still_serves(port, counter[0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(chunk, max_size=12))
def test_fuzz_lmtp_front_keeps_serving(server, chunks):
    _check_lmtp(server, chunks)


@pytest.mark.slow
@settings(max_examples=LONG // 4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(chunk, max_size=40))
def test_fuzz_lmtp_front_long(server, chunks):
    _check_lmtp(server, chunks)


def test_after_fuzzing_the_log_verifies(server):
    node, port, proc = server
    _send_junk(port, [b"LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@example.org>\r\nDATA\r\nhalf a message"])
    _lmtp_still_serves(port, 10**6)
    rep = verify(os.path.join(node, "log.wal"))
    assert rep.ok and rep.records >= 1
