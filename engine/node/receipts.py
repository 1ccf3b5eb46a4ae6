"""What a node's write methods return once their record is durable."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Receipt", "AppendReceipt", "CopyReceipt", "FlagsReceipt", "PlannedDeliveries"]


@dataclass(frozen=True)
class Receipt:
    """Proof of one durable delivery."""

    mailbox: str
    uidvalidity: int
    uid: int
    guid: str  # hex
    lsn: int
    duplicate: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AppendReceipt:
    """Proof of one durable IMAP APPEND (MS-20)."""

    mailbox: str
    uidvalidity: int
    uids: tuple[int, ...]
    lsn: int


@dataclass(frozen=True)
class CopyReceipt:
    """Proof of one durable COPY or MOVE: ``source_uids[i]`` became ``target_uids[i]`` (none: nothing left to copy)."""

    mailbox: str  # the target
    uidvalidity: int  # the target's
    source_uids: tuple[int, ...]
    target_uids: tuple[int, ...]
    lsn: int


@dataclass(frozen=True)
class FlagsReceipt:
    """Proof of one durable flag change: the UIDs in its record, the UIDs an UNCHANGEDSINCE
    left alone (``modified``), the record's MODSEQ and LSN (0 when nothing was logged)."""

    mailbox: str
    uids: tuple[int, ...]
    modified: tuple[int, ...]
    modseq: int
    lsn: int


@dataclass(frozen=True)
class PlannedDeliveries:
    """Decided and enqueued deliveries (see :meth:`Node.plan_deliveries`): not yet durable."""

    results: list  # Receipt | Exception per target
    sync_lsn: int  # acknowledge only after log.sync_to(sync_lsn)
