"""Replaying one side's tail into tracks: the first half of the pure core (specs/reconcile.md).

A *tail* is the records one log wrote after the fork point. :class:`SideReplay`
feeds them in LSN order into a :class:`MailboxTrack` per mailbox and a
:class:`MessageTrack` per message the tail met, keyed so that a message is
named the same way on both sides without the shared prefix (see ``Key``).
Each track keeps the last operation per flag (:class:`FlagOp`), which the
flag rule (:func:`resolve_flag`, REC-8) weighs against the other side's.

Pure: no I/O, no clock; times are the records' own ``changed_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..store.events import (
    EpochStarted,
    FlagsChanged,
    MailboxCreated,
    MailboxDeleted,
    MailboxRenamed,
    MailboxRenumbered,
    MessageAppended,
    MessagesAppended,
    MessagesCopied,
    MessagesExpunged,
    MessagesMoved,
    SubscriptionChanged,
    UserDeleted,
    UserPasswordSet,
    renumbered_uids,
)

__all__ = ["Key", "FlagOp", "resolve_flag", "MessageTrack", "MailboxTrack", "SideReplay", "LastChange"]

# A message key names one message on one side, stable across renumbering:
#   ("pre", mailbox_id, uid at the fork)  a message that existed at the fork
#   ("new", mailbox_id, lsn)              a message delivered in this side's tail
#   ("new", mailbox_id, lsn, i)           the i-th message of a record of several (MS-20)
Key = tuple


@dataclass(frozen=True)
class LastChange:
    """One side's last change, since the fork, of a user or of a subscription (REC-15, REC-16)."""

    lsn: int
    changed_ms: int
    value: object  # a user: the password hash, or None (deleted); a subscription: subscribed (bool)

    def to_dict(self) -> dict:
        value = self.value
        if isinstance(value, str):
            value = "(a password hash)"
        return {"lsn": self.lsn, "changed_ms": self.changed_ms, "value": value}


@dataclass(frozen=True)
class FlagOp:
    """The last thing one side did to one flag of one message (REC-8)."""

    value: bool  # True: the flag was set; False: cleared
    changed_ms: int
    lsn: int
    via: str  # "add", "remove", "replace" or "append"

    def to_dict(self) -> dict:
        return {"op": "add" if self.value else "remove", "changed_ms": self.changed_ms, "lsn": self.lsn,
                "via": self.via}


def resolve_flag(survivor: FlagOp | None, loser: FlagOp | None) -> tuple[str, FlagOp | None]:
    """REC-8: which side's operation on a flag wins.

    Returns ``(winner, op)`` with winner ``"survivor"``, ``"loser"`` or
    ``"none"``. The later ``changed_ms`` wins; on a tie an addition wins
    (additions are kept); with one side silent, the other side's op stands.
    """
    if loser is None:
        return ("survivor" if survivor is not None else "none"), survivor
    if survivor is None:
        return "loser", loser
    if survivor.changed_ms != loser.changed_ms:
        return ("survivor", survivor) if survivor.changed_ms > loser.changed_ms else ("loser", loser)
    if survivor.value == loser.value or survivor.value:
        return "survivor", survivor
    return "loser", loser


@dataclass
class MessageTrack:
    """What one side's tail says about one message."""

    key: Key
    mailbox_id: str
    uid: int  # the UID when the tail first met it (delivery UID, or UID at the fork)
    guid: bytes | None = None  # None for a message from before the fork (the tail never saw its delivery)
    size: int = 0
    internaldate_ms: int = 0
    delivered_ms: int = 0
    lsn: int | None = None  # the delivery record (None before the fork)
    uid_space: object = "fork"  # "fork" or the UIDVALIDITY the UID belongs to
    flags: set[str] | None = None  # current flags, when known (messages delivered in the tail)
    explicit: dict[str, FlagOp] = field(default_factory=dict)
    baseline: tuple[frozenset, FlagOp] | None = None  # the last replace
    changes: list[dict] = field(default_factory=list)
    expunged_lsn: int | None = None
    moved: bool = False  # the expunge was a move's (MS-16, MS-20): the message lives on at another UID
    gone_with_mailbox: bool = False
    # where the body is (REC-5 copies it back): ("lsn", L) a delivery record of this side's log
    # holding that GUID, or ("pre", mailbox_id, uid at the fork) a message of the shared prefix
    body_from: tuple | None = None

    def op(self, flag: str) -> FlagOp | None:
        """This side's last operation on ``flag`` since the fork (None: untouched)."""
        got = self.explicit.get(flag)
        if got is not None:
            return got
        if self.baseline is not None:
            kept, op = self.baseline
            return FlagOp(flag in kept, op.changed_ms, op.lsn, "replace")
        return None

    def touched_flags(self) -> set[str]:
        out = set(self.explicit)
        if self.baseline is not None:
            out |= set(self.baseline[0])
        return out

    @property
    def alive(self) -> bool:
        return self.expunged_lsn is None and not self.gone_with_mailbox


@dataclass
class MailboxTrack:
    """What one side's tail says about one mailbox."""

    mailbox_id: str
    created_lsn: int | None = None  # None: the mailbox existed at the fork
    uidvalidity: int | None = None  # known if created or renumbered in the tail
    fork_name: str | None = None  # learnt from a rename's old name or a delete
    name: str | None = None  # current name, when known
    renames: list[tuple[int, str, str]] = field(default_factory=list)
    deleted: tuple[int, str] | None = None
    renumbers: list[tuple[int, int]] = field(default_factory=list)  # (lsn, new uidvalidity)
    rename_children: bool = False  # a rename moved the mailboxes below along (MS-19)
    uid_key: dict[int, Key] = field(default_factory=dict)  # current UID -> key (only UIDs the tail met)
    expunged_key: dict[int, Key] = field(default_factory=dict)  # expunged UID -> its key (CTL-9 merges)
    max_uid: int = 0  # greatest UID delivered in the tail
    uid_space: object = "fork"

    @property
    def created(self) -> bool:
        return self.created_lsn is not None

    @property
    def renumbered(self) -> bool:
        return bool(self.renumbers)

    def key_for(self, uid: int) -> Key | None:
        key = self.uid_key.get(uid)
        if key is None and not self.created and not self.renumbered:
            key = ("pre", self.mailbox_id, uid)
        return key

    def uid_of(self, key: Key, expunged: bool) -> int | None:
        """The UID ``key`` has at the end of this side's tail (None: gone)."""
        if expunged or self.deleted is not None:
            return None
        for uid, k in self.uid_key.items():
            if k == key:
                return uid
        if key[0] == "pre" and not self.renumbered:
            return key[2]
        return None


class SideReplay:
    """Replays one side's tail (records after the fork) into tracks."""

    def __init__(self, label: str):
        self.label = label
        self.mailboxes: dict[str, MailboxTrack] = {}
        self.messages: dict[Key, MessageTrack] = {}
        self.records = 0
        self.first_lsn: int | None = None
        self.last_lsn: int | None = None
        self.epochs: list[dict] = []
        self.other_records = 0
        self.users: dict[str, LastChange] = {}  # REC-15
        self.subscriptions: dict[tuple[str, str], LastChange] = {}  # REC-16

    def _mailbox(self, mailbox_id: str) -> MailboxTrack:
        """The track of ``mailbox_id``, begun now if the tail had not met it (it existed at the fork)."""
        mailbox = self.mailboxes.get(mailbox_id)
        if mailbox is None:
            mailbox = self.mailboxes[mailbox_id] = MailboxTrack(mailbox_id)
        return mailbox

    def _message(self, mailbox: MailboxTrack, uid: int) -> MessageTrack | None:
        """The track of the message at ``uid`` now, begun if the tail had not met it (None: a UID
        the tail cannot name, in a mailbox it created or renumbered)."""
        key = mailbox.key_for(uid)
        if key is None:
            return None
        message = self.messages.get(key)
        if message is None:
            message = self.messages[key] = MessageTrack(key, mailbox.mailbox_id, uid)
            mailbox.uid_key[uid] = key
        return message

    def _expunge(self, mailbox: MailboxTrack, uid: int, lsn: int, *, moved: bool = False) -> None:
        message = self._message(mailbox, uid)
        if message is not None:
            message.expunged_lsn = lsn
            message.moved = moved
            mailbox.expunged_key[uid] = message.key
        mailbox.uid_key.pop(uid, None)

    def feed(self, lsn: int, event) -> None:
        """Apply one decoded record of the tail (in LSN order)."""
        self.records += 1
        if self.first_lsn is None:
            self.first_lsn = lsn
        self.last_lsn = lsn
        replay = self._REPLAY.get(type(event))
        if replay is not None:
            replay(self, lsn, event)
        else:  # a Checkpoint (decode_event returns only known types)
            self.other_records += 1

    def _mailbox_created(self, lsn: int, event: MailboxCreated) -> None:
        self.mailboxes[event.mailbox_id] = MailboxTrack(
            event.mailbox_id, created_lsn=lsn, uidvalidity=event.uidvalidity, name=event.name,
            uid_space=event.uidvalidity,
        )

    def _mailbox_renamed(self, lsn: int, event: MailboxRenamed) -> None:
        mailbox = self._mailbox(event.mailbox_id)
        if mailbox.name is None and not mailbox.created:
            mailbox.fork_name = mailbox.fork_name or event.old_name
        mailbox.renames.append((lsn, event.old_name, event.new_name))
        mailbox.name = event.new_name
        if event.children:  # MS-19: the mailboxes below whose names the tail knows move along
            mailbox.rename_children = True
            for track in self.mailboxes.values():
                if track is not mailbox and track.name and track.name.startswith(event.old_name + "/"):
                    track.name = event.new_name + track.name[len(event.old_name):]

    def _mailbox_deleted(self, lsn: int, event: MailboxDeleted) -> None:
        mailbox = self._mailbox(event.mailbox_id)
        if mailbox.name is None and not mailbox.created:
            mailbox.fork_name = mailbox.fork_name or event.name
            mailbox.name = event.name
        mailbox.deleted = (lsn, event.name)
        for message in self.messages.values():
            if message.mailbox_id == event.mailbox_id:
                message.gone_with_mailbox = True

    def _message_appended(self, lsn: int, event: MessageAppended, key: Key | None = None) -> None:
        mailbox = self._mailbox(event.mailbox_id)
        key = key or ("new", event.mailbox_id, lsn)
        flags = set(event.flags)
        at = FlagOp(True, event.delivered_ms, lsn, "append")
        explicit, baseline = {f: at for f in flags}, None
        if event.replaces:
            # A move (MS-16): the same message at a new UID, and the old UID expunged by the
            # same record. Its flags were copied, not set by a client: its operations since
            # the fork are the old UID's (none if the tail never touched it).
            old = self._message(mailbox, event.replaces)
            explicit = dict(old.explicit) if old is not None else {}
            baseline = old.baseline if old is not None else None
        self.messages[key] = MessageTrack(
            key, event.mailbox_id, event.uid, guid=event.guid, size=len(event.body),
            internaldate_ms=event.internaldate_ms, delivered_ms=event.delivered_ms, lsn=lsn,
            uid_space=mailbox.uid_space, flags=flags, explicit=explicit, baseline=baseline, body_from=("lsn", lsn),
        )
        if event.replaces:
            self._expunge(mailbox, event.replaces, lsn, moved=True)
        mailbox.uid_key[event.uid] = key
        mailbox.max_uid = max(mailbox.max_uid, event.uid)

    def _messages_appended(self, lsn: int, event: MessagesAppended) -> None:
        """MS-20: each message of the record, as if delivered alone (its key names its place in the record)."""
        for i, one in enumerate(event.messages()):
            self._message_appended(lsn, one, key=("new", event.mailbox_id, lsn, i))

    def _messages_copied(self, lsn: int, event: MessagesCopied) -> None:
        """MS-20: each copy is a new message of the target, like a delivery at the copy's time (its
        flags were the source's: REC-8 counts them as set when the copy arrived); its body is where
        the source's is. A move's source UIDs leave their mailbox by a move, which is not an
        expunge (REC-10, REC-17)."""
        target = self._mailbox(event.mailbox_id)
        source = self._mailbox(event.source_mailbox_id)
        for i, ((src_uid, uid), guid, flags) in enumerate(zip(event.uids, event.guids, event.flags)):
            origin = self._message(source, src_uid)
            if origin is None:
                body_from = None
            elif origin.key[0] == "pre":
                body_from = ("pre",) + tuple(origin.key[1:3])
            else:
                body_from = origin.body_from
            key = ("new", event.mailbox_id, lsn, i)
            at = FlagOp(True, event.copied_ms, lsn, "append")
            self.messages[key] = MessageTrack(
                key, event.mailbox_id, uid, guid=guid, size=origin.size if origin is not None else 0,
                internaldate_ms=event.internaldate_ms[i], delivered_ms=event.copied_ms, lsn=lsn,
                uid_space=target.uid_space, flags=set(flags), explicit={f: at for f in flags}, body_from=body_from,
            )
            target.uid_key[uid] = key
            target.max_uid = max(target.max_uid, uid)
            if isinstance(event, MessagesMoved):
                self._expunge(source, src_uid, lsn, moved=True)

    def _user_changed(self, lsn: int, event) -> None:
        value = event.password_hash if isinstance(event, UserPasswordSet) else None
        self.users[event.name] = LastChange(lsn, event.changed_ms, value)

    def _subscription_changed(self, lsn: int, event: SubscriptionChanged) -> None:
        self.subscriptions[(event.user, event.mailbox)] = LastChange(lsn, event.changed_ms, event.subscribed)

    def _flags_changed(self, lsn: int, event: FlagsChanged) -> None:
        mailbox = self._mailbox(event.mailbox_id)
        flags = set(event.flags)
        for uid in event.uids:
            # A change logged on an expunged UID (only a CTL-9 merge writes one) is its message's.
            gone = mailbox.expunged_key.get(uid) if uid not in mailbox.uid_key else None
            message = self.messages.get(gone) if gone is not None else self._message(mailbox, uid)
            if message is None:
                continue
            if event.op == "replace":
                message.explicit = {}
                message.baseline = (frozenset(flags), FlagOp(True, event.changed_ms, lsn, "replace"))
                if message.flags is not None:
                    message.flags = set(flags)
            else:
                value = event.op == "add"
                for flag in flags:
                    message.explicit[flag] = FlagOp(value, event.changed_ms, lsn, event.op)
                if message.flags is not None:
                    message.flags = (message.flags | flags) if value else (message.flags - flags)
            message.changes.append({"uid": uid, "op": event.op, "flags": sorted(flags),
                                    "changed_ms": event.changed_ms, "lsn": lsn})

    def _messages_expunged(self, lsn: int, event: MessagesExpunged) -> None:
        mailbox = self._mailbox(event.mailbox_id)
        for uid in event.uids:
            self._expunge(mailbox, uid, lsn)

    def _mailbox_renumbered(self, lsn: int, event: MailboxRenumbered) -> None:
        mailbox = self._mailbox(event.mailbox_id)
        present = set(mailbox.uid_key) | {old for old, _ in event.uids}
        keys_by_new_uid: dict[int, Key] = {}
        for old, new in renumbered_uids(event, present).items():
            key = mailbox.key_for(old)
            if key is not None:
                keys_by_new_uid[new] = key
                if key not in self.messages:
                    self.messages[key] = MessageTrack(key, mailbox.mailbox_id, old)
        mailbox.uid_key = keys_by_new_uid
        mailbox.expunged_key = {}
        mailbox.renumbers.append((lsn, event.uidvalidity))
        mailbox.uidvalidity = event.uidvalidity
        mailbox.uid_space = event.uidvalidity

    def _epoch_started(self, lsn: int, event: EpochStarted) -> None:
        self.epochs.append({"lsn": lsn, "epoch": event.epoch, "node": event.node})

    _REPLAY = {
        MailboxCreated: _mailbox_created,
        MailboxRenamed: _mailbox_renamed,
        MailboxDeleted: _mailbox_deleted,
        MessageAppended: _message_appended,
        FlagsChanged: _flags_changed,
        MessagesExpunged: _messages_expunged,
        MailboxRenumbered: _mailbox_renumbered,
        EpochStarted: _epoch_started,
        MessagesAppended: _messages_appended,
        MessagesCopied: _messages_copied,
        MessagesMoved: _messages_copied,
        UserPasswordSet: _user_changed,
        UserDeleted: _user_changed,
        SubscriptionChanged: _subscription_changed,
    }

    def messages_in(self, mailbox_id: str, kind: str = "new") -> list[MessageTrack]:
        """This side's tracks of messages in ``mailbox_id``: delivered in the tail (``"new"``)
        or from before the fork (``"pre"``)."""
        return [m for m in self.messages.values() if m.mailbox_id == mailbox_id and m.key[0] == kind]
