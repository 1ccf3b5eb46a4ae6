"""Prometheus metrics of a node (``--metrics HOST:PORT``).

One :class:`Metrics` per node, on its own registry (tests can run several
nodes in one process). Gauges that mirror state (lag, log size, quarantined
mailboxes) are refreshed by :meth:`Metrics.refresh` from a status dict right
before each scrape, so nothing on the delivery path pays for them.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._status: Callable[[], dict] | None = None
        # Registered first, so each scrape refreshes the gauges before they are read.
        r.register(_Refresher(self))
        self.deliveries = Counter("mailwal_deliveries", "Messages delivered (durable), per outcome",
                                  ["outcome"], registry=r)
        self.refusals = Counter("mailwal_refusals", "Deliveries refused, per reason", ["reason"], registry=r)
        self.append_seconds = Histogram("mailwal_append_seconds", "Time from request to durable record",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.fsync_seconds = Histogram("mailwal_fsync_seconds", "write+fdatasync time of one group commit",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_records = Histogram("mailwal_group_commit_records", "Records per group commit (fsync)",
                                       buckets=_BATCH_BUCKETS, registry=r)
        self.log_bytes = Gauge("mailwal_log_bytes", "Bytes in the log's segments", registry=r)
        self.log_segments = Gauge("mailwal_log_segments", "Segment files in the log", registry=r)
        self.last_lsn = Gauge("mailwal_last_lsn", "Last durable LSN", registry=r)
        self.applied_lsn = Gauge("mailwal_applied_lsn", "Last LSN applied to the store", registry=r)
        self.replicas_connected = Gauge("mailwal_replicas_connected", "Replicas connected to this master",
                                        registry=r)
        self.replica_lag_records = Gauge("mailwal_replica_lag_records", "Records a replica lacks",
                                         ["replica", "kind"], registry=r)
        self.replica_lag_seconds = Gauge("mailwal_replica_lag_seconds", "Age of the oldest record a replica lacks",
                                         ["replica", "kind"], registry=r)
        self.quarantined = Gauge("mailwal_quarantined_mailboxes", "Mailboxes held in quarantine", registry=r)
        self.checkpoint_mismatches = Counter("mailwal_checkpoint_mismatches", "Mailbox digests that differed "
                                             "from the master's checkpoint", registry=r)
        self.reconcile_decisions = Counter("mailwal_reconcile_decisions", "Reconciler decisions, per kind",
                                           ["kind"], registry=r)
        self._seen_mismatches = 0
        self._server = None
        self._imap: Callable[[], dict | None] | None = None
        r.register(_ImapCollector(self))

    def imap_source(self, stats: Callable[[], dict | None]) -> None:
        """Where the IMAP front's counters come from at each scrape (``ImapServer.stats``, or None
        while the node has no IMAP front)."""
        self._imap = stats

    def refresh(self, status: dict) -> None:
        """Mirror a node status dict (``walctl status --json`` fields) into gauges."""
        self.last_lsn.set(status.get("last_lsn", 0))
        self.applied_lsn.set(status.get("applied_lsn", 0))
        if "log_bytes" in status:
            self.log_bytes.set(status["log_bytes"])
        if "log_segments" in status:
            self.log_segments.set(status["log_segments"])
        self.quarantined.set(status.get("quarantined", 0))
        mism = status.get("checkpoint_mismatches", 0)
        if mism > self._seen_mismatches:
            self.checkpoint_mismatches.inc(mism - self._seen_mismatches)
            self._seen_mismatches = mism
        replicas = status.get("replicas") or []
        self.replicas_connected.set(sum(1 for rep in replicas if rep.get("connected")))
        for rep in replicas:
            name = rep.get("name", "?")
            for kind in ("durable", "applied"):
                if rep.get(f"{kind}_lag_records") is not None:
                    self.replica_lag_records.labels(name, kind).set(rep[f"{kind}_lag_records"])
                if rep.get(f"{kind}_lag_seconds") is not None:
                    self.replica_lag_seconds.labels(name, kind).set(rep[f"{kind}_lag_seconds"])

    def serve(self, host: str, port: int, status: Callable[[], dict]) -> int:
        """Start the HTTP endpoint in a thread; returns the bound port."""
        self._status = status
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = (server, thread)
        return server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            server, _ = self._server
            server.shutdown()
            self._server = None



class _ImapCollector:
    """The IMAP front's sessions, IDLEs, connections, commands and failed logins, read from the
    server at each scrape (the families are there, without samples, when it has none)."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def collect(self):
        stats = None
        if self._metrics._imap is not None:
            try:
                stats = self._metrics._imap()
            except Exception:  # a scrape must not fail because the front's counters could not be read
                stats = None
        sessions = GaugeMetricFamily("mailwal_imap_sessions", "IMAP sessions open")
        idle = GaugeMetricFamily("mailwal_imap_idle_sessions", "IMAP sessions in IDLE")
        connections = CounterMetricFamily("mailwal_imap_connections", "IMAP connections accepted")
        failures = CounterMetricFamily("mailwal_imap_auth_failures", "Failed IMAP LOGIN and AUTHENTICATE")
        commands = CounterMetricFamily("mailwal_imap_commands", "IMAP commands answered, per command and "
                                       "tagged status", labels=["command", "outcome"])
        if stats is not None:
            sessions.add_metric([], stats["sessions"])
            idle.add_metric([], stats["idle"])
            connections.add_metric([], stats["connections"])
            failures.add_metric([], stats["auth_failures"])
            for name, outcomes in sorted(stats["commands"].items()):
                for outcome, n in sorted(outcomes.items()):
                    commands.add_metric([name, outcome], n)
        return iter((sessions, idle, connections, failures, commands))


class _Refresher:
    """A collector that yields nothing; collecting it refreshes the gauges."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def collect(self):
        if self._metrics._status is not None:
            try:
                self._metrics.refresh(self._metrics._status())
            except Exception:  # a scrape must not fail because status did
                pass
        return iter(())
