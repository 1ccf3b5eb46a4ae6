"""A node directory: what lives where, and the node's own settings file.

::

    NODE/
      node.json          NodeConfig (role, name, limits), written atomically
      node.toml          the operator's settings (engine.cluster.config)
      log.wal/           the write-ahead log (wal)
      store.sqlite       the SQLite projection of the log (engine.store)
      diverged.json      the registry of diverged tails (engine.node.diverged)
      diverged/          tails cut aside after a fork, never deleted
      cut.json           a cut in progress (finished or undone on open)
      reconcile/         apply reports (engine.reconcile.reports); reconcile/tails/: tails replicas shipped
      replication.secret the shared secret (0600)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from wal import OS_FILEOPS, WalError

__all__ = ["LOG_DIR", "STORE_FILE", "CONFIG_FILE", "DIVERGED_FILE", "DIVERGED_DIR", "CUT_INTENT_FILE", "REPORT_DIR",
           "KEPT_TAILS_DIR", "NodeConfig", "read_config", "write_config", "write_json_atomic", "list_reports"]

LOG_DIR = "log.wal"
STORE_FILE = "store.sqlite"
CONFIG_FILE = "node.json"
DIVERGED_FILE = "diverged.json"
DIVERGED_DIR = "diverged"
CUT_INTENT_FILE = "cut.json"  # a diverged tail's cut in progress (cut_diverged)
REPORT_DIR = "reconcile"
KEPT_TAILS_DIR = os.path.join(REPORT_DIR, "tails")

@dataclass
class NodeConfig:
    """Persistent per-node settings (``node.json``)."""

    role: str = "master"  # "master" or "replica"
    name: str = ""
    max_message_bytes: int = 50 * 1024 * 1024
    dedup_window_s: int = 24 * 3600
    segment_max_bytes: int = 64 * 1024 * 1024
    checkpoint_every_records: int = 10000  # master: a checkpoint after this many records...
    checkpoint_every_s: float = 60.0  # ...or this many seconds with at least one new record
    apply_retries: int = 3  # replica: tries before a failing mailbox is quarantined
    on_mismatch: str = "resync"  # "resync" or "report" (checkpoint digest mismatches)
    guard_enabled: bool = True
    guard_window_s: int = 60
    guard_max_deletes: int = 10
    guard_max_expunge_ratio: float = 0.5
    guard_min_expunged: int = 50
    max_mailbox_deletes: int = 100  # master: refuse one operation deleting more mailboxes

def read_config(path: str) -> NodeConfig:
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise WalError(f"{path} is not a mailwal node (no {CONFIG_FILE}); create it with `walctl init`") from None
    known = {k: v for k, v in data.items() if k in NodeConfig.__dataclass_fields__}
    return NodeConfig(**known)
def write_config(path: str, cfg: NodeConfig) -> None:
    write_json_atomic(os.path.join(path, CONFIG_FILE), asdict(cfg))
def write_json_atomic(path: str, data: dict) -> None:
    """Replace the JSON file ``path`` atomically and durably (the one way node files are written)."""
    OS_FILEOPS.write_file_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")


def list_reports(node_dir: str) -> list[str]:
    """Reconcile report files of a node directory (``NODE/reconcile/*.json``), oldest first."""
    directory = os.path.join(node_dir, REPORT_DIR)
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names]
