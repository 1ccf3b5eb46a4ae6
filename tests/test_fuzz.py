"""Fuzzing the record decoder and the LMTP front with malformed input.

Only typed errors, never a crash of the server, never a corrupt record
accepted, and the server keeps serving other clients. The replication frame
decoder has its own fuzz tests (tests/test_protocol_fuzz.py).

The default run is short; `pytest --run-slow -k fuzz` runs the long mode
(FUZZ_EXAMPLES examples per test, default 2000).
"""

import os
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tools.ports import free_port
from wal import Log, LogReader, WalError, verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = int(os.environ.get("FUZZ_EXAMPLES", "2000"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A valid 3-segment log and its records."""
    path = str(tmp_path_factory.mktemp("fz") / "p.wal")
    log = Log.create(path, segment_max_bytes=600)
    for i in range(25):
        log.append(1 + i % 3, os.urandom(i * 7 % 90))
    records = list(log.read(1))
    log.close()
    return path, records


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=200)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=80)),
)


def _mutate(src: str, dst: str, segment_index: int, muts) -> None:
    shutil.copytree(src, dst)
    segs = sorted(n for n in os.listdir(dst) if n.endswith(".seg"))
    target = os.path.join(dst, segs[segment_index % len(segs)])
    data = bytearray(open(target, "rb").read())
    for kind, pos, arg in muts:
        pos = pos % (len(data) + 1)
        if kind == "flip" and pos < len(data):
            data[pos] ^= arg
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = arg
        elif kind == "overwrite":
            data[pos:pos + len(arg)] = arg
    with open(target, "wb") as f:
        f.write(bytes(data))


def _check_record_decoder(pristine, segment_index, muts):
    src, records = pristine
    by_lsn = {r.lsn: r for r in records}
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "m.wal")
        _mutate(src, dst, segment_index, muts)
        rep = verify(dst)  # never raises for damage: it reports
        assert rep.ok or rep.error["reason"]
        try:
            got = list(LogReader(dst).records(1))
        except WalError:
            got = None
        if got is not None:  # whatever a reader returns is the true history
            assert [r.hash for r in got] == [by_lsn[r.lsn].hash for r in got]
            assert [r.lsn for r in got] == list(range(1, len(got) + 1))
        try:
            log = Log.open(dst)
        except WalError:
            return
        try:
            for r in log.read(1):  # damage in a sealed segment may surface here: loud and typed
                assert r.hash == by_lsn[r.lsn].hash and r.payload == by_lsn[r.lsn].payload
        except WalError:
            pass
        finally:
            log.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2), st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_record_decoder_accepts_no_corrupt_record(pristine, segment_index, muts):
    _check_record_decoder(pristine, segment_index, muts)


@pytest.mark.slow
@settings(max_examples=LONG, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2), st.lists(mutation, min_size=1, max_size=8))
def test_fuzz_record_decoder_long(pristine, segment_index, muts):
    _check_record_decoder(pristine, segment_index, muts)


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
