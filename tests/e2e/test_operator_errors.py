"""What an operator meets when something is wrong: the real ``walctl`` as a process.

Every failure is one ``Error:`` line on stderr with the documented exit
status (1: the operation failed, 2: bad usage or a bad node.toml), never a
traceback unless ``walctl --debug``, and nothing is lost or left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time

import pytest

from tests.support.helpers import ROOT, assert_no_traceback
from tools.ports import free_port

WALCTL = [sys.executable, "-m", "tools"]


def walctl(*args, timeout: float = 60, cwd: str = ROOT, input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``walctl ARGS`` to completion (text output); a traceback fails the test."""
    p = subprocess.run(WALCTL + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       input=input, env=dict(os.environ, PYTHONPATH=ROOT))
    assert_no_traceback(p.stderr, args)
    return p


def error_line(p: subprocess.CompletedProcess, status: int = 1) -> str:
    """The one ``Error:`` line of a failed command, after checking its exit status."""
    assert p.returncode == status, f"exit {p.returncode}, wanted {status}:\n{p.stdout}\n{p.stderr}"
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, f"wanted exactly one Error: line on stderr:\n{p.stderr}"
    return errors[0]


def init_node(path, *args) -> str:
    p = walctl("init", path, *args)
    assert p.returncode == 0, p.stderr
    return str(path)


# -- the general guard -------------------------------------------------------------


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    node = init_node(tmp_path / "a")
    with open(os.path.join(node, "store.sqlite"), "wb") as f:
        f.write(b"this is not an SQLite database" * 10)
    line = error_line(walctl("digest", node))
    assert "file is not a database" in line and "run with --debug for the traceback" in line
    p = walctl("--debug", "digest", node)
    assert p.returncode == 1 and "Traceback (most recent call last)" in p.stderr


def test_usage_errors_keep_exit_status_2(tmp_path):
    line = error_line(walctl("verify", tmp_path / "missing"), 2)
    assert "does not exist" in line
    error_line(walctl("status", "--bogus-option"), 2)


# -- running nodes as processes ----------------------------------------------------------


class NodeProcess:
    """``walctl serve|follow NODE ...`` as a child process; its stderr goes to NODE.err."""

    def __init__(self, mode: str, node: str, *args):
        self.node = node
        self.err_path = f"{node}.err"
        self._err = open(self.err_path, "ab")
        self.args = [mode, node, *map(str, args)]
        self.proc = subprocess.Popen(WALCTL + self.args, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._err,
                                     stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=ROOT))
        self.announced: list[str] = []

    def wait_ready(self, timeout: float = 30) -> list[str]:
        """The lines printed until the node said where it takes mail (or that it has no LMTP front)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise AssertionError(f"walctl {' '.join(self.args)} exited {self.proc.wait()}:\n{self.stderr()}")
            self.announced.append(line.rstrip("\n"))
            if "LMTP listening on" in line or "no LMTP front" in line:
                return self.announced
        raise AssertionError(f"walctl {' '.join(self.args)} did not come up")

    @property
    def lmtp_port(self) -> int:
        line = next(x for x in self.announced if "LMTP listening on" in x)
        return int(line.rsplit(":", 1)[1])

    def stderr(self) -> str:
        with open(self.err_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_stderr(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stderr():
                return self.stderr()
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the stderr of walctl {' '.join(self.args)}:\n{self.stderr()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        self.proc.stdout.close()
        self._err.close()
        assert_no_traceback(self.stderr(), self.args, what="walctl")
        return rc


@pytest.fixture
def procs():
    """Node processes a test starts; every one still running is stopped (SIGTERM) at the end."""
    started: list[NodeProcess] = []

    def start(mode: str, node: str, *args, ready: bool = True) -> NodeProcess:
        p = NodeProcess(mode, node, *args)
        started.append(p)
        if ready:
            p.wait_ready()
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.stop()


def held_port() -> socket.socket:
    """A listening socket on a free port of 127.0.0.1 (close it to free the port)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def addr(port: int) -> str:
    return f"127.0.0.1:{port}"


def listing(path: str) -> list[str]:
    return sorted(os.listdir(path))


@pytest.fixture
def master(tmp_path, procs):
    """A running master ``a`` (LMTP and replication on free ports); (node, replication address, process)."""
    node = init_node(tmp_path / "a", "--name", "a")
    listen = addr(free_port())
    p = procs("serve", node, "--lmtp", "127.0.0.1:0", "--listen", listen, "--peer", listen)
    return node, listen, p


# -- a port in use: one line naming the address and what set it ---------------------------


def test_serve_with_its_lmtp_port_in_use_names_the_address_and_the_flag(tmp_path):
    node = init_node(tmp_path / "a")
    before = listing(node)
    with held_port() as busy:
        port = busy.getsockname()[1]
        line = error_line(walctl("serve", node, "--lmtp", addr(port)))
    assert f"cannot listen for LMTP on 127.0.0.1:{port}: address already in use (set by --lmtp)" in line
    assert listing(node) == before  # no control.sock (or anything else) left behind


def test_serve_with_its_replication_port_in_use_names_the_address_and_the_flag(tmp_path):
    node = init_node(tmp_path / "a")
    before = listing(node)
    with held_port() as busy:
        port = busy.getsockname()[1]
        line = error_line(walctl("serve", node, "--lmtp", "127.0.0.1:0", "--listen", addr(port)))
    assert f"cannot listen for replication and control on 127.0.0.1:{port}" in line and "(set by --listen)" in line
    assert listing(node) == before


def test_a_port_in_use_set_in_node_toml_names_the_file_and_the_key(tmp_path):
    node = init_node(tmp_path / "a")
    toml = os.path.join(node, "node.toml")
    with held_port() as busy:
        port = busy.getsockname()[1]
        text = open(toml).read().replace('# listen = "127.0.0.1:2424"', f'listen = "{addr(port)}"')
        with open(toml, "w") as f:
            f.write(text)
        line = error_line(walctl("serve", node))
    assert f"cannot listen for LMTP on 127.0.0.1:{port}" in line and f"(set by [lmtp] listen in {toml})" in line


def test_follow_of_an_existing_replica_with_its_lmtp_port_in_use(tmp_path, master, procs):
    _, listen, _ = master
    secret = os.path.join(master[0], "replication.secret")
    b = str(tmp_path / "b")
    procs("follow", b, "--peer", listen, "--secret-file", secret, "--name", "b").stop()
    before = listing(b)
    with held_port() as busy:
        port = busy.getsockname()[1]
        line = error_line(walctl("follow", b, "--peer", listen, "--secret-file", secret, "--lmtp", addr(port)))
    assert f"cannot listen for LMTP on 127.0.0.1:{port}: address already in use (set by --lmtp)" in line
    assert listing(b) == before


# -- a replica: no LMTP front by default; says when it waits and when it connects ----------


def test_a_replica_has_no_lmtp_front_unless_asked(tmp_path, master, procs):
    node_a, listen, _ = master
    secret = os.path.join(node_a, "replication.secret")
    b = procs("follow", str(tmp_path / "b"), "--peer", listen, "--secret-file", secret, "--name", "b")
    assert any("no LMTP front" in line for line in b.announced), b.announced
    b.stop()
    # The node.toml key gives it one (as --lmtp would).
    with open(str(tmp_path / "b.toml"), "w") as f:
        f.write('[lmtp]\nlisten = "127.0.0.1:0"\n')
    b = procs("follow", str(tmp_path / "b"), "--peer", listen, "--secret-file", secret,
              "--config", str(tmp_path / "b.toml"))
    with smtplib.LMTP("127.0.0.1", b.lmtp_port, timeout=20) as c:
        c.ehlo("client.test")
        code, _ = c.docmd("MAIL FROM:<x@example.org>")
        assert code == 250
        code, text = c.docmd("RCPT TO:<bob@example.org>")
        assert code == 451 and b"read-only replica" in text


def test_a_replica_says_once_that_it_waits_for_its_master_and_once_that_it_connected(tmp_path, procs):
    a = init_node(tmp_path / "a", "--name", "a")
    listen = addr(free_port())
    secret = os.path.join(a, "replication.secret")
    first = procs("serve", a, "--lmtp", "127.0.0.1:0", "--listen", listen)
    procs("follow", str(tmp_path / "b"), "--peer", listen, "--secret-file", secret, "--name", "b").stop()
    first.stop()
    b = procs("follow", str(tmp_path / "b"), "--peer", listen, "--secret-file", secret, "--name", "b")
    err = b.wait_stderr("waiting for its master")
    assert f"replica b: waiting for its master at {listen}" in err
    procs("serve", a, "--lmtp", "127.0.0.1:0", "--listen", listen)
    err = b.wait_stderr(f"replica b: connected to the master at {listen}")
    time.sleep(1.5)  # longer than the replica waits before it says it is waiting
    err = b.stderr()
    assert err.count("waiting for its master") == 1 and err.count("connected to the master") == 1, err


# -- seeding with a wrong secret: one line, nothing left behind -----------------------------


def test_seeding_a_new_replica_with_a_wrong_secret_leaves_nothing_behind(tmp_path, master):
    _, listen, _ = master
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("0123456789abcdef" * 4)
    wrong.chmod(0o600)
    b = tmp_path / "b"
    line = error_line(walctl("follow", b, "--peer", listen, "--secret-file", wrong, "--name", "b"))
    assert f"cannot seed {b} from {listen}" in line and "secret" in line
    assert not b.exists()  # no NODE/node.json: as if the command had not run
    # A directory that was there keeps exactly what it held.
    b.mkdir()
    (b / "notes.txt").write_text("mine")
    error_line(walctl("follow", b, "--peer", listen, "--secret-file", wrong, "--name", "b"))
    assert listing(str(b)) == ["notes.txt"]


# -- control.sock: gone after a clean stop; a stale one means "not running" ----------------


def test_control_socket_is_removed_on_a_clean_stop_and_a_stale_one_means_not_running(tmp_path, procs):
    a = init_node(tmp_path / "a", "--name", "a")
    p = procs("serve", a, "--lmtp", "127.0.0.1:0")
    assert os.path.exists(os.path.join(a, "control.sock"))
    assert p.stop() == 0
    assert not os.path.exists(os.path.join(a, "control.sock"))
    line = error_line(walctl("failover", a, "--to", "b"))
    assert line == (f"Error: node {a} is not running (nothing answers on {a}/control.sock): start it with "
                    f"`walctl serve {a}` or `walctl follow {a} ...`")
    p = procs("serve", a, "--lmtp", "127.0.0.1:0")
    p.stop(signal.SIGKILL)
    assert os.path.exists(os.path.join(a, "control.sock"))  # what a kill -9 leaves
    line = error_line(walctl("failover", a, "--to", "b"))
    assert f"node {a} is not running" in line


# -- failover to a name nobody has -----------------------------------------------------------


def test_failover_to_an_unknown_name_answers_at_once_listing_the_known_replicas(tmp_path, master, procs):
    node_a, listen, pa = master
    secret = os.path.join(node_a, "replication.secret")
    procs("follow", str(tmp_path / "b"), "--peer", listen, "--secret-file", secret, "--name", "b")
    deadline = time.monotonic() + 30
    while "b (connected)" not in error_line(walctl("failover", node_a, "--to", "typo")):
        assert time.monotonic() < deadline, "b never connected"
        time.sleep(0.1)
    line = error_line(walctl("failover", node_a, "--to", "typo", "--timeout", "600"))
    assert line == "Error: no replica named 'typo'; known replicas: b (connected)"
    st = json.loads(walctl("status", node_a, "--json").stdout)
    assert st["role"] == "master" and not st.get("writes_paused")
    with smtplib.LMTP("127.0.0.1", pa.lmtp_port, timeout=20) as c:  # writes were never paused
        c.ehlo("client.test")
        assert c.sendmail("x@example.org", ["bob@example.org"], b"Subject: hi\r\n\r\nhello\r\n") == {}


# -- a damaged log: one word, one advice ------------------------------------------------------


def _damage_frame_header(log: str, lsn: int) -> None:
    """Flip a byte in the frame header of record ``lsn`` (later records stay valid: damage, not a torn tail)."""
    from wal.format import SEGMENT_HEADER_SIZE
    from wal.segment import iter_frames, list_segments

    for _, name in list_segments(log):
        path = os.path.join(log, name)
        for off, fh, _payload in iter_frames(path, SEGMENT_HEADER_SIZE):
            if fh.lsn == lsn:
                with open(path, "r+b") as f:
                    f.seek(off + 8)
                    b = f.read(1)
                    f.seek(off + 8)
                    f.write(bytes([b[0] ^ 0xFF]))
                return
    raise AssertionError(f"no record {lsn}")


def deliver(node: str, mailbox: str, body: bytes) -> None:
    p = walctl("deliver", node, mailbox, "--create", input=body.decode())
    assert p.returncode == 0, p.stderr


def test_serve_on_a_damaged_log_points_at_verify_and_repair_as_verify_does(tmp_path):
    node = init_node(tmp_path / "a")
    for i in range(5):
        deliver(node, "user/bob/INBOX", f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode())
    log = os.path.join(node, "log.wal")
    _damage_frame_header(log, 3)
    serve_line = error_line(walctl("serve", node, "--lmtp", "127.0.0.1:0"))
    verify_line = error_line(walctl("verify", log))
    expected = "log is damaged at segment 00000000000000000001.seg, offset "
    for line in (serve_line, verify_line):
        assert line.startswith("Error: " + expected) and ", LSN 3: " in line
        assert line.endswith(f"Restore it from a replica, or cut it there with `walctl repair {log}` (the cut bytes "
                             f"are kept); `walctl verify {log}` shows the damage")
    assert serve_line == verify_line
    assert "corrupt" not in walctl("serve", node, "--lmtp", "127.0.0.1:0").stderr
    assert not os.path.exists(os.path.join(node, "control.sock"))


# -- node.toml errors: exit 2, the file and the key, no usage banner --------------------------


@pytest.mark.parametrize("section, line, key", [
    ("replication", 'sync_fallback = "sometimes"', "[replication] sync_fallback must be one of 'refuse', 'async'"),
    ("lmtp", 'unknown_recipients = "bounce"', "[lmtp] unknown_recipients must be one of 'create', 'reject'"),
    ("replication", 'listen = "localhost"', "[replication] listen must be HOST:PORT or empty"),
    ("replication", 'peers = ["127.0.0.1:7001", "nope"]', "[replication] peers must be HOST:PORT strings"),
    ("metrics", 'listen = "127.0.0.1:99999"', "[metrics] listen must be HOST:PORT or empty"),
    ("replication", 'sync_replica = 1', "unknown key 'sync_replica' in [replication]"),
    ("replication", 'sync_replicas = "one"', "[replication] sync_replicas must be an integer, got a string 'one'"),
    ("replication", 'sync_timeout_s = -1', "[replication] sync_timeout_s must not be negative"),
])
@pytest.mark.parametrize("command", ["serve", "follow"])
def test_a_bad_node_toml_exits_2_naming_the_file_and_the_key(tmp_path, section, line, key, command):
    node = init_node(tmp_path / "a")
    toml = os.path.join(node, "node.toml")
    with open(toml, "w") as f:
        f.write(f"[{section}]\n{line}\n")
    p = walctl(command, node, "--peer", "127.0.0.1:1")
    err = error_line(p, 2)
    assert err.startswith(f"Error: {toml}: ") and key in err, err
    assert "Usage:" not in p.stderr


def test_a_bad_address_flag_is_a_usage_error_naming_the_option(tmp_path):
    node = init_node(tmp_path / "a")
    line = error_line(walctl("serve", node, "--lmtp", "nowhere"), 2)
    assert "--lmtp" in line and "'nowhere' is not HOST:PORT" in line


# -- init ------------------------------------------------------------------------------------


def test_init_writes_the_name_into_node_toml_and_refuses_an_existing_node_saying_what_to_do(tmp_path):
    node = init_node(tmp_path / "a", "--name", "mx1")
    import tomllib

    with open(os.path.join(node, "node.toml"), "rb") as f:
        assert tomllib.load(f)["node"]["name"] == "mx1"
    with open(os.path.join(node, "node.json")) as f:
        assert json.load(f)["name"] == "mx1"
    before = {n: os.path.getmtime(os.path.join(node, n)) for n in os.listdir(node)}
    line = error_line(walctl("init", node, "--name", "other"))
    assert line == f"Error: {node} is already a node (master mx1); run it with `walctl serve {node}`, " \
                   f"or init another directory"
    assert {n: os.path.getmtime(os.path.join(node, n)) for n in os.listdir(node)} == before


# -- help texts ---------------------------------------------------------------------------------


def test_help_describes_the_tool_and_failover_names_its_option():
    text = walctl("--help").stdout
    assert "operator's command line for mailwal nodes and their logs" in text
    assert "inspect" not in text.lower().split("commands:")[0]
    text = walctl("failover", "--help").stdout
    assert "--to NAME" in text and "TARGET" not in text


# -- replay: names for people, numbers in JSON; an empty range says why ----------------------


@pytest.fixture
def mail_node(tmp_path):
    """A stopped node with two mailboxes, one renamed, and three messages."""
    node = init_node(tmp_path / "n")
    deliver(node, "user/bob/INBOX", b"From: Alice <alice@example.org>\r\nSubject: Hello there\r\n\r\nhi\r\n")  # 1, 2
    assert walctl("mailbox", node, "create", "user/bob/Old").returncode == 0  # 3
    assert walctl("mailbox", node, "rename", "user/bob/Old", "user/bob/Archive").returncode == 0  # 4
    deliver(node, "user/bob/Archive", "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nFrom: carol@example.org\r\n\r\nx\r\n"
            .encode())  # 5
    deliver(node, "user/bob/INBOX", b"Subject: second\r\n\r\nagain\r\n")  # 6
    return node


def test_replay_text_shows_type_and_mailbox_names_json_keeps_numbers_and_ids(mail_node):
    log = os.path.join(mail_node, "log.wal")
    lines = walctl("replay", log).stdout.splitlines()
    assert [line.split()[4] for line in lines] == ["MailboxCreated", "MessageAppended", "MailboxCreated",
                                                   "MailboxRenamed", "MessageAppended", "MessageAppended"]
    assert 'mailbox="user/bob/INBOX" uid=1' in lines[1] and "mailbox_id" not in lines[1]
    assert 'mailbox="user/bob/Archive" uid=1' in lines[4]
    docs = [json.loads(line) for line in walctl("replay", log, "--json").stdout.splitlines()]
    assert [d["type"] for d in docs] == [1, 4, 1, 2, 4, 4]
    assert [d["type_name"] for d in docs][3] == "MailboxRenamed"
    appended = docs[4]
    assert appended["mailbox"] == "user/bob/Archive" and len(appended["mailbox_id"]) == 32
    assert {"lsn", "epoch", "hash", "uid", "modseq", "guid", "body_size", "body_guid"} <= set(appended)


def test_replay_from_after_the_defining_record_resolves_from_the_store_or_shows_the_id(mail_node, tmp_path):
    log = os.path.join(mail_node, "log.wal")
    line = walctl("replay", log, "--from", "5", "--to", "5").stdout
    assert "MessageAppended" in line and 'mailbox="user/bob/Archive"' in line
    copy = str(tmp_path / "copy.wal")  # a bare log, no store beside it: the id it is
    shutil.copytree(log, copy)
    line = walctl("replay", copy, "--from", "5", "--to", "5").stdout
    assert "MessageAppended" in line and "mailbox_id=" in line and "mailbox=" not in line


def test_replay_of_an_empty_range_says_why(mail_node):
    log = os.path.join(mail_node, "log.wal")
    p = walctl("replay", log, "--from", "99999")
    assert p.returncode == 0 and p.stdout == ""
    assert p.stderr == "nothing to replay: the log ends at LSN 6, before --from 99999\n"
    p = walctl("replay", log, "--from", "5", "--to", "2")
    assert error_line(p, 2) == "Error: empty range: --to 2 is before --from 5" and p.stdout == ""
    assert walctl("cursor", log, "set", "indexer", "6").returncode == 0
    p = walctl("replay", log, "--from", "indexer", "--json")
    assert p.returncode == 0 and p.stdout == ""
    assert p.stderr == "nothing to replay: the log ends at LSN 6, cursor indexer is there already\n"
    assert "Exit status: 0" in walctl("replay", "--help").stdout


# -- messages: a header row, sender and subject --------------------------------------------------


def test_messages_has_column_headers_sender_and_subject(mail_node):
    lines = walctl("messages", mail_node, "user/bob/INBOX").stdout.splitlines()
    assert lines[0].split() == ["UID", "SIZE", "MODSEQ", "FLAGS", "GUID", "FROM", "SUBJECT"]
    assert lines[1].split()[0] == "1" and lines[1].endswith("Alice <alice@example.org>  Hello there")
    assert lines[2].split()[0] == "2" and lines[2].endswith("second")
    rows = json.loads(walctl("messages", mail_node, "user/bob/Archive", "--json").stdout)
    assert rows[0]["subject"] == "Grüße" and rows[0]["from"] == "carol@example.org"
    assert {"uid", "guid", "flags", "size", "internaldate_ms", "modseq"} <= set(rows[0])


def test_messages_of_a_running_node_read_the_same(mail_node, procs):
    procs("serve", mail_node, "--lmtp", "127.0.0.1:0")
    lines = walctl("messages", mail_node, "user/bob/INBOX").stdout.splitlines()
    assert lines[0].startswith("UID") and "Hello there" in lines[1]


# -- status in a pipe: nothing cut, both lags -----------------------------------------------------


def test_status_piped_is_not_cut_and_shows_both_lags(tmp_path, master, procs):
    node_a, listen, pa = master
    secret = os.path.join(node_a, "replication.secret")
    b = "b-with-a-rather-long-replica-name"
    procs("follow", str(tmp_path / "b"), "--peer", listen, "--secret-file", secret, "--name", b)
    deadline = time.monotonic() + 30
    while not any(r["connected"] for r in json.loads(walctl("status", node_a, "--json").stdout)["replicas"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    out = walctl("status", node_a).stdout  # stdout is a pipe
    assert not [line for line in out.splitlines() if "…" in line and "last_hash" not in line], out  # only the hash is short
    header = next(line for line in out.splitlines() if "durable lag" in line)
    for column in ("connected", "durable LSN", "applied LSN", "durable lag", "applied lag", "lag bytes"):
        assert column in header, header
    assert b in out and max(len(line) for line in out.splitlines()) > 80


# -- check --repair / scrub --repair: exit 0 only when the state after the repair verifies -----


@pytest.fixture
def pair(tmp_path):
    from tests.support.cluster import Cluster

    c = Cluster(tmp_path, names=("a", "b"))
    c["a"].start("serve")
    c["b"].start("follow")
    yield c
    c.stop()


def _edit_store(node, sql: str, *args) -> None:
    """An edit nobody logged (what a disk or a person does behind the node's back)."""
    import sqlite3

    with sqlite3.connect(f"{node.path}/store.sqlite") as db:
        mid = db.execute("SELECT mailbox_id FROM mailboxes WHERE name='user/u1/INBOX'").fetchone()[0]
        db.execute(sql, (mid, *args))


def test_check_repair_that_does_not_make_the_pair_equal_exits_1_saying_what_still_differs(pair):
    from tests.support.cluster import Mailer

    a, b = pair["a"], pair["b"]
    Mailer(pair, users=2).deliver(6)
    pair.wait_converged(["a", "b"])
    args = ["check", "--master", f"127.0.0.1:{a.listen}", "--replica", f"127.0.0.1:{b.listen}",
            "--secret-file", pair.secret]
    # The master's own copy is damaged (a row changed, its digest not): a resync copies the damage.
    _edit_store(a, "UPDATE messages SET flags='\\Flagged' WHERE mailbox_id=? AND uid=1")
    _edit_store(b, "UPDATE messages SET flags='\\Seen' WHERE mailbox_id=? AND uid=1")
    p = walctl(*args, "--repair")
    line = error_line(p)
    assert "1 mailbox(es) still differ after the repair" in line and "user/u1/INBOX" in line
    assert "run `walctl scrub` on the master" in line
    assert "after the repair, checkpoint at LSN" in p.stdout and "1 mismatched" in p.stdout.split("after the repair")[1]
    report = json.loads(walctl(*args, "--repair", "--json").stdout)
    assert report["after_repair"]["ok"] is False
    assert [m["mailbox"] for m in report["after_repair"]["mismatched"]] == ["user/u1/INBOX"]


def test_scrub_repair_that_leaves_damage_exits_1_saying_what_is_still_damaged(pair):
    from tests.support.cluster import Mailer

    a, b = pair["a"], pair["b"]
    Mailer(pair, users=2).deliver(6)
    pair.wait_converged(["a", "b"])
    import sqlite3

    with sqlite3.connect(f"{a.path}/store.sqlite") as db:  # the master's copy of one body is damaged
        guid = db.execute("SELECT m.guid FROM messages m JOIN mailboxes x ON x.mailbox_id=m.mailbox_id "
                          "WHERE x.name='user/u1/INBOX' AND m.uid=1").fetchone()[0]
        db.execute("UPDATE bodies SET data=? WHERE guid=?", (b"Subject: not what was delivered\r\n\r\n", guid))
    with sqlite3.connect(f"{b.path}/store.sqlite") as db:  # and the replica lost its copy
        db.execute("DELETE FROM bodies WHERE guid=?", (guid,))
    p = walctl("scrub", b.path, "--repair")
    line = error_line(p)
    assert "1 mailbox(es) still damaged after the repair: user/u1/INBOX" in line, line
    assert "(still damaged after the repair)" in p.stdout
    out = json.loads(walctl("scrub", b.path, "--repair", "--json").stdout)
    assert out["ok"] is False and list(out["after_repair"]) == ["user/u1/INBOX"]


def test_pyproject_license_is_an_spdx_expression():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["license"] == "MIT"  # a string: no deprecation warning from setuptools
    assert "setuptools>=77" in project["build-system"]["requires"]  # the first setuptools to read one


# -- the quick start, pasted into a shell in an empty directory outside the checkout -----------

QUICK_START = """\
walctl init a --name a
walctl serve a --lmtp 127.0.0.1:2424 --listen 127.0.0.1:7001 --peer 127.0.0.1:7001 --peer 127.0.0.1:7002 &
walctl follow b --listen 127.0.0.1:7002 --peer 127.0.0.1:7001 --peer 127.0.0.1:7002 --secret-file a/replication.secret --name b --auto-reconcile &
walctl status a
walctl failover a --to b
"""


def test_the_quick_start_works_pasted_into_a_shell_in_an_empty_directory(tmp_path):
    """The README's quick start as written (free ports instead of 2424, 7001 and 7002),
    with the venv's walctl on PATH, in a directory that is not the checkout."""
    assert not str(tmp_path).startswith(ROOT)
    ports = {"2424": free_port(), "7001": free_port(), "7002": free_port()}
    script = QUICK_START
    for fixed, port in ports.items():
        script = script.replace(f"127.0.0.1:{fixed}", f"127.0.0.1:{port}")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("PYTHONPATH", None)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    # b, promoted, opens the master's default LMTP address (CTL-11): held busy here, as the
    # reader's own master holds it when the block runs unchanged (or something else holds it).
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", 2424))
        held.listen()
    except OSError:
        held.close()
    with open(out, "wb") as o, open(err, "wb") as e:
        shell = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=o, stderr=e,
                                 stdin=subprocess.DEVNULL, start_new_session=True)  # its own process group
    try:
        rc = shell.wait(timeout=120)
        stdout, stderr = out.read_text(), err.read_text()
        assert rc == 0, f"{stdout}\n{stderr}"
        assert_no_traceback(stderr, what="the quick start")
        assert not [line for line in stderr.splitlines() if line.startswith("Error:")], stderr
        assert "b is master in epoch 2" in stdout and "node a (master)" in stdout
        assert "node b (replica) at " in stdout and ": no LMTP front" in stdout  # a replica takes no port
        assert sorted(os.listdir(tmp_path)) == ["a", "b", "err.txt", "out.txt"]
        assert not (tmp_path / "b" / "replication.secret").exists()  # the secret was not copied
        st = {n: json.loads(walctl("status", tmp_path / n, "--json").stdout) for n in ("a", "b")}
        assert st["b"]["role"] == "master" and st["a"]["role"] == "replica"
        deadline = time.monotonic() + 20  # says once that it cannot have the LMTP address yet
        while not any(e["kind"] == "lmtp-unavailable" and "127.0.0.1:2424" in e["text"] for e in st["b"]["events"]):
            assert time.monotonic() < deadline, st["b"]["events"]
            time.sleep(0.5)
            st["b"] = json.loads(walctl("status", tmp_path / "b", "--json").stdout)
    finally:
        held.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.killpg(shell.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    assert not (tmp_path / "a" / "control.sock").exists() and not (tmp_path / "b" / "control.sock").exists()
    assert_no_traceback(err.read_text(), what="the quick start's nodes")


def test_failover_to_an_unknown_name_waits_for_peers_that_do_not_answer_then_names_them(tmp_path, procs):
    a = init_node(tmp_path / "a", "--name", "a")
    listen, silent = addr(free_port()), addr(free_port())  # nothing listens on the second peer
    procs("serve", a, "--lmtp", "127.0.0.1:0", "--listen", listen, "--peer", listen, "--peer", silent)
    line = error_line(walctl("failover", a, "--to", "b", "--timeout", "1"))
    assert line == f"Error: no replica named 'b'; known replicas: none has connected yet; peers that did not " \
                   f"answer: {silent}"
