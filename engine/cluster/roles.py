"""A node's place in its cluster: master or replica, failover, control.

Theory of operation
-------------------
:class:`Cluster` is one :class:`~engine.runner.NodeRunner` service. It owns:

* the node's **listener** (``listen``): one TCP port multiplexing
  replication (connections starting with ``MWREPL``) and control
  (``MWCTL/1``). While the node is a replica, replication connections are
  closed at once, so replicas looking for the master move on to the next
  peer (engine.replication.receiver ``alternates``).
* the **control** handler (also on ``NODE/control.sock``): status, digest,
  quarantine, soft failover, promotion, snapshots, reconcile.
* as **master**: a :class:`~engine.replication.sender.ReplicationHub`, the replication
  handler, and synchronous replication for LMTP deliveries
  (``sync_replicas``).
* as **replica**: :func:`~engine.replication.receiver.run_replica` on the node's log,
  trying every peer; a divergence cuts the log's tail aside
  (:meth:`Node.cut_diverged`), reconciles it into the master if configured
  (a tail whose fork point was cut aside with a later tail is merged into
  that tail first, CTL-9), and follows again; a promotion turns the node into the master.

Soft failover (requirement c): the master refuses writes, waits until its
in-flight records are durable, fences every replica (they confirm they hold
everything), promotes the target with a new epoch, and becomes a replica of
it. On any failure before the promotion it resumes as master.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import anyio
import anyio.abc

from wal import OS_FILEOPS, Log, Record
from wal import read_history

from .control import PREAMBLE, ControlClient, ControlError, serve_control, serve_control_connection
from ..errors import (
    AuthenticationError,
    BehindRetentionError,
    DivergedError,
    ListenError,
    ReplicationRefusedError,
    ReplicationTimeoutError,
    format_address,
    listen_error,
)
from ..store.errors import ReadOnlyNodeError, TemporaryFailure, UnknownMailboxError
from ..node.admin import OPERATIONS
from ..replication.receiver import ReplicaHooks, ReplicaLink, run_replica
from ..reconcile.errors import ReconcileError
from ..replication.secret import load_secret
from ..replication.channel import PrefixedStream
from ..replication.sender import ReplicationHub, replication_handler

__all__ = ["ClusterConfig", "Cluster", "parse_address", "SyncReplicationBackend"]

log = logging.getLogger("mailwal.cluster")

#: A promoted node retries an LMTP address in use quietly this long (the old master on the
#: same host releases it a moment after the promotion), then says so once and retries every
#: LMTP_RETRY_S (CTL-11).
LMTP_PATIENCE_S = 3.0
LMTP_RETRY_S = 1.0


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port). Raises ValueError with a clear message."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass
class ClusterConfig:
    """Replication settings of one running node (``walctl serve/follow`` flags, ``[replication]``)."""

    name: str = ""
    listen: tuple[str, int] | None = None  # replication + control port (as master; control only as replica)
    peers: list[tuple[str, int]] = field(default_factory=list)  # where a master may be
    secret_file: str = ""
    sync_replicas: int = 0
    sync_timeout_s: float = 5.0
    sync_fallback: str = "refuse"  # "refuse": 451 when fewer than K replicas acked; "async": accept anyway
    auto_reconcile: bool = False
    failover_timeout_s: float = 30.0
    metrics: tuple[str, int] | None = None
    reconnect_refused_s: float = 10.0
    reconcile_retry_s: float = 5.0  # auto_reconcile: how often a tail not reconciled yet is tried again
    retention_max_bytes: int = 0  # 0: keep the whole log; else drop what nobody needs once the log is larger
    retention_interval_s: float = 5.0


class SyncReplicationBackend:
    """The LMTP delivery backend in synchronous mode (``sync_replicas`` = K >= 1).

    A message is acknowledged only once K replicas hold its records durably.
    When they do not within ``sync_timeout_s``, the recipients get 451 (the
    record stays in the log: the MTA's retry is de-duplicated), or with
    ``sync_fallback = "async"`` the 250 goes out anyway and status says the
    node is degraded.
    """

    def __init__(self, cluster: "Cluster", inner):
        self.cluster = cluster
        self.inner = inner
        self.node = inner.node

    @property
    def role(self) -> str:
        return self.inner.role

    def mailbox_exists(self, name: str) -> bool:
        return self.inner.mailbox_exists(name)

    async def deliver_many(self, targets, body, *, create: bool = False):
        results = await self.inner.deliver_many(targets, body, create=create)
        cluster = self.cluster
        k = cluster.config.sync_replicas
        # A duplicate's receipt LSN is at or after its original's: waiting for it covers the original.
        lsns = [r.lsn for r in results if hasattr(r, "lsn")]
        if k <= 0 or not lsns or cluster.hub is None:
            return results
        try:
            await cluster.hub.wait_replicated(max(lsns), k, cluster.config.sync_timeout_s)
            cluster.sync_degraded = None
        except ReplicationTimeoutError as exc:
            if cluster.config.sync_fallback == "async":
                cluster.sync_degraded = f"fell back to asynchronous: {exc}"
                return results
            cluster.sync_degraded = f"refusing: {exc}"
            err = TemporaryFailure(f"fewer than {k} replica(s) confirmed the message in time: {exc}")
            return [err if hasattr(r, "lsn") else r for r in results]
        return results


async def report_link(link: ReplicaLink, candidates: list[str], waiting: Callable[[str], None],
                      connected: Callable[[str], None], *, patience_s: float = 1.0) -> None:
    """Tell the operator where a replica stands with its master, once per change (until cancelled).

    When the replica is not streaming within ``patience_s`` (at start, or
    after losing its master), ``waiting`` gets one line: it is waiting, for
    which addresses, and why the last attempt failed. Each time it streams
    again, ``connected`` gets one line naming the master (a quick reconnect
    says only that).
    """
    while True:
        with anyio.move_on_after(patience_s):
            await link.wait_state("streaming")
        if link.state != "streaming":
            why = f" (last attempt: {link.master}: {link.last_error})" if link.last_error else ""
            waiting(f"replica {link.name}: waiting for its master at {', '.join(candidates)}{why}")
            await link.wait_state("streaming")
        connected(f"replica {link.name}: connected to the master at {link.master}")
        await link.wait_state(*(s for s in _LINK_STATES if s != "streaming"))


#: Every state of :class:`engine.replication.receiver.ReplicaLink`.
_LINK_STATES = ("starting", "connecting", "authenticating", "placing", "seeding", "streaming", "fenced", "backoff",
                "refused", "promoted", "failed", "stopped")


def _check_applied(result) -> None:
    """Raise unless a reconcile apply completed: a tail is reconciled only when every
    action was done or skipped (e.g. a soft failover made the survivor read-only midway)."""
    if result.status != "done" or result.counts()["failed"]:
        raise ReconcileError(f"reconcile apply {result.status}: {result.counts()}; report {result.report_path}")


class Cluster:
    """The cluster side of one running node; see the module docstring."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self.runner = None
        self.node = None
        self.secret: bytes | None = None
        self.hub: ReplicationHub | None = None
        self.link: ReplicaLink | None = None
        self.handler = None  # replication handler while master
        self.sync_degraded: str | None = None
        self.events: list[dict] = []  # failovers, promotions, divergences (for status)
        self.listen_address: tuple[str, int] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._role_scope: anyio.CancelScope | None = None
        self._repl_scopes: set[anyio.CancelScope] = set()
        self._metrics = None
        # Diverged tails: cutting, reconciling and marking them take this lock (one at a time,
        # and diverged.json is rewritten by one writer). Applies on this node as master take
        # _apply_lock: two overlapping tails applied at once would both copy the same message.
        self._tail_lock = anyio.Lock()
        self._tail_errors: dict[str, str] = {}
        self._apply_lock = threading.Lock()
        self._role: str | None = None  # the role the last _start_role started

    # -- the NodeRunner service ------------------------------------------------------

    async def service(self, runner, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        self.runner = runner
        self.node = runner.anode.node
        if self.config.secret_file:
            self.secret = load_secret(self.config.secret_file)
        if not self.config.name:
            self.config.name = self.node.config.name
        async with anyio.create_task_group() as tg:
            self._tg = tg
            sock_path = os.path.join(self.node.path, "control.sock")
            if len(os.fsencode(sock_path)) < 100:  # AF_UNIX paths are limited to ~107 bytes
                await tg.start(functools.partial(serve_control, self._control, unix_path=sock_path))
            else:
                log.warning("node path too long for %s: local control only over --listen (TCP)", sock_path)
            if self.config.listen is not None:
                if self.secret is None:
                    raise ValueError("a replication listener needs a shared secret (secret_file)")
                self.listen_address = await tg.start(self._listen)
                runner.announce(f"node {self.config.name}: replication and control on "
                                f"{self.listen_address[0]}:{self.listen_address[1]}")
            if self.config.metrics is not None:
                from .metrics import Metrics

                self._metrics = m = Metrics()
                try:
                    port = m.serve(self.config.metrics[0], self.config.metrics[1], self.status)
                except OSError as exc:
                    raise listen_error("metrics", self.config.metrics, exc) from exc

                def on_sync(records: int, seconds: float) -> None:
                    m.fsync_seconds.observe(seconds)
                    m.batch_records.observe(records)

                self.node.log.on_sync = on_sync
                m.imap_source(lambda: runner.imap.stats() if runner.imap is not None else None)
                runner.announce(f"node {self.config.name}: metrics on http://{self.config.metrics[0]}:{port}/metrics")
            if runner.lmtp is not None:
                self._wire_lmtp(runner.lmtp)
            imap = getattr(runner, "imap_backend", None)
            if imap is not None:  # IMAP writes wait for --sync-replicas like deliveries; a replica names its master
                imap.replicated = self._imap_replicated
                imap.master_address = lambda: self.link.master if self.link is not None else None
            self._start_role()
            if self.config.auto_reconcile:
                tg.start_soon(self._retry_tails)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                if self._metrics is not None:
                    self._metrics.close()

    def _wire_lmtp(self, server) -> None:
        """An LMTP front of this node, before it accepts: deliveries wait for ``sync_replicas`` and are counted."""
        if self._metrics is not None:
            server.on_delivery = self._count_delivery
        server.backend = SyncReplicationBackend(self, server.backend)

    async def _imap_replicated(self, lsn: int) -> None:
        """An IMAP write's record is durable here: wait for ``sync_replicas`` replicas, as a delivery
        does (raises TemporaryFailure when they do not confirm in time and the fallback refuses)."""
        k = self.config.sync_replicas
        if k <= 0 or self.hub is None:
            return
        try:
            await self.hub.wait_replicated(lsn, k, self.config.sync_timeout_s)
            self.sync_degraded = None
        except ReplicationTimeoutError as exc:
            if self.config.sync_fallback == "async":
                self.sync_degraded = f"fell back to asynchronous: {exc}"
                return
            self.sync_degraded = f"refusing: {exc}"
            raise TemporaryFailure(f"fewer than {k} replica(s) confirmed the change in time: {exc}") from exc

    def _count_delivery(self, d: dict) -> None:
        """LMTP per-recipient outcome -> metrics (deliveries, refusals by reason, latency)."""
        m = self._metrics
        if m is None:
            return
        if d["outcome"] in ("delivered", "duplicate"):
            m.deliveries.labels(d["outcome"]).inc()
            m.append_seconds.observe(d["latency_ms"] / 1000)
        else:
            parts = (d.get("reply") or "").split(" ", 2)
            m.refusals.labels(parts[1] if len(parts) > 1 else d["outcome"]).inc()

    def _count_reconcile(self, result) -> None:
        if self._metrics is not None:
            for r in result.results:
                self._metrics.reconcile_decisions.labels(r.get("kind", "?")).inc()

    def _start_role(self) -> None:
        assert self._tg is not None
        previous, self._role = self._role, self.node.role
        self._role_scope = anyio.CancelScope()
        if self.node.role == "master":
            self._tg.start_soon(self._master_role, self._role_scope)
        else:
            if previous == "master":  # demoted (a soft failover): the master's LMTP address goes to the new one
                self._tg.start_soon(self._release_lmtp)
            self._tg.start_soon(self._replica_role, self._role_scope)

    # -- the LMTP front follows the role (CTL-11) -------------------------------------------

    async def _take_lmtp(self) -> None:
        """As master: open the role's LMTP front if the node has none (it was a replica started
        without one, or it gave the address up when it was demoted), retrying while the address
        is held (the old master on this host releases it a moment after the promotion). Says once
        when the address cannot be had; cancelled with the master role."""
        runner, cfg = self.runner, getattr(self.runner, "lmtp_role", None)
        if runner is None or cfg is None or runner.lmtp is not None:
            return
        where = f"{cfg.host}:{cfg.port}"
        started, told = time.monotonic(), False
        while True:
            try:
                host, port = await runner.open_lmtp(cfg, wire=self._wire_lmtp)
            except ListenError as exc:
                if exc.errno != errno.EADDRINUSE:
                    self._event("lmtp-unavailable", f"{exc}: this master takes no mail; give it an address of this "
                                                    f"host (--lmtp, [lmtp] listen) and restart it")
                    return
                if not told and time.monotonic() - started >= LMTP_PATIENCE_S:
                    told = True
                    self._event("lmtp-unavailable", f"{exc}: another process holds {where} (an old master on this "
                                                    f"host?); this master takes no mail until it is free, and "
                                                    f"tries every {LMTP_RETRY_S:g} s")
                await anyio.sleep(LMTP_RETRY_S if told else 0.1)
                continue
            self._event("lmtp", f"master: LMTP front listening on {host}:{port}")
            return

    async def _release_lmtp(self) -> None:
        """Demoted: close the LMTP front if it listens on the role's address, for the new master
        (on this host, it takes the same address). A front elsewhere stays and answers 451."""
        runner, cfg = self.runner, getattr(self.runner, "lmtp_role", None)
        if runner is None or cfg is None or runner.lmtp is None:
            return
        if (runner.lmtp.config.host, runner.lmtp.config.port) != (cfg.host, cfg.port):
            return
        await runner.close_lmtp()
        self._event("lmtp-closed", f"replica: LMTP front on {cfg.host}:{cfg.port} closed (the master takes mail; "
                                   f"it opens again if this node is promoted)")

    # -- the listener --------------------------------------------------------------------

    async def _listen(self, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        host, port = self.config.listen
        try:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
        except OSError as exc:
            raise listen_error("replication and control", (host, port), exc) from exc
        async with listener, anyio.create_task_group() as tg:
            bound = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_address)
            task_status.started((bound[0], bound[1]))
            while True:
                try:
                    stream = await listener.listeners[0].accept()
                except OSError as exc:
                    log.error("accept failed: %s", exc)
                    await anyio.sleep(0.1)
                    continue
                tg.start_soon(self._dispatch, stream)

    async def _dispatch(self, stream) -> None:
        prefix = b""
        try:
            with anyio.fail_after(5):
                while len(prefix) < 6:
                    chunk = await stream.receive(6 - len(prefix))
                    prefix += chunk
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            await stream.aclose()
            return
        if prefix == PREAMBLE[:6]:
            await serve_control_connection(PrefixedStream(stream, prefix), self._control, self.secret)
        elif self.handler is not None:
            # Served inside a scope the role owns: a demotion cuts every
            # replication connection (replicas then look for the new master).
            scope = anyio.CancelScope()
            self._repl_scopes.add(scope)
            try:
                with scope:
                    await self.handler(PrefixedStream(stream, prefix))
            finally:
                self._repl_scopes.discard(scope)
                if scope.cancel_called:
                    with anyio.move_on_after(1, shield=True):
                        await stream.aclose()
        else:  # a replica: not serving replication, so replicas move on to the next peer
            await stream.aclose()

    # -- master ----------------------------------------------------------------------------

    async def _master_role(self, scope: anyio.CancelScope) -> None:
        with scope:
            node = self.node
            self.hub = ReplicationHub(node.log)
            if self.secret is not None:
                self.handler = replication_handler(node.log, self.hub, self.secret,
                                                   make_snapshot=self._make_snapshot)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._take_lmtp)
                    while True:
                        await anyio.sleep(self.config.retention_interval_s)
                        if self.config.retention_max_bytes > 0:
                            await anyio.to_thread.run_sync(self.apply_retention)
            finally:
                self.handler = None
                self._stop_replication_connections()

    def apply_retention(self) -> list[str]:
        """Drop whole segments nobody needs once the log passes ``retention_max_bytes``.

        Never drops a record the store has not applied durably (the store is
        checkpointed first) or a registered replica's cursor still needs.
        When the log is still over the ceiling, the most-behind replica that is
        not connected is marked lost (its cursor dropped: it must be reseeded).
        """
        node, log_ = self.node, self.node.log
        dropped: list[str] = []
        while log_.size_bytes() > self.config.retention_max_bytes:
            with node._apply_lock:
                node.store.conn.execute("PRAGMA wal_checkpoint(FULL)")
                applied = node.store.applied_lsn
            cursors = {n: v for n, v in log_.cursors.list().items() if n.startswith("replica.")}
            floor = min([applied] + list(cursors.values()))
            got = log_.drop_before(floor + 1)
            dropped += got
            if got or log_.size_bytes() <= self.config.retention_max_bytes:
                if not got:
                    break
                continue
            connected = {r.name for r in (self.hub.status() if self.hub else []) if r.connected}
            idle = sorted((v, n) for n, v in cursors.items() if n[len("replica."):] not in connected and v < applied)
            if not idle:
                break  # connected replicas still need it: retention waits for them
            lsn, name = idle[0]
            log_.cursors.drop(name)
            self._event("replica-lost", f"replica {name[len('replica.'):]} (at LSN {lsn}) is past the retention "
                                        f"ceiling of {self.config.retention_max_bytes} bytes: it must be reseeded")
        return dropped

    def _make_snapshot(self):
        tmpdir = tempfile.mkdtemp(prefix="mailwal-seed-")
        path = os.path.join(tmpdir, "store.sqlite")
        lsn, h = self.node.store_snapshot(path)

        def chunks():
            try:
                with open(path, "rb") as f:
                    while True:
                        data = f.read(1 << 20)
                        if not data:
                            return
                        yield data
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)

        return lsn, h, self.node.log.log_id, self.node.log.epoch, chunks()

    # -- replica ---------------------------------------------------------------------------

    async def _replica_role(self, scope: anyio.CancelScope) -> None:
        with scope:
            node = self.node
            peers = [p for p in self.config.peers if p != self.listen_address and p != self.config.listen]
            if not peers:
                log.error("replica %s has no master address to follow", self.config.name)
                return
            self.link = link = ReplicaLink(self.config.name, f"{peers[0][0]}:{peers[0][1]}")
            async with anyio.create_task_group() as reporting:
                reporting.start_soon(report_link, link, [f"{h}:{p}" for h, p in peers], log.warning, log.info)
                await self._follow(link, peers)
                reporting.cancel_scope.cancel()
        if link.state == "promoted":
            self._event("promoted", f"promoted by the master to epoch {node.log.epoch}")
            self._warn_no_lmtp()
            self._start_role()

    def _warn_no_lmtp(self) -> None:
        """A node promoted while it runs whose LMTP front does not follow the role (``--lmtp ''``): say
        so when it has none (otherwise _take_lmtp opens it)."""
        runner = self.runner
        if runner is not None and runner.lmtp is None and getattr(runner, "lmtp_role", None) is None:
            self._event("no-lmtp", "this node is master now but has no LMTP front (it runs with --lmtp '' or "
                                   "[lmtp] listen = \"\"): to take mail, restart it with an LMTP address")

    async def _follow(self, link: ReplicaLink, peers: list[tuple[str, int]]) -> None:
        """Follow the master among ``peers`` until this replica is promoted by it."""
        node = self.node
        while True:
            try:
                await run_replica(
                    node.log, peers[0][0], peers[0][1], self.secret or b"", self.config.name,
                    hooks=ReplicaHooks(applied_lsn=lambda: min(node.applied_lsn, node.log.last_lsn),
                                       on_promote=self._on_promoted_by_master),
                    link=link, alternates=peers[1:],
                )
            except DivergedError as exc:
                await self._diverged(exc)
                continue
            except BehindRetentionError as exc:
                self._event("lost", f"{exc}: this replica must be reseeded: stop it and run "
                                    f"`walctl follow {node.path} --reseed ...`")
                await anyio.sleep(self.config.reconnect_refused_s)
                continue
            except (ReplicationRefusedError, AuthenticationError) as exc:
                self._event("refused", str(exc))
                await anyio.sleep(self.config.reconnect_refused_s)
                continue
            # returned: promoted by the master (soft failover)
            break

    async def _on_promoted_by_master(self, epoch: int) -> None:
        """The epoch is started; become master and log EpochStarted before answering."""
        await anyio.to_thread.run_sync(self._become_master_sync)

    def _become_master_sync(self) -> dict:
        from .failover import promote

        node = self.node
        # Writes stay refused until EpochStarted is the new epoch's first record:
        # a delivery slipping in between would make the promotion fail (race found
        # by the double-failover test under load).
        node.pause_writes("promotion in progress")
        try:
            node.set_role("master")
            promotion = promote(node, epoch=node.log.epoch, node_name=self.config.name)
        finally:
            node.resume_writes()
        return promotion.to_dict()

    async def _diverged(self, exc: DivergedError) -> None:
        fork = exc.last_common_lsn
        # The master that refused this log is the one to reconcile into. Read it now: the
        # link is reused by the next connection attempt, which may be to another peer.
        refused_by = self.link.master if self.link is not None else None
        self._event("diverged", f"log diverged from the master's after LSN {fork}; cutting the tail aside")
        async with self._tail_lock:
            tail = await anyio.to_thread.run_sync(self.node.cut_diverged, fork)
        log.warning("diverged tail after LSN %d moved to %s", fork, tail)
        if self.config.auto_reconcile and self._tg is not None:
            # In the background: this replica follows its master again at once instead of
            # falling behind for as long as the master takes to apply the tail.
            self._tg.start_soon(functools.partial(self._reconcile_pending_tail, tail, remote=refused_by))

    async def _retry_tails(self) -> None:
        """Auto-reconcile keeps trying every diverged tail not reconciled yet.

        The first attempt (right after the cut) fails when the master is
        killed, demoted or unreachable meanwhile; without a retry the tail's
        acknowledged deliveries would stay out of the cluster. An apply is
        idempotent (REC-12): a tail the master applied without answering
        plans nothing the second time. A node that has become master
        reconciles its own tails into itself.
        """
        while True:
            await anyio.sleep(self.config.reconcile_retry_s)
            # Every tail, each round: one that keeps failing (e.g. its fork point left the
            # cluster's history with a later cut) must not hold back the others.
            for tail in [t["path"] for t in self.node.diverged_tails() if not t.get("reconciled")]:
                await self._reconcile_pending_tail(tail)

    async def _reconcile_pending_tail(self, tail: str, *, remote: str | None = None) -> bool:
        """One attempt to reconcile ``tail`` (into the master, or into this node
        when it is master); marks it reconciled on success.

        ``remote``: right after the cut the link is not streaming (the master
        refused this log); ``remote`` is that master's address, to send it to.
        """
        async with self._tail_lock:
            if not any(t["path"] == tail and not t.get("reconciled") for t in self.node.diverged_tails()):
                return True
            try:
                # CTL-9: a tail whose fork point was cut aside with a later tail is merged into
                # that tail first; the merged tail (pending, listed) is what is reconciled now.
                merged = await anyio.to_thread.run_sync(self._place_tail, tail)
            except Exception as exc:  # listed in status and retried; nothing was changed
                self._tail_failed(tail, exc)
                return False
            if merged:
                self._tail_errors.pop(tail, None)
                for entry in merged:
                    self._event("tail-merged", f"{' into '.join(entry['merged_from'])}: its fork point is in the "
                                               f"later tail, off the master's history; merged as {entry['path']} "
                                               f"(report {entry['merge_report']})")
                tail = merged[-1]["path"]
            try:
                if self.node.role == "master" and not remote:
                    report = await anyio.to_thread.run_sync(self._reconcile_locally, tail)
                    where = "into this node (master)"
                elif remote or (self.link is not None and self.link.state == "streaming"):
                    report = await anyio.to_thread.run_sync(self._reconcile_into_master, tail, remote)
                    where = "into the master"
                else:
                    return False
            except Exception as exc:  # listed in status and retried; the operator may run walctl reconcile
                self._tail_failed(tail, exc)
                return False
            self._tail_errors.pop(tail, None)
            self.node.mark_reconciled(tail, report)
            self._event("reconciled", f"tail {tail} reconciled {where}: {report}")
            return True

    def _tail_failed(self, tail: str, exc: Exception) -> None:
        """Remember why ``tail`` is still pending (shown with it in status); an event when it changes."""
        if self._tail_errors.get(tail) != str(exc):
            self._tail_errors[tail] = str(exc)
            self._event("reconcile-failed", f"{tail}: {exc} (retried every {self.config.reconcile_retry_s:g} s)")

    def _place_tail(self, tail: str) -> list[dict]:
        """CTL-9: merge ``tail`` into the later tail holding its fork point while it is
        stranded (engine.reconcile.placement.place_tail); returns the merged tails' entries."""
        from ..reconcile.placement import place_tail

        def floors() -> dict[str, tuple[int, int]]:
            return {m.mailbox_id: (m.uidvalidity, m.uidnext) for m in self.node.list_mailboxes()}

        return place_tail(self.node.path, self.node.log.path, tail, uid_floors=floors)

    def _reconcile_locally(self, tail: str) -> str | None:
        """Apply one of this node's own diverged tails to itself (it is the master now)."""
        from ..reconcile.apply import apply_reconcile

        with self._apply_lock:
            result = apply_reconcile(self.node, self.node.log.path, tail)
        _check_applied(result)
        return getattr(result, "report_path", None)

    def _reconcile_into_master(self, tail: str, master: str | None = None) -> str | None:
        """Send the tail's records to the master's control port to reconcile there
        (``master``, else the one the link streams from)."""
        master = master or (self.link.master if self.link is not None else None)
        if not master:
            raise ControlError("no master known")
        host, port = parse_address(master)
        with Log.open(tail) as tail_log:
            records = [[r.lsn, r.epoch, r.type, r.payload, r.hash] for r in tail_log.read(tail_log.first_lsn)]
            first = tail_log.first_lsn
            prev = tail_log.hash_at(first - 1)
            log_id = str(tail_log.log_id)
        with ControlClient.tcp(host, port, self.secret, timeout=300) as c:
            result = c.call("reconcile_tail", log_id=log_id, first_lsn=first, prev_hash=prev, records=records)
        return result.get("report")

    # -- role changes --------------------------------------------------------------------------

    async def soft_failover(self, to: str, timeout: float | None = None) -> dict:
        """Requirement (c): drain, fence, promote ``to``, become its replica (CTL-4).

        Until the target has confirmed it holds the whole log (Drained), a
        failure aborts and this node resumes as master: nobody else can be
        master then. From the moment Promote may leave, this node is durably a
        replica *first* (``node.json``), so a lost Promoted reply or a crash
        can never leave two masters (specs/replication.pml checks it:
        BUG_RESUME_AFTER_PROMOTE): at worst the cluster has no master and the
        operator promotes one (`walctl promote`); nothing is lost, the target
        holds every record.
        """
        node = self.node
        if node.role != "master" or self.hub is None:
            raise ReadOnlyNodeError("only the master can hand over; this node is a replica")
        timeout = timeout or self.config.failover_timeout_s
        await self._await_target(to, timeout)  # before anything is paused
        started = time.monotonic()
        node.pause_writes(f"soft failover to {to} in progress")
        try:
            await anyio.to_thread.run_sync(lambda: node.log.sync_to(node.log._next_lsn - 1))
            drained = await self.hub.fence(timeout)
            if drained.get(to) != node.log.last_lsn:
                raise ReplicationTimeoutError(node.log.last_lsn, 1, sorted(drained))
            new_epoch = max([node.log.epoch] + [e.epoch for e in read_history(node.log.path)]
                            + self.hub.replica_epochs()) + 1
        except BaseException as exc:
            # Abort before any Promote: drop every replication connection (they
            # leave the fence and reconnect) and resume as master.
            self._restart_role()
            node.resume_writes()
            window = time.monotonic() - started
            self._event("failover-aborted", f"to {to}: {exc!r}; writes refused for {window:.3f}s")
            if isinstance(exc, Exception):
                raise TemporaryFailure(f"soft failover to {to} aborted, this node is master again: {exc}") from exc
            raise
        # Point of no return: become a replica durably before Promote can leave.
        await anyio.to_thread.run_sync(node.set_role, "replica")
        node.resume_writes()  # writes are refused now because the role is replica
        try:
            promoted = await self.hub.promote(to, new_epoch, timeout)
        except BaseException as exc:
            window = time.monotonic() - started
            self._restart_role()
            self._event("failover-uncertain",
                        f"{to} did not confirm its promotion to epoch {new_epoch} ({exc!r}); this node stays a "
                        f"replica. If {to} is not master, promote a node with `walctl promote` (every replica "
                        f"drained holds the whole log)")
            if isinstance(exc, Exception):
                raise TemporaryFailure(f"{to} did not confirm its promotion ({exc}); this node is now a replica: "
                                       f"check `walctl status` and promote a node if none is master") from exc
            raise
        window = time.monotonic() - started
        self._restart_role()
        self._tg.start_soon(self._refer_imap_sessions, to)
        result = {"to": to, "epoch": promoted.epoch, "last_lsn": promoted.last_lsn,
                  "last_hash": promoted.last_hash.hex(), "refused_writes_s": round(window, 4),
                  "drained": drained}
        self._event("failover", f"handed over to {to} in epoch {promoted.epoch}; writes refused for {window:.3f}s")
        return result

    async def _refer_imap_sessions(self, to: str) -> None:
        """After a soft failover: the IMAP sessions open here end with a BYE naming the new master
        ``to`` and its IMAP address (asked of it over the control channel; IMAP-13)."""
        server = getattr(self.runner, "imap", None)
        if server is None:
            return
        imap, imaps = await anyio.to_thread.run_sync(self._imap_addresses_of, to)
        server.refer(to, imap, imaps)

    def _imap_addresses_of(self, name: str) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
        """The IMAP and IMAPS addresses of the peer called ``name`` (None where unknown); a wildcard
        host is replaced by the host this node reaches it at."""
        for host, port in self.config.peers:
            if (host, port) in (self.listen_address, self.config.listen):
                continue
            try:
                with ControlClient.tcp(host, port, self.secret, timeout=2) as c:
                    st = c.call("status")
            except (OSError, ControlError, ValueError):
                continue
            if st.get("node") != name:
                continue
            found = []
            for kind in ("imap", "imaps"):
                text = ((st.get("imap") or {}).get("listen") or {}).get(kind)
                if not text:
                    found.append(None)
                    continue
                h, p = parse_address(text)
                found.append((host if h in ("0.0.0.0", "::", "") else h, p))
            return found[0], found[1]
        return None, None

    async def _await_target(self, to: str, timeout: float) -> None:
        """CTL-4: return once ``to`` is a replica connected to this master; raise if it is none.

        A name no known replica and no peer has is refused at once (with the
        known replicas). A known replica not connected now, a peer answering
        with that name that has not connected yet, or peers that do not
        answer (one may be the replica, starting) are waited for, up to
        ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            known = {r.name: r.connected for r in (self.hub.status() if self.hub else [])}
            if known.get(to):
                return
            late = time.monotonic() >= deadline
            if to in known:  # a replica of this master, not connected now: it may be reconnecting
                if late:
                    raise ControlError(f"the replica {to} is not connected to this master (waited {timeout:g} s); "
                                       f"check `walctl status`", "ReplicaNotConnectedError")
                await anyio.sleep(0.1)
                continue
            names, silent = await anyio.to_thread.run_sync(self._peer_names)
            if to in names and late:
                raise ControlError(f"the replica {to} (at {names[to]}) has not connected to this master within "
                                   f"{timeout:g} s", "UnknownReplicaError")
            if to not in names and (not silent or late):
                listing = ", ".join(f"{name} ({'connected' if up else 'not connected'})"
                                    for name, up in sorted(known.items()))
                quiet = f"; peers that did not answer: {', '.join(silent)}" if silent else ""
                raise ControlError(f"no replica named {to!r}; known replicas: {listing or 'none has connected yet'}"
                                   f"{quiet}", "UnknownReplicaError")
            await anyio.sleep(0.2)

    def _peer_names(self) -> tuple[dict[str, str], list[str]]:
        """({node name: address} of the peers that answer, [addresses of those that do not])."""
        names, silent = {}, []
        for host, port in self.config.peers:
            if (host, port) in (self.listen_address, self.config.listen):
                continue
            try:
                with ControlClient.tcp(host, port, self.secret, timeout=2) as c:
                    names[str(c.call("status")["node"])] = f"{host}:{port}"
            except (OSError, ControlError, ValueError, KeyError, TypeError):
                silent.append(f"{host}:{port}")
        return names, silent

    def _stop_replication_connections(self) -> None:
        for scope in list(self._repl_scopes):
            scope.cancel()

    def _restart_role(self) -> None:
        if self._role_scope is not None:
            self._role_scope.cancel()
        self.hub = None
        self.handler = None
        self._stop_replication_connections()
        self._start_role()

    async def promote(self, force: bool = False) -> dict:
        """Hard failover: make this replica the master (refused while its master serves, unless force)."""
        node = self.node
        if node.role == "master":
            raise ControlError("this node is already the master")
        link = self.link
        if link is not None and link.connected and not force:
            raise ControlError(f"the master at {link.master} is reachable and serving; use --force to promote anyway "
                               f"(the old master must then be stopped or it will diverge)")
        if self._role_scope is not None:
            self._role_scope.cancel()
            self._role_scope = None
        await anyio.sleep(0)
        seen = await anyio.to_thread.run_sync(self._peer_epochs)
        promotion = await anyio.to_thread.run_sync(self._hard_promote_sync, max(seen, default=0))
        self._event("promoted", f"hard failover: master in epoch {promotion['epoch']}")
        self._warn_no_lmtp()
        self._start_role()
        return promotion

    def _peer_epochs(self) -> list[int]:
        """The epochs of the other nodes that answer (5 s each: a busy node is slow to, and a
        dead one refuses at once). A replica that lagged
        may not know the epochs a newer branch used; promoting it at its own top + 1
        would reuse one (two histories, one epoch), and a later Promote to a node
        already in that epoch would fail."""
        out = []
        for host, port in self.config.peers:
            if (host, port) in (self.listen_address, self.config.listen):
                continue
            try:
                with ControlClient.tcp(host, port, self.secret, timeout=5) as c:
                    out.append(int(c.call("status")["epoch"]))
            except (OSError, ControlError, ValueError, KeyError, TypeError):
                pass
        return out

    def _hard_promote_sync(self, floor_epoch: int = 0) -> dict:
        from .failover import promote

        node = self.node
        node.pause_writes("promotion in progress")  # see _become_master_sync
        try:
            node.set_role("master")
            top = max([node.log.epoch] + [e.epoch for e in read_history(node.log.path)])
            return promote(node, epoch=max(top, floor_epoch) + 1, node_name=self.config.name).to_dict()
        finally:
            node.resume_writes()

    # -- status ---------------------------------------------------------------------------------

    def _event(self, kind: str, text: str) -> None:
        log.warning("%s: %s", kind, text)
        self.events.append({"time": time.time(), "kind": kind, "text": text})
        del self.events[:-50]

    def status(self, node_status: dict | None = None) -> dict:
        """Cluster status; ``node_status``: :meth:`Node.status`, read off the event loop
        by the control handler (it waits while a diverged tail's cut swaps the store)."""
        node = self.node
        st = node_status if node_status is not None else node.status()
        st["log_bytes"] = node.log.size_bytes()
        st["log_segments"] = node.log.segment_count()
        st["listen"] = f"{self.listen_address[0]}:{self.listen_address[1]}" if self.listen_address else None
        runner = self.runner
        lmtp = getattr(runner, "lmtp_address", None)
        st["lmtp"] = format_address(lmtp) if lmtp else None
        if getattr(runner, "imap", None) is not None:
            st["imap"] = {"listen": {kind: format_address(a) for kind, a in runner.imap_addresses.items()},
                          **runner.imap.stats()}
        st["events"] = self.events[-10:]
        # Each pending tail with the reason its last reconcile attempt failed (CTL-9: e.g. a fork point nowhere known).
        st["diverged_tails"] = [dict(t, error=self._tail_errors[t["path"]]) if t["path"] in self._tail_errors else t
                                for t in node.diverged_tails() if not t.get("reconciled")]
        if node.role == "master":
            st["sync_replicas"] = self.config.sync_replicas
            st["sync_mode"] = ("asynchronous" if self.config.sync_replicas <= 0 else
                               f"synchronous (K={self.config.sync_replicas}, on timeout: {self.config.sync_fallback})")
            st["sync_degraded"] = self.sync_degraded
            reps = []
            for r in (self.hub.status() if self.hub else []):
                d = r.as_dict()
                d["durable_lag_records"] = d.get("lag_records")
                d["durable_lag_seconds"] = d.get("lag_seconds")
                d["applied_lag_records"] = max(0, node.log.last_lsn - (d.get("applied_lsn") or 0))
                reps.append(d)
            st["replicas"] = reps
        else:
            link = self.link
            st["master"] = link.master if link else None
            st["connection"] = link.as_dict() if link else None
            st["durable_lsn"] = node.log.last_lsn
        return st

    # -- control ------------------------------------------------------------------------------------

    async def _control(self, op: str, args: dict) -> Any:
        node = self.node
        run = anyio.to_thread.run_sync
        if op == "status":
            return self.status(await run(node.status))
        if op == "digest":
            return await run(node.digest)
        if op == "failover":
            return await self.soft_failover(args["to"], args.get("timeout"))
        if op == "promote":
            return await self.promote(bool(args.get("force")))
        if op == "checkpoint":
            return {"lsn": await run(node.checkpoint)}
        if op == "quarantine_list":
            return node.quarantined()
        if op == "quarantine_show":
            return node.quarantine_show(args["mailbox"])
        if op == "quarantine_retry":
            ok, msg = await run(node.quarantine_retry, args["mailbox"])
            return {"released": ok, "message": msg}
        if op == "quarantine_release":
            ok, msg = await run(node.quarantine_release, args["mailbox"])
            return {"released": ok, "message": msg}
        if op == "quarantine_resync":
            return await self.resync(args["mailbox"])
        if op == "mailbox_snapshot":
            try:
                return await run(node.mailbox_snapshot, args["mailbox"])
            except UnknownMailboxError:
                raise ControlError(f"no mailbox named {args['mailbox']!r} on this node") from None
        if op == "verify_store":
            return await run(node.verify_store)
        if op == "reconcile_apply":
            from ..reconcile.apply import apply_reconcile

            def apply():
                with self._apply_lock:
                    return apply_reconcile(node, args["dir_a"], args["dir_b"], strategy=args.get("strategy", "renumber"),
                                           destructive=bool(args.get("destructive")), dry_run=bool(args.get("dry_run")))

            result = await run(apply)
            self._count_reconcile(result)
            doc = result.to_dict()
            doc["failed"] = result.counts()["failed"] > 0
            return doc
        if op == "reconcile_tail":
            return await run(functools.partial(self._reconcile_tail, **args))
        if op == "mailboxes":  # name, uidvalidity, uidnext, highestmodseq, messages, digest per mailbox
            return [asdict(m) for m in await run(node.list_mailboxes)]
        if op == "messages":  # uid, guid, flags, size, internaldate_ms, modseq per message
            return [asdict(m) for m in await run(node.list_messages, args["mailbox"])]
        if op in OPERATIONS:  # CTL-10: users, mailboxes, flags, expunges (walctl user|mailbox|flags|expunge)
            return await self._operate(op, args)
        if op == "store_flags":  # action: add | remove | replace; durable on return (master only)
            lsn = await run(functools.partial(node.store_flags, args["mailbox"], list(args["uids"]),
                                              args.get("action", "add"), list(args["flags"])))
            return {"lsn": lsn}
        raise ControlError(f"unknown control operation {op!r}")

    async def _operate(self, op: str, args: dict) -> Any:
        """CTL-10: an operator's request through the node's write path (engine.node.admin), in a worker
        thread; like an IMAP write, it is answered once durable and, with ``sync_replicas``, once K
        replicas confirmed it. A replica refuses it naming its master."""
        node = self.node
        fn = OPERATIONS[op]
        try:
            inspect.signature(fn).bind(node, **args)
        except TypeError as exc:  # arguments that do not fit the operation: the client's mistake
            raise ControlError(f"bad arguments for {op}: {exc}") from None
        try:
            result = await anyio.to_thread.run_sync(functools.partial(fn, node, **args))
        except ReadOnlyNodeError:
            if node.role == "master":
                raise  # writes paused (a soft failover): the node's own words say so
            master = self.link.master if self.link is not None else None
            raise ControlError(f"node {self.config.name} is a read-only replica: run this on the master "
                               f"({master or 'not known right now'})", "ReadOnlyNodeError") from None
        lsn = result.get("lsn") if isinstance(result, dict) else 0
        if lsn:
            await self._imap_replicated(lsn)
        return result

    async def resync(self, mailbox: str) -> dict:
        """MS-13: replace one mailbox with the master's copy, then replay what came after."""
        if self.node.role == "master":
            raise ControlError("the master has nothing to resync from; resync a replica")
        if self.link is None or not self.link.master:
            raise ControlError("no master known to resync from")
        host, port = parse_address(self.link.master)

        def fetch():
            with ControlClient.tcp(host, port, self.secret, timeout=300) as c:
                return c.call("mailbox_snapshot", mailbox=mailbox)

        snap = await anyio.to_thread.run_sync(fetch)
        replayed = await anyio.to_thread.run_sync(self.node.resync_mailbox, snap)
        return {"mailbox": mailbox, "snapshot_lsn": snap["at_lsn"], "replayed": replayed,
                "messages": len(snap["messages"])}

    def _reconcile_tail(self, log_id: str, first_lsn: int, prev_hash: bytes, records: list, strategy: str = "renumber",
                        destructive: bool = False) -> dict:
        """Reconcile a diverged tail shipped by a former master into this master."""
        from ..reconcile.apply import apply_reconcile

        node = self.node
        if node.role != "master":
            raise ReadOnlyNodeError("reconcile into the master, not a replica")
        if uuid.UUID(log_id) != node.log.log_id:
            raise ControlError("that tail belongs to another log")
        tmp = tempfile.mkdtemp(prefix="mailwal-tail-", dir=node.path)
        tail_dir = os.path.join(tmp, "tail.wal")
        tail = Log.create(tail_dir, log_id=node.log.log_id, first_lsn=first_lsn, prev_hash=prev_hash,
                          epoch=records[0][1] if records else 1)
        try:
            tail.append_records([Record(*r) for r in records])
        finally:
            tail.close()
        kept = os.path.join(node.path, "reconcile", "tails")
        os.makedirs(kept, exist_ok=True)
        dest = os.path.join(kept, f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-after-{first_lsn - 1}-"
                                  f"{uuid.uuid4().hex[:8]}.wal")  # two replicas may send tails in the same second
        os.rename(tail_dir, dest)
        OS_FILEOPS.fsync_dir(kept)  # the kept copy survives a crash (the sender keeps its own until we answer)
        shutil.rmtree(tmp, ignore_errors=True)
        with self._apply_lock:  # one apply at a time: overlapping tails must not both copy a message
            # The wait for the lock can be long (another tail's apply): a soft failover may
            # have made this node a replica meanwhile, and a replica's log only follows.
            if node.role != "master":
                raise ReadOnlyNodeError("this node stopped being the master while the tail waited; "
                                        "the tail stays pending on its node and is sent to the new master")
            result = apply_reconcile(node, node.log.path, dest, strategy=strategy, destructive=destructive)
        self._count_reconcile(result)
        _check_applied(result)  # a failed apply must leave the tail pending on its node (it is retried)
        return {"report": getattr(result, "report_path", None), "tail": dest}
