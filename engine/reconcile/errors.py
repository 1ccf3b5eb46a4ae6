"""The reconcile errors: each message says what the operator can do."""

from __future__ import annotations

from ..errors import EngineError

__all__ = ["ReconcileError", "NotSurvivorError", "UndecodableRecordError", "TailPlacementError"]


class ReconcileError(EngineError):
    """Reconciling could not start or go on (the message says what to do)."""


class NotSurvivorError(ReconcileError):
    """The node's log continues neither of the two logs, so it is not their survivor."""


class UndecodableRecordError(ReconcileError):
    """A record after the fork point is not a mail event this version knows."""

    def __init__(self, path: str, lsn: int, reason: str):
        self.path = path
        self.lsn = lsn
        super().__init__(f"{path}: record at LSN {lsn} cannot be decoded ({reason}); upgrade mailwal or "
                         f"check the log with `walctl verify`")


class TailPlacementError(EngineError):
    """A diverged tail cannot be placed on the master's history (CTL-9).

    Nothing was lost: the tail's records stay in its directory under
    ``NODE/diverged/`` and it stays listed (``walctl status``). The message
    names the tail, its fork point and what the operator can do.
    """
