"""What the IMAP front needs from a mail store: the :class:`Backend` protocol (pure definitions).

The executor (``engine/imap/executor.py``) is the only caller. It maps every
client name to a *store name* (``user/NAME/...``, ``engine/imap/names.py``)
before calling, so a backend never sees client names and the isolation
between users is the executor's, in one place.

Contract of every backend (IMAP-10, IMAP-11, IMAP-13)
-----------------------------------------------------
* **Durability.** A write method (``create``, ``delete``, ``rename``,
  ``set_subscribed``, ``append``, ``store``, ``copy``, ``move``,
  ``expunge``) returns only once its change is durable (for the engine: its
  log record is fdatasync'ed, and on K replicas with ``--sync-replicas K``).
  It either applies completely or raises and applies nothing.
* **Errors** are :class:`BackendError` subclasses; each carries the RFC 9051
  response code the executor answers with. Anything else a backend raises
  is a bug (answered ``NO [SERVERBUG]`` and logged).
* **Read-only nodes.** :meth:`Backend.read_only` returns the error every
  write would raise right now (a :class:`ReadOnly` naming the master), or
  None when writes are accepted. SELECT then answers ``[READ-ONLY]``.
* **MODSEQ.** Every change to a mailbox (a new message, a flag change, an
  expunge) takes the mailbox's next MODSEQ; a message carries the MODSEQ of
  its last change, the mailbox its highest; an expunged UID is remembered
  with the MODSEQ of its expunge (VANISHED). UIDs only grow within one
  UIDVALIDITY and are never reused.
* **Notification.** ``watch(callback)`` calls ``callback(store_name)`` after
  every committed change to a mailbox, from any thread; the callback must be
  cheap and thread-safe (the server only sets a flag and wakes a task).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

__all__ = [
    "Backend", "MessageInfo", "Snapshot", "Changes", "MailboxStatus", "MailboxEntry", "AppendResult",
    "CopyResult", "StoreResult", "NewMessage", "BackendError", "Unavailable", "ReadOnly", "NoSuchMailbox",
    "AlreadyExists", "OverQuota", "LimitExceeded", "TooBig", "Cannot", "InUse", "STORE_MODES",
]

STORE_MODES = ("add", "remove", "replace")


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """A message's metadata: everything FETCH of metadata needs, no body."""

    uid: int
    flags: frozenset[str]
    modseq: int
    internaldate: _dt.datetime
    size: int
    structure: Mapping  # engine/store/structure.py analyze(), computed at delivery


@dataclass(frozen=True)
class Snapshot:
    """A mailbox at one moment (SELECT): messages sorted by UID."""

    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: Sequence[MessageInfo]


@dataclass(frozen=True)
class Changes:
    """What changed in a mailbox after MODSEQ ``since``.

    ``changed``: messages (new or with new flags) whose MODSEQ is above
    ``since``, sorted by UID. ``vanished``: UIDs expunged above ``since``,
    sorted; None when the backend no longer knows that far back (the
    executor then computes VANISHED from the client's known UIDs).
    """

    uidvalidity: int
    uidnext: int
    highestmodseq: int
    changed: Sequence[MessageInfo]
    vanished: Sequence[int] | None


@dataclass(frozen=True)
class MailboxStatus:
    messages: int
    uidnext: int
    uidvalidity: int
    unseen: int
    deleted: int
    size: int
    highestmodseq: int


@dataclass(frozen=True)
class MailboxEntry:
    name: str  # store name
    special_use: tuple[str, ...] = ()


@dataclass(frozen=True)
class NewMessage:
    """One message to APPEND."""

    data: bytes
    flags: tuple[str, ...] = ()
    internaldate: _dt.datetime | None = None


@dataclass(frozen=True)
class AppendResult:
    uidvalidity: int
    uids: tuple[int, ...]


@dataclass(frozen=True)
class CopyResult:
    """COPY/MOVE: ``source_uids[i]`` became ``target_uids[i]`` (UIDPLUS COPYUID)."""

    uidvalidity: int
    source_uids: tuple[int, ...]
    target_uids: tuple[int, ...]


@dataclass(frozen=True)
class StoreResult:
    """STORE: ``changed`` (new state of every message whose flags changed, with its new MODSEQ),
    ``unchanged`` (messages already in the requested state), ``modified`` (UIDs refused by
    UNCHANGEDSINCE, RFC 7162 3.1.3)."""

    changed: tuple[MessageInfo, ...] = ()
    unchanged: tuple[MessageInfo, ...] = ()
    modified: tuple[int, ...] = ()


class BackendError(Exception):
    """A refused request; ``code`` is the response code of the ``NO`` answer."""

    code: ClassVar[str] = "UNAVAILABLE"


class Unavailable(BackendError):
    """Temporary: the store cannot take this now (the log failed, writes are paused). Retry later."""

    code = "UNAVAILABLE"


@dataclass
class ReadOnly(Unavailable):
    """This node is a replica: writes go to the master."""

    master: str | None = None
    detail: str = field(default="")

    def __str__(self) -> str:
        where = f"the master is {self.master}" if self.master else "the master is not known right now"
        return f"this node is a read-only replica; {where}" + (f" ({self.detail})" if self.detail else "")


class NoSuchMailbox(BackendError):
    code = "NONEXISTENT"


class AlreadyExists(BackendError):
    code = "ALREADYEXISTS"


class OverQuota(BackendError):
    code = "OVERQUOTA"


class LimitExceeded(BackendError):
    code = "LIMIT"


class TooBig(BackendError):
    code = "TOOBIG"


class Cannot(BackendError):
    """The operation can never succeed (delete INBOX, rename a mailbox into itself, a bad name)."""

    code = "CANNOT"


class InUse(BackendError):
    code = "INUSE"


@runtime_checkable
class Backend(Protocol):
    """The mail store as the IMAP executor sees it (store names throughout)."""

    async def authenticate(self, username: str, password: str) -> str | None:
        """The user's canonical name if the password is right, else None (never says which part was wrong)."""

    def read_only(self) -> ReadOnly | None:
        """The error writes raise right now, or None when this node accepts writes."""

    async def list_mailboxes(self, prefix: str) -> Sequence[MailboxEntry]:
        """Every mailbox whose store name starts with ``prefix``."""

    async def subscriptions(self, user: str) -> frozenset[str]:
        """The store names ``user`` subscribed to (they may not exist)."""

    async def set_subscribed(self, user: str, name: str, subscribed: bool) -> None:
        """Durable."""

    async def create(self, name: str, special_use: tuple[str, ...] = ()) -> None:
        """Durable. Raises AlreadyExists."""

    async def delete(self, name: str) -> None:
        """Durable; the mailbox and its messages go; its UIDVALIDITY is never reused for that name."""

    async def rename(self, old: str, new: str) -> None:
        """Durable; children move with their parent. Raises NoSuchMailbox, AlreadyExists."""

    async def status(self, name: str) -> MailboxStatus:
        """Raises NoSuchMailbox."""

    async def snapshot(self, name: str) -> Snapshot:
        """Raises NoSuchMailbox."""

    async def changes(self, name: str, since_modseq: int) -> Changes:
        """Raises NoSuchMailbox (the mailbox was deleted)."""

    async def fetch_bodies(self, name: str, uids: Sequence[int]) -> Mapping[int, bytes]:
        """The bytes of each message still present (expunged ones are left out)."""

    async def append(self, name: str, messages: Sequence[NewMessage]) -> AppendResult:
        """Durable; all or nothing. Raises NoSuchMailbox (answered TRYCREATE), TooBig, OverQuota."""

    async def store(self, name: str, uids: Sequence[int], mode: str, flags: frozenset[str],
                    unchanged_since: int | None = None) -> StoreResult:
        """Durable. ``mode`` is one of STORE_MODES; UIDs no longer present are ignored."""

    async def copy(self, name: str, uids: Sequence[int], target: str) -> CopyResult:
        """Durable. Raises NoSuchMailbox for the target (answered TRYCREATE)."""

    async def move(self, name: str, uids: Sequence[int], target: str) -> CopyResult:
        """Durable and atomic: the messages are in ``target`` and gone from ``name``, or nothing happened."""

    async def expunge(self, name: str, uids: Sequence[int]) -> tuple[int, ...]:
        """Durable; returns the UIDs actually expunged."""

    def watch(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(store_name)`` after each committed change; returns the function that stops it."""
