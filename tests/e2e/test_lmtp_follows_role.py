"""The LMTP front follows the node's role (CTL-11), with real `walctl serve`/`follow` processes.

Neither node is given an LMTP address, so both use the master's default, 127.0.0.1:2424: the
master listens there, the replica has no front. On a soft failover the old master closes its
front and the promoted replica opens one at that address, retrying while the old master still
holds it; failing back does the reverse; on a hard failover (`walctl promote`) with the address
held by another process, the new master says so once (a status event and a log line) and takes
the address as soon as it is free. Mail delivered to 127.0.0.1:2424 lands on whichever node is
master.

The default port is the point, so the scenario runs in a network namespace of its own (`unshare
-rn`: a private loopback where 127.0.0.1:2424 is free and no other test can hold it), in a
Python process started there; the test skips where user and network namespaces are not
available.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from blake3 import blake3

from engine.cluster.control import ControlClient, ControlError
from tests.support.cluster import ROOT, WALCTL, walctl
from tests.support.helpers import assert_no_traceback
from tools.lmtp_client import LmtpClient

DEFAULT = ("127.0.0.1", 2424)


def _namespace_command() -> list[str] | None:
    """``unshare`` for a private network namespace, or None where the system does not allow one."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    cmd = ["unshare", "-rn"]
    probe = subprocess.run(cmd + ["true"], capture_output=True)
    return cmd if probe.returncode == 0 else None


def test_the_lmtp_front_follows_the_role_at_the_masters_default_address():
    """CTL-11 (through CTL-4 soft failovers and a CTL-5 promotion)."""
    cmd = _namespace_command()
    if cmd is None:
        pytest.skip("needs `unshare -rn` (user and network namespaces) and `ip` (iproute2)")
    base = tempfile.mkdtemp(prefix="mwns-")  # short: a node's control socket path must fit AF_UNIX
    try:
        inner = (f"ip link set lo up && exec {sys.executable} -c 'import pathlib, sys; from "
                 f"tests.e2e.test_lmtp_follows_role import _scenario; _scenario(pathlib.Path(sys.argv[1])); "
                 f"print(\"scenario passed\")' {base}")
        p = subprocess.run(cmd + ["sh", "-c", inner], cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert p.returncode == 0 and "scenario passed" in p.stdout, p.stdout[-3000:] + p.stderr[-6000:]


class Node:
    def __init__(self, base, name: str, listen: int):
        self.name, self.path, self.listen = name, str(base / name), listen
        self.out = open(str(base / f"{name}.out"), "ab")
        self.proc: subprocess.Popen | None = None

    def start(self, mode: str, *args) -> None:
        self.proc = subprocess.Popen(WALCTL + [mode, self.path, "--listen", f"127.0.0.1:{self.listen}", *args],
                                     cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.status_or_none():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    def control(self, op: str, **args):
        with ControlClient.unix(os.path.join(self.path, "control.sock"), timeout=30) as c:
            return c.call(op, **args)

    def status_or_none(self) -> dict | None:
        try:
            return self.control("status")
        except (OSError, ControlError):
            return None

    def events(self) -> list[str]:
        return [e["kind"] for e in (self.status_or_none() or {}).get("events", [])]

    def output(self) -> str:
        self.out.flush()
        with open(self.out.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)
        self.proc = None
        assert_no_traceback(self.output(), what=f"node {self.name}")


def deliver(n: int, deadline_s: float = 30) -> str:
    """Deliver message ``n`` to the default address until it is acknowledged (a 4xx, or nothing
    listening, is retried: the address is changing hands); returns the message's GUID."""
    body = f"Message-ID: <{n}@role.test>\r\nSubject: message {n}\r\n\r\nbody\r\n".encode()
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        try:
            with LmtpClient(*DEFAULT, timeout=10) as c:
                reply = c.deliver("s@example.org", ["bob@example.org"], body)["bob@example.org"]
            if reply.outcome == "acked":
                return blake3(body).hexdigest()
            last = reply
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"message {n} was not acknowledged at 127.0.0.1:2424: last {last!r}")


def guids(node: Node) -> list[str]:
    """The GUIDs in user/bob/INBOX of the running ``node``, in UID order."""
    return [m["guid"] for m in node.control("messages", mailbox="user/bob/INBOX")]


def wait_for(what, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return got


def _scenario(tmp_path) -> None:
    a, b = Node(tmp_path, "a", 7001), Node(tmp_path, "b", 7002)
    walctl("init", a.path, "--name", "a")
    peers = ["--peer", "127.0.0.1:7001", "--peer", "127.0.0.1:7002",
             "--secret-file", os.path.join(a.path, "replication.secret")]
    try:
        a.start("serve", *peers)
        b.start("follow", *peers, "--name", "b")
        assert b.status_or_none()["lmtp"] is None and a.status_or_none()["lmtp"] == "127.0.0.1:2424"
        wait_for(lambda: any(r["connected"] for r in a.status_or_none()["replicas"]))
        first = deliver(1)

        # Soft failover: a gives the address up, b takes it (retrying while a still held it).
        walctl("failover", a.path, "--to", "b")
        second = deliver(2)
        assert wait_for(lambda: second in guids(b)) and b.status_or_none()["lmtp"] == "127.0.0.1:2424"
        assert a.status_or_none()["lmtp"] is None
        assert "lmtp-closed" in a.events() and "lmtp" in b.events() and "lmtp-unavailable" not in b.events()

        # And back: a takes it again, at the address it had.
        walctl("failover", b.path, "--to", "a")
        third = deliver(3)
        assert wait_for(lambda: third in guids(a)) and a.status_or_none()["lmtp"] == "127.0.0.1:2424"
        assert b.status_or_none()["lmtp"] is None

        # Hard failover while another process holds the address: said once, taken once free.
        wait_for(lambda: third in guids(b))
        a.stop(signal.SIGKILL)
        import socket

        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(DEFAULT)
        holder.listen()
        try:
            walctl("promote", b.path)
            wait_for(lambda: "lmtp-unavailable" in b.events())
            text = b.output()
            assert text.count("lmtp-unavailable: cannot listen for LMTP on 127.0.0.1:2424: address already in use") == 1
            assert b.status_or_none()["lmtp"] is None
        finally:
            holder.close()
        fourth = deliver(4)
        assert wait_for(lambda: b.status_or_none()["lmtp"] == "127.0.0.1:2424")
        assert guids(b) == [first, second, third, fourth]
        assert b.events().count("lmtp-unavailable") == 1
    finally:
        for node in (a, b):
            node.stop()
