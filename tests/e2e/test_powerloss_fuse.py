"""Power loss under a real node, through a file system that forgets (FAULTS.md D5).

A node's directory lives on ``tests/support/lazyfs.py``, a FUSE pass-through that
keeps every unsynced write in memory. A child process works on the node
(Node API, or ``walctl serve`` over LMTP) and reports each operation once the
call that makes it durable returned. At a seeded point the file system
"loses power" (``crash``: every unsynced write and every name operation not
covered by a directory fsync is undone; ``crash-torn SEED``: a random prefix of
them survives, the last write torn) and the process is killed. A second round
reopens the node through a fresh lazyfs instance (recovery itself runs on the
forgetful file system), works and crashes again. Then, on the backing
directory (the disk after power loss):

* *NoAckedLoss*: every reported delivery is in its mailbox exactly once, with
  the bytes sent, at the UID reported; every reported checkpoint is a
  Checkpoint record at its LSN; every cursor holds the last value reported or
  the one being set when power went (*CursorsDurable*);
* *PrefixOfAppended*: nothing is stored that was never sent;
* *ChainIntact*: ``wal.verify`` finds no corruption (a torn tail is allowed
  before the reopen and gone after it);
* MS-5: the live store after recovery has the digest of a store rebuilt from
  the log alone.

kill -9 alone keeps the page cache (FAULTS.md P1); this is the test that
drops it. The mount lives in a private mount namespace (``unshare -m``), so a
killed test run leaves no mount behind; the children join it with
``nsenter``, and this process reaches the control file through
``/proc/PID/root``.
"""

from __future__ import annotations

import collections
import errno
import ctypes.util
import importlib.util
import json
import os
import random
import select
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
import time

import pytest

import wal
from engine.store.events import Checkpoint, body_guid, decode_event
from engine.node import Node, rebuild_store
from tests.support.powerloss_child import message_body
from tests.support import ROOT

LAZYFS = os.path.join(ROOT, "tests", "support", "lazyfs.py")
CHILD = os.path.join(ROOT, "tests", "support", "powerloss_child.py")
STEP_TIMEOUT_S = 60  # a hang (lost wakeup, FUSE deadlock) fails the test instead of blocking CI


def _missing() -> str | None:
    if sys.platform != "linux":
        return "FUSE power-loss tests need Linux"
    if os.geteuid() != 0:
        return "needs root: /dev/fuse is mode 0600 and mounting needs CAP_SYS_ADMIN"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse (kernel FUSE support)"
    if ctypes.util.find_library("fuse3") is None:
        return "needs libfuse3 (Debian package fuse3)"
    if importlib.util.find_spec("mfusepy") is None:
        return "needs the pip package mfusepy (pip install -e '.[test]')"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux)"
    return None


pytestmark = [pytest.mark.root, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


class LazyMount:
    """``tests/support/lazyfs.py BACKING MNT`` in a private mount namespace."""

    def __init__(self, backing: str, mnt: str, log_path: str):
        self.backing, self.mnt = backing, mnt
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", sys.executable, LAZYFS, backing, mnt],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, cwd=ROOT,
        )
        ready = self._event()
        if ready.get("event") != "ready":
            self.close()
            raise RuntimeError(f"lazyfs did not start: {ready}; see {log_path}")

    def _event(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], STEP_TIMEOUT_S)
        if not ready:
            raise TimeoutError("lazyfs said nothing")
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"event": "exited", "rc": self.proc.poll()}

    def crash(self, command: str) -> dict:
        """Write ``command`` to the control file; returns lazyfs's report of the crash."""
        with open(f"/proc/{self.proc.pid}/root{self.mnt}/.lazyfs_ctl", "w") as f:
            f.write(command + "\n")
        event = self._event()
        assert event["event"] == "crash", event
        return event

    def spawn(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Run ``argv`` inside the mount namespace."""
        env = dict(os.environ, PYTHONPATH=ROOT)
        return subprocess.Popen(["nsenter", "-t", str(self.proc.pid), "-m", "--", *argv], cwd=ROOT, env=env,
                                **kwargs)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._log.close()

    def __enter__(self) -> "LazyMount":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Acks:
    """What the child reported, read from its pipe."""

    def __init__(self):
        self.tried_keys: set[str] = set()
        self.deliveries: list[dict] = []
        self.checkpoints: list[int] = []
        self.cursor_acked: dict[str, int] = {}
        self.cursor_tried: dict[str, list[int]] = collections.defaultdict(list)  # since the last ack
        self.errors: list[dict] = []
        self.counts: collections.Counter = collections.Counter()

    def add(self, ev: dict) -> None:
        op = ev["op"]
        self.counts[op] += 1
        if op == "try" and ev["kind"] == "deliver":
            self.tried_keys.add(ev["key"])
        elif op == "try" and ev["kind"] == "cursor":
            self.cursor_tried[ev["name"]].append(ev["lsn"])
        elif op == "deliver":
            self.deliveries.append(ev)
        elif op == "checkpoint":
            self.checkpoints.append(ev["lsn"])
        elif op == "cursor":
            self.cursor_acked[ev["name"]] = ev["lsn"]
            self.cursor_tried[ev["name"]] = []
        elif op == "error":
            self.errors.append(ev)

    def count(self, op: str) -> int:
        return self.counts[op]


def _read_lines(fd: int, acks: Acks, buf: bytearray, until, deadline: float) -> bool:
    """Feed the child's lines to ``acks`` until ``until(acks)`` or EOF; False on EOF."""
    while not until(acks):
        if time.monotonic() > deadline:
            raise TimeoutError("the child did not reach its crash point")
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return False
        buf += chunk
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            acks.add(json.loads(line))
    return True


FOCUS = {"deliver": ("deliver", 1, 120), "rollover": ("deliver", 1, 80), "cursors": ("cursor", 1, 60),
         "checkpoints": ("checkpoint", 1, 6)}  # power goes after this many acknowledgements of the kind


def _round(backing: str, mnt: str, workload: str, seed: int, round_no: int, acks: Acks, log_path: str) -> dict:
    """One life of the node on a fresh lazyfs: work, then power loss at a seeded point."""
    rng = random.Random(f"{seed}/{round_no}")
    focus, low, high = FOCUS[workload]
    want = rng.randint(low, high)
    command = "crash" if rng.random() < 0.5 else f"crash-torn {rng.randrange(2**32)}"
    with LazyMount(backing, mnt, log_path) as fs:
        r, w = os.pipe()
        with open(log_path, "ab") as errlog:
            child = fs.spawn([sys.executable, CHILD, os.path.join(mnt, "node"), workload, str(seed), str(round_no),
                              str(w)], pass_fds=[w], stdout=errlog, stderr=errlog, stdin=subprocess.DEVNULL)
        os.close(w)
        try:
            buf = bytearray()
            start = acks.count(focus)
            deadline = time.monotonic() + STEP_TIMEOUT_S
            alive = _read_lines(r, acks, buf, lambda a: a.count(focus) - start >= want, deadline)
            assert alive, f"the child ended before its crash point; see {log_path}"
            report = fs.crash(command)
            child.kill()
            child.wait(STEP_TIMEOUT_S)
            _read_lines(r, acks, buf, lambda a: False, time.monotonic() + STEP_TIMEOUT_S)  # to EOF
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            os.close(r)
    report["wanted"] = want
    return report


def _check(node_dir: str, deliveries: list[tuple[str, int | None, bytes]], sent: set[str], *,
           checkpoints: list[int] = (), cursor_acked: dict[str, int] | None = None,
           cursor_tried: dict[str, list[int]] | None = None) -> None:
    """The node on the backing directory after the power losses; see the module docstring."""
    log_dir = os.path.join(node_dir, "log.wal")
    before = wal.verify(log_dir)
    assert before.ok and before.error is None, f"ChainIntact after power loss: {before.to_dict()}"

    with Node.open(node_dir) as node:
        after = wal.verify(log_dir)
        assert after.ok and after.torn_tail is None, f"reopen left the log unclean: {after.to_dict()}"
        stored = collections.Counter()
        for mb in node.list_mailboxes():
            for m in node.list_messages(mb.name):
                stored[(mb.name, m.guid)] += 1
        # NoAckedLoss: every acknowledged delivery, once, with the bytes sent (at its UID when known)
        for mailbox, uid, body in deliveries:
            guid = body_guid(body).hex()
            assert stored[(mailbox, guid)] == 1, f"acknowledged delivery {guid} to {mailbox}: " \
                                                 f"found {stored[(mailbox, guid)]} times"
            if uid is not None:
                assert node.fetch(mailbox, uid) == body, f"acknowledged delivery {mailbox} UID {uid} changed"
        for (mailbox, guid), n in stored.items():
            assert n == 1, f"message {guid} is {n} times in {mailbox}"
            assert guid in sent, f"PrefixOfAppended: {mailbox} holds {guid}, which nobody sent"
        for lsn in checkpoints:
            rec = next(node.log.read(lsn, lsn))
            assert isinstance(decode_event(rec.type, rec.payload), Checkpoint), f"checkpoint at LSN {lsn} lost"
        # CursorsDurable: the last acknowledged value, or the one being set when power went
        cursors = node.log.cursors.list()
        for name, acked in (cursor_acked or {}).items():
            allowed = {acked, *(cursor_tried or {}).get(name, [])}
            assert cursors.get(name) in allowed, f"cursor {name} is {cursors.get(name)}, expected one of {allowed}"
        live = node.digest()
        assert live["applied_lsn"] == node.log.last_lsn
    rebuilt = rebuild_store(node_dir)
    assert rebuilt == live, "MS-5: the store after recovery differs from one rebuilt from the log"
    assert wal.verify(log_dir).ok


def _disk(tmp_path) -> tuple[str, str]:
    backing, mnt = str(tmp_path / "disk"), str(tmp_path / "mnt")
    os.mkdir(backing)
    os.mkdir(mnt)
    return backing, mnt


SEEDS = [int(s) for s in os.environ.get("POWERLOSS_SEEDS", "11,12,13,14").split(",")]
ROUNDS = 3


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("workload", ["deliver", "rollover", "cursors", "checkpoints"])
def test_power_loss_keeps_every_acknowledged_operation(tmp_path, workload, seed):
    """NoAckedLoss, PrefixOfAppended, ChainIntact, CursorsDurable and MS-5 across two power losses."""
    backing, mnt = _disk(tmp_path)
    node_dir = os.path.join(backing, "node")
    config = {"segment_max_bytes": 4096} if workload == "rollover" else {"segment_max_bytes": 256 * 1024}
    Node.init(node_dir, **config).close()
    acks = Acks()
    reports = [_round(backing, mnt, workload, seed, n, acks, str(tmp_path / "lazyfs.log")) for n in range(ROUNDS)]
    assert acks.deliveries, "no delivery was acknowledged: the test proved nothing"
    # the crashes really took something away (the store's SQLite WAL is never fsynced per write)
    assert any(r["dropped_bytes"] > 0 or r["name_ops_undone"] for r in reports), reports
    if workload == "rollover":
        segments = [n for n in os.listdir(os.path.join(node_dir, "log.wal")) if n.endswith(".seg")]
        assert len(segments) > 5, f"expected many segments with segment_max_bytes=4096, got {segments}"
    if workload == "cursors":
        assert acks.cursor_acked, "no cursor update was acknowledged"
    if workload == "checkpoints":
        assert acks.checkpoints, "no checkpoint was acknowledged"
    deliveries = [(d["mailbox"], d["uid"], message_body(seed, d["key"], workload)) for d in acks.deliveries]
    sent = {body_guid(message_body(seed, k, workload)).hex() for k in acks.tried_keys}
    _check(node_dir, deliveries, sent, checkpoints=acks.checkpoints, cursor_acked=acks.cursor_acked,
           cursor_tried=acks.cursor_tried)


# -- walctl serve over LMTP ------------------------------------------------------

RECIPIENTS = ["ann@x", "bob@x", "carl@x"]


def test_power_loss_under_walctl_serve_keeps_every_250(tmp_path):
    """MS-2 end to end: every LMTP 250 survives two power losses of the served node's file system."""
    from tests.support.lmtp import client, lmtp_send, make_message

    backing, mnt = _disk(tmp_path)
    node_dir = os.path.join(backing, "node")
    Node.init(node_dir).close()
    rng = random.Random(SEEDS[0])
    acked: list[tuple[str, bytes]] = []
    sent: set[str] = set()
    lock = threading.Lock()
    reports = []
    log_path = str(tmp_path / "lazyfs.log")
    for round_no in range(ROUNDS):
        with LazyMount(backing, mnt, log_path) as fs, open(log_path, "ab") as errlog:
            srv = fs.spawn([sys.executable, "-m", "tools", "serve", os.path.join(mnt, "node"), "--lmtp",
                            "127.0.0.1:0", "--quiet"], stdout=subprocess.PIPE, stderr=errlog,
                           stdin=subprocess.DEVNULL)
            try:
                line = srv.stdout.readline().decode()
                assert "listening on" in line, f"walctl serve did not start: {line!r}; see {log_path}"
                port = int(line.rsplit(":", 1)[1])
                stop = threading.Event()

                def worker(k: int) -> None:
                    try:
                        c = client(port, timeout=STEP_TIMEOUT_S)
                    except OSError:
                        return
                    i = 0
                    while not stop.is_set():
                        rcpt = RECIPIENTS[(k + i) % len(RECIPIENTS)]
                        msg = make_message(f"p{round_no}-t{k}-m{i}", 600 + 300 * k)
                        i += 1
                        with lock:
                            sent.add(body_guid(msg).hex())
                        try:
                            code, _ = lmtp_send(c, "a@x", [rcpt], msg)[rcpt]
                        except (OSError, EOFError, smtplib.SMTPException):  # power went: not acknowledged
                            return
                        if code == 250:
                            with lock:
                                acked.append((rcpt, msg))

                threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(4)]
                for t in threads:
                    t.start()
                want, before = rng.randint(10, 120), len(acked)
                deadline = time.monotonic() + STEP_TIMEOUT_S
                while len(acked) - before < want:
                    assert time.monotonic() < deadline, "walctl serve did not acknowledge enough deliveries"
                    assert srv.poll() is None, f"walctl serve died; see {log_path}"
                    time.sleep(0.001)
                reports.append(fs.crash("crash" if round_no == 0 else f"crash-torn {rng.randrange(2**32)}"))
            finally:
                srv.kill()
                srv.wait(STEP_TIMEOUT_S)
                srv.stdout.close()
            stop.set()
            for t in threads:
                t.join(STEP_TIMEOUT_S)
    assert any(r["dropped_bytes"] > 0 for r in reports), reports
    deliveries = [(f"user/{rcpt.split('@')[0]}/INBOX", None, msg) for rcpt, msg in acked]
    _check(node_dir, deliveries, sent)


# -- the harness itself ------------------------------------------------------------

SEMANTICS = r"""
import os, sys
m = sys.argv[1]
def put(name, data, sync):
    fd = os.open(os.path.join(m, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    if sync:
        os.fdatasync(fd)
    os.close(fd)
def dirsync():
    fd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
def get(name):
    with open(os.path.join(m, name), "rb") as f:
        return f.read()
put("kept", b"durable", True)
put("renamed-src", b"R", True)
put("unlinked", b"U", True)
put("truncated", b"0123456789", True)
put("cursor", b"v1", True)
os.mkdir(os.path.join(m, "dir"))
dirsync()
# nothing below is made durable
with open(os.path.join(m, "kept"), "ab") as f:
    f.write(b"+lost")
fd = os.open(os.path.join(m, "truncated"), os.O_RDWR)
os.ftruncate(fd, 3)
os.pwrite(fd, b"xy", 8)
os.close(fd)
assert get("truncated") == b"012\0\0\0\0\0xy", get("truncated")  # reads see the newest data
assert get("kept") == b"durable+lost"
put("new", b"N", True)  # data synced, name never
os.rename(os.path.join(m, "renamed-src"), os.path.join(m, "renamed-dst"))
os.unlink(os.path.join(m, "unlinked"))
os.mkdir(os.path.join(m, "dir2"))
put(".cursor.tmp", b"v2", True)
os.rename(os.path.join(m, ".cursor.tmp"), os.path.join(m, "cursor"))
assert get("cursor") == b"v2"
print("ok", flush=True)
"""


def test_lazyfs_loses_what_was_not_made_durable(tmp_path):
    """The harness's model: unsynced data and names not covered by a directory fsync are undone."""
    backing, mnt = _disk(tmp_path)
    with LazyMount(backing, mnt, str(tmp_path / "lazyfs.log")) as fs:
        out = fs.spawn([sys.executable, "-c", SEMANTICS, mnt], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = out.communicate(timeout=STEP_TIMEOUT_S)
        assert stdout == b"ok\n", stderr.decode()
        report = fs.crash("crash")
        with pytest.raises(OSError) as err:  # the machine is off
            os.stat(f"/proc/{fs.proc.pid}/root{mnt}/kept")
        assert err.value.errno == errno.EIO
    assert sorted(os.listdir(backing)) == ["cursor", "dir", "kept", "renamed-src", "truncated", "unlinked"]

    def content(name: str) -> bytes:
        with open(os.path.join(backing, name), "rb") as f:
            return f.read()

    assert content("kept") == b"durable"
    assert content("truncated") == b"0123456789"
    assert content("renamed-src") == b"R"
    assert content("unlinked") == b"U"
    assert content("cursor") == b"v1"
    assert report["dropped_bytes"] == len(b"+lost") + len(b"xy")  # "new" and ".cursor.tmp" were synced, only unnamed
    assert report["name_ops_undone"] == ["create new", "rename renamed-src", "unlink unlinked", "mkdir dir2",
                                         "create .cursor.tmp", "rename .cursor.tmp"]


def test_lazyfs_crash_torn_keeps_a_prefix_of_the_unsynced_writes(tmp_path):
    """crash-torn SEED: the file holds its durable bytes plus a prefix of what was written after, cut anywhere."""
    backing, mnt = _disk(tmp_path)
    written = b"".join(b"%03d:" % i + bytes([65 + i]) * 95 for i in range(10))
    lengths = set()
    for seed in range(6):
        shutil.rmtree(backing)
        os.mkdir(backing)
        with open(os.path.join(backing, "f"), "wb") as f:
            f.write(b"base")
        with LazyMount(backing, mnt, str(tmp_path / "lazyfs.log")) as fs:
            script = ("import os,sys\nfd=os.open(sys.argv[1]+'/f', os.O_WRONLY|os.O_APPEND)\n"
                      "for i in range(10):\n    os.write(fd, sys.argv[2].encode()[i*100:(i+1)*100])\nprint('ok')")
            out = fs.spawn([sys.executable, "-c", script, mnt, written.decode()], stdout=subprocess.PIPE)
            assert out.communicate(timeout=STEP_TIMEOUT_S)[0] == b"ok\n"
            report = fs.crash(f"crash-torn {seed}")
        with open(os.path.join(backing, "f"), "rb") as f:
            got = f.read()
        assert got.startswith(b"base") and written.startswith(got[4:]), (seed, got)
        f_report = report["files"]["f"]
        assert f_report["unsynced_ops"] == 10
        assert len(got) - 4 == 100 * f_report["kept_ops"] + (f_report["torn_bytes"] or 0), (seed, report)
        lengths.add(len(got) - 4)
    assert len(lengths) > 2, f"six seeds kept the same prefix lengths {lengths}"


LIAR = r"""
import sys
from wal import FileOps, Log
class AcksBeforeDurable(FileOps):  # the planted bug: fdatasync and directory fsync do nothing
    def fdatasync(self, fd):
        pass
    def fsync_dir(self, path):
        pass
ops = AcksBeforeDurable() if sys.argv[2] == "liar" else FileOps()
log = Log.open(sys.argv[1], fileops=ops, segment_max_bytes=2048)
for i in range(60):
    a = log.append(1, b"record %d" % i)
    print(a.lsn, flush=True)
"""


@pytest.mark.parametrize("fileops", ["honest", "liar"])
def test_lazyfs_catches_an_acknowledgement_before_fdatasync(tmp_path, fileops):
    """The harness has teeth: a log whose fdatasync is a no-op loses acknowledged records; the real one does not."""
    backing, mnt = _disk(tmp_path)
    wal.Log.create(os.path.join(backing, "x.wal"), segment_max_bytes=2048).close()
    with LazyMount(backing, mnt, str(tmp_path / "lazyfs.log")) as fs:
        out = fs.spawn([sys.executable, "-c", LIAR, os.path.join(mnt, "x.wal"), fileops], stdout=subprocess.PIPE)
        acked = [int(x) for x in out.communicate(timeout=STEP_TIMEOUT_S)[0].split()]
        fs.crash("crash")
    assert acked == list(range(1, 61))
    log = wal.Log.open(os.path.join(backing, "x.wal"))
    try:
        lost = [lsn for lsn in acked if lsn > log.last_lsn]
    finally:
        log.close()
    if fileops == "honest":
        assert lost == []
    else:
        assert lost == acked, f"the planted bug lost only {lost}"


STALL = r"""
import sys, threading, time
from wal import FileOps, Log
stall_at = int(sys.argv[2])
class StallingSync(FileOps):  # fault injection: the stall_at-th fdatasync never returns
    calls = 0
    def fdatasync(self, fd):
        StallingSync.calls += 1
        if StallingSync.calls == stall_at:
            print("stalled", flush=True)
            threading.Event().wait()
        super().fdatasync(fd)
log = Log.open(sys.argv[1], fileops=StallingSync(), segment_max_bytes=8192)
i = 0
while True:
    batch = [(1, b"%d:%d:" % (i, k) + b"m" * 300) for k in range(5)]
    i += 1
    for a in log.append_many(batch):
        print(a.lsn, flush=True)
"""


def test_power_loss_between_a_batch_write_and_its_fdatasync(tmp_path):
    """LOG-8 through a real power loss: of the batch written but not synced, complete frames stay and the torn
    rest is trimmed into torn/; every acknowledged record stays and the chain verifies."""
    torn_seen = 0
    for seed in range(6):
        backing, mnt = str(tmp_path / f"disk{seed}"), str(tmp_path / f"mnt{seed}")
        os.mkdir(backing)
        os.mkdir(mnt)
        log_dir = os.path.join(backing, "x.wal")
        wal.Log.create(log_dir, segment_max_bytes=8192).close()
        with LazyMount(backing, mnt, str(tmp_path / "lazyfs.log")) as fs:
            child = fs.spawn([sys.executable, "-c", STALL, os.path.join(mnt, "x.wal"), str(4 + 3 * seed)],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            acked = []
            try:
                for line in child.stdout:
                    if line == b"stalled\n":
                        break
                    acked.append(int(line))
                else:
                    pytest.fail("the child ended before its fdatasync stalled")
                report = fs.crash(f"crash-torn {seed}")
            finally:
                child.kill()
                child.wait()
                child.stdout.close()
        assert acked, "nothing was acknowledged before the stall"
        segment = [f for f in report["files"] if f.startswith("x.wal/") and f.endswith(".seg")]
        assert segment, f"the stalled batch was not pending in a segment: {report}"
        before = wal.verify(log_dir)
        assert before.ok, before.to_dict()
        log = wal.Log.open(log_dir)
        try:
            assert log.last_lsn >= acked[-1], f"acknowledged LSNs {log.last_lsn + 1}..{acked[-1]} lost"
            # complete frames of the unacknowledged batch may stay (LOG-8: a complete frame is a record)
            assert log.last_lsn <= acked[-1] + 5, "records appeared that were never written"
            assert [r.lsn for r in log.read(1)] == list(range(1, log.last_lsn + 1))
        finally:
            log.close()
        assert wal.verify(log_dir).torn_tail is None
        torn_dir = os.path.join(log_dir, "torn")
        if before.torn_tail is not None:
            assert os.listdir(torn_dir), "a torn tail was trimmed without a copy in torn/"
            torn_seen += 1
    assert torn_seen >= 2, f"only {torn_seen} of six power losses left a torn batch"
