"""Per-node configuration: one TOML file (``walctl serve --config node.toml``).

Every key, its default and its unit are in :data:`DEFAULT_TOML`, which
``walctl init`` writes as ``NODE/node.toml``. Command-line flags override the
file. Every value is checked when the file is read: an unknown key or
section, a wrong type, a value outside its choices or range, or an address
that is not ``HOST:PORT`` raises :class:`ConfigError` naming the file and the
key (a typo must not silently fall back to a default, nor fail later with
no hint where it came from).

A key in :data:`ROLE_DEFAULTS` is left unset (commented out) in
:data:`DEFAULT_TOML`: its default depends on the node's role, and only a value
the file sets overrides it.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

__all__ = ["DEFAULT_TOML", "load_config", "ConfigError", "DEFAULTS", "ROLE_DEFAULTS", "NodeConfig",
           "parse_host_port"]

DEFAULT_TOML = """\
# mailwal node configuration. Command-line flags override these values.

[node]
# The node's name: how its master and `walctl status` call it (1-48 of A-Z a-z 0-9 . _ -).
name = ""

[lmtp]
# Where the LMTP front listens (HOST:PORT, "" = no LMTP front). Deliver here from Postfix.
# Unset (commented out), a master listens on 127.0.0.1:2424 and a replica has no LMTP front
# (it could only answer 451 until promoted); set it to give a replica one. A front at
# 127.0.0.1:2424 (set or unset) follows the role: opened when the node becomes master,
# closed when a failover makes it a replica.
# listen = "127.0.0.1:2424"
# A recipient with no user/LOCAL/INBOX: "create" it on first delivery, or "reject" (550 5.1.1).
unknown_recipients = "create"
# Largest message accepted, in bytes (larger: 552 5.3.4). 0 = the node's limit (50 MiB).
max_message_bytes = 0
# Seconds SIGTERM waits for open transactions before cutting them.
shutdown_grace_s = 30.0

[imap]
# Where the IMAP front listens (HOST:PORT, "" = no IMAP front). A replica serves it read-only.
# With tls_cert set, STARTTLS is offered here.
listen = ""
# Implicit TLS (IMAPS) address (HOST:PORT, "" = none); needs tls_cert and tls_key.
tls_listen = ""
# The PEM certificate chain for STARTTLS and IMAPS ("" = no TLS).
tls_cert = ""
# Its PEM private key (mode 0600).
tls_key = ""
# LOGIN and AUTHENTICATE PLAIN without TLS from addresses other than loopback (off: refused there).
allow_plaintext_login = false
# Sessions one user may have open at once, and one client address.
max_sessions_per_user = 20
max_sessions_per_address = 100
# Largest literal accepted (an APPENDed message), in bytes (larger: NO [TOOBIG]).
max_literal_bytes = 67108864
# Seconds a client may take to log in, and may stay idle once logged in (IDLE included).
login_timeout_s = 60.0
idle_timeout_s = 1800.0
# Seconds SIGTERM gives sessions to finish their command before BYE cuts them.
shutdown_grace_s = 10.0

[replication]
# This node's replication and control port (HOST:PORT). A master serves replicas here;
# a replica answers control requests here and serves replicas once promoted.
listen = ""
# Every replication address of the cluster (HOST:PORT strings). A replica follows whichever
# of them is the master, and finds the new one by itself after a failover.
peers = []
# The shared secret file (mode 0600, at least 16 bytes). "" = NODE/replication.secret.
secret_file = ""
# Synchronous replication: acknowledge (LMTP 250) only once this many replicas hold the
# message durably. 0 = asynchronous (250 after the local fsync).
sync_replicas = 0
# Seconds to wait for those replicas.
sync_timeout_s = 5.0
# When they do not answer in time: "refuse" (451, the MTA retries) or "async" (accept anyway).
sync_fallback = "refuse"
# After a divergence, send the diverged tail to the master's reconciler automatically.
auto_reconcile = false
# Seconds a soft failover may take before it is aborted (the master then resumes).
failover_timeout_s = 30.0
# Master: once the log is larger than this many bytes, drop whole segments that the store and
# every registered replica have (0 = keep the whole log, so `walctl rebuild` always works).
# A disconnected replica that still needs a segment past this ceiling is marked lost and must
# be reseeded (`walctl follow NODE --reseed`).
retention_max_bytes = 0

[metrics]
# Prometheus endpoint (HOST:PORT, "" = none).
listen = ""

[log]
# One JSON object per line instead of text.
json = false
# Append the log here instead of stderr ("" = stderr).
file = ""
# Log only warnings (no line per delivery).
quiet = false
"""

#: (section, key) -> role -> default, for the keys :data:`DEFAULT_TOML` leaves unset.
ROLE_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("lmtp", "listen"): {"master": "127.0.0.1:2424", "replica": ""},
}

#: section -> key -> default (None for a key whose default depends on the role).
DEFAULTS: dict[str, dict[str, Any]] = tomllib.loads(DEFAULT_TOML)
for (_section, _key), _by_role in ROLE_DEFAULTS.items():
    DEFAULTS[_section][_key] = None
_TYPES = {(section, key): type(value) for section, values in tomllib.loads(DEFAULT_TOML).items()
          for key, value in values.items()}
_TYPES.update({key: type(by_role["master"]) for key, by_role in ROLE_DEFAULTS.items()})

#: Keys with a fixed set of values.
_CHOICES = {
    ("lmtp", "unknown_recipients"): ("create", "reject"),
    ("replication", "sync_fallback"): ("refuse", "async"),
}
#: Keys holding a HOST:PORT ("" allowed: none) or a list of them.
_ADDRESSES = {("lmtp", "listen"), ("replication", "listen"), ("metrics", "listen"), ("imap", "listen"),
              ("imap", "tls_listen")}
_ADDRESS_LISTS = {("replication", "peers")}
#: Numbers that must not be negative.
_NON_NEGATIVE = {("lmtp", "max_message_bytes"), ("lmtp", "shutdown_grace_s"), ("replication", "sync_replicas"),
                 ("replication", "sync_timeout_s"), ("replication", "failover_timeout_s"),
                 ("replication", "retention_max_bytes"), ("imap", "max_sessions_per_user"),
                 ("imap", "max_sessions_per_address"), ("imap", "max_literal_bytes"), ("imap", "login_timeout_s"),
                 ("imap", "idle_timeout_s"), ("imap", "shutdown_grace_s")}
_NAME = re.compile(r"[A-Za-z0-9._-]{1,48}")
_KIND = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
         dict: "a table"}


class ConfigError(ValueError):
    """The configuration file is unreadable, or a key in it is unknown or has a bad value.

    The message names the file and the key. ``walctl`` exits with status 2.
    """


class NodeConfig(dict):
    """section -> key -> value: the defaults overlaid with a file.

    ``path`` is the file (None: defaults only); ``given`` holds the
    ``(section, key)`` pairs the file sets. :meth:`value` resolves a key
    left unset whose default depends on the role (:data:`ROLE_DEFAULTS`).
    """

    path: str | None = None
    given: frozenset = frozenset()

    def value(self, section: str, key: str, role: str) -> Any:
        if (section, key) in ROLE_DEFAULTS and (section, key) not in self.given:
            return ROLE_DEFAULTS[(section, key)][role]
        return self[section][key]

    def source(self, section: str, key: str, role: str | None = None) -> str:
        """Where a value came from, for messages: ``[section] key in PATH`` or ``the default``."""
        if (section, key) in self.given:
            return f"[{section}] {key} in {self.path}"
        if role is not None and (section, key) in ROLE_DEFAULTS:
            return f"the default for a {role}"
        return "the default"


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port). Raises ValueError saying what is wrong."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:2424)")
    return host.strip("[]"), int(port)


def _check(section: str, key: str, value: Any) -> str | None:
    """Why ``value`` is not allowed for ``[section] key`` (None: it is)."""
    if (section, key) in _CHOICES and value not in _CHOICES[(section, key)]:
        return f"must be one of {', '.join(map(repr, _CHOICES[(section, key)]))}, got {value!r}"
    addresses = value if (section, key) in _ADDRESS_LISTS else [value] if (section, key) in _ADDRESSES else []
    for address in addresses:
        if not isinstance(address, str):
            return f"must hold HOST:PORT strings, got {address!r}"
        if address or (section, key) in _ADDRESS_LISTS:
            try:
                parse_host_port(address)
            except ValueError as exc:
                return f"must be {'HOST:PORT strings' if (section, key) in _ADDRESS_LISTS else 'HOST:PORT or empty'}: {exc}"
    if (section, key) in _NON_NEGATIVE and value < 0:
        return f"must not be negative, got {value!r}"
    if (section, key) == ("node", "name") and value and not _NAME.fullmatch(value):
        return f"must be 1-48 of A-Z a-z 0-9 . _ -, got {value!r}"
    return None


def load_config(path: str | None) -> NodeConfig:
    """The defaults overlaid with ``path`` (None: the defaults).

    Raises:
        ConfigError: the file cannot be read or parsed, or a key in it is
            unknown or has a bad value (the message names the file and key).
    """
    out = NodeConfig({section: dict(values) for section, values in DEFAULTS.items()})
    out.path = path
    if path is None:
        return out
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    given = set()
    for section, values in data.items():
        if section not in out or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown section [{section}] (known: {', '.join(out)})")
        for key, value in values.items():
            if key not in out[section]:
                raise ConfigError(f"{path}: unknown key {key!r} in [{section}] (known: {', '.join(out[section])})")
            want = _TYPES[(section, key)]
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not want:
                got = _KIND.get(type(value), type(value).__name__)
                raise ConfigError(f"{path}: [{section}] {key} must be {_KIND[want]}, got {got} {value!r}")
            problem = _check(section, key, value)
            if problem is not None:
                raise ConfigError(f"{path}: [{section}] {key} {problem}")
            out[section][key] = value
            given.add((section, key))
    out.given = frozenset(given)
    return out
