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

from .errors import BadFlagError, BadMailboxNameError, BadUserNameError

__all__ = [
    "MailboxCreated", "MailboxRenamed", "MailboxDeleted", "MessageAppended",
    "FlagsChanged", "MessagesExpunged", "Checkpoint", "EpochStarted", "MailboxRenumbered",
    "MessagesAppended", "MessagesCopied", "MessagesMoved", "UserPasswordSet", "UserDeleted", "SubscriptionChanged",
    "Event", "encode_event", "decode_event", "EVENT_TYPES",
    "validate_mailbox_name", "normalize_flags", "body_guid", "SYSTEM_FLAGS", "SPECIAL_USE",
    "FLAG_OPS", "event_mailbox_id", "event_mailbox_ids", "renumbered_uids", "validate_user_name", "modseq_floor",
    "MODSEQ_EPOCH_SHIFT",
]

SYSTEM_FLAGS = ("\\Answered", "\\Deleted", "\\Draft", "\\Flagged", "\\Seen")
_SYSTEM_BY_LOWER = {f.lower(): f for f in SYSTEM_FLAGS}
# RFC 3501 atom: any CHAR except atom-specials ( ) { SP CTL % * " \ ]
_KEYWORD = re.compile(r'^[!#$&\'+,\-./0-9:;<=>?@A-Z\[^_`a-z|}~]{1,64}$')
FLAG_OPS = ("add", "remove", "replace")
MAX_MAILBOX_NAME_BYTES = 255
# RFC 6154 special-use attributes a mailbox may carry (MailboxCreated.special_use).
SPECIAL_USE = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")
# MS-18: MODSEQs of epoch e are at least (e - 1) << MODSEQ_EPOCH_SHIFT.
MODSEQ_EPOCH_SHIFT = 32
_USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,63}$")


def modseq_floor(epoch: int) -> int:
    """MS-18: the least HIGHESTMODSEQ of every mailbox once ``EpochStarted(epoch)`` is applied."""
    return max(0, epoch - 1) << MODSEQ_EPOCH_SHIFT


def validate_user_name(name: str) -> str:
    """MS-21: a user name is 1-64 characters of lower-case a-z, digits and ``. _ + -``, starting with
    a letter or digit (it is a component of the user's mailbox names, ``user/<name>/...``)."""
    if not isinstance(name, str) or not _USER_NAME.match(name):
        raise BadUserNameError(f"user name {name!r} must be 1-64 characters of a-z, 0-9, '.', '_', '+', '-', "
                               f"starting with a letter or digit")
    return name


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
    """A new mailbox; ``special_use`` (RFC 6154 attributes, sorted) is omitted when empty."""

    TYPE: ClassVar[int] = 1
    OMITTED_WHEN_ZERO: ClassVar[tuple[str, ...]] = ("special_use",)
    mailbox_id: str
    name: str
    uidvalidity: int
    special_use: tuple[str, ...] = ()

    def __post_init__(self):
        _check_id(self.mailbox_id)
        validate_mailbox_name(self.name)
        if not 1 <= self.uidvalidity <= 0xFFFFFFFF:
            raise ValueError("uidvalidity must be a nonzero 32-bit number")
        use = tuple(sorted(set(self.special_use)))
        if any(u not in SPECIAL_USE for u in use):
            raise ValueError(f"special_use must be among {', '.join(SPECIAL_USE)}")
        object.__setattr__(self, "special_use", use)


@dataclass(frozen=True)
class MailboxRenamed:
    """A mailbox gets a new name; with ``children`` (MS-19; omitted when false) every mailbox
    whose name starts with ``old_name + "/"`` moves under the new name in the same record."""

    TYPE: ClassVar[int] = 2
    OMITTED_WHEN_ZERO: ClassVar[tuple[str, ...]] = ("children",)
    mailbox_id: str
    old_name: str
    new_name: str
    children: bool = False

    def __post_init__(self):
        _check_id(self.mailbox_id)
        validate_mailbox_name(self.new_name)
        if not isinstance(self.children, bool):
            raise ValueError("children must be a boolean")
        if self.children and self.new_name.startswith(self.old_name + "/"):
            raise ValueError("a mailbox cannot be renamed into itself")


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
    """Per-mailbox digests at this point of the log (MS-11, integrity)."""

    TYPE: ClassVar[int] = 7
    digests: dict = field(default_factory=dict)  # mailbox_id -> 32-byte digest
    store_digest: bytes = b""


@dataclass(frozen=True)
class EpochStarted:
    """A promotion: records from here on belong to ``epoch`` (REC-2)."""

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


def _check_modseq(modseq) -> None:
    if isinstance(modseq, bool) or not isinstance(modseq, int) or modseq < 1:
        raise ValueError("modseq must be an integer >= 1")


def _check_guids(guids, n: int) -> tuple[bytes, ...]:
    guids = tuple(bytes(g) for g in guids)
    if len(guids) != n or any(len(g) != 32 for g in guids):
        raise ValueError("guids must hold one 32-byte GUID per message")
    return guids


def _check_times(values, n: int, what: str) -> tuple[int, ...]:
    values = tuple(values)
    if len(values) != n or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"{what} must hold one integer per message")
    return values


@dataclass(frozen=True)
class MessagesAppended:
    """Several messages appended to one mailbox in one record (MS-20: an IMAP APPEND of several
    messages is all or nothing). Message ``i`` gets ``uids[i]`` (strictly increasing) and MODSEQ
    ``modseq + i``; the other lists hold one entry per message."""

    TYPE: ClassVar[int] = 10
    mailbox_id: str
    uids: tuple[int, ...]
    modseq: int
    guids: tuple[bytes, ...]
    bodies: tuple[bytes, ...]
    flags: tuple[tuple[str, ...], ...]
    internaldate_ms: tuple[int, ...]
    delivered_ms: int

    def __post_init__(self):
        _check_id(self.mailbox_id)
        object.__setattr__(self, "uids", tuple(self.uids))
        _check_uids(self.uids)
        n = len(self.uids)
        _check_modseq(self.modseq)
        object.__setattr__(self, "bodies", tuple(bytes(b) for b in self.bodies))
        object.__setattr__(self, "guids", _check_guids(self.guids, n))
        if len(self.bodies) != n or len(self.flags) != n:
            raise ValueError("bodies and flags must hold one entry per message")
        object.__setattr__(self, "flags", tuple(normalize_flags(f) for f in self.flags))
        object.__setattr__(self, "internaldate_ms", _check_times(self.internaldate_ms, n, "internaldate_ms"))

    def messages(self) -> list["MessageAppended"]:
        """The same messages as single deliveries (what applying this record does, in one step)."""
        return [MessageAppended(self.mailbox_id, uid, self.modseq + i, guid, body, flags, idate, self.delivered_ms)
                for i, (uid, guid, body, flags, idate) in enumerate(
                    zip(self.uids, self.guids, self.bodies, self.flags, self.internaldate_ms))]


@dataclass(frozen=True)
class MessagesCopied:
    """Messages copied from ``source_mailbox_id`` into ``mailbox_id`` (which may be the same
    mailbox: the copies get new UIDs there) in one record (MS-20).

    ``uids`` holds ``(source UID, new UID)`` pairs sorted by source UID (new UIDs strictly
    increasing too); ``guids``, ``flags`` and ``internaldate_ms`` are the source messages' when
    the copy was planned, one per pair. The bodies are not in the record: they are the source
    messages' (the store holds them by GUID). The copy at pair ``i`` gets MODSEQ ``modseq + i``
    of the target mailbox and ``copied_ms`` as its arrival time."""

    TYPE: ClassVar[int] = 11
    mailbox_id: str
    source_mailbox_id: str
    uids: tuple[tuple[int, int], ...]
    guids: tuple[bytes, ...]
    flags: tuple[tuple[str, ...], ...]
    internaldate_ms: tuple[int, ...]
    modseq: int
    copied_ms: int

    def __post_init__(self):
        _check_id(self.mailbox_id)
        _check_id(self.source_mailbox_id)
        pairs = tuple((int(a), int(b)) for a, b in self.uids)
        object.__setattr__(self, "uids", pairs)
        if not pairs:
            raise ValueError("uids must name at least one message")
        _check_uids([a for a, _ in pairs])
        _check_uids([b for _, b in pairs])
        n = len(pairs)
        object.__setattr__(self, "guids", _check_guids(self.guids, n))
        if len(self.flags) != n:
            raise ValueError("flags must hold one entry per message")
        object.__setattr__(self, "flags", tuple(normalize_flags(f) for f in self.flags))
        object.__setattr__(self, "internaldate_ms", _check_times(self.internaldate_ms, n, "internaldate_ms"))
        _check_modseq(self.modseq)

    @property
    def source_uids(self) -> tuple[int, ...]:
        return tuple(a for a, _ in self.uids)

    @property
    def target_uids(self) -> tuple[int, ...]:
        return tuple(b for _, b in self.uids)


@dataclass(frozen=True)
class MessagesMoved(MessagesCopied):
    """A copy whose source messages leave their mailbox in the same record (MS-20, RFC 6851
    MOVE): applying it appends the copies and expunges the source UIDs at MODSEQ
    ``source_modseq`` of the source mailbox, in one step."""

    TYPE: ClassVar[int] = 12
    source_modseq: int = 0

    def __post_init__(self):
        super().__post_init__()
        _check_modseq(self.source_modseq)


@dataclass(frozen=True)
class UserPasswordSet:
    """A user exists with this password hash from here on (MS-21): added, or a new password.
    ``password_hash`` is a PHC string (``$argon2id$...``) or an imported Dovecot hash with its
    scheme prefix (``{BLF-CRYPT}...``); never a password."""

    TYPE: ClassVar[int] = 13
    name: str
    password_hash: str
    changed_ms: int = 0

    def __post_init__(self):
        validate_user_name(self.name)
        if not isinstance(self.password_hash, str) or not self.password_hash or len(self.password_hash) > 1024:
            raise ValueError("password_hash must be a non-empty string of at most 1024 characters")


@dataclass(frozen=True)
class UserDeleted:
    """The user can no longer log in; their subscriptions go too (MS-21). Their mailboxes stay."""

    TYPE: ClassVar[int] = 14
    name: str
    changed_ms: int = 0

    def __post_init__(self):
        validate_user_name(self.name)


@dataclass(frozen=True)
class SubscriptionChanged:
    """A user subscribes to or unsubscribes from a mailbox name, which need not exist (MS-22)."""

    TYPE: ClassVar[int] = 15
    user: str
    mailbox: str
    subscribed: bool
    changed_ms: int = 0

    def __post_init__(self):
        validate_user_name(self.user)
        validate_mailbox_name(self.mailbox)
        if not isinstance(self.subscribed, bool):
            raise ValueError("subscribed must be a boolean")


Event = (MailboxCreated | MailboxRenamed | MailboxDeleted | MessageAppended | FlagsChanged | MessagesExpunged
         | Checkpoint | EpochStarted | MailboxRenumbered | MessagesAppended | MessagesCopied | MessagesMoved
         | UserPasswordSet | UserDeleted | SubscriptionChanged)
EVENT_TYPES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (MailboxCreated, MailboxRenamed, MailboxDeleted, MessageAppended, FlagsChanged, MessagesExpunged,
                Checkpoint, EpochStarted, MailboxRenumbered, MessagesAppended, MessagesCopied, MessagesMoved,
                UserPasswordSet, UserDeleted, SubscriptionChanged)
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
         if not (k in omitted and not v)}
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
    """The mailbox a mail event concerns (None for node-wide events); for a copy, the target."""
    return getattr(event, "mailbox_id", None)


def event_mailbox_ids(event) -> tuple[str, ...]:
    """Every mailbox a record changes (MS-10 holds each one): a move changes its source and its
    target, a copy only its target (its source is read)."""
    mid = getattr(event, "mailbox_id", None)
    if mid is None:
        return ()
    if isinstance(event, MessagesMoved) and event.source_mailbox_id != mid:
        return (mid, event.source_mailbox_id)
    return (mid,)
