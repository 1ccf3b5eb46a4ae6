"""End to end with real processes on 127.0.0.1: replication (REP-n) and failover (CTL-4)."""

import glob
import json
import os
import random
import socket
import time

import pytest

from tests.support.cluster import Cluster, Mailer, assert_all_present_once, walctl


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


def test_replicas_survive_kills_and_late_start(cluster):
    """(d)+(g): replicas reconnect by themselves, resume, and end identical."""
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    a.start("serve")
    b.start("follow")
    mailer = Mailer(cluster, threads=4)
    mailer.start()
    rng = random.Random(7)
    time.sleep(1.0)
    for _ in range(2):  # a replica killed at a random moment and restarted
        time.sleep(rng.uniform(0.2, 0.8))
        b.kill()
        time.sleep(rng.uniform(0.1, 0.5))
        b.start("follow")
    c.start("follow")  # a replica started long after the master
    time.sleep(rng.uniform(0.2, 0.6))
    a.kill()  # the master itself dies; clients see unknown outcomes and retry
    time.sleep(0.3)
    a.start("serve")
    time.sleep(1.0)
    mailer.stop()
    sts = cluster.wait_converged(["a", "b", "c"])
    assert len({s["log_id"] for s in sts.values()}) == 1
    assert len(set(cluster.digests(["a", "b", "c"]).values())) == 1
    n = assert_all_present_once(a, mailer)
    for node in (b, c):
        assert_all_present_once(node, mailer)
    assert n > 20
    reps = {r["name"]: r for r in a.status()["replicas"]}
    assert reps["b"]["connected"] and reps["c"]["connected"]
    assert reps["b"]["durable_lsn"] == sts["a"]["last_lsn"]


def test_soft_failover_under_load(cluster):
    """(c): drain, promote, the old master follows; nothing lost or doubled."""
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    a.start("serve")
    b.start("follow")
    c.start("follow")
    mailer = Mailer(cluster, threads=4)
    mailer.start()
    time.sleep(1.5)
    result = a.control("failover", to="b")
    assert result["to"] == "b" and result["epoch"] == 2
    assert result["refused_writes_s"] < 30
    time.sleep(1.5)
    mailer.stop()
    sts = cluster.wait_converged(["a", "b", "c"])
    assert sts["b"]["role"] == "master" and sts["a"]["role"] == "replica" and sts["c"]["role"] == "replica"
    assert sts["a"]["master"].endswith(f":{b.listen}") and sts["c"]["master"].endswith(f":{b.listen}")
    assert assert_all_present_once(b, mailer) > 10
    assert any(o["node"] == "b" and o["outcome"] == "acked" for o in mailer.ops)  # writes went on at the new master
    assert len(set(cluster.digests(["a", "b", "c"]).values())) == 1
    p = walctl("reconcile", os.path.join(a.path, "log.wal"), os.path.join(b.path, "log.wal"), "--json", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["diverged"] is False


def test_hard_failover_diverged_tail_is_reconciled(cluster):
    """(e): messages only the old master had come back; UIDs collide and are renumbered."""
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    a.start("serve")
    b.start("follow")
    mailer = Mailer(cluster, threads=2, users=2)
    mailer.deliver(20)
    cluster.wait_converged(["a", "b"])
    with pytest.raises(Exception, match="reachable and serving"):
        b.control("promote")  # refused while its master serves (no --force)
    b.kill()  # replication to b cut
    mailer.deliver(10)  # acknowledged by a only
    a.kill()
    b.start("follow")
    promoted = b.control("promote")
    assert promoted["epoch"] == 2
    uidvalidity = {m["name"]: m["uidvalidity"] for m in json.loads(walctl("mailbox", b.path, "list", "--json").stdout)}
    mailer.deliver(10)  # acknowledged by b: same mailboxes, so UIDs collide with a's tail
    a.start("follow")  # the old master comes back as a follower
    deadline = time.time() + 30
    while time.time() < deadline:
        st = a.status()
        if st.get("events") and any(e["kind"] == "reconciled" for e in st["events"]):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no reconcile: {a.status().get('events')}")
    sts = cluster.wait_converged(["a", "b"])
    assert sts["b"]["role"] == "master"
    assert assert_all_present_once(b, mailer) == 40
    assert_all_present_once(a, mailer)
    tails = glob.glob(os.path.join(a.path, "diverged", "*.wal"))
    assert len(tails) == 1  # the diverged tail is kept
    reports = glob.glob(os.path.join(b.path, "reconcile", "*.json"))
    assert reports
    after = {m["name"]: m["uidvalidity"] for m in json.loads(walctl("mailbox", b.path, "list", "--json").stdout)}
    assert after == uidvalidity  # UIDVALIDITY unchanged under the renumber strategy
    assert len(set(cluster.digests(["a", "b"]).values())) == 1


def test_junk_and_bad_secret_on_the_cluster_port(cluster):
    a, b = cluster["a"], cluster["b"]
    a.start("serve")
    b.start("follow")
    for junk in (b"GET / HTTP/1.1\r\n\r\n", b"\x00" * 64, b"MWREPL\x00\x01" + b"\xff" * 100000):
        with socket.create_connection(("127.0.0.1", a.listen), timeout=5) as s:
            s.sendall(junk)
            s.settimeout(10)
            try:
                while s.recv(65536):
                    pass
            except (ConnectionResetError, socket.timeout):
                pass
    from engine.cluster.control import ControlClient, ControlError

    with pytest.raises(ControlError):
        ControlClient.tcp("127.0.0.1", a.listen, b"not the secret at all")
    mailer = Mailer(cluster, threads=1)
    mailer.deliver(5)
    cluster.wait_converged(["a", "b"])
    assert a.status()["replicas"][0]["connected"]


def test_sync_replication_refuses_without_replicas(cluster):
    a, b = cluster["a"], cluster["b"]
    a.start("serve", extra=["--sync-replicas", "1", "--sync-timeout", "0.5"])
    mailer = Mailer(cluster, threads=1)
    assert mailer.send_one(a.lmtp, "u1", b"Subject: x\r\n\r\nno replica yet\r\n") == "temp"
    b.start("follow")
    cluster.wait_converged(["a", "b"])
    assert mailer.send_one(a.lmtp, "u1", b"Subject: y\r\n\r\nwith a replica\r\n") == "acked"
    st = a.status()
    assert st["sync_replicas"] == 1 and "synchronous" in st["sync_mode"]


def test_retention_marks_a_lost_replica_and_reseed_brings_it_back(cluster):
    """Retention keeps what a replica needs, up to a ceiling; past it the replica is lost and reseeded."""
    from engine.node import read_config, write_config

    a, b = cluster["a"], cluster["b"]
    cfg = read_config(a.path)
    cfg.segment_max_bytes = 32 * 1024
    write_config(a.path, cfg)
    a.start("serve", extra=["--retention-max-bytes", str(96 * 1024)])
    b.start("follow")
    mailer = Mailer(cluster, threads=2)
    big = b"x" * 3000
    for i in range(60):
        assert mailer.send_one(a.lmtp, f"u{i % 3}", b"Subject: %d\r\n\r\n%s\r\n" % (i, big)) == "acked"
    cluster.wait_converged(["a", "b"])
    deadline = time.time() + 30
    while a.status()["log_bytes"] > 96 * 1024 + 40 * 1024 and time.time() < deadline:
        time.sleep(0.2)
    st = a.status()
    assert st["log_bytes"] <= 96 * 1024 + 40 * 1024, st["log_bytes"]  # old segments went: b had them
    first_lsn_before = st["last_lsn"]
    b.kill()
    for i in range(60):
        assert mailer.send_one(a.lmtp, f"u{i % 3}", b"Subject: more %d\r\n\r\n%s\r\n" % (i, big)) == "acked"
    deadline = time.time() + 30
    while not any(e["kind"] == "replica-lost" for e in a.status()["events"]) and time.time() < deadline:
        time.sleep(0.2)
    assert any(e["kind"] == "replica-lost" for e in a.status()["events"])
    b.start("follow")
    deadline = time.time() + 30
    while not any(e["kind"] == "lost" for e in b.status()["events"]) and time.time() < deadline:
        time.sleep(0.2)
    assert any(e["kind"] == "lost" for e in b.status()["events"])
    assert b.status()["last_lsn"] < a.status()["last_lsn"]  # b was never silently skipped ahead
    b.kill()
    b.start("follow", extra=["--reseed"])
    cluster.wait_converged(["a", "b"])
    assert len(set(cluster.digests(["a", "b"]).values())) == 1
    assert first_lsn_before > 0
    assert glob.glob(os.path.join(b.path, "lost-*"))


def test_double_failover_and_back(cluster):
    """A -> B -> A: epochs 2 and 3; every node ends identical, nothing lost."""
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    a.start("serve")
    b.start("follow")
    c.start("follow")
    mailer = Mailer(cluster, threads=2)
    mailer.start()
    time.sleep(0.8)
    assert a.control("failover", to="b")["epoch"] == 2
    time.sleep(0.8)
    cluster.wait_converged(["a", "b", "c"], timeout=30)
    assert b.control("failover", to="a")["epoch"] == 3
    time.sleep(0.8)
    mailer.stop()
    sts = cluster.wait_converged(["a", "b", "c"])
    assert sts["a"]["role"] == "master" and sts["a"]["epoch"] == 3
    assert assert_all_present_once(a, mailer) > 5
    assert len(set(cluster.digests(["a", "b", "c"]).values())) == 1
    for x, y in (("a", "b"), ("a", "c")):
        p = walctl("reconcile", os.path.join(cluster[x].path, "log.wal"), os.path.join(cluster[y].path, "log.wal"),
                   "--json", check=False)
        assert p.returncode == 0 and json.loads(p.stdout)["diverged"] is False, p.stdout + p.stderr


def test_diverged_tail_listed_until_the_operator_reconciles_it(cluster):
    """Without auto-reconcile the tail waits in status; `walctl reconcile --apply` on the running master takes it."""
    a, b = cluster["a"], cluster["b"]
    a.start("serve", auto_reconcile=False)
    b.start("follow", auto_reconcile=False)
    mailer = Mailer(cluster, threads=1, users=2)
    mailer.deliver(6)
    cluster.wait_converged(["a", "b"])
    b.kill()
    mailer.deliver(4)  # only on a
    a.kill()
    b.start("follow", auto_reconcile=False)
    b.control("promote")
    mailer.deliver(3)  # only on b
    a.start("follow", auto_reconcile=False)
    cluster.wait_converged(["a", "b"])
    tails = a.status()["diverged_tails"]
    assert len(tails) == 1 and tails[0]["records"] == 4 and not tails[0]["reconciled"]
    p = walctl("reconcile", os.path.join(b.path, "log.wal"), tails[0]["path"], "--json", check=False)
    assert p.returncode == 1 and json.loads(p.stdout)["diverged"] is True
    p = walctl("reconcile", os.path.join(b.path, "log.wal"), tails[0]["path"], "--apply", b.path, "--json",
               check=False)
    assert p.returncode == 1, p.stdout + p.stderr  # still "diverged" (REC exit codes); the apply succeeded
    assert json.loads(p.stdout)["apply"]["failed"] == 0
    assert a.status()["diverged_tails"] == []
    cluster.wait_converged(["a", "b"])
    assert assert_all_present_once(b, mailer) == 13
    assert_all_present_once(a, mailer)


def test_a_second_master_refuses_to_serve(cluster):
    """After a hard failover, the old master started with `serve` refuses: no split brain."""
    a, b = cluster["a"], cluster["b"]
    a.start("serve")
    b.start("follow")
    cluster.wait_converged(["a", "b"])
    a.kill()
    b.control("promote")
    with pytest.raises(AssertionError, match="exited"):
        a.start("serve")
    assert "already the master" in open(a.log.name).read()
    a.start("follow")
    cluster.wait_converged(["a", "b"])


def test_metrics_count_deliveries_refusals_and_group_commits(cluster):
    import urllib.request

    from tests.support.cluster import free_port

    a, b = cluster["a"], cluster["b"]
    port = free_port()
    a.start("serve", extra=["--metrics", f"127.0.0.1:{port}"])
    b.start("follow")
    mailer = Mailer(cluster, threads=1)
    mailer.deliver(5)
    assert mailer.send_one(b.lmtp, "u1", b"Subject: to a replica\r\n\r\nx\r\n") == "temp"
    cluster.wait_converged(["a", "b"])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("mailwal_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values['mailwal_deliveries_total{outcome="delivered"}'] == 5
    assert values["mailwal_fsync_seconds_count"] >= 1
    assert values["mailwal_group_commit_records_sum"] >= 5
    assert values["mailwal_append_seconds_count"] == 5
    assert values["mailwal_replicas_connected"] == 1
    assert values['mailwal_replica_lag_records{kind="durable",replica="b"}'] == 0
