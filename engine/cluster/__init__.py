"""A node's place in its cluster: master or replica, failover, control, metrics.

* :mod:`.roles`: :class:`Cluster`, the node-runner service that makes a node
  a master (replication hub, synchronous replication) or a replica (follows
  the master, cuts a diverged tail aside and reconciles it), and performs
  soft failover (CTL-4) and promotion.
* :mod:`.failover`: promotion with a new epoch (pure decision plus the
  record that starts the epoch).
* :mod:`.control`: the control channel ``walctl`` speaks to a running node
  (specs/control.md, CTL-n).
* :mod:`.metrics`: Prometheus metrics; :mod:`.config`: ``node.toml``.
"""

from .roles import Cluster, ClusterConfig, SyncReplicationBackend, parse_address, report_link

__all__ = ["Cluster", "ClusterConfig", "SyncReplicationBackend", "parse_address", "report_link"]
