"""Log shipping over real sockets on 127.0.0.1 with real logs (real fsync).

Covers REP-6..REP-13, REP-19, REP-20 and the invariants INV-PrefixAgreement,
INV-NoSilentTruncate, INV-CursorMonotonic and INV-AuthFirst end to end.
"""

from __future__ import annotations

import os
import struct
import uuid
from functools import partial

import anyio
import pytest

from engine import replication as P
from engine.errors import (
    AuthenticationError,
    BehindRetentionError,
    DivergedError,
    ReplicaAheadError,
    ReplicationTimeoutError,
    SeedUnavailableError,
    WrongLogError,
)
from engine.replication.receiver import ReplicaHooks, ReplicaSettings, run_replica
from engine.replication.secret import create_secret, load_secret
from engine.errors import SecretFileError
from engine.replication.sender import ReplicationHub, serve_replication
from wal import Log, LogReader
from wal.history import read_history_file

pytestmark = pytest.mark.anyio

SECRET = b"live-replication-test-secret-42"
SERVER = dict(secret=SECRET, heartbeat_interval_s=0.1, idle_timeout_s=3.0, handshake_timeout_s=3.0)
REPLICA = dict(settings=ReplicaSettings(idle_timeout_s=3.0, handshake_timeout_s=3.0, connect_timeout_s=3.0,
                                        backoff_initial_s=0.02, backoff_max_s=0.3))


@pytest.fixture
def master(tmp_path):
    log = Log.create(str(tmp_path / "master.wal"))
    yield log
    log.close()


def records(path_or_log) -> list[tuple]:
    path = path_or_log.path if isinstance(path_or_log, Log) else str(path_or_log)
    reader = LogReader(path)
    return [(r.lsn, r.epoch, r.type, r.payload, r.hash) for r in reader.records(reader.first_lsn())]


def assert_identical(master: Log, replica_path) -> None:
    """INV-PrefixAgreement at its limit: same records, same last LSN and hash."""
    got = records(replica_path)
    want = [r for r in records(master) if r[0] >= (got[0][0] if got else 1)]
    assert got == want
    assert got[-1][0] == master.last_lsn and got[-1][4] == master.last_hash


async def append_from_threads(log: Log, threads: int, each: int, size: int = 64) -> None:
    def work(t: int) -> None:
        for i in range(each):
            log.append(1 + t, os.urandom(size // 2).hex().encode())

    async with anyio.create_task_group() as tg:
        for t in range(threads):
            tg.start_soon(anyio.to_thread.run_sync, work, t)


def copy_records(src: Log, dst: Log, first: int, last: int) -> None:
    dst.append_records(list(src.read(first, last)))


async def test_two_replicas_and_a_late_one_end_identical(tmp_path, master):
    """Appends from 4 threads while two replicas follow; a third joins late."""
    hub = ReplicationHub(master)
    paths = [tmp_path / f"r{i}.wal" for i in (1, 2, 3)]
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(partial(serve_replication, master, hub, **SERVER))
            links = [await tg.start(partial(run_replica, str(p), host, port, SECRET, f"r{i}", **REPLICA))
                     for i, p in ((1, paths[0]), (2, paths[1]))]
            await append_from_threads(master, 4, 150)
            links.append(await tg.start(partial(run_replica, str(paths[2]), host, port, SECRET, "r3", **REPLICA)))
            await append_from_threads(master, 2, 50)
            last = master.last_lsn
            assert last == 700
            for link in links:
                await link.wait_durable(last)
            assert await hub.wait_replicated(last, 3, timeout=10) == ["r1", "r2", "r3"]
            st = hub.replica("r2")
            assert st.connected and st.durable_lsn == last and st.lag_records == 0 and st.peer.startswith("127.0.0.1")
            assert links[0].as_dict()["state"] == "streaming" and links[0].master_lsn == last
            tg.cancel_scope.cancel()
    for p in paths:
        assert_identical(master, p)
    # REP-13: every replica's durable LSN was persisted as its cursor, and survives a restart.
    assert master.cursors.list() == {"replica.r1": 700, "replica.r2": 700, "replica.r3": 700}
    after = ReplicationHub(master).status()
    assert [(s.name, s.connected, s.durable_lsn, s.lag_records) for s in after] == [
        ("r1", False, 700, 0), ("r2", False, 700, 0), ("r3", False, 700, 0)]


async def test_replica_restart_resumes_without_gaps_or_duplicates(tmp_path, master):
    """REP-11, REP-19: a stopped replica resumes at its durable LSN."""
    hub = ReplicationHub(master)
    path = str(tmp_path / "r1.wal")
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(partial(serve_replication, master, hub, **SERVER))
            for round_ in range(3):
                await append_from_threads(master, 2, 40)
                with anyio.CancelScope() as replica_scope:
                    async with anyio.create_task_group() as rtg:
                        link = await rtg.start(partial(run_replica, path, host, port, SECRET, "r1", **REPLICA))
                        await link.wait_durable(master.last_lsn)
                        replica_scope.cancel()
                assert link.state == "stopped" and not link.connected
            tg.cancel_scope.cancel()
    assert_identical(master, path)
    assert hub.replica("r1").connects == 3


async def test_records_durable_hook_and_applied_lsn(tmp_path, master):
    """REP-12: Acks carry the replica's applied LSN from its hook."""
    hub = ReplicationHub(master)
    seen: list[int] = []
    applied = {"lsn": 0}

    async def on_durable(recs):
        seen.extend(r.lsn for r in recs)
        applied["lsn"] = recs[-1].lsn - 1  # the store lags one record behind

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(partial(serve_replication, master, hub, **SERVER))
            link = await tg.start(partial(run_replica, str(tmp_path / "r.wal"), host, port, SECRET, "r1",
                                          hooks=ReplicaHooks(on_records_durable=on_durable,
                                                             applied_lsn=lambda: applied["lsn"]), **REPLICA))
            await append_from_threads(master, 1, 30)
            await link.wait_durable(30)
            await hub.wait_replicated(30, 1, 10)
            while hub.replica("r1").applied_lsn != 29:
                await hub.wait_changed()
            tg.cancel_scope.cancel()
    assert seen == list(range(1, 31))


async def test_seed_with_a_snapshot(tmp_path):
    """REP-10: the master no longer holds LSN 1, so a new replica gets a snapshot."""
    master = Log.create(str(tmp_path / "m.wal"), segment_max_bytes=4096)
    try:
        for i in range(300):
            master.append(1, b"r%04d" % i + b"." * 90)
        master.drop_before(150)
        assert master.first_lsn > 1
        snap_lsn = master.last_lsn
        snap_hash = master.hash_at(snap_lsn)
        chunks = [b"header", os.urandom(P.SNAPSHOT_CHUNK_MAX_BYTES + 1000), b"", b"tail"]
        made = []

        def make_snapshot():
            made.append(1)
            return snap_lsn, snap_hash, master.log_id, master.epoch, iter(chunks)

        sink_dir = tmp_path / "snap"
        sink_dir.mkdir()

        class Sink:
            def __init__(self, meta):
                self.meta = meta
                self.f = open(sink_dir / "partial", "wb")

            def write(self, data):
                self.f.write(data)

            def commit(self):
                self.f.flush()
                os.fsync(self.f.fileno())
                self.f.close()
                os.rename(sink_dir / "partial", sink_dir / f"snapshot-{self.meta.lsn}")

            def abort(self):
                self.f.close()

        hub = ReplicationHub(master)
        path = str(tmp_path / "new.wal")
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                host, port = await tg.start(partial(serve_replication, master, hub, make_snapshot=make_snapshot, **SERVER))
                link = await tg.start(partial(run_replica, path, host, port, SECRET, "fresh", hooks=ReplicaHooks(snapshot_sink=Sink), **REPLICA))
                await append_from_threads(master, 1, 20)
                await link.wait_durable(master.last_lsn)
                await hub.wait_replicated(master.last_lsn, 1, 10)
                assert link.log.first_lsn == snap_lsn + 1
                tg.cancel_scope.cancel()
        assert (sink_dir / f"snapshot-{snap_lsn}").read_bytes() == b"".join(chunks)
        assert_identical(master, path)
        assert made == [1]
        assert master.cursors.get("replica.fresh") == master.last_lsn
    finally:
        master.close()


async def test_seed_refused_without_a_snapshot_source(tmp_path):
    """REP-10: no LSN 1 and no snapshot: refused, and no log is created."""
    master = Log.create(str(tmp_path / "m.wal"), segment_max_bytes=4096)
    try:
        for i in range(200):
            master.append(1, b"x" * 100)
        master.drop_before(100)
        hub = ReplicationHub(master)
        path = tmp_path / "new.wal"
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                host, port = await tg.start(partial(serve_replication, master, hub, **SERVER))
                with pytest.raises(SeedUnavailableError):
                    await run_replica(str(path), host, port, SECRET, "fresh", **REPLICA)
                tg.cancel_scope.cancel()
        assert not path.exists()
        assert "refused (no-seed)" in hub.replica("fresh").last_error
    finally:
        master.close()


async def _refused(master: Log, replica_path: str, expected: type) -> Exception:
    hub = ReplicationHub(master)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(partial(serve_replication, master, hub, **SERVER))
            with pytest.raises(expected) as info:
                await run_replica(replica_path, host, port, SECRET, "r1", **REPLICA)
            tg.cancel_scope.cancel()
    return info.value


async def test_diverged_replica_is_refused_with_the_last_common_lsn(tmp_path, master):
    """REP-8, REP-9, INV-NoSilentTruncate."""
    for i in range(500):
        master.append(1, b"m%d" % i)
    path = str(tmp_path / "r.wal")
    with Log.create(path, log_id=master.log_id) as rep:
        copy_records(master, rep, 1, 313)
        for i in range(40):
            rep.append(1, b"other %d" % i)
        before = (rep.last_lsn, rep.last_hash)
    err = await _refused(master, path, DivergedError)
    assert err.last_common_lsn == 313 and err.replica_lsn == 353
    assert "last common LSN 313" in str(err)
    with Log.open(path) as rep:
        assert (rep.last_lsn, rep.last_hash) == before
    assert master.cursors.list() == {}  # a refused replica pins nothing on the master


async def test_replica_ahead_is_refused_and_not_rolled_back(tmp_path, master):
    for i in range(50):
        master.append(1, b"m%d" % i)
    path = str(tmp_path / "r.wal")
    with Log.create(path, log_id=master.log_id) as rep:
        copy_records(master, rep, 1, 50)
        rep.append(1, b"only on the replica")
        before = (rep.last_lsn, rep.last_hash)
    err = await _refused(master, path, ReplicaAheadError)
    assert (err.replica_lsn, err.master_lsn) == (51, 50)
    with Log.open(path) as rep:
        assert (rep.last_lsn, rep.last_hash) == before


async def test_replica_of_another_log_is_refused(tmp_path, master):
    master.append(1, b"x")
    path = str(tmp_path / "r.wal")
    with Log.create(path, log_id=uuid.uuid4()) as rep:
        rep.append(1, b"x")
    await _refused(master, path, WrongLogError)


async def test_replica_behind_retention_is_refused(tmp_path):
    master = Log.create(str(tmp_path / "m.wal"), segment_max_bytes=4096)
    try:
        for i in range(200):
            master.append(1, b"y" * 100)
        path = str(tmp_path / "r.wal")
        with Log.create(path, log_id=master.log_id) as rep:
            copy_records(master, rep, 1, 10)
        master.drop_before(100)
        err = await _refused(master, path, BehindRetentionError)
        assert "no longer holds LSN 11" in str(err)
    finally:
        master.close()


async def test_wait_replicated_times_out_with_a_typed_error(master):
    hub = ReplicationHub(master)
    master.append(1, b"x")
    assert await hub.wait_replicated(1, 0, timeout=0) == []
    with anyio.fail_after(5):
        with pytest.raises(ReplicationTimeoutError) as info:
            await hub.wait_replicated(1, 1, timeout=0.05)
    assert info.value.acked == [] and info.value.wanted == 1


async def test_fence_then_promote(tmp_path, master):
    """REP-14, REP-15 (minimal): fence both replicas, promote one."""
    hub = ReplicationHub(master)
    promoted_to: list[int] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(partial(serve_replication, master, hub, **SERVER))
            l1 = await tg.start(partial(run_replica, str(tmp_path / "r1.wal"), host, port, SECRET, "r1",
                                        hooks=ReplicaHooks(on_promote=promoted_to.append), **REPLICA))
            l2 = await tg.start(partial(run_replica, str(tmp_path / "r2.wal"), host, port, SECRET, "r2", **REPLICA))
            await append_from_threads(master, 2, 30)
            drained = await hub.fence(timeout=10)
            assert drained == {"r1": 60, "r2": 60}
            assert l1.state == "fenced"
            reply = await hub.promote("r1", 2, timeout=10)
            assert (reply.epoch, reply.last_lsn, reply.last_hash) == (2, 60, master.last_hash)
            await l1.wait_state("promoted")
            assert promoted_to == [2] and l1.log.epoch == 2
            assert [(e.epoch, e.first_lsn) for e in read_history_file(l1.log.path)][-1] == (2, 61)
            l1.log.close()
            await l2.wait_durable(60)
            tg.cancel_scope.cancel()
    assert_identical(master, tmp_path / "r2.wal")


async def test_bad_peers_are_refused_while_a_good_replica_keeps_streaming(tmp_path, master, caplog):
    """REP-3, REP-5, REP-20, INV-AuthFirst on the real port."""
    caplog.set_level("INFO", logger="mailwal.replication")
    hub = ReplicationHub(master)
    server = dict(SERVER, handshake_timeout_s=0.5)
    with anyio.fail_after(40):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(partial(serve_replication, master, hub, **server))
            good = await tg.start(partial(run_replica, str(tmp_path / "good.wal"), host, port, SECRET, "good", **REPLICA))
            tg.start_soon(append_from_threads, master, 1, 300)

            # Wrong secret: typed error on the replica, no log created, nothing learnt.
            with pytest.raises(AuthenticationError):
                await run_replica(str(tmp_path / "bad.wal"), host, port, b"not-the-right-secret!!", "bad", **REPLICA)
            assert not (tmp_path / "bad.wal").exists()

            async def raw(data: bytes) -> bytes:
                async with await anyio.connect_tcp(host, port) as s:
                    if data:
                        await s.send(data)
                    got = b""
                    while True:
                        try:
                            got += await s.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                            return got

            assert await raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""          # junk
            assert await raw(P.PREAMBLE + struct.pack(">IB", 1 << 20, 1)) == b""      # oversized before auth
            assert await raw(b"") == b""                                               # silent: handshake timeout
            hello = P.encode_message(P.Hello(os.urandom(32)))
            bogus = P.encode_message(P.Proof(os.urandom(32)))
            got = await raw(P.PREAMBLE + hello + bogus)                                # bad proof
            assert master.log_id.bytes not in got
            session = P.ReplicationSession(P.Role.REPLICA, SECRET)
            session.send(P.Hello(os.urandom(32)))  # mirror the conversation to parse the reply
            session.receive_data(got)
            assert isinstance(session.next_event(), P.Challenge)
            session.send(session.proof())
            refuse = session.next_event()
            assert isinstance(refuse, P.Refuse) and refuse.code == "auth"

            # Authenticated, then out of order (an Ack before any Position): closed, logged, nothing else.
            async with await anyio.connect_tcp(host, port) as s:
                me = P.ReplicationSession(P.Role.REPLICA, SECRET)
                await s.send(me.send(P.Hello(os.urandom(32))))
                for expected in (P.Challenge, P.Proof):
                    while (ev := me.next_event()) is P.NEED_DATA:
                        me.receive_data(await s.receive())
                    assert isinstance(ev, expected)
                    if expected is P.Challenge:
                        await s.send(me.send(me.proof()))
                await s.send(P.encode_message(P.Ack(0, 0)))
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError)):
                    await s.receive()
            assert "replica may not send Ack in state REQUEST" in caplog.text  # the logged reason
            assert "bad preamble" in caplog.text and "before authentication" in caplog.text

            await good.wait_durable(300)
            assert hub.replica("good").connects == 1 and good.connects == 1
            assert [s.name for s in hub.status()] == ["good"]
            tg.cancel_scope.cancel()
    assert_identical(master, tmp_path / "good.wal")


async def test_same_name_reconnect_supersedes_the_old_connection(tmp_path, master):
    hub = ReplicationHub(master)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(partial(serve_replication, master, hub, **SERVER))
            a = await tg.start(partial(run_replica, str(tmp_path / "a.wal"), host, port, SECRET, "same", **REPLICA))
            master.append(1, b"1")
            await a.wait_durable(1)
            with Log.create(str(tmp_path / "b.wal"), log_id=master.log_id) as b:
                copy_records(master, b, 1, 1)
            b_link = await tg.start(partial(run_replica, str(tmp_path / "b.wal"), host, port, SECRET, "same", **REPLICA))
            master.append(1, b"2")
            await b_link.wait_durable(2)
            assert hub.replica("same").connects >= 2
            tg.cancel_scope.cancel()


def test_secret_files(tmp_path):
    path = tmp_path / "replication.secret"
    secret = create_secret(path)
    assert load_secret(path) == secret and len(secret) == 64
    assert (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(SecretFileError, match="already exists"):
        create_secret(path)
    os.chmod(path, 0o644)
    with pytest.raises(SecretFileError, match="chmod 600"):
        load_secret(path)
    short = tmp_path / "short"
    short.write_bytes(b"abc\n")
    os.chmod(short, 0o600)
    with pytest.raises(SecretFileError, match="at least 16"):
        load_secret(short)
    with pytest.raises(SecretFileError, match="cannot read"):
        load_secret(tmp_path / "missing")
