"""Mail-store domain events: what the log records (specs/mail-store.md).

Each event is a frozen dataclass that validates itself, maps to one record
type (a u16 in the log) and to a canonical CBOR map. Every decision the
master makes (mailbox id, UIDVALIDITY, UID, MODSEQ) is *in* the event, so
applying the log anywhere gives the same store (MS-1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import blake3
import cbor2

from wal import codec

from .errors import BadFlagError, BadMailboxNameError

__all__ = [
    "MailboxCreated", "MailboxRenamed", "MailboxDeleted", "MessageAppended",
    "FlagsChanged", "MessagesExpunged", "Checkpoint", "EpochStarted", "MailboxRenumbered",
    "Event", "encode_event", "decode_event", "EVENT_TYPES",
    "validate_mailbox_name", "normalize_flags", "body_guid", "SYSTEM_FLAGS",
    "FLAG_OPS", "event_mailbox_id", "renumbered_uids",
]

SYSTEM_FLAGS = ("\\Answered", "\\Deleted", "\\Draft", "\\Flagged", "\\Seen")
_SYSTEM_BY_LOWER = {f.lower(): f for f in SYSTEM_FLAGS}
# RFC 3501 atom: any CHAR except atom-specials ( ) { SP CTL % * " \ ]
_KEYWORD = re.compile(r'^[!#$&\'+,\-./0-9:;<=>?@A-Z\[^_`a-z|}~]{1,64}$')
FLAG_OPS = ("add", "remove", "replace")
MAX_MAILBOX_NAME_BYTES = 255


def body_guid(body: bytes) -> bytes:
    """A message's GUID: blake3 of its exact bytes (32 bytes)."""
    return blake3.blake3(body).digest()


def validate_mailbox_name(name: str) -> str:
    """MS-3: return ``name`` if it is a valid mailbox name, else raise.

    Names are '/'-separated, 1..255 UTF-8 bytes, with no empty, '.' or '..'
    component, no control characters and no IMAP wildcards ('*', '%').
    """
    if not isinstance(name, str) or not name:
        raise BadMailboxNameError("mailbox name is empty")
    if len(name.encode("utf-8")) > MAX_MAILBOX_NAME_BYTES:
        raise BadMailboxNameError(f"mailbox name longer than {MAX_MAILBOX_NAME_BYTES} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise BadMailboxNameError(f"mailbox name {name!r} contains a control character")
    if "*" in name or "%" in name:
        raise BadMailboxNameError(f"mailbox name {name!r} contains an IMAP wildcard (* or %)")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise BadMailboxNameError(f"mailbox name {name!r} has an empty, '.' or '..' component")
    return name


def normalize_flags(flags) -> tuple[str, ...]:
    """MS-4: canonical flag tuple (system flags in canonical case, sorted, unique).

    Raises BadFlagError for \\Recent, unknown system flags and bad keywords.
    """
    out = set()
    for f in flags:
        if not isinstance(f, str) or not f:
            raise BadFlagError(f"flag {f!r} is not a non-empty string")
        if f.startswith("\\"):
            canon = _SYSTEM_BY_LOWER.get(f.lower())
            if canon is None:
                raise BadFlagError(f"{f} is not a storable system flag (use {', '.join(SYSTEM_FLAGS)})")
            out.add(canon)
        elif _KEYWORD.match(f):
            out.add(f)
        else:
            raise BadFlagError(f"keyword {f!r} has characters IMAP does not allow in an atom")
    return tuple(sorted(out))


def _check_id(mailbox_id: str) -> None:
    if not (isinstance(mailbox_id, str) and re.fullmatch(r"[0-9a-f]{32}", mailbox_id)):
        raise ValueError(f"mailbox_id must be 32 lowercase hex digits, got {mailbox_id!r}")


def _check_uids(uids) -> None:
    if not uids or any((not isinstance(u, int)) or u < 1 or u > 0xFFFFFFFF for u in uids):
        raise ValueError("uids must be a non-empty list of 32-bit UIDs >= 1")
    if list(uids) != sorted(set(uids)):
        raise ValueError("uids must be sorted and unique")


@dataclass(frozen=True)
class MailboxCreated:
    TYPE: ClassVar[int] = 1
    mailbox_id: str
    name: str
    uidvalidity: int

    def __post_init__(self):
        _check_id(self.mailbox_id)
        validate_mailbox_name(self.name)
        if not 1 <= self.uidvalidity <= 0xFFFFFFFF:
            raise ValueError("uidvalidity must be a nonzero 32-bit number")


@dataclass(frozen=True)
class MailboxRenamed:
    TYPE: ClassVar[int] = 2
    mailbox_id: str
    old_name: str
    new_name: str

    def __post_init__(self):
        _check_id(self.mailbox_id)
        validate_mailbox_name(self.new_name)


@dataclass(frozen=True)
class MailboxDeleted:
    """Tombstone: the mailbox and its messages are gone; the name is free."""

    TYPE: ClassVar[int] = 3
    mailbox_id: str
    name: str
    deleted_ms: int = 0

    def __post_init__(self):
        _check_id(self.mailbox_id)


@dataclass(frozen=True)
class MessageAppended:
    """A message delivered at ``uid``; with ``replaces`` (MS-16), a move: the
    same message leaves UID ``replaces`` of the mailbox in the same record."""

    TYPE: ClassVar[int] = 4
    OMITTED_WHEN_ZERO: ClassVar[tuple[str, ...]] = ("replaces",)
    mailbox_id: str
    uid: int
    modseq: int
    guid: bytes
    body: bytes
    flags: tuple[str, ...]
    internaldate_ms: int
    delivered_ms: int
    replaces: int = 0

    def __post_init__(self):
        _check_id(self.mailbox_id)
        _check_uids([self.uid])
        if self.replaces:
            _check_uids([self.replaces])
            if self.replaces >= self.uid:
                raise ValueError("replaces must be a UID below uid (a move goes to a fresh UID)")
        if len(self.guid) != 32:
            raise ValueError("guid must be 32 bytes")
        if self.modseq < 1:
            raise ValueError("modseq must be >= 1")
        object.__setattr__(self, "flags", normalize_flags(self.flags))

    @property
    def size(self) -> int:
        return len(self.body)


@dataclass(frozen=True)
class FlagsChanged:
    TYPE: ClassVar[int] = 5
    mailbox_id: str
    uids: tuple[int, ...]
    op: str
    flags: tuple[str, ...]
    modseq: int
    changed_ms: int = 0

    def __post_init__(self):
        _check_id(self.mailbox_id)
        object.__setattr__(self, "uids", tuple(self.uids))
        _check_uids(self.uids)
        if self.op not in FLAG_OPS:
            raise ValueError(f"op must be one of {FLAG_OPS}")
        object.__setattr__(self, "flags", normalize_flags(self.flags))
        if self.modseq < 1:
            raise ValueError("modseq must be >= 1")


@dataclass(frozen=True)
class MessagesExpunged:
    TYPE: ClassVar[int] = 6
    mailbox_id: str
    uids: tuple[int, ...]
    modseq: int
    expunged_ms: int = 0

    def __post_init__(self):
        _check_id(self.mailbox_id)
        object.__setattr__(self, "uids", tuple(self.uids))
        _check_uids(self.uids)


@dataclass(frozen=True)
class Checkpoint:
    """Per-mailbox digests at this point of the log (issue 6, integrity)."""

    TYPE: ClassVar[int] = 7
    digests: dict = field(default_factory=dict)  # mailbox_id -> 32-byte digest
    store_digest: bytes = b""


@dataclass(frozen=True)
class EpochStarted:
    """A promotion: records from here on belong to ``epoch`` (issue 5)."""

    TYPE: ClassVar[int] = 8
    epoch: int
    fork_lsn: int
    fork_hash: bytes
    node: str = ""


@dataclass(frozen=True)
class MailboxRenumbered:
    """A mailbox gets a new UIDVALIDITY and its messages new UIDs (REC-9).

    Written by the reconciler's ``uidvalidity`` strategy after a UID
    collision. ``uids`` holds ``(old UID, new UID)`` pairs sorted by old UID.
    A message the mailbox holds that the map does not name (delivered while
    the renumbering was planned) keeps its relative order and gets the UIDs
    from ``uidnext`` on, so applying the event is deterministic everywhere.
    """

    TYPE: ClassVar[int] = 9
    mailbox_id: str
    uidvalidity: int
    uids: tuple[tuple[int, int], ...]
    uidnext: int
    modseq: int

    def __post_init__(self):
        _check_id(self.mailbox_id)
        if not 1 <= self.uidvalidity <= 0xFFFFFFFF:
            raise ValueError("uidvalidity must be a nonzero 32-bit number")
        pairs = tuple((int(o), int(n)) for o, n in self.uids)
        object.__setattr__(self, "uids", pairs)
        olds = [o for o, _ in pairs]
        news = [n for _, n in pairs]
        if olds != sorted(set(olds)) or len(set(news)) != len(news):
            raise ValueError("uids must map each old UID once, sorted by old UID, to distinct new UIDs")
        if any(not 1 <= u <= 0xFFFFFFFF for u in olds + news):
            raise ValueError("UIDs must be 32-bit numbers >= 1")
        if not (max(news, default=0) < self.uidnext <= 0xFFFFFFFF):
            raise ValueError("uidnext must exceed every new UID")
        if self.modseq < 1:
            raise ValueError("modseq must be >= 1")


Event = (MailboxCreated | MailboxRenamed | MailboxDeleted | MessageAppended | FlagsChanged | MessagesExpunged
         | Checkpoint | EpochStarted | MailboxRenumbered)
EVENT_TYPES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (MailboxCreated, MailboxRenamed, MailboxDeleted, MessageAppended, FlagsChanged, MessagesExpunged,
                Checkpoint, EpochStarted, MailboxRenumbered)
}


def renumbered_uids(event: "MailboxRenumbered", present) -> dict[int, int]:
    """Old UID -> new UID for every UID in ``present`` (REC-9).

    UIDs the event maps get their mapped value; the others, in ascending
    order, get ``event.uidnext``, ``event.uidnext + 1``, ...
    """
    mapping = dict(event.uids)
    out = {}
    nxt = event.uidnext
    for uid in sorted(present):
        if uid in mapping:
            out[uid] = mapping[uid]
        else:
            out[uid] = nxt
            nxt += 1
    return out


def encode_event(event) -> tuple[int, bytes]:
    """(record type, canonical CBOR payload) for ``event``."""
    omitted = getattr(event, "OMITTED_WHEN_ZERO", ())
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in event.__dict__.items()
         if not (k in omitted and v == 0)}
    return event.TYPE, codec.dumps(d)


def decode_event(type_: int, payload: bytes):
    """The event a record holds. Raises ValueError for unknown types or bad fields."""
    cls = EVENT_TYPES.get(type_)
    if cls is None:
        raise ValueError(f"unknown record type {type_}")
    try:
        d = codec.loads(payload)
    except cbor2.CBORDecodeError as exc:
        raise ValueError(f"record type {type_} payload is not valid CBOR: {exc}") from exc
    if not isinstance(d, dict):
        raise ValueError(f"record type {type_} payload is not a map")
    try:
        return cls(**d)
    except TypeError as exc:
        raise ValueError(f"record type {type_} payload has wrong fields: {exc}") from exc


def event_mailbox_id(event) -> str | None:
    """The mailbox a mail event concerns (None for node-wide events)."""
    return getattr(event, "mailbox_id", None)
