"""The IMAP socket edge: anyio listeners, TLS, one task per connection, limits (the only I/O of the front).

Pieces
------
* :class:`ImapConfig`: addresses, TLS certificate, limits and timeouts.
* :class:`ImapServer`: listens (plain with STARTTLS when a certificate is
  given, and/or implicit TLS), runs one task per connection that moves bytes
  between the socket and an :class:`~engine.imap.session.ImapConnection`,
  hands commands to an :class:`~engine.imap.executor.Executor` over the
  backend, and writes the responses. It enforces the limits the sans-I/O
  layers cannot: sessions per user and per client address, a delay after
  failed logins that grows with the failures counted per client address, a
  login timeout and an idle (autologout) timeout. While a client IDLEs, the
  task waits for either its next bytes or the backend's change notification
  (``Backend.watch``) and sends the updates at once (IMAP-7).
* :class:`ServerThread`: a server on its own event loop thread, for tests
  and tools that use blocking clients (``imaplib``); see :func:`serve_in_thread`.

Failure rules (IMAP-25): no traceback reaches a client. A bug while
executing a command is logged (with its traceback, in the server's log) and
answered ``NO [SERVERBUG]``; a bug in the connection machinery itself ends
that connection with ``* BYE [SERVERBUG]``. Other connections carry on.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
from anyio.streams.tls import TLSStream

from .backend import Backend
from .commands import Command, Idle
from .executor import Executor
from .parser import DEFAULT_MAX_COMMAND_BYTES, DEFAULT_MAX_LINE_BYTES
from .responses import Code, Continuation, Status
from .session import NEED_DATA, PAUSED, ConnectionClosed, IdleDone, ImapConnection, LocalProtocolError, State

__all__ = ["ImapConfig", "ImapServer", "ServerThread", "serve_in_thread", "login_delay_s", "make_ssl_context",
           "referral"]

log = logging.getLogger("mailwal.imap")
RECEIVE_BYTES = 64 * 1024


@dataclass
class ImapConfig:
    """How the IMAP front behaves (``walctl serve --imap``)."""

    host: str = "127.0.0.1"
    port: int | None = 1143  # plain (STARTTLS when a certificate is set); None: no plain listener
    tls_port: int | None = None  # implicit TLS (IMAPS); needs a certificate
    certfile: str | None = None
    keyfile: str | None = None
    allow_plaintext_login: bool = False  # LOGIN without TLS from non-loopback addresses (IMAP-8)
    hostname: str = "mailwal"
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES
    max_literal_bytes: int = 64 * 1024 * 1024
    max_sessions_per_user: int = 20
    max_sessions_per_address: int = 100
    login_timeout_s: float = 60.0
    idle_timeout_s: float = 30 * 60.0  # RFC 9051 5.4: an autologout timer of at least 30 minutes
    failed_login_delay_s: float = 0.5  # doubled per failure from the same address, up to the cap
    failed_login_delay_max_s: float = 8.0
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    def context(self) -> ssl.SSLContext | None:
        if self.ssl_context is None and self.certfile:
            self.ssl_context = make_ssl_context(self.certfile, self.keyfile)
        return self.ssl_context


def make_ssl_context(certfile: str, keyfile: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def login_delay_s(failures: int, base_s: float, max_s: float) -> float:
    """The delay before answering a failed login, ``failures`` counting this one (pure)."""
    if failures <= 0 or base_s <= 0:
        return 0.0
    return min(max_s, base_s * (2 ** min(failures - 1, 30)))


def referral(master: str, imap: tuple[str, int] | None, imaps: tuple[str, int] | None) -> tuple[str, Code | None]:
    """The BYE text and code that send a client to the new master ``master`` (pure): RFC 2221
    ``[REFERRAL imap://HOST:PORT/]`` when its IMAP address is known (an IPv6 host only in the
    text: a code holds no ``]``), else ``[UNAVAILABLE]``; the text names the master either way."""
    def shown(address: tuple[str, int]) -> str:
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    where = ([f"IMAP at {shown(imap)}"] if imap else []) + ([f"IMAPS at {shown(imaps)}"] if imaps else [])
    text = (f"this node is a read-only replica now; the master is {master}"
            + (f" ({' and '.join(where)}): reconnect there" if where else ""))
    if imap and ":" not in imap[0]:
        return text, Code("REFERRAL", f"imap://{imap[0]}:{imap[1]}/")
    return text, Code("UNAVAILABLE")


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


class ImapServer:
    """The IMAP listener(s) over a backend (see the module docstring)."""

    def __init__(self, backend: Backend, config: ImapConfig | None = None):
        self.backend = backend
        self.config = config or ImapConfig()
        self.user_sessions: Counter[str] = Counter()
        self.address_sessions: Counter[str] = Counter()
        self.auth_failures: Counter[str] = Counter()  # per client address, since its last success
        self.commands: Counter[tuple[str, str]] = Counter()  # (command, OK/NO/BAD): every tagged status sent
        self.sessions = 0  # open now
        self.idling = 0  # of them, in IDLE now
        self.connections_total = 0  # accepted since the server started
        self.auth_failures_total = 0  # failed LOGIN and AUTHENTICATE since the server started
        self.bound: dict[str, tuple[str, int]] = {}
        self._connections: set[_ConnectionTask] = set()
        self._tg: anyio.abc.TaskGroup | None = None
        self._draining = False

    # -- lifecycle ----------------------------------------------------------------------

    async def serve(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports ``{"imap": (host, port), "imaps": ...}`` with task_status."""
        cfg = self.config
        ctx = cfg.context()
        if cfg.tls_port is not None and ctx is None:
            raise ValueError("an IMAPS port needs a certificate (certfile/keyfile)")
        listeners = []
        if cfg.port is not None:
            plain = await anyio.create_tcp_listener(local_host=cfg.host, local_port=cfg.port, reuse_port=False)
            listeners.append(("imap", plain, False))
        if cfg.tls_port is not None:
            tls = await anyio.create_tcp_listener(local_host=cfg.host, local_port=cfg.tls_port)
            listeners.append(("imaps", tls, True))
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for kind, listener, implicit in listeners:
                    host, port = listener.extra(anyio.abc.SocketAttribute.local_address)[:2]
                    self.bound[kind] = (host, port)
                    tg.start_soon(self._accept, listener, implicit)
                task_status.started(dict(self.bound))
        finally:
            for _, listener, _ in listeners:
                await listener.aclose()

    async def _accept(self, listener, implicit: bool) -> None:
        async def handle(stream) -> None:
            await self._connection(stream, implicit)
        await listener.serve(handle, task_group=self._tg)

    def shutdown(self) -> None:
        """Say ``* BYE`` to every session at its next command boundary, and stop accepting."""
        self._draining = True
        for conn in list(self._connections):
            conn.wake()
        if self._tg is not None and not self._connections:
            self._tg.cancel_scope.cancel()

    def refer(self, master: str, imap: tuple[str, int] | None = None, imaps: tuple[str, int] | None = None) -> None:
        """This node stopped being the master (a soft failover): end every session open now with
        an untagged BYE naming the new master at its next command boundary, IDLE included
        (IMAP-13; :func:`referral`). The listeners stay: new connections are served, read-only."""
        bye = referral(master, imap, imaps)
        for conn in list(self._connections):
            conn.bye = bye
            conn.wake()

    def stop_now(self) -> None:
        """Cut every connection and stop listening at once (after a shutdown's grace period)."""
        self._draining = True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def stats(self) -> dict:
        """What the front did (for ``walctl status`` and ``/metrics``; any thread may call it):
        ``sessions`` and ``idle`` open now; since it started: ``connections``, ``auth_failures``
        and ``commands`` (command name -> tagged status -> count)."""
        commands: dict[str, dict[str, int]] = {}
        for (name, status), n in dict(self.commands).items():
            commands.setdefault(name, {})[status] = n
        return {"sessions": self.sessions, "idle": self.idling, "connections": self.connections_total,
                "auth_failures": self.auth_failures_total, "commands": commands}

    # -- limits (called by executors) -----------------------------------------------------

    def _admit(self, user: str) -> str | None:
        if self.user_sessions[user] >= self.config.max_sessions_per_user:
            return f"too many sessions for this user (limit {self.config.max_sessions_per_user}); close one first"
        self.user_sessions[user] += 1
        return None

    def _release(self, user: str) -> None:
        self.user_sessions[user] -= 1
        if self.user_sessions[user] <= 0:
            del self.user_sessions[user]

    # -- one connection -------------------------------------------------------------------

    async def _connection(self, stream: anyio.abc.ByteStream, implicit: bool) -> None:
        cfg = self.config
        try:
            peer = stream.extra(anyio.abc.SocketAttribute.remote_address)
            address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        except Exception:  # noqa: BLE001 - a socket without a peer address: treat as unknown, not local
            address = "?"
        if self.address_sessions[address] >= cfg.max_sessions_per_address:
            try:
                await stream.send(Status("BYE", f"too many connections from your address (limit "
                                                f"{cfg.max_sessions_per_address})", Code("LIMIT")).encode())
            finally:
                await stream.aclose()
            return
        if implicit:
            try:
                with anyio.fail_after(cfg.login_timeout_s):
                    stream = await TLSStream.wrap(stream, server_side=True, ssl_context=cfg.context(),
                                                  standard_compatible=False)
            except (TimeoutError, ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                log.info("IMAPS handshake with %s failed: %s", address, exc)
                await anyio.aclose_forcefully(stream)
                return
        self.address_sessions[address] += 1
        self.sessions += 1
        self.connections_total += 1
        task = _ConnectionTask(self, stream, address, implicit)
        self._connections.add(task)
        try:
            await task.run()
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:  # noqa: BLE001 - the task boundary: log the bug, end this connection only
            log.exception("IMAP connection from %s failed", address)
            await task.abort("internal server error; the connection is closed (logged)")
        finally:
            self._connections.discard(task)
            task.executor.close()
            task.take_counts()
            task._count_idle(False)
            self.sessions -= 1
            self.address_sessions[address] -= 1
            if self.address_sessions[address] <= 0:
                del self.address_sessions[address]
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(task.stream)
            if self._draining and not self._connections and self._tg is not None:
                self._tg.cancel_scope.cancel()


class _ConnectionTask:
    def __init__(self, server: ImapServer, stream, address: str, implicit: bool):
        cfg = server.config
        self.server = server
        self.stream = stream
        self.address = address
        ctx = cfg.context()
        self.conn = ImapConnection(tls=implicit, starttls=ctx is not None and not implicit,
                                   plaintext_login=cfg.allow_plaintext_login or _is_loopback(address),
                                   max_line_bytes=cfg.max_line_bytes, max_command_bytes=cfg.max_command_bytes,
                                   max_literal_bytes=cfg.max_literal_bytes, hostname=cfg.hostname)
        self.executor = Executor(server.backend, capabilities=lambda: self.conn.capabilities(State.AUTHENTICATED),
                                 admit=server._admit, release=server._release)
        self.bye: tuple[str, Code | None] | None = None  # set by ImapServer.refer: end at the next boundary
        self.idle_counted = False  # counted in ImapServer.idling
        self._woken = False  # wake() came: the read in progress (or the next one) returns None
        self._read_scope: anyio.CancelScope | None = None  # the read in progress, cancelled by wake()
        self._idle_waiting = False  # in IDLE, waiting for DONE or a change of the selected mailbox
        self._mailbox_changed = False  # the backend said the selected mailbox changed (read in IDLE)
        self._token = anyio.lowlevel.current_token()
        native = self._token.native_token  # an asyncio loop or a trio token: both schedule without waiting
        self._call_soon = getattr(native, "call_soon_threadsafe", None) or native.run_sync_soon
        self._wake_queued = False  # a wake-up from another thread is scheduled and has not run yet
        self._thread = threading.get_ident()
        self._stop_watch = None

    # -- wake-ups (backend notifications, shutdown) --------------------------------------------

    def wake(self) -> None:
        """End the read in progress, or the next one, with None (shutdown, a referral, IDLE news).
        On the event loop's thread."""
        self._woken = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    def _changed(self, name: str) -> None:
        """The backend's notification (often on the node's applier thread) that a mailbox changed.

        Only a session in IDLE is woken: any other hears of the change with its next command's
        answer (IMAP-15), and waking it would only restart its read. The flag is set before
        ``_idle_waiting`` is read, and ``_receive_idling`` sets that before it reads the flag, so
        a change that comes as IDLE begins is never missed. Never waits for the event loop (the
        applier, which every read-your-writes read waits for, must not queue behind sessions);
        a burst of notifications schedules one wake-up."""
        view = self.executor.view
        if view is None or view.name != name:
            return
        self._mailbox_changed = True
        if not self._idle_waiting:
            return
        if threading.get_ident() == self._thread:
            self.wake()
        elif not self._wake_queued:
            self._wake_queued = True
            try:
                self._call_soon(self._queued_wake)
            except RuntimeError:
                pass  # the loop is gone: the connection is over

    def _queued_wake(self) -> None:
        self._wake_queued = False
        self.wake()

    # -- the loop ------------------------------------------------------------------------------

    def take_counts(self) -> None:
        """Move the session's answered-command counts into the server's (``stats``)."""
        if self.conn.answered:
            self.server.commands.update(self.conn.answered)
            self.conn.answered.clear()

    async def _flush(self) -> None:
        self.take_counts()
        data = self.conn.data_to_send()
        if data:
            await self.stream.send(data)

    async def abort(self, text: str) -> None:
        with anyio.move_on_after(2, shield=True):
            try:
                await self.stream.send(Status("BYE", text, Code("SERVERBUG")).encode())
            except Exception:  # noqa: BLE001 - the peer may be gone; nothing more to tell it
                pass

    async def run(self) -> None:
        self._stop_watch = self.server.backend.watch(self._changed)
        try:
            await self._loop()
        finally:
            self._stop_watch()

    async def _loop(self) -> None:
        conn, cfg, server = self.conn, self.server.config, self.server
        await self._flush()
        while True:
            if server._draining and (conn.pending is None or conn.idling) and not conn.closed:
                conn.close(f"{cfg.hostname} shutting down; reconnect later", "shutdown", Code("UNAVAILABLE"))
            elif self.bye is not None and (conn.pending is None or conn.idling) and not conn.closed:
                conn.close(self.bye[0], "referred to the new master", self.bye[1])
            try:
                ev = conn.next_event()
            except LocalProtocolError:
                log.exception("IMAP session with %s: protocol machine misused", self.address)
                await self.abort("internal server error; the connection is closed (logged)")
                return
            if isinstance(ev, ConnectionClosed):
                await self._flush()
                return
            if ev is PAUSED:
                if conn.awaiting_tls:
                    await self._flush()
                    self.stream = await TLSStream.wrap(self.stream, server_side=True, ssl_context=cfg.context(),
                                                       standard_compatible=False)
                    conn.tls_started()
                    continue
                raise LocalProtocolError("the connection paused with no command pending")
            if ev is NEED_DATA:
                await self._flush()
                await self._receive()
                continue
            if isinstance(ev, IdleDone):
                self._count_idle(False)
                await self._answer(ev, await self.executor.idle_done(ev.tag), "IDLE")
                continue
            responses = await self._execute(ev)
            await self._answer(ev, responses, _command_name(ev))
            if isinstance(ev, Idle) and conn.idling:
                self._count_idle(True)

    def _count_idle(self, idling: bool) -> None:
        """Keep ``ImapServer.idling`` true: this session counts while it IDLEs (until DONE, or its end)."""
        if idling != self.idle_counted:
            self.idle_counted = idling
            self.server.idling += 1 if idling else -1

    async def _execute(self, cmd: Command) -> list:
        try:
            return await self.executor.execute(cmd)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:  # noqa: BLE001 - a bug: log it, answer NO [SERVERBUG], keep the session
            log.exception("IMAP command %s from %s failed", _command_name(cmd), self.address)
            return [Status("NO", "internal server error (logged); the command may not have completed",
                           Code("SERVERBUG"), cmd.tag)]

    async def _answer(self, cmd, responses: list, name: str) -> None:
        conn, server, cfg = self.conn, self.server, self.server.config
        last = responses[-1] if responses else None
        if isinstance(last, Status) and last.tagged:
            if last.code is not None and last.code.name == "AUTHENTICATIONFAILED":
                server.auth_failures[self.address] += 1
                server.auth_failures_total += 1
                delay = login_delay_s(server.auth_failures[self.address], cfg.failed_login_delay_s,
                                      cfg.failed_login_delay_max_s)
                await self._flush()
                await anyio.sleep(delay)
            elif name in ("LOGIN", "AUTHENTICATE") and last.status == "OK":
                server.auth_failures.pop(self.address, None)
        for i, r in enumerate(responses):
            conn.send(r)
            if i % 256 == 255:
                await self._flush()
        await self._flush()

    async def _receive(self) -> None:
        conn, cfg = self.conn, self.server.config
        timeout = cfg.login_timeout_s if conn.state is State.NOT_AUTHENTICATED else cfg.idle_timeout_s
        if conn.idling:
            await self._receive_idling(timeout)
            return
        data = None
        with anyio.move_on_after(timeout) as scope:
            data = await self._read_or_wake()
        if scope.cancelled_caught:
            conn.close("autologout: idle too long" if conn.state is not State.NOT_AUTHENTICATED
                       else "login timeout", "timeout")
            return
        if data is not None:
            conn.receive_data(data)

    async def _read_or_wake(self) -> bytes | None:
        """The next bytes (``b""`` at EOF), or None when woken (shutdown, a referral, a change during
        IDLE). One cancel scope per read, which :meth:`wake` cancels (no task per read)."""
        if self._woken:
            self._woken = False
            return None
        data = None
        with anyio.CancelScope() as scope:
            self._read_scope = scope
            try:
                data = await self.stream.receive(RECEIVE_BYTES)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError,
                    ssl.SSLError):
                data = b""
            finally:
                self._read_scope = None
        if scope.cancelled_caught:
            self._woken = False
            return None
        return data

    async def _receive_idling(self, timeout: float) -> None:
        conn = self.conn
        with anyio.move_on_after(timeout) as scope:
            while conn.idling:
                self._idle_waiting = True  # before the flag is read: see _changed
                try:
                    data = None if self._mailbox_changed else await self._read_or_wake()
                finally:
                    self._idle_waiting = False
                if data is not None:
                    conn.receive_data(data)
                    return
                if self.server._draining or self.bye is not None:
                    return
                self._mailbox_changed = False  # before reading: a change during the read sets it again
                for r in await self.executor.idle_updates():
                    conn.send(r)
                await self._flush()
        if scope.cancelled_caught:
            conn.close("autologout: idle too long", "timeout")


def _command_name(cmd: Command) -> str:
    name = cmd.NAME
    if name == "SELECT" and getattr(cmd, "read_only", False):
        name = "EXAMINE"
    return f"UID {name}" if getattr(cmd, "uid", False) is True or (
        name == "EXPUNGE" and getattr(cmd, "uids", None) is not None) else name


# -- a server on its own thread (tests, blocking clients) ---------------------------------------------


class ServerThread:
    """An :class:`ImapServer` on a private event loop thread; use as a context manager."""

    def __init__(self, backend: Backend, config: ImapConfig | None = None, *, grace_s: float = 10.0):
        self.server = ImapServer(backend, config or ImapConfig(port=0))
        self.grace_s = grace_s
        self._portal_cm = None
        self.portal = None
        self._future = None

    def __enter__(self) -> "ServerThread":
        self._portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
        self.portal = self._portal_cm.__enter__()
        self._future, self.bound = self.portal.start_task(self.server.serve)
        return self

    @property
    def port(self) -> int:
        return self.bound["imap"][1]

    @property
    def tls_port(self) -> int:
        return self.bound["imaps"][1]

    def call(self, fn, *args) -> Any:
        """Run ``fn(*args)`` on the server's loop thread (the memory backend is not thread-safe)."""
        return self.portal.call(fn, *args)

    def __exit__(self, *exc) -> None:
        try:
            self.portal.call(self.server.shutdown)
            try:
                self._future.result(timeout=self.grace_s)
            except TimeoutError:
                log.warning("IMAP sessions still open after %.0f s: cutting them", self.grace_s)
                self.portal.call(self.server.stop_now)
            except BaseException:  # noqa: BLE001 - cancelled on shutdown is the normal end
                pass
        finally:
            self._portal_cm.__exit__(None, None, None)


def serve_in_thread(backend: Backend, **config) -> ServerThread:
    """``with serve_in_thread(MemoryBackend(), port=0) as srv: imaplib.IMAP4("127.0.0.1", srv.port)``."""
    config.setdefault("port", 0)
    return ServerThread(backend, ImapConfig(**config))
