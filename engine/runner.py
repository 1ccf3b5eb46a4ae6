"""The node runner: open a node, run its fronts and services, drain on SIGTERM.

:class:`NodeRunner` owns a node process's lifecycle: open the node, start the
LMTP listener (:mod:`engine.lmtp`), start any extra services
(``add_service``: the cluster's replication and control hook in here), start
the IMAP front when configured (:mod:`engine.imap`, over the same node:
``imap_backend`` is there for services to wire before it serves), then
wait for SIGTERM/SIGINT or :meth:`NodeRunner.request_stop`. Shutdown is
graceful: stop accepting, let every connection finish the transaction it is
in (its deliveries complete and are answered), answer ``421 4.3.2`` at the
next command boundary; IMAP sessions get ``* BYE`` at their next command
boundary (an IDLE included); then cancel the services and close the node.
Connections still mid-transaction after the grace period are cut: they were
never acknowledged, so their MTA (or mail client) retries.

The LMTP front may also open and close while the node runs, when the
cluster changes its role (CTL-11): :meth:`NodeRunner.open_lmtp` and
:meth:`NodeRunner.close_lmtp`, at ``lmtp_role``, the front that follows the
role.
"""


from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any, Awaitable, Callable

import anyio

from .node import AsyncNode
from .errors import listen_error
from .lmtp.server import LmtpConfig, LmtpServer

__all__ = ["NodeRunner", "run_node", "Service"]

log = logging.getLogger("mailwal.lmtp")


Service = Callable[["NodeRunner", Any], Awaitable[None]]


class NodeRunner:
    """Run one node: the LMTP front plus any services, with a graceful stop.

    Extend with :meth:`add_service` before :meth:`run`: each service is an
    ``async def svc(runner, task_status)`` started with ``TaskGroup.start``
    (it calls ``task_status.started()`` once ready) and cancelled after the
    LMTP front drained, before the node closes.
    """

    def __init__(self, path: str, lmtp: LmtpConfig | None | bool = None, *, handle_signals: bool = True,
                 announce: Callable[[str], None] | None = None, threads: int | None = None, imap=None,
                 imap_grace_s: float = 10.0, lmtp_role: LmtpConfig | None = None):
        self.path = path
        self.lmtp_enabled = lmtp is not False
        self.lmtp_config = lmtp or LmtpConfig()
        # The LMTP front that follows the node's role (CTL-11): opened when the node becomes master
        # without a front, closed when it stops being master while listening there. None: the
        # front stays as started.
        self.lmtp_role = lmtp_role
        self.handle_signals = handle_signals
        self.announce = announce or (lambda msg: print(msg, flush=True))
        self.threads = threads
        self.services: list[tuple[str, Service]] = []
        self.anode: AsyncNode | None = None
        self.lmtp: LmtpServer | None = None
        self.lmtp_address: tuple[str, int] | None = None
        self.imap_config = imap  # engine.imap.server.ImapConfig, or None: no IMAP front
        self.imap_grace_s = imap_grace_s
        self.imap_backend = None  # the NodeBackend the IMAP front serves (set before services start)
        self.imap = None  # the ImapServer
        self.imap_addresses: dict[str, tuple[str, int]] = {}
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: anyio.Event | None = None
        self._stop_requested = False

    def add_service(self, name: str, service: Service) -> None:
        self.services.append((name, service))

    def request_stop(self) -> None:
        """Begin a graceful shutdown; safe from any thread (and before run started)."""
        self._stop_requested = True
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: draining (stop accepting, finish in-flight deliveries)",
                         signal.Signals(signum).name)
                self._stop.set()

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = anyio.Event()
        if self._stop_requested:
            self._stop.set()
        kwargs = {"threads": self.threads} if self.threads else {}
        self.anode = anode = await AsyncNode.open(self.path, **kwargs)
        try:
            async with anyio.create_task_group() as tg:
                if self.handle_signals:
                    tg.start_soon(self._watch_signals)
                if self.lmtp_enabled:
                    # Created and bound first, so services can wrap its backend and an address
                    # in use stops the node before anything starts; accepting starts only once
                    # every service is up (no mail before the node is ready).
                    self.lmtp = LmtpServer(anode, self.lmtp_config)
                    await self.lmtp.bind()
                if self.imap_config is not None:
                    from .imap.node_backend import NodeBackend

                    self.imap_backend = NodeBackend(anode)
                for name, service in self.services:
                    await tg.start(service, self)
                imap_done = anyio.Event()
                if self.imap_config is not None:
                    self.imap_addresses = await tg.start(self._serve_imap, imap_done)
                    where = ", ".join(f"{kind.upper()} on {host}:{port}"
                                      for kind, (host, port) in self.imap_addresses.items())
                    self.announce(f"node {anode.name} ({anode.role}) at {anode.node.path}: {where}")
                if self.lmtp is not None:
                    self.lmtp_address = await self.lmtp.start()
                    host, port = self.lmtp_address
                    self.announce(f"node {anode.name} ({anode.role}) at {anode.node.path}: LMTP listening on "
                                  f"{host}:{port}")
                else:
                    self.announce(f"node {anode.name} ({anode.role}) at {anode.node.path}: no LMTP front")
                self.ready.set()
                task_status.started(self.lmtp_address)
                await self._stop.wait()
                if self.imap is not None:
                    await self._drain_imap(imap_done)
                if self.lmtp is not None:
                    clean = await self.lmtp.drain()
                    c = self.lmtp.counts
                    log.info("LMTP drained (%s): %d delivered, %d duplicate, %d deferred, %d rejected",
                             "clean" if clean else "grace period exceeded", c["delivered"], c["duplicate"],
                             c["deferred"], c["rejected"])
                tg.cancel_scope.cancel()
        finally:
            if self.lmtp is not None:
                self.lmtp.close_now()  # a failed service or a crash: no connection may outlive the node
            if self.imap is not None:
                self.imap.stop_now()
            await anode.aclose()
            self.stopped.set()
            self.ready.set()


    async def open_lmtp(self, config: LmtpConfig, *, wire: Callable[[LmtpServer], None] | None = None
                        ) -> tuple[str, int]:
        """Open an LMTP front while the node runs (it became master without one); returns the bound
        address. ``wire(server)`` runs before it accepts (the cluster wraps its backend).

        Raises:
            ListenError: the address cannot be had (in use, not local); nothing changed.
        """
        if self.lmtp is not None:
            return self.lmtp_address
        server = LmtpServer(self.anode, config)
        await server.bind()
        if wire is not None:
            wire(server)
        self.lmtp, self.lmtp_config = server, config
        self.lmtp_address = host, port = await server.start()
        self.announce(f"node {self.anode.name} ({self.anode.role}) at {self.anode.node.path}: LMTP listening on "
                      f"{host}:{port}")
        return self.lmtp_address

    async def close_lmtp(self) -> None:
        """Close the LMTP front while the node runs (it stopped being master): stop accepting at
        once (the address is free for another process), answer the transactions in progress, close."""
        server = self.lmtp
        if server is None:
            return
        self.lmtp = None
        self.lmtp_address = None
        try:
            await server.drain()
        finally:
            server.close_now()

    async def _serve_imap(self, done: anyio.Event, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """The IMAP front over this node (started after the services wired ``imap_backend``);
        reports the bound addresses once listening, sets ``done`` when it stopped."""
        from .imap.server import ImapServer

        cfg = self.imap_config
        self.imap = ImapServer(self.imap_backend, cfg)
        try:
            await self.imap.serve(task_status=task_status)
        except OSError as exc:
            port = cfg.port if cfg.port is not None else cfg.tls_port
            raise listen_error("IMAP", (cfg.host, port), exc) from exc
        finally:
            done.set()

    async def _drain_imap(self, done: anyio.Event) -> None:
        """``* BYE`` to every IMAP session at its next command boundary; cut what remains after the grace."""
        self.imap.shutdown()
        with anyio.move_on_after(self.imap_grace_s):
            await done.wait()
        if not done.is_set():
            log.warning("IMAP sessions still open after %.0f s: cutting them", self.imap_grace_s)
            self.imap.stop_now()
            await done.wait()


def run_node(path: str, lmtp: LmtpConfig | None = None, *, announce: Callable[[str], None] | None = None) -> int:
    """Run a node until SIGTERM/SIGINT (blocking); returns the exit status (0 after a clean drain)."""
    runner = NodeRunner(path, lmtp, announce=announce)
    anyio.run(runner.run)
    return 0
