"""Per-node configuration: one TOML file (``walctl serve --config node.toml``).

Every key, its default and its unit are in :data:`DEFAULT_TOML`, which
``walctl init`` writes as ``NODE/node.toml``. Command-line flags override the
file. Unknown keys are an error (a typo must not silently fall back to a
default).
"""

from __future__ import annotations

import tomllib
from typing import Any

__all__ = ["DEFAULT_TOML", "load_config", "ConfigError", "DEFAULTS"]

DEFAULT_TOML = """\
# mailwal node configuration. Command-line flags override these values.

[node]
# The node's name: how its master and `walctl status` call it (1-48 of A-Z a-z 0-9 . _ -).
name = ""

[lmtp]
# Where the LMTP front listens ("" = no LMTP front). Deliver here from Postfix.
listen = "127.0.0.1:2424"
# A recipient with no user/LOCAL/INBOX: "create" it on first delivery, or "reject" (550 5.1.1).
unknown_recipients = "create"
# Largest message accepted, in bytes (larger: 552 5.3.4). 0 = the node's limit (50 MiB).
max_message_bytes = 0
# Seconds SIGTERM waits for open transactions before cutting them.
shutdown_grace_s = 30.0

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

DEFAULTS: dict[str, dict[str, Any]] = tomllib.loads(DEFAULT_TOML)


class ConfigError(ValueError):
    """The configuration file is unreadable or has unknown keys or wrong types."""


def load_config(path: str | None) -> dict[str, dict[str, Any]]:
    """The defaults overlaid with ``path`` (None: the defaults)."""
    out = {section: dict(values) for section, values in DEFAULTS.items()}
    if path is None:
        return out
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    for section, values in data.items():
        if section not in out or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown section [{section}] (known: {', '.join(out)})")
        for key, value in values.items():
            if key not in out[section]:
                raise ConfigError(f"{path}: unknown key {key!r} in [{section}] (known: {', '.join(out[section])})")
            default = out[section][key]
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not type(default):
                raise ConfigError(f"{path}: [{section}] {key} must be a {type(default).__name__}, "
                                  f"got {type(value).__name__}")
            out[section][key] = value
    return out
