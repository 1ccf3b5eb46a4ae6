"""A ReplicaLink passed to run_replica again names the address it now connects to
(found by walctl torture: after a divergence the cluster reuses its link, and the
stale master address sent every retry of the diverged tail to a former master)."""

from functools import partial

import anyio
import pytest

from engine.replication.receiver import ReplicaLink, ReplicaSettings, run_replica
from engine.replication.sender import ReplicationHub, serve_replication
from wal import Log

pytestmark = pytest.mark.anyio

SECRET = b"live-replication-test-secret-42"


async def test_a_reused_link_names_the_master_it_streams_from(tmp_path):
    master = Log.create(str(tmp_path / "master.wal"))
    try:
        master.append(1, b"one")
        hub = ReplicationHub(master)
        link = ReplicaLink("r1", "127.0.0.1:1")  # what a previous run_replica left behind
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                host, port = await tg.start(partial(serve_replication, master, hub, secret=SECRET,
                                                    heartbeat_interval_s=0.1))
                await tg.start(partial(run_replica, str(tmp_path / "r1.wal"), host, port, SECRET, "r1", link=link,
                                       settings=ReplicaSettings(backoff_initial_s=0.02, backoff_max_s=0.3)))
                await link.wait_durable(master.last_lsn)
                assert link.state == "streaming"
                assert link.master == f"{host}:{port}"
                tg.cancel_scope.cancel()
    finally:
        master.close()
