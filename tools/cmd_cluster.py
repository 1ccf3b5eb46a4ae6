"""walctl commands for running nodes and clusters: serve, follow, status,
failover, promote, quarantine, check, scrub.

Running nodes are reached through their control channel (engine/control.py):
``NODE/control.sock`` when NODE is given and the node runs, or
``--connect HOST:PORT`` (the node's replication port) with the shared secret.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time

import click

from engine.cluster.config import ROLE_DEFAULTS, ConfigError, load_config
from engine.cluster.control import ControlClient, ControlError
from engine.replication.secret import load_secret

from .cliutil import CONTEXT_SETTINGS
from .cmd_node import _errors, _host_port, _require_node, log_in_use, node_argument

__all__ = ["CLUSTER_COMMANDS", "serve", "follow"]

SECRET_FILE = "replication.secret"
#: Console width of `walctl status` when stdout is not a terminal: wide enough that no value is cut.
STATUS_WIDTH_NOT_TTY = 1000
#: How long a command waits for a node whose log is locked to answer on its control socket.
NODE_START_WAIT_S = 10.0


def _setup_logging(file: str | None, quiet: bool, as_json: bool) -> None:
    handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    if as_json:
        class _Json(logging.Formatter):
            def format(self, rec: logging.LogRecord) -> str:
                return json.dumps({"time": round(rec.created, 3), "level": rec.levelname.lower(),
                                   "logger": rec.name, "message": rec.getMessage()})
        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("mailwal")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)


class HostPort(click.ParamType):
    """A ``HOST:PORT`` option value (kept as text); ``""`` too when ``empty_ok``."""

    name = "HOST:PORT"

    def __init__(self, empty_ok: bool = False):
        self.empty_ok = empty_ok

    def convert(self, value, param, ctx):
        from engine.cluster.config import parse_host_port

        if value == "" and self.empty_ok:
            return value
        try:
            parse_host_port(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return value


class ConfigFileError(click.ClickException):
    """A bad node.toml: one Error line naming the file and the key, exit status 2 (no usage banner)."""

    exit_code = 2


def _node_options(f):
    opts = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True), default=None,
                     help="A node.toml (see `walctl init`); flags override it. Default: NODE/node.toml if present."),
        click.option("--lmtp", default=None, type=HostPort(empty_ok=True), metavar="HOST:PORT",
                     help="LMTP front address ('' for none). Default: [lmtp] listen of node.toml, else "
                          "127.0.0.1:2424 for `serve` and none for `follow` (a replica answers 451). At "
                          "127.0.0.1:2424 the front follows the role (opened on promotion, closed on demotion)."),
        click.option("--imap", default=None, type=HostPort(empty_ok=True), metavar="HOST:PORT",
                     help="IMAP front address ('' for none; a replica serves it read-only). Default: [imap] listen "
                          "of node.toml, else none."),
        click.option("--imaps", default=None, type=HostPort(empty_ok=True), metavar="HOST:PORT",
                     help="IMAP over implicit TLS (needs --tls-cert and --tls-key). Default: [imap] tls_listen."),
        click.option("--tls-cert", default=None, type=click.Path(dir_okay=False),
                     help="PEM certificate chain for IMAP STARTTLS and IMAPS. Default: [imap] tls_cert."),
        click.option("--tls-key", default=None, type=click.Path(dir_okay=False),
                     help="Its PEM private key (mode 0600). Default: [imap] tls_key."),
        click.option("--imap-plaintext-login", "allow_plaintext_login", is_flag=True, default=None,
                     help="Allow IMAP LOGIN without TLS from non-loopback addresses (default: loopback only)."),
        click.option("--listen", default=None, type=HostPort(), metavar="HOST:PORT",
                     help="Replication and control port of this node."),
        click.option("--peer", "peers", multiple=True, type=HostPort(), metavar="HOST:PORT",
                     help="Replication address of another node of the cluster (repeat)."),
        click.option("--name", default=None, help="This node's name (default: node.json's)."),
        click.option("--secret-file", default=None, type=click.Path(dir_okay=False),
                     help="Shared replication secret (default NODE/replication.secret)."),
        click.option("--sync-replicas", type=click.IntRange(min=0), default=None,
                     help="Acknowledge only once K replicas hold the message durably (0: asynchronous)."),
        click.option("--sync-timeout", type=click.FloatRange(min=0), default=None, help="Seconds to wait for them."),
        click.option("--sync-fallback", type=click.Choice(["refuse", "async"]), default=None,
                     help="When too few replicas answer: refuse (451) or accept anyway."),
        click.option("--auto-reconcile/--no-auto-reconcile", default=None,
                     help="Send a diverged tail to the master's reconciler automatically."),
        click.option("--metrics", default=None, type=HostPort(empty_ok=True), metavar="HOST:PORT",
                     help="Prometheus endpoint."),
        click.option("--retention-max-bytes", type=click.IntRange(min=0), default=None,
                     help="Drop log segments nobody needs once the log is larger (0: keep everything)."),
        click.option("--unknown-recipients", type=click.Choice(["create", "reject"]), default=None,
                     help="A recipient with no user/LOCAL/INBOX: create it, or answer 550 5.1.1."),
        click.option("--max-message-bytes", type=click.IntRange(min=1), default=None,
                     help="Refuse larger messages with 552 5.3.4."),
        click.option("--log-file", default=None, type=click.Path(dir_okay=False), help="Log here, not stderr."),
        click.option("--log-json", is_flag=True, default=None, help="One JSON object per log line."),
        click.option("--quiet", is_flag=True, default=None, help="Log only warnings."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _settings(node: str, config_file, role: str, **flags) -> dict:
    """The node's settings: each flag given, else its node.toml key, else its default.

    ``role`` ("master" for serve, "replica" for follow) picks the defaults
    that depend on it (:data:`engine.cluster.config.ROLE_DEFAULTS`). ``sources``
    says where each address came from, for error messages.
    """
    path = config_file or (os.path.join(node, "node.toml") if os.path.isfile(os.path.join(node, "node.toml")) else None)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise ConfigFileError(str(exc)) from exc

    def pick(flag, section, key):
        value = flags.get(flag)
        return cfg.value(section, key, role) if value is None else value

    def source(flag, section, key):
        return f"--{flag}" if flags.get(flag) is not None else cfg.source(section, key, role)

    return {
        "name": pick("name", "node", "name"),
        "lmtp": pick("lmtp", "lmtp", "listen"),
        "lmtp_given": flags.get("lmtp") is not None or ("lmtp", "listen") in cfg.given,
        "unknown_recipients": pick("unknown_recipients", "lmtp", "unknown_recipients"),
        "max_message_bytes": flags.get("max_message_bytes") or cfg["lmtp"]["max_message_bytes"] or None,
        "shutdown_grace_s": cfg["lmtp"]["shutdown_grace_s"],
        "listen": pick("listen", "replication", "listen"),
        "peers": list(flags.get("peers") or ()) or list(cfg["replication"]["peers"]),
        "secret_file": pick("secret_file", "replication", "secret_file") or os.path.join(node, SECRET_FILE),
        "sync_replicas": pick("sync_replicas", "replication", "sync_replicas"),
        "sync_timeout_s": pick("sync_timeout", "replication", "sync_timeout_s"),
        "sync_fallback": pick("sync_fallback", "replication", "sync_fallback"),
        "auto_reconcile": pick("auto_reconcile", "replication", "auto_reconcile"),
        "failover_timeout_s": cfg["replication"]["failover_timeout_s"],
        "retention_max_bytes": pick("retention_max_bytes", "replication", "retention_max_bytes"),
        "metrics": pick("metrics", "metrics", "listen"),
        "imap": pick("imap", "imap", "listen"),
        "imaps": pick("imaps", "imap", "tls_listen"),
        "tls_cert": pick("tls_cert", "imap", "tls_cert"),
        "tls_key": pick("tls_key", "imap", "tls_key"),
        "allow_plaintext_login": pick("allow_plaintext_login", "imap", "allow_plaintext_login"),
        "imap_limits": {k: cfg["imap"][k] for k in ("max_sessions_per_user", "max_sessions_per_address",
                                                      "max_literal_bytes", "login_timeout_s", "idle_timeout_s")},
        "imap_grace_s": cfg["imap"]["shutdown_grace_s"],
        "log_file": pick("log_file", "log", "file") or None,
        "log_json": pick("log_json", "log", "json"),
        "quiet": pick("quiet", "log", "quiet"),
        "sources": {
            "LMTP": source("lmtp", "lmtp", "listen"),
            "replication and control": source("listen", "replication", "listen"),
            "metrics": source("metrics", "metrics", "listen"),
            "IMAP": source("imap", "imap", "listen") if pick("imap", "imap", "listen")
            else source("imaps", "imap", "tls_listen"),
        },
    }


def _find(exc: BaseException, kind: type) -> BaseException | None:
    """The first ``kind`` in ``exc`` or the exception groups it nests."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _find(sub, kind)
            if found is not None:
                return found
    return None


def _run(node: str, s: dict, *, masters: list[str] = ()) -> int:
    import errno

    import anyio

    from engine.cluster import Cluster, ClusterConfig, parse_address
    from engine.errors import ListenError
    from engine.node import LOG_DIR
    from engine.lmtp import LmtpConfig
    from engine.runner import NodeRunner

    from .cliutil import error_message

    _setup_logging(s["log_file"], s["quiet"], s["log_json"])
    # A thread whose fdatasync returned should get the GIL quickly: the default
    # 5 ms switch interval added ~1 ms to a lone delivery (measured: 434/s vs 1,178/s).
    sys.setswitchinterval(0.0005)
    listen = parse_address(s["listen"]) if s["listen"] else None
    peers = [parse_address(p) for p in list(masters) + s["peers"]]
    metrics = parse_address(s["metrics"]) if s["metrics"] else None
    def lmtp_config(address: str) -> LmtpConfig:
        host, port = parse_address(address)
        return LmtpConfig(host=host, port=port, unknown_recipients=s["unknown_recipients"],
                          max_message_bytes=s["max_message_bytes"], shutdown_grace_s=s["shutdown_grace_s"])

    lmtp = lmtp_config(s["lmtp"]) if s["lmtp"] else False
    # CTL-11: the front follows the role when it is the master's default address (set or by
    # default): a promoted node opens it, a demoted one gives it up. An address set elsewhere
    # stays as started; "" means no LMTP front in any role.
    master_default = parse_address(ROLE_DEFAULTS[("lmtp", "listen")]["master"])
    if not s["lmtp_given"]:
        lmtp_role = lmtp_config(ROLE_DEFAULTS[("lmtp", "listen")]["master"])
    elif s["lmtp"] and parse_address(s["lmtp"]) == master_default:
        lmtp_role = lmtp
    else:
        lmtp_role = None
    if listen and not os.path.exists(s["secret_file"]):
        raise click.ClickException(f"no secret file {s['secret_file']}: copy the master's replication.secret "
                                   f"there (mode 0600), or pass --secret-file")
    secret_file = s["secret_file"] if os.path.exists(s["secret_file"]) else ""
    imap = _imap_config(s)
    cluster = Cluster(ClusterConfig(
        name=s["name"] or "", listen=listen, peers=peers, secret_file=secret_file,
        sync_replicas=s["sync_replicas"], sync_timeout_s=s["sync_timeout_s"], sync_fallback=s["sync_fallback"],
        auto_reconcile=s["auto_reconcile"], failover_timeout_s=s["failover_timeout_s"], metrics=metrics,
        retention_max_bytes=s["retention_max_bytes"]))
    runner = NodeRunner(node, lmtp, imap=imap, imap_grace_s=s["imap_grace_s"], lmtp_role=lmtp_role)
    runner.add_service("cluster", cluster.service)
    try:
        anyio.run(runner.run)
    except Exception as exc:
        clash = _find(exc, ListenError)
        if clash is not None:
            what = ("another process listens there: stop it, or choose another address"
                    if clash.errno == errno.EADDRINUSE else "choose an address of this host")
            raise click.ClickException(f"{clash} (set by {s['sources'].get(clash.service, 'the default')}); "
                                       f"{what}") from None
        message, typed = error_message(exc, log=os.path.join(node, LOG_DIR))
        if typed:  # the node's own words (a damaged log, a refusal); anything else: walctl's guard
            raise click.ClickException(message) from None
        raise
    return 0


def _imap_config(s: dict):
    """The IMAP front's settings (None: no IMAP front). Refuses, before anything starts, an IMAPS
    address without a certificate and key, an unreadable certificate or key, and a key that group
    or other users can read."""
    import stat

    from engine.cluster import parse_address
    from engine.imap.server import ImapConfig, make_ssl_context

    if not s["imap"] and not s["imaps"]:
        return None
    cert, key = s["tls_cert"] or None, s["tls_key"] or None
    if s["imaps"] and not (cert and key):
        raise click.ClickException("--imaps (IMAP over TLS) needs --tls-cert and --tls-key ([imap] tls_cert, tls_key)")
    if bool(cert) != bool(key):
        raise click.ClickException("give both --tls-cert and --tls-key ([imap] tls_cert, tls_key), or neither")
    context = None
    if cert:
        try:
            mode = stat.S_IMODE(os.stat(key).st_mode)
        except OSError as exc:
            raise click.ClickException(f"cannot read the TLS key {key}: {exc.strerror}") from None
        if mode & 0o077:
            raise click.ClickException(f"the TLS key {key} is readable by other users (mode {mode:o}): "
                                       f"chmod 600 {key}")
        try:
            context = make_ssl_context(cert, key)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise click.ClickException(f"cannot load the TLS certificate {cert} with key {key}: {exc}") from None
    host, port = parse_address(s["imap"]) if s["imap"] else (None, None)
    tls_host, tls_port = parse_address(s["imaps"]) if s["imaps"] else (None, None)
    if host and tls_host and host != tls_host:
        raise click.ClickException(f"--imap and --imaps must be on one address (got {host} and {tls_host})")
    return ImapConfig(host=host or tls_host, port=port, tls_port=tls_port, certfile=cert, keyfile=key,
                      ssl_context=context, allow_plaintext_login=bool(s["allow_plaintext_login"]), **s["imap_limits"])


@click.command(context_settings=CONTEXT_SETTINGS)
@node_argument
@_node_options
def serve(node: str, config_file, **flags) -> None:
    """Run a master: LMTP front, IMAP front, replication for replicas, control, until SIGTERM.

    A 250 goes out once the delivery is durable in the log (and, with
    --sync-replicas K, on K replicas); so does an IMAP tagged OK to a write
    (--imap HOST:PORT; --imaps with --tls-cert and --tls-key; LOGIN without
    TLS only from loopback unless --imap-plaintext-login). Prints where it
    listens; logs one line per recipient delivery. After a soft failover
    (`walctl failover`) it is a replica: its IMAP sessions get BYE naming the
    new master, and an LMTP front at 127.0.0.1:2424 closes for the new master.
    SIGTERM or SIGINT drains (IMAP sessions get BYE) and exits 0.

    \b
    Example:
        walctl serve node1 --lmtp 127.0.0.1:2424 --listen 127.0.0.1:7001
    """
    from engine.node import read_config, write_config

    _require_node(node)
    if log_in_use(node):
        raise click.ClickException(f"node {node} is already running (its log is locked by another process)")
    s = _settings(node, config_file, "master", **flags)
    with _errors(node):
        cfg = read_config(node)
    if cfg.role != "master":
        raise click.ClickException(f"node {node} is a replica: run `walctl follow {node} --master HOST:PORT`, "
                                   f"or promote it with `walctl promote {node}`")
    if s["name"] and s["name"] != cfg.name:
        cfg.name = s["name"]
        write_config(os.path.abspath(node), cfg)
    other = _other_master(s)
    if other is not None:
        raise click.ClickException(
            f"{other['node']} at {other['address']} is already the master (epoch {other['epoch']}, "
            f"LSN {other['last_lsn']}): two masters would split the cluster. After a failover, restart this "
            f"node as a replica: `walctl follow {node} --master {other['address']} ...` (its diverged records, "
            f"if any, are cut aside and reconciled)")
    sys.exit(_run(node, s))


def _other_master(s: dict) -> dict | None:
    """A reachable peer that is master already (checked before serving as master)."""
    from engine.cluster import parse_address

    if not s["peers"] or not os.path.exists(s["secret_file"]):
        return None
    secret = load_secret(s["secret_file"])
    for peer in s["peers"]:
        if peer == s["listen"]:
            continue
        try:
            host, port = parse_address(peer)
            with ControlClient.tcp(host, port, secret, timeout=1.0) as c:
                st = c.call("status")
        except (OSError, ControlError, ValueError):
            continue
        if st.get("role") == "master":
            return {"node": st.get("node"), "address": peer, "epoch": st.get("epoch"), "last_lsn": st.get("last_lsn")}
    return None


@click.command(context_settings=CONTEXT_SETTINGS)
@node_argument
@click.option("--master", "masters", multiple=True, type=HostPort(), metavar="HOST:PORT",
              help="The master's replication address (repeat for every node that may be master).")
@click.option("--reseed", is_flag=True,
              help="Move this node's log and store aside (NODE/lost-STAMP/) and seed it anew from the master.")
@_node_options
def follow(node: str, masters: tuple[str, ...], reseed: bool, config_file, **flags) -> None:
    """Run a replica of a master: an exact copy of its log, applied to its store.

    Reconnects by itself with backoff, resumes at its durable LSN, and after
    a failover finds the new master among --master/--peer addresses. A new
    NODE is created and seeded from the master (a snapshot of its store plus
    the log from there when the master no longer holds LSN 1); a seed that
    fails leaves no node behind. A replica has no LMTP front unless --lmtp
    or [lmtp] listen gives it one (answering 451 until promoted); given
    none, it opens one at 127.0.0.1:2424 once promoted. With --imap it
    serves IMAP read-only (writes answer NO [UNAVAILABLE] naming the
    master; open sessions become writable once promoted). While no master answers, it says once
    that it waits, and once when it connects.

    \b
    Example:
        walctl follow node2 --master 127.0.0.1:7001 --listen 127.0.0.1:7002
    """
    from engine.node import LOG_DIR, Node, read_config, write_config

    s = _settings(node, config_file, "replica", **flags)
    if not masters and not s["peers"]:
        raise click.UsageError("give the master's address with --master HOST:PORT")
    if log_in_use(node):
        raise click.ClickException(f"node {node} is already running (its log is locked by another process)")
    if not os.path.exists(s["secret_file"]):
        raise click.ClickException(f"no secret file {s['secret_file']}: give the master's replication.secret "
                                   f"with --secret-file (or copy it there, mode 0600)")
    new = not os.path.isfile(os.path.join(node, "node.json"))
    before = set(os.listdir(node)) if os.path.isdir(node) else None
    try:
        if new:
            with _errors(node):
                Node.init(node, role="replica", name=s["name"] or "", create_log=False)
        with _errors(node):
            cfg = read_config(node)
            if cfg.role != "replica" or (s["name"] and s["name"] != cfg.name):
                cfg.role = "replica"
                cfg.name = s["name"] or cfg.name
                write_config(os.path.abspath(node), cfg)
        if reseed and os.path.isdir(os.path.join(node, LOG_DIR)):
            aside = os.path.join(node, "lost-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime()))
            os.makedirs(aside)
            for name in (LOG_DIR, "store.sqlite", "store.sqlite-wal", "store.sqlite-shm"):
                if os.path.exists(os.path.join(node, name)):
                    os.rename(os.path.join(node, name), os.path.join(aside, name))
            click.echo(f"moved the old log and store to {aside}", err=True)
        if not os.path.isdir(os.path.join(node, LOG_DIR)):
            _setup_logging(s["log_file"], s["quiet"], s["log_json"])
            _seed(node, [*masters, *s["peers"]], s, cfg.name)
    except BaseException:
        if new:  # a seed that failed leaves the directory as it was: no half-made node
            _remove_created(node, before)
        raise
    sys.exit(_run(node, s, masters=list(masters)))


def _remove_created(node: str, before: set[str] | None) -> None:
    """Remove what a failed ``follow`` created in ``node`` (the directory too if it was
    not there); entries that were there before (a secret copied in) stay."""
    import shutil

    if not os.path.isdir(node):
        return
    for name in set(os.listdir(node)) - (before or set()):
        path = os.path.join(node, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    if before is None:
        with contextlib.suppress(OSError):
            os.rmdir(node)


def _seed(node: str, addresses: list[str], s: dict, name: str) -> None:
    """Create a new replica's log (and store, from a snapshot) from its master."""
    import anyio

    from engine.cluster import parse_address, report_link
    from engine.node import LOG_DIR, STORE_FILE
    from engine.replication.receiver import ReplicaHooks, ReplicaLink, run_replica

    from .cliutil import error_message, stderr_console

    secret = load_secret(s["secret_file"])
    addrs = [parse_address(a) for a in addresses]
    store_path = os.path.join(node, STORE_FILE)
    console = stderr_console()  # a progress bar on a terminal, nothing in pipes
    progress = None
    if console is not None:
        from rich.progress import DownloadColumn, Progress, SpinnerColumn, TextColumn, TransferSpeedColumn

        progress = Progress(SpinnerColumn(), TextColumn("seeding {task.description}"), DownloadColumn(),
                            TransferSpeedColumn(), console=console, transient=True)

    class Sink:
        """The seeding snapshot, written beside the store and put in place atomically (FileOps)."""

        def __init__(self, meta):
            from wal import OS_FILEOPS

            self.meta = meta
            self.out = OS_FILEOPS.open_atomic(store_path)
            self.n = 0

        def write(self, data: bytes) -> None:
            self.out.write(data)
            self.n += len(data)
            if progress is not None:
                progress.update(task, completed=self.n)

        def commit(self) -> None:
            for suffix in ("-wal", "-shm"):  # the old store's SQLite files must not meet the new store
                if os.path.exists(store_path + suffix):
                    os.unlink(store_path + suffix)
            self.out.commit()
            click.echo(f"seeded store from a snapshot at LSN {self.meta.lsn} ({self.n} bytes)", err=True)

        def abort(self) -> None:
            self.out.abort()

    link = ReplicaLink(name, addresses[0])

    def say(text: str) -> None:
        click.echo(text, err=True)

    async def main():
        async with anyio.create_task_group() as tg:
            tg.start_soon(report_link, link, addresses, say, lambda _text: None)
            await tg.start(lambda task_status: run_replica(
                os.path.join(node, LOG_DIR), addrs[0][0], addrs[0][1], secret, name,
                hooks=ReplicaHooks(snapshot_sink=Sink), alternates=addrs[1:], link=link, task_status=task_status))
            say(f"seeding: following {link.master}")
            tg.cancel_scope.cancel()

    task = progress.add_task(f"store snapshot from {addresses[0]}", total=None) if progress else None
    try:
        if progress is not None:
            with progress:
                anyio.run(main)
        else:
            anyio.run(main)
    except Exception as exc:
        message, typed = error_message(exc, log=os.path.join(node, LOG_DIR))
        if typed or isinstance(exc, OSError):
            raise click.ClickException(f"cannot seed {node} from {link.master}: {message}") from None
        raise


def _client(node: str | None, connect: str | None, secret_file: str | None) -> ControlClient:
    """A control connection to the node: ``--connect`` over TCP, else NODE/control.sock.

    No socket file, or one nobody answers (a killed node leaves its socket
    behind), means the node is not running, and the error says so.
    """
    import errno

    try:
        if connect:
            host, port = _host_port(connect)
            sf = secret_file or (os.path.join(node, SECRET_FILE) if node else None)
            secret = load_secret(sf) if sf and os.path.exists(sf) else None
            return ControlClient.tcp(host, port, secret)
        _require_node(node)
        sock = os.path.join(node, "control.sock")
        try:
            return ControlClient.unix(sock)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT) and _starting(node):
                return ControlClient.unix(sock)  # it was starting: its socket answers now
            raise
    except (OSError, ControlError) as exc:
        if not connect and isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            raise click.ClickException(f"node {node} is not running (nothing answers on "
                                       f"{os.path.join(node, 'control.sock')}): start it with `walctl serve "
                                       f"{node}` or `walctl follow {node} ...`") from exc
        where = connect or os.path.join(node, "control.sock")
        raise click.ClickException(f"cannot reach the node at {where}: {exc}") from exc


def _call(node: str | None, connect: str | None, secret_file: str | None, op: str, **args):
    with _client(node, connect, secret_file) as c:
        try:
            return c.call(op, **args)
        except ControlError as exc:
            raise click.ClickException(str(exc)) from exc


def _running(node: str | None, connect: str | None) -> bool:
    return bool(connect) or (node is not None and log_in_use(node) and os.path.exists(os.path.join(node, "control.sock")))


connect_options = [
    click.option("--connect", default=None, metavar="HOST:PORT", help="Reach a running node on its replication port."),
    click.option("--secret-file", default=None, type=click.Path(dir_okay=False), help="Secret for --connect."),
]


def _with_connect(f):
    for opt in reversed(connect_options):
        f = opt(f)
    return f


def _offline_status(node: str) -> dict:
    """A stopped node's status, read without opening the node.

    Nothing is locked or changed (a torn tail is left for the node to trim
    when it starts): a node started meanwhile is never refused because a
    status holds its log.
    """
    import wal
    from engine.node import DIVERGED_FILE, LOG_DIR, STORE_FILE, read_config
    from wal import SeekReader
    from wal.segment import list_segments

    from .cmd_node import ReadOnlyStore

    cfg = read_config(node)
    log = os.path.join(node, LOG_DIR)
    with SeekReader(log) as r:
        last_lsn, last_hash, last_epoch = r.last()
        log_id = r.log_id
    try:
        with open(os.path.join(log, "EPOCH"), "rb") as f:
            epoch_file = int(f.read().strip() or b"1")
    except FileNotFoundError:
        epoch_file = 1
    applied_lsn = quarantined = 0
    if os.path.exists(os.path.join(node, STORE_FILE)):  # a replica being seeded has none yet
        store = ReadOnlyStore(node)
        try:
            applied_lsn = store.applied_lsn
            quarantined = store.conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
        finally:
            store.close()
    try:
        with open(os.path.join(node, DIVERGED_FILE)) as f:
            tails = json.load(f)["tails"]
    except FileNotFoundError:
        tails = []
    segments = list_segments(log)
    cursors = wal.CursorStore(log, wal.OS_FILEOPS).list()
    return {
        "node": cfg.name, "role": cfg.role, "log_id": str(log_id), "epoch": max(last_epoch, epoch_file),
        "last_lsn": last_lsn, "last_hash": last_hash.hex(), "applied_lsn": applied_lsn, "writes_paused": False,
        "log_failed": None, "applier_error": None, "quarantined": quarantined, "checkpoint_mismatches": 0,
        "running": False,
        "log_bytes": sum(os.path.getsize(os.path.join(log, name)) for _, name in segments),
        "log_segments": len(segments),
        "diverged_tails": [t for t in tails if not t.get("reconciled")],
        "replicas": [{"name": name[len("replica."):], "connected": False, "durable_lsn": lsn,
                      "durable_lag_records": max(0, last_lsn - lsn)}
                     for name, lsn in cursors.items() if name.startswith("replica.")],
    }


def _print_status(st: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a file, a pipe, `less`: never cut a value at 80 columns
        console = Console(width=STATUS_WIDTH_NOT_TTY)
    t = Table(title=f"node {st.get('node')} ({st.get('role')})", show_header=False)
    for key in ("log_id", "epoch", "last_lsn", "last_hash", "applied_lsn", "listen", "lmtp", "master", "sync_mode",
                "sync_degraded", "writes_paused", "log_failed", "applier_error", "quarantined",
                "checkpoint_mismatches", "log_bytes", "log_segments"):
        if st.get(key) not in (None, ""):
            value = st[key]
            if key == "last_hash":
                value = str(value)[:16] + "…"
            t.add_row(key, str(value))
    imap = st.get("imap")
    if imap:
        t.add_row("imap", ", ".join(f"{kind.upper()} {address}" for kind, address in imap["listen"].items()))
        t.add_row("imap sessions", f"{imap['sessions']} open ({imap['idle']} in IDLE); {imap['connections']} "
                                   f"connections and {imap['auth_failures']} failed logins since start")
        if imap["commands"]:
            t.add_row("imap commands", "; ".join(
                f"{name} " + " ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
                for name, outcomes in sorted(imap["commands"].items())))
    conn = st.get("connection")
    if conn:
        t.add_row("connection", f"{conn.get('state')} ({'connected' if conn.get('connected') else 'not connected'}"
                                f"{', since ' + time.strftime('%H:%M:%S', time.localtime(conn['since'])) if conn.get('since') else ''})")
        if conn.get("last_error"):
            t.add_row("last error", str(conn["last_error"]))
    console.print(t)
    if st.get("replicas"):
        r = Table(title="replicas", caption="lags in records behind the master's last LSN; lag bytes and seconds: "
                                            "sent, not yet durable on the replica")
        for col in ("name", "connected", "since", "durable LSN", "applied LSN", "durable lag", "applied lag",
                    "lag bytes", "lag seconds", "last error"):
            r.add_column(col)

        def cell(value) -> str:
            return "" if value is None else str(value)

        for rep in st["replicas"]:
            since = rep.get("since")
            r.add_row(rep.get("name", "?"), "yes" if rep.get("connected") else "no",
                      time.strftime("%H:%M:%S", time.localtime(since)) if since else "",
                      cell(rep.get("durable_lsn")), cell(rep.get("applied_lsn")),
                      cell(rep.get("durable_lag_records")), cell(rep.get("applied_lag_records")),
                      cell(rep.get("lag_bytes")),
                      f"{rep['lag_seconds']:.3f}" if rep.get("lag_seconds") is not None else "",
                      # a connected replica's last error is history (kept in --json as last_error)
                      "" if rep.get("connected") else str(rep.get("last_error") or ""))
        console.print(r)
    for tail in st.get("diverged_tails") or []:
        console.print(f"[yellow]diverged tail not reconciled:[/] {tail['path']} (after LSN {tail['fork_lsn']}, "
                      f"{tail['records']} records): run `walctl reconcile`")
    for ev in st.get("events") or []:
        console.print(f"{time.strftime('%H:%M:%S', time.localtime(ev['time']))} {ev['kind']}: {ev['text']}")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("node", required=False, type=click.Path(file_okay=False))
@_with_connect
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the same fields).")
@click.option("--watch", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS", help="Refresh every SECONDS until Ctrl-C.")
def status(node: str | None, connect: str | None, secret_file: str | None, as_json: bool, watch: float | None) -> None:
    """Show a node's role, log position, store, replicas and their lag.

    On a master: per replica name, connected (since), durable and applied
    LSN, lag in records, bytes and seconds, last error. On a replica: its
    master, connection state, durable and applied LSN. Either: where the
    LMTP and IMAP fronts listen; IMAP sessions open and in IDLE, failed
    logins, and commands answered per name and tagged status (OK/NO/BAD).

    \b
    Example:
        walctl status node1
        walctl status --connect 127.0.0.1:7001 --secret-file node1/replication.secret --json
    """
    if node is None and not connect:
        raise click.UsageError("give NODE or --connect HOST:PORT")
    if not watch:
        _show_status(node, connect, secret_file, as_json, clear=False)
        return
    try:
        _show_status(node, connect, secret_file, as_json, clear=True)  # a bad NODE or address fails at once
        while True:
            time.sleep(watch)
            try:
                _show_status(node, connect, secret_file, as_json, clear=True)
            except click.ClickException as exc:
                # Watching: a node that stops or restarts is shown as such, not the end of the watch.
                click.echo(f"{time.strftime('%H:%M:%S')} {exc.format_message()}", err=True)
    except KeyboardInterrupt:
        return


def _starting(node: str | None, wait_s: float = NODE_START_WAIT_S) -> bool:
    """Whether ``node`` is a node that is starting: its log is locked and its control socket
    answers within ``wait_s`` (a node opens its log, then its socket; a status run right
    after `walctl serve NODE &` shows the running node, not the stopped one)."""
    if node is None or not log_in_use(node):
        return False
    sock = os.path.join(node, "control.sock")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and log_in_use(node):
        try:
            ControlClient.unix(sock, timeout=5).close()
            return True
        except (OSError, ControlError):
            time.sleep(0.05)
    return False


def _show_status(node: str | None, connect: str | None, secret_file: str | None, as_json: bool, clear: bool) -> None:
    if _running(node, connect) or _starting(node):
        st = _call(node, connect, secret_file, "status")
        st["running"] = True
    else:
        _require_node(node)
        with _errors(node):
            st = _offline_status(node)
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
    else:
        if clear:
            click.clear()
        _print_status(st)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("node", required=False, type=click.Path(file_okay=False))
@click.option("--to", "target", required=True, metavar="NAME",
              help="Name of the replica to hand the master role to (as `walctl status` lists it).")
@click.option("--timeout", type=float, default=None, help="Seconds before the failover is aborted.")
@_with_connect
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def failover(node, target, timeout, connect, secret_file, as_json) -> None:
    """Soft failover: drain every replication event, then hand the master role over.

    The master refuses new writes (LMTP 451), waits until the replica named
    by --to NAME holds its whole log durably, promotes it in a new epoch and
    becomes its replica; the other replicas follow the new master by
    themselves. On timeout the failover is aborted and the master resumes.
    A NAME the master does not know is refused at once, listing the known
    replicas. Prints how long writes were refused.

    \b
    Example:
        walctl failover node1 --to node2
    """
    if node is None and not connect:
        raise click.UsageError("give NODE or --connect HOST:PORT")
    result = _call(node, connect, secret_file, "failover", to=target, timeout=timeout)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{target} is master in epoch {result['epoch']} from LSN {result['last_lsn']}; "
                   f"writes were refused for {result['refused_writes_s']:.3f} s")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("node", required=False, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Promote even if the old master still answers.")
@_with_connect
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def promote(node, force, connect, secret_file, as_json) -> None:
    """Hard failover: make this replica the master in a new epoch.

    Refused while the replica's master is reachable and serving, unless
    --force. A stopped node is promoted offline only with --force (nothing
    can tell whether its master still serves). Other replicas join the new
    master if their logs are a prefix of its history.

    \b
    Example:
        walctl promote node2
    """
    if node is None and not connect:
        raise click.UsageError("give NODE or --connect HOST:PORT")
    if _running(node, connect):
        result = _call(node, connect, secret_file, "promote", force=force)
    else:
        if not force:
            raise click.ClickException(f"node {node} is not running: start it with `walctl follow` and promote it "
                                       f"there (it checks whether its master still serves), or use --force")
        from engine.cluster.failover import promote as do_promote
        from engine.node import Node

        _require_node(node)
        with _errors(node):
            n = Node.open(node)
            try:
                n.set_role("master")
                result = do_promote(n).to_dict()
            finally:
                n.close()
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"promoted: master in epoch {result['epoch']} from LSN {result['first_lsn']}")


@click.group(context_settings=CONTEXT_SETTINGS)
@click.argument("node", type=click.Path(file_okay=False))
@click.pass_context
def quarantine(ctx, node) -> None:
    """Mailboxes held after failing to apply (or tripping the guard).

    \b
    Example:
        walctl quarantine node2 list
        walctl quarantine node2 resync user/bob/INBOX
    """
    _require_node(node)
    ctx.obj = node


def _q(node: str, op: str, **args):
    if _running(node, None):
        return _call(node, None, None, op, **args)
    from engine.node import Node

    with _errors(node):
        n = Node.open(node, start_applier=False)
        try:
            if op == "quarantine_list":
                return n.quarantined()
            if op == "quarantine_show":
                return n.quarantine_show(args["mailbox"])
            if op in ("quarantine_retry", "quarantine_release"):
                fn = n.quarantine_retry if op == "quarantine_retry" else n.quarantine_release
                ok, msg = fn(args["mailbox"])
                return {"released": ok, "message": msg}
            raise click.ClickException("resync needs the node running and connected to its master")
        finally:
            n.close()


def _q_echo(result, as_json: bool) -> None:
    if as_json or not isinstance(result, (list, dict)):
        click.echo(json.dumps(result, indent=2, default=str))
    elif isinstance(result, list):
        if not result:
            click.echo("no mailbox is quarantined")
        for row in result:
            click.echo(f"{row['name']}  {row['kind']}  {row['state']}  from LSN {row['first_lsn']}  "
                       f"held {row['held_records']}  {row['reason']}")
    else:
        for k, v in result.items():
            click.echo(f"{k}: {v}")


@quarantine.command(name="list", context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def quarantine_list(node, as_json) -> None:
    """List quarantined mailboxes: kind, state, first held LSN, reason."""
    _q_echo(_q(node, "quarantine_list"), as_json)


@quarantine.command(name="show", context_settings=CONTEXT_SETTINGS)
@click.argument("mailbox")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def quarantine_show(node, mailbox, as_json) -> None:
    """Show why MAILBOX is held."""
    _q_echo(_q(node, "quarantine_show", mailbox=mailbox), as_json)


def _q_action(op: str, doc: str):
    @click.argument("mailbox")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_obj
    def cmd(node, mailbox, as_json) -> None:
        result = _q(node, op, mailbox=mailbox)
        _q_echo(result, as_json)
        if isinstance(result, dict) and result.get("released") is False:
            sys.exit(1)

    cmd.__doc__ = doc
    return cmd


quarantine.command(name="retry", context_settings=CONTEXT_SETTINGS)(
    _q_action("quarantine_retry", "Apply MAILBOX's held records again (after fixing the cause)."))
quarantine.command(name="release", context_settings=CONTEXT_SETTINGS)(
    _q_action("quarantine_release", "Apply MAILBOX's held records, bypassing the guard (you confirmed them)."))
quarantine.command(name="resync", context_settings=CONTEXT_SETTINGS)(
    _q_action("quarantine_resync", "Replace MAILBOX with the master's copy, then replay later records."))


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--master", "master", required=True, metavar="HOST:PORT", help="The master's replication port.")
@click.option("--replica", "replica", required=True, metavar="HOST:PORT", help="The replica's replication port.")
@click.option("--secret-file", required=True, type=click.Path(dir_okay=False, exists=True), help="Shared secret.")
@click.option("--repair", is_flag=True, help="Resync every mismatched mailbox from the master.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for the replica.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def check(master, replica, secret_file, repair, timeout, as_json) -> None:
    """Prove a replica pair consistent: every mailbox's digest at a common LSN.

    The master logs a checkpoint; once the replica applied it, mailboxes
    whose digest differs (or whose rows or bodies fail a full recompute on
    the replica) are listed with what differs: UIDs missing on either side,
    GUID mismatches, flag differences. --repair resyncs them from the master
    and then checks again at a new checkpoint. After a crash of either
    node, run this.

    Exit status: 0 when every mailbox matches (with --repair: when the
    check after the repair finds every mailbox matching); 1 otherwise, with
    one Error line saying which mailboxes still differ.

    \b
    Example:
        walctl check --master 127.0.0.1:7001 --replica 127.0.0.1:7002 --secret-file s
    """
    report = _check_pair(master, replica, secret_file, timeout)
    after = None
    if repair and not report["ok"]:
        for entry in report["mismatched"]:
            entry["repair"] = _call(None, replica, secret_file, "quarantine_resync", mailbox=entry["mailbox"])
        after = _check_pair(master, replica, secret_file, timeout)
        report["after_repair"] = after
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        _print_check(report)
        if after is not None:
            click.echo("after the repair, ", nl=False)
            _print_check(after)
    final = after or report
    if final["ok"]:
        sys.exit(0)
    names = [e["mailbox"] for e in final["mismatched"]]
    listing = "; ".join(f"{e['mailbox']}: {', '.join(e['reasons']) or 'digest differs'}" for e in final["mismatched"])
    if after is not None:
        raise click.ClickException(
            f"{len(names)} mailbox(es) still differ after the repair, at checkpoint LSN {after['checkpoint_lsn']} "
            f"({listing}): the master's own copy may be damaged; run `walctl scrub` on the master")
    raise click.ClickException(f"{len(names)} mailbox(es) differ at checkpoint LSN {report['checkpoint_lsn']} "
                               f"({listing}); `walctl check ... --repair` resyncs them from the master")


def _check_pair(master: str, replica: str, secret_file: str, timeout: float) -> dict:
    """One check of the pair at a new checkpoint: ``{checkpoint_lsn, ok, mismatched: [...]}``."""
    import contextlib

    from .cliutil import stderr_console

    cp = _call(None, master, secret_file, "checkpoint")["lsn"]
    deadline = time.monotonic() + timeout
    console = stderr_console()  # a spinner on a terminal, nothing in pipes
    with console.status(f"waiting for the replica to apply the checkpoint at LSN {cp}") if console \
            else contextlib.nullcontext():
        while True:
            st = _call(None, replica, secret_file, "status")
            if st.get("applied_lsn", 0) >= cp:
                break
            if time.monotonic() > deadline:
                raise click.ClickException(f"the replica has not applied the checkpoint (LSN {cp}) after {timeout} s")
            time.sleep(0.1)
    held = [q for q in _call(None, replica, secret_file, "quarantine_list") if q["kind"] in ("digest", "error")]
    problems = _call(None, replica, secret_file, "verify_store")
    names = sorted({q["name"] for q in held} | set(problems))
    report = {"checkpoint_lsn": cp, "ok": not names, "mismatched": []}
    for name in names:
        entry = {"mailbox": name, "reasons": [q["reason"] for q in held if q["name"] == name] + problems.get(name, [])}
        try:
            ms = _call(None, master, secret_file, "mailbox_snapshot", mailbox=name)
            rs = _call(None, replica, secret_file, "mailbox_snapshot", mailbox=name)
            mm = {m["uid"]: m for m in ms["messages"]}
            rm = {m["uid"]: m for m in rs["messages"]}
            entry["missing_on_replica"] = sorted(set(mm) - set(rm))
            entry["missing_on_master"] = sorted(set(rm) - set(mm))
            entry["guid_mismatch"] = sorted(u for u in set(mm) & set(rm) if mm[u]["guid"] != rm[u]["guid"])
            entry["flag_differences"] = sorted(u for u in set(mm) & set(rm) if mm[u]["flags"] != rm[u]["flags"])
        except click.ClickException as exc:
            entry["detail_error"] = str(exc)
        report["mismatched"].append(entry)
    return report


def _print_check(report: dict) -> None:
    mismatched = report["mismatched"]
    click.echo(f"checkpoint at LSN {report['checkpoint_lsn']}: "
               + ("all mailboxes match" if not mismatched else f"{len(mismatched)} mismatched"))
    for e in mismatched:
        click.echo(f"  {e['mailbox']}: {'; '.join(e['reasons'])}")
        for k in ("missing_on_replica", "missing_on_master", "guid_mismatch", "flag_differences"):
            if e.get(k):
                click.echo(f"    {k.replace('_', ' ')}: UIDs {e[k][:20]}")
        if "repair" in e:
            click.echo(f"    repaired: {e['repair']}")


@click.command(context_settings=CONTEXT_SETTINGS)
@node_argument
@click.option("--repair", is_flag=True, help="Resync damaged mailboxes from the master (running replica).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def scrub(node, repair, as_json) -> None:
    """Rehash every log record against its hash and every body against its GUID.

    Reports damage; with --repair, a running replica fetches good copies of
    damaged mailboxes from its master, and then every mailbox is checked
    again. A damaged log is not repaired here (see `walctl verify` and
    `walctl repair`).

    Exit status: 0 when nothing is damaged (with --repair: when nothing is
    damaged after the repair); 1 otherwise, with one Error line saying what
    is still damaged.

    \b
    Example:
        walctl scrub node2 --repair
    """
    from engine.node import LOG_DIR

    from .cliutil import describe_damage
    from .walctl_verify import _run_verify

    _require_node(node)
    log_dir = os.path.join(node, LOG_DIR)
    log_report = _run_verify(log_dir)  # progress bar on a terminal
    problems = _store_problems(node)
    repaired, after = {}, None
    if repair and problems:
        if not _running(node, None):
            raise click.ClickException("--repair needs the node running as a replica (it fetches from the master)")
        for name in problems:
            repaired[name] = _call(node, None, None, "quarantine_resync", mailbox=name)
        after = _store_problems(node)
    remaining = problems if after is None else after
    out = {"log": log_report.to_dict(), "mailboxes": problems, "repaired": repaired,
           "ok": log_report.ok and not remaining}
    if after is not None:
        out["after_repair"] = after
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
    else:
        click.echo(f"log: {'ok' if log_report.ok else 'DAMAGED: ' + str(log_report.error)} "
                   f"({log_report.records} records)")
        for name, probs in problems.items():
            state = "" if name not in repaired else "  (still damaged after the repair)" if name in remaining \
                else "  (repaired)"
            click.echo(f"  {name}: {'; '.join(probs)}{state}")
        if not remaining:
            click.echo("store: every body matches its GUID; every digest matches its rows")
    if out["ok"]:
        sys.exit(0)
    wrong = []
    if not log_report.ok:
        e = log_report.error or {}
        where = f"segment {e.get('segment')}, offset {e.get('offset')}" + (
            f", LSN {e['lsn']}" if e.get("lsn") is not None else "")
        wrong.append(describe_damage(where, str(e.get("reason")), log_dir))
    if remaining:
        what = "still damaged after the repair" if after is not None else "damaged"
        advice = "; the master's copy may be damaged too: scrub the master" if after is not None else \
            "; `walctl scrub NODE --repair` on the running replica fetches them from the master"
        wrong.append(f"{len(remaining)} mailbox(es) {what}: "
                     + "; ".join(f"{n}: {', '.join(p)}" for n, p in sorted(remaining.items())) + advice)
    raise click.ClickException("; ".join(wrong))


def _store_problems(node: str) -> dict:
    """Mailbox -> problems found by a full recompute of the store (running node or not)."""
    if _running(node, None):
        return _call(node, None, None, "verify_store")
    from engine.node import Node

    with _errors(node):
        n = Node.open(node, start_applier=False)
        try:
            return n.verify_store()
        finally:
            n.close()


CLUSTER_COMMANDS = (serve, follow, status, failover, promote, quarantine, check, scrub)
