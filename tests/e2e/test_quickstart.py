"""The README's quick start, pasted into a shell in an empty directory outside the checkout, works.

The test takes the ```bash block under "## Quick start" from README.md as it
stands and changes only what a reader changes: ``/path/to/mailwal`` becomes
this checkout, and the block's ports (2424, 7001, 7002) become free ones so
the test can run beside others. The default LMTP port 2424 is held busy
meanwhile, as the master holds it when the block runs unchanged, so a node
that would listen there by default fails here as it would for the reader.

bash runs the block in a fresh temporary directory. It must exit 0 with no
traceback, deliver the message (the listing shows its UID 1 and the blake3
of its bytes), hand the master role to b, and stop both nodes cleanly; the
nodes and the replication secret (0600) stay in that directory.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from blake3 import blake3

from tools.ports import free_port
from tests.support import ROOT

BIN = os.path.dirname(sys.executable)
TIMEOUT_S = 60


def _quick_start() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the quick start has one ```bash block"
    return blocks[0]


def test_quick_start_reads_as_documented():
    block = _quick_start()
    assert block.startswith("export PATH=/path/to/mailwal/.venv/bin:$PATH\n")
    for line in ("walctl init a --name a",
                 "walctl serve a --lmtp 127.0.0.1:2424 --listen 127.0.0.1:7001 --peer 127.0.0.1:7001 "
                 "--peer 127.0.0.1:7002 &",
                 "walctl follow b --listen 127.0.0.1:7002 --peer 127.0.0.1:7001 --peer 127.0.0.1:7002 "
                 "--secret-file a/replication.secret --name b --auto-reconcile &",
                 "walctl status a", "walctl messages a user/bob/INBOX", "walctl failover a --to b"):
        assert line in block.splitlines(), line
    assert ".venv/bin/walctl" not in block.replace("/path/to/mailwal/.venv/bin:", ""), "walctl comes from PATH"


def _hold(port: int) -> socket.socket | None:
    """Listen on 127.0.0.1:PORT, or None when something else already does (it is busy either way)."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    s.listen()
    return s


def test_quick_start_runs_from_an_empty_directory(tmp_path):
    ports = {"2424": free_port(), "7001": free_port(), "7002": free_port()}
    script = _quick_start().replace("/path/to/mailwal", ROOT)
    script = re.sub(r"\b(2424|7001|7002)\b", lambda m: str(ports[m[1]]), script)
    work = tmp_path / "empty"
    work.mkdir()
    assert not os.path.commonpath([str(work), ROOT]) == ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # the block itself puts the checkout's virtualenv first
    held = _hold(2424)
    proc = subprocess.Popen(["bash", "-c", script], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the quick start did not finish in {TIMEOUT_S} s (a node never came up or b never "
                    f"connected)\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}")
    finally:
        if held:
            held.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of the block still running
        except ProcessLookupError:
            pass

    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}"
    assert "Traceback" not in err, err[-5000:]
    assert "Error:" not in err, err[-5000:]

    body = b"Subject: hello\r\n\r\nHello, Bob.\r\n"
    guid = blake3(body).hexdigest()
    listed = [line for line in out.splitlines() if line.split()[:1] == ["1"] and guid[:12] in line]
    assert listed, f"walctl messages did not list UID 1 with the message's GUID {guid}\n{out[-3000:]}"
    assert re.search(r"^b is master in epoch 2\b", out, re.M), out[-3000:]
    assert "node b (master)" in out, out[-3000:]

    assert (work / "a" / "node.json").exists() and (work / "b" / "node.json").exists()
    secret = work / "a" / "replication.secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert "LMTP drained (clean)" in err  # the master stopped by the block's kill drained and exited
