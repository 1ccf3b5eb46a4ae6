"""The engine's exception hierarchy.

Every error the engine raises on purpose derives from :class:`EngineError`.
Errors carry structured attributes (LSNs, log ids, codes) so that callers and
``walctl`` can show the operator what happened and what to do about it.

Replication errors fall in three groups:

* :class:`ProtocolError` (abstract), split by who is at fault, as in h11:
  :class:`LocalProtocolError` means *this* program misused the sans-I/O
  session (a bug here); :class:`RemoteProtocolError` means the peer sent
  bytes or messages the protocol does not allow (the connection is dropped,
  nothing else is affected). :class:`AuthenticationError` is the remote kind
  raised when the peer cannot prove it knows the shared secret.
* :class:`ReplicationRefusedError` and its subclasses: the master looked at a
  replica's position and refused to serve it. These are *not* retried by the
  replica driver: a person has to decide (the replica's log is left alone).
* :class:`ReplicationTimeoutError`: synchronous replication did not reach the
  wanted number of replicas in time.
"""

from __future__ import annotations

import uuid

__all__ = [
    "EngineError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "AuthenticationError",
    "ReplicationRefusedError",
    "DivergedError",
    "ReplicaAheadError",
    "WrongLogError",
    "BehindRetentionError",
    "SeedUnavailableError",
    "MasterUnavailableError",
    "ReplicationTimeoutError",
    "ConnectionLostError",
    "SecretFileError",
    "ListenError",
    "listen_error",
    "format_address",
]


class EngineError(Exception):
    """Base class of every error raised on purpose by :mod:`engine`."""


class ListenError(EngineError):
    """A node's listener could not bind its address (in use, not local, no permission).

    ``service`` names what would have listened (``LMTP``, ``replication and
    control``, ``metrics``), ``address`` is ``(host, port)``, ``reason`` the
    system's words and ``errno`` its number. Raised while the node starts,
    before it accepts anything: the node stops and nothing was acknowledged.
    Fix: pick another address, or stop whatever listens there.
    """

    def __init__(self, service: str, address: tuple[str, int], reason: str, errno: int | None = None):
        self.service = service
        self.address = address
        self.reason = reason
        self.errno = errno
        super().__init__(f"cannot listen for {service} on {format_address(address)}: {reason}")


def format_address(address: tuple[str, int]) -> str:
    """``HOST:PORT`` (``[HOST]:PORT`` for an IPv6 host)."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_error(service: str, address: tuple[str, int], exc: OSError) -> ListenError:
    """The :class:`ListenError` for ``exc``, raised by a bind of ``address``."""
    import os

    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return ListenError(service, address, reason, exc.errno)


# -- protocol errors ---------------------------------------------------------


class ProtocolError(EngineError):
    """Abstract: the replication protocol was broken (see the two subclasses).

    Never raised itself; catch it to handle both kinds.
    """

    def __init__(self, *args: object) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract: raise LocalProtocolError or RemoteProtocolError")
        super().__init__(*args)


class LocalProtocolError(ProtocolError):
    """This side misused the session API (sent a message its state does not
    allow, or an invalid message). A bug in the caller; the session is now in
    its sticky ERROR state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow (junk bytes, an
    oversized or malformed frame, a message out of order). The session is now
    in its sticky ERROR state; drop the connection. Nothing else is affected."""


class AuthenticationError(RemoteProtocolError):
    """Mutual authentication failed: one side could not prove it knows the
    shared replication secret. Fix: give master and replica the same secret
    file (``NODE/replication.secret``)."""


# -- refusals ----------------------------------------------------------------


class ReplicationRefusedError(EngineError):
    """The master refused to serve this replica; the replica stops.

    ``code`` is the wire refusal code (specs/replication.md, Refuse) and
    ``detail`` the master's explanation. The replica's log is never changed
    because of a refusal (INV-NoSilentTruncate).
    """

    code = "refused"

    def __init__(self, detail: str, *, code: str | None = None):
        if code is not None:
            self.code = code
        self.detail = detail
        super().__init__(detail)


class DivergedError(ReplicationRefusedError):
    """The replica's log is not a prefix of the master's history.

    ``last_common_lsn`` is the last LSN at which both logs hold the same
    record (equal hashes, hence equal histories up to there); None when no
    common record is within the retained range of both logs. Fix: keep the
    replica's log for inspection (``walctl dump``), reconcile or move it
    aside, and seed a fresh replica.
    """

    code = "diverged"

    def __init__(self, last_common_lsn: int | None, replica_lsn: int, detail: str | None = None):
        self.last_common_lsn = last_common_lsn
        self.replica_lsn = replica_lsn
        where = "no common record in the retained range" if last_common_lsn is None else f"last common LSN {last_common_lsn}"
        super().__init__(
            detail
            or f"replica diverged from the master ({where}; replica is at LSN {replica_lsn}): "
            f"its log is kept as is; reconcile it or seed a new replica"
        )


class ReplicaAheadError(ReplicationRefusedError):
    """The replica holds records the master does not (master's whole history
    is a prefix of the replica's). The replica is never rolled back. Fix: the
    replica may be the more up-to-date node; check before failing over."""

    code = "ahead"

    def __init__(self, replica_lsn: int, master_lsn: int, detail: str | None = None):
        self.replica_lsn = replica_lsn
        self.master_lsn = master_lsn
        super().__init__(
            detail
            or f"replica is ahead of the master (replica at LSN {replica_lsn}, master at {master_lsn}); "
            f"it is never rolled back: check which node should be master"
        )


class WrongLogError(ReplicationRefusedError):
    """The replica's log has another log id than the master's: it is a copy of
    a different log. Fix: point the replica at the right master, or seed a new
    replica in an empty directory."""

    code = "wrong-log"

    def __init__(self, replica_log_id: uuid.UUID | None, master_log_id: uuid.UUID | None, detail: str | None = None):
        self.replica_log_id = replica_log_id
        self.master_log_id = master_log_id
        super().__init__(
            detail
            or f"replica log {replica_log_id} is not a copy of master log {master_log_id}: "
            f"point it at the right master or seed a new replica"
        )


class BehindRetentionError(ReplicationRefusedError):
    """The master no longer holds the records right after the replica's last
    one (retention dropped them). Fix: seed a new replica; keep the old log
    until the new one has caught up."""

    code = "behind-retention"


class SeedUnavailableError(ReplicationRefusedError):
    """A new replica asked to be seeded but the master can neither stream from
    LSN 1 (its first retained LSN is higher) nor send a snapshot this replica
    can take. Fix: configure a snapshot source on the master and a snapshot
    sink on the replica."""

    code = "no-seed"


class MasterUnavailableError(ReplicationRefusedError):
    """The master could not serve the replica because of its own failure
    (e.g. its log failed or is closing). The replica driver retries these."""

    code = "unavailable"


class ReplicationTimeoutError(EngineError):
    """Fewer than ``wanted`` replicas durably acknowledged ``lsn`` in time.

    ``acked`` names the replicas that did. The record is durable on the master
    but not yet on enough replicas; the caller decides whether to fail the
    client request.
    """

    def __init__(self, lsn: int, wanted: int, acked: list[str]):
        self.lsn = lsn
        self.wanted = wanted
        self.acked = acked
        super().__init__(
            f"LSN {lsn} reached {len(acked)} of {wanted} required replicas in time "
            f"({', '.join(acked) or 'none'}); check `walctl status` for lagging replicas"
        )


class ConnectionLostError(EngineError):
    """The replication connection broke (peer closed, reset, timed out, or
    sent something invalid). Transient: the replica driver reconnects by
    itself with backoff and resumes at its durable LSN."""


class SecretFileError(EngineError):
    """The replication secret file is missing, too short, or readable by other
    users. Fix: :func:`engine.replication.secret.create_secret` makes one (32
    random bytes as 64 hex characters, mode 0600); copy the same file to every
    node."""
