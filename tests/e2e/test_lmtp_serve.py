"""``walctl serve`` as a real process: a real full disk, graceful SIGTERM, options and a running node's digest."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import sys
import textwrap
import time

import pytest

from engine.node import Node
from engine.store.events import body_guid
from tests.support.lmtp import ROOT, ServeProcess, client, lmtp_send, make_message, stored


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1) for a tmpfs")
def test_disk_full_gives_452_and_every_250_survives(tmp_path):
    """A real full disk: walctl serve on a small tmpfs in a private mount namespace. (LMTP-11)"""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "full.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, subprocess, json
        sys.path[:0] = [{ROOT!r}]
        from tests.support.lmtp import ServeProcess, client, lmtp_send, make_message
        from engine.node import Node
        node = os.path.join(sys.argv[1], "n")
        Node.init(node, segment_max_bytes=4 << 20).close()
        acked, codes = [], []
        with ServeProcess(node, log_file="/dev/null") as srv:
            c = client(srv.port)
            for i in range(400):
                msg = make_message(f"full-{{i}}", 8192)
                code, text = lmtp_send(c, "a@x", ["bob@x"], msg)["bob@x"]
                codes.append(code)
                if code == 250:
                    acked.append(msg.hex())
                elif len([x for x in codes if x != 250]) >= 3:
                    break
            c.quit()
            srv.terminate()
        print(json.dumps({{"codes": codes, "acked": acked}}))
    """))
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
           f"mount -t tmpfs -o size=1m tmpfs {mnt} && exec {sys.executable} {script} {mnt}"]
    proc = subprocess.run(cmd, capture_output=True, timeout=120)
    if proc.returncode != 0 and b"mount" in proc.stderr and b"permission" in proc.stderr.lower():
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.decode()}")
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    import json

    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    codes = result["codes"]
    failures = [c for c in codes if c != 250]
    assert failures and all(c in (451, 452) for c in failures), codes
    assert 452 in failures
    assert len(result["acked"]) >= 1


# -- graceful SIGTERM ------------------------------------


def test_sigterm_finishes_the_transaction_in_flight_then_exits_0(tmp_path):
    """LMTP-14"""
    node = str(tmp_path / "n")
    Node.init(node).close()
    msg = make_message("in-flight")
    with ServeProcess(node) as srv:
        busy = client(srv.port)
        idle = client(srv.port)
        busy.mail("a@x")
        assert busy.rcpt("bob@x")[0] == 250
        busy.putcmd("data")
        assert busy.getreply()[0] == 354
        busy.send(msg[:1000])  # half the message is on the wire
        srv.proc.send_signal(signal.SIGTERM)
        # the idle connection is told to go away (it gets 421 at once)
        code, text = idle.getreply()
        assert code == 421 and text.startswith(b"4.3.2")
        # a new connection is refused or closed at once
        with pytest.raises((ConnectionError, smtplib.SMTPException, OSError)):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                client(srv.port, timeout=2).noop()
                time.sleep(0.05)
        busy.send(msg[1000:] + b".\r\n")
        code, text = busy.getreply()
        assert code == 250, text
        code, text = busy.getreply()  # then the server says goodbye
        assert code == 421
        assert srv.wait(30) == 0
        log = srv.log()
    assert "received SIGTERM" in log and "delivered rcpt=<bob@x>" in log
    assert stored(node, "user/bob/INBOX") == {body_guid(msg).hex(): 1}


def test_walctl_serve_reject_policy_and_digest_while_running(tmp_path):
    node = str(tmp_path / "n")
    Node.init(node).close()
    with Node.open(node) as n:
        n.create_mailbox("user/bob/INBOX")
    with ServeProcess(node, "--unknown-recipients", "reject", "--max-message-bytes", "5000") as srv:
        c = client(srv.port)
        assert c.esmtp_features["size"] == "5000"
        r = lmtp_send(c, "a@x", ["bob@x", "nobody@x"], make_message("cli", 2000))
        assert r["bob@x"][0] == 250 and r["nobody@x"][0] == 550
        c.quit()
        out = subprocess.run([sys.executable, "-m", "tools", "digest", node, "--json"], cwd=ROOT,
                             capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        running = __import__("json").loads(out.stdout)
        assert "node is running" in running["note"]
        assert srv.terminate() == 0
    with Node.open(node) as n:
        assert n.digest()["store"] == running["store"]
        assert n.digest()["applied_lsn"] == running["applied_lsn"]
