"""Damage in a node's log is loud (LOG-9, IMAP-11): a running node names it and takes no writes.

A byte inside a record's payload is damaged on disk (the frame header, and so every cheap check,
still looks right):

* in a sealed segment of a stopped node, a record the store applied long ago: ``walctl serve``
  starts (opening verifies only the last segment and the ends of sealed ones), its background
  check of the sealed segments finds the damage, ``walctl status`` names segment, offset and LSN,
  LMTP answers 451 and IMAP writes ``NO [UNAVAILABLE]`` with that text, reads go on, and ``walctl
  verify`` points at the same place;
* in a record the store has not applied yet: ``walctl serve`` refuses to start with one Error line;
* under a running applier: it stops at the record before the damage, ``status`` says why, and
  writes are refused.
"""

from __future__ import annotations

import imaplib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from engine.node import Node
from engine.store.errors import StoreUnavailableError
from tests.support.cluster import WALCTL, walctl
from tests.support.helpers import assert_no_traceback, flip_bit, frame_offsets, seg_paths
from tests.support.lmtp import ROOT, client, lmtp_send, make_message
from wal import FRAME_HEADER_SIZE

SEGMENT_BYTES = 8192  # small segments: 30 messages of 1 KiB make several


def _node_with_sealed_segments(path: str, *, store_copy: str | None = None) -> None:
    """A stopped node: alice and 30 messages of 1 KiB in her INBOX, in several segments.
    ``store_copy``: where to copy the store as it was after the first 3 messages."""
    node = Node.init(path, segment_max_bytes=SEGMENT_BYTES)
    try:
        node.add_user("alice", "apw")
        for i in range(30):
            node.deliver("user/alice/INBOX", make_message(f"m{i}", 1024))
            if i == 2 and store_copy is not None:
                assert node.wait_applied(node.log.last_lsn)
                with node._apply_lock:
                    node.store.conn.execute("VACUUM INTO ?", (store_copy,))
    finally:
        node.close()
    assert len(seg_paths(os.path.join(path, "log.wal"))) >= 3


def _damage_payload(path: str, segment_index: int) -> dict:
    """Flip one bit in the middle of the payload of the middle record of a segment; returns
    where, as ``walctl status`` and ``walctl verify`` should name it."""
    seg = seg_paths(os.path.join(path, "log.wal"))[segment_index]
    frames = frame_offsets(seg)
    offset, size, lsn = frames[len(frames) // 2]
    flip_bit(seg, offset + FRAME_HEADER_SIZE + (size - FRAME_HEADER_SIZE) // 2, 3)
    return {"segment": os.path.basename(seg), "offset": offset, "lsn": lsn, "reason": "record hash mismatch"}


class Served:
    """``walctl serve NODE --lmtp 127.0.0.1:0 --imap 127.0.0.1:0`` as a real child process."""

    def __init__(self, path: str, log_file: str):
        self.log_file = log_file
        self._log = open(log_file, "ab")
        self.proc = subprocess.Popen([*WALCTL, "serve", path, "--lmtp", "127.0.0.1:0", "--imap", "127.0.0.1:0"],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL)
        self.lmtp = self.imap = 0
        for _ in range(10):
            line = self.proc.stdout.readline().decode()
            if not line:
                break
            if "IMAP on" in line:
                self.imap = int(line.rsplit(":", 1)[1])
            if "LMTP listening on" in line:
                self.lmtp = int(line.rsplit(":", 1)[1])
                break
        assert self.lmtp and self.imap, open(log_file).read()[-2000:]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self.proc.stdout.close()
            self._log.close()
            with open(self.log_file) as f:
                assert_no_traceback(f.read(), ("serve",))


def _status(path: str) -> dict:
    return json.loads(walctl("status", path, "--json").stdout)


def test_damage_inside_a_sealed_segment_is_found_by_the_running_node_and_refuses_writes(tmp_path):
    """LOG-9, IMAP-11: the damage is named in status (segment, offset, LSN) and the log, every write
    is refused with that text (LMTP 451, IMAP NO [UNAVAILABLE]), reads go on, verify agrees."""
    path = str(tmp_path / "n")
    _node_with_sealed_segments(path)
    where = _damage_payload(path, 1)
    served = Served(path, str(tmp_path / "serve.log"))
    try:
        deadline = time.monotonic() + 60
        st = _status(path)
        while st.get("log_damage") is None and time.monotonic() < deadline:
            time.sleep(0.1)
            st = _status(path)
        assert st["log_damage"] == where
        text = f"segment {where['segment']}, offset {where['offset']}, LSN {where['lsn']}"
        assert text in st["log_failed"] and "takes no writes" in st["log_failed"]
        assert st["applied_lsn"] == st["last_lsn"]  # the store is whole: the damage is in what it applied before

        with client(served.lmtp) as lmtp:
            code, reply = lmtp_send(lmtp, "a@x.example", ["alice@x.example"], make_message("after", 512))[
                "alice@x.example"]
        assert code == 451 and text in reply

        with imaplib.IMAP4("127.0.0.1", served.imap, timeout=20) as imap:
            imap.login("alice", "apw")
            typ, data = imap.select("INBOX")
            assert typ == "OK" and int(data[0]) == 30  # reads go on
            typ, data = imap.append("INBOX", None, None, make_message("imap", 512))
            assert typ == "NO" and data[0].startswith(b"[UNAVAILABLE]") and text.encode() in data[0]
            typ, data = imap.uid("STORE", "1", "+FLAGS", "(\\Seen)")
            assert typ == "NO" and data[0].startswith(b"[UNAVAILABLE]")
        with open(served.log_file) as f:
            assert any(" ERROR " in line and text in line for line in f)
    finally:
        assert served.stop() == 0

    verify = walctl("verify", os.path.join(path, "log.wal"), check=False)
    assert verify.returncode == 1
    assert f"segment {where['segment']}, offset {where['offset']}, LSN {where['lsn']}" in verify.stdout + verify.stderr


def test_serve_refuses_to_start_at_damage_the_store_has_not_applied(tmp_path):
    """LOG-9: the store catches up at open and meets the damage: one Error line naming it, exit 1."""
    path = str(tmp_path / "n")
    _node_with_sealed_segments(path, store_copy=str(tmp_path / "early.sqlite"))
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(os.path.join(path, "store.sqlite" + suffix)):
            os.remove(os.path.join(path, "store.sqlite" + suffix))
    shutil.copy(tmp_path / "early.sqlite", os.path.join(path, "store.sqlite"))
    where = _damage_payload(path, 1)
    p = subprocess.run([*WALCTL, "serve", path, "--lmtp", "127.0.0.1:0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert_no_traceback(p.stderr, ("serve",))
    assert p.returncode == 1
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1
    assert f"segment {where['segment']}, offset {where['offset']}, LSN {where['lsn']}" in errors[0]


def test_an_applier_that_meets_damage_stops_before_it_names_it_and_refuses_writes(tmp_path):
    """LOG-9: records read before the damage are applied; status names segment, offset and LSN;
    writes are refused (StoreUnavailableError, LMTP 451 / IMAP NO [UNAVAILABLE]) with that text."""
    path = str(tmp_path / "n")
    node = Node.init(path)
    try:
        node.deliver("user/bob/INBOX", make_message("first", 512), create=True)
        with node._apply_lock:  # fault injection: the applier waits while a durable record is damaged on disk
            receipt = node.deliver("user/bob/INBOX", make_message("second", 512))
            node.deliver("user/bob/INBOX", make_message("third", 512))
            seg = seg_paths(os.path.join(path, "log.wal"))[-1]
            (offset, size), = [(o, s) for o, s, lsn in frame_offsets(seg) if lsn == receipt.lsn]
            flip_bit(seg, offset + FRAME_HEADER_SIZE + (size - FRAME_HEADER_SIZE) // 2, 0)
        deadline = time.monotonic() + 30
        while node.applier_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        st = node.status()
        text = f"segment {os.path.basename(seg)}, offset {offset}, LSN {receipt.lsn}"
        assert st["applied_lsn"] == receipt.lsn - 1
        assert text in st["applier_error"] and "takes no writes" in st["applier_error"]
        with pytest.raises(StoreUnavailableError, match=text):
            node.deliver("user/bob/INBOX", make_message("refused", 512))
        with pytest.raises(StoreUnavailableError, match=text):
            node.create_mailbox("user/bob/Other")
        assert node.log.last_lsn == receipt.lsn + 1  # nothing was logged for the refused writes
    finally:
        node.close()
