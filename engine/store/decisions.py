"""The master's decision state: plans events for requests and applies them.

Theory of operation
-------------------
A request (deliver, store flags, ...) is first *planned* against this state:
validated, and given every number IMAP needs (mailbox id, UIDVALIDITY, UID,
MODSEQ). The planned event is appended to the log, then *applied* here, all
under the node's state lock, so LSN order equals decision order (MS-2: UIDs
are strictly increasing per mailbox in LSN order and never reused).

The state is pure: no clock, no randomness, no I/O. Time and fresh ids come
in as arguments, so planning is deterministic and testable. It holds only
what decisions need; the SQLite store (engine/store.py) holds the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .events import (
    FLAG_OPS,
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
    body_guid,
    modseq_floor,
    normalize_flags,
    renumbered_uids,
    validate_mailbox_name,
    validate_user_name,
)
from .errors import (
    BadFlagError,
    GuardRefusedError,
    MailboxExistsError,
    MessageTooLargeError,
    UidOrderError,
    UidValidityReuseError,
    UnknownMailboxError,
    UnknownUidError,
    UnknownUserError,
    UserExistsError,
    RequestError,
)

__all__ = ["MailboxState", "DecisionState", "Duplicate", "ImportedMessage", "SourceMessage", "UIDNEXT_PLACEHOLDER"]

# MS-14: the body of the message an import appends and expunges at once to carry
# a UIDNEXT above its last UID (every placeholder has this GUID).
UIDNEXT_PLACEHOLDER = (
    b"Subject: mailwal import placeholder\r\n"
    b"X-Mailwal-Placeholder: uidnext\r\n"
    b"\r\n"
    b"An import appended and expunged this message to keep the source's UIDNEXT.\r\n"
)


@dataclass
class MailboxState:
    mailbox_id: str
    name: str
    uidvalidity: int
    uidnext: int = 1
    highestmodseq: int = 0
    uids: set[int] = field(default_factory=set)
    # guid -> (uid, delivered_ms) of recent deliveries, for retry de-duplication (MS-6)
    recent: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    # prune ``recent`` when it grows past this; doubled after each prune so the
    # pruning stays amortised O(1) per delivery even when every entry is
    # still inside the window (a busy mailbox)
    recent_prune_at: int = 1024


@dataclass(frozen=True)
class ImportedMessage:
    """One message brought in from another store with the UID it had there (MS-14)."""

    uid: int
    body: bytes
    flags: tuple[str, ...] = ()
    internaldate_ms: int = 0


@dataclass(frozen=True)
class SourceMessage:
    """What a copy or move needs of one source message (read from the store, MS-20)."""

    guid: bytes
    flags: tuple[str, ...]
    internaldate_ms: int


@dataclass(frozen=True)
class Duplicate:
    """A delivery of the same bytes to the same mailbox within the window (MS-6)."""

    mailbox: str
    uidvalidity: int
    uid: int
    guid: bytes


class DecisionState:
    """Mailboxes as the master's next decisions see them (everything logged so far)."""

    def __init__(self) -> None:
        self.by_name: dict[str, MailboxState] = {}
        self.by_id: dict[str, MailboxState] = {}
        self.last_uidvalidity = 0
        # Names deleted or renamed away since this state was built (MS-14 asks
        # the caller for older ones: the store's tombstones).
        self.retired_names: set[str] = set()
        # MS-18: every mailbox's HIGHESTMODSEQ is at least this (raised by each EpochStarted)
        self.modseq_floor = 0
        self.users: set[str] = set()  # MS-21: the user names that exist

    # -- lookups -----------------------------------------------------------

    def mailbox(self, name: str) -> MailboxState:
        mb = self.by_name.get(name)
        if mb is None:
            raise UnknownMailboxError(f"no mailbox named {name!r}")
        return mb

    # -- planning (pure: raises RequestError or returns an event) ----------

    def plan_create(self, name: str, *, new_id: str, now_s: int, uidvalidity: int | None = None,
                    name_used_before: bool = False, special_use=()) -> MailboxCreated:
        """A new mailbox. ``uidvalidity`` (import only, MS-14) keeps the value
        the mailbox had on another server; it is refused with
        UidValidityReuseError when the name was used on this node before
        (``name_used_before``, or retired since this state was built) and the
        value is not above every UIDVALIDITY given out so far: clients may
        have cached UIDs of the old mailbox under it."""
        validate_mailbox_name(name)
        if name in self.by_name:
            raise MailboxExistsError(f"mailbox {name!r} exists already")
        if uidvalidity is None:
            # RFC 3501 2.3.1.1: a recreated name must get a greater UIDVALIDITY.
            uidvalidity = max(now_s & 0xFFFFFFFF, self.last_uidvalidity + 1)
        else:
            if isinstance(uidvalidity, bool) or not isinstance(uidvalidity, int) or not 1 <= uidvalidity <= 0xFFFFFFFF:
                raise RequestError(f"UIDVALIDITY must be a nonzero 32-bit number, got {uidvalidity!r}")
            if (name_used_before or name in self.retired_names) and uidvalidity <= self.last_uidvalidity:
                raise UidValidityReuseError(
                    f"mailbox name {name!r} was used on this node before, and UIDVALIDITY {uidvalidity} is not above "
                    f"every UIDVALIDITY given out here ({self.last_uidvalidity}): clients could confuse the old "
                    f"mailbox's UIDs with the imported ones; import under another name or with a fresh UIDVALIDITY"
                )
        try:
            return MailboxCreated(new_id, name, uidvalidity, tuple(special_use))
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    def plan_rename(self, old: str, new: str, *, children: bool = False) -> MailboxRenamed:
        """Rename ``old``; with ``children`` (MS-19) the mailboxes below it move along, in one record."""
        mb = self.mailbox(old)
        validate_mailbox_name(new)
        if new in self.by_name:
            raise MailboxExistsError(f"mailbox {new!r} exists already")
        if children:
            if new.startswith(old + "/"):
                raise RequestError(f"mailbox {old!r} cannot be renamed into itself")
            for child in self.children(old):
                target = new + child[len(old):]
                validate_mailbox_name(target)
                if target in self.by_name:
                    raise MailboxExistsError(f"mailbox {target!r} exists already")
        return MailboxRenamed(mb.mailbox_id, old, new, children=children)

    def children(self, name: str) -> list[str]:
        """The names of the mailboxes below ``name``, sorted."""
        prefix = name + "/"
        return sorted(n for n in self.by_name if n.startswith(prefix))

    def plan_delete(self, name: str, *, now_ms: int = 0, recursive: bool = False, max_mailboxes: int = 0) -> list[MailboxDeleted]:
        """Delete ``name`` (and, if ``recursive``, every mailbox below it).

        Raises GuardRefusedError when more than ``max_mailboxes`` (> 0) would go.
        """
        mb = self.mailbox(name)
        targets = [mb]
        if recursive:
            prefix = name + "/"
            targets += [m for n, m in sorted(self.by_name.items()) if n.startswith(prefix)]
        if max_mailboxes and len(targets) > max_mailboxes:
            raise GuardRefusedError(
                f"deleting {name!r} would delete {len(targets)} mailboxes, more than the guard allows "
                f"({max_mailboxes}); raise guard.max_mailbox_deletes if you mean it"
            )
        return [MailboxDeleted(m.mailbox_id, m.name, now_ms) for m in targets]

    def plan_append(
        self, name: str, body: bytes, flags, *, internaldate_ms: int, now_ms: int, dedup_window_ms: int
    ) -> MessageAppended | Duplicate:
        mb = self.mailbox(name)
        flags = normalize_flags(flags)
        guid = body_guid(body)
        seen = mb.recent.get(guid)
        if seen is not None and dedup_window_ms > 0 and now_ms - seen[1] <= dedup_window_ms and seen[0] in mb.uids:
            return Duplicate(name, mb.uidvalidity, seen[0], guid)
        return MessageAppended(
            mailbox_id=mb.mailbox_id, uid=mb.uidnext, modseq=mb.highestmodseq + 1, guid=guid, body=body,
            flags=flags, internaldate_ms=internaldate_ms, delivered_ms=now_ms,
        )

    def plan_import(self, name: str, messages, *, now_ms: int, uidnext: int | None = None,
                    max_message_bytes: int = 0) -> list[MessageAppended | MessagesExpunged]:
        """Events appending ``messages`` (ImportedMessage) with their own UIDs (MS-14).

        UIDs must be strictly increasing and at least the mailbox's UIDNEXT
        (gaps are fine: expunged messages of the source). ``uidnext``, when
        given, is the UIDNEXT the mailbox must have afterwards; if it exceeds
        the last UID + 1, a placeholder (UIDNEXT_PLACEHOLDER) is appended at
        ``uidnext - 1`` and expunged in the same batch, so UIDNEXT is carried
        with the existing event types. Validates everything before returning:
        the batch is all or nothing. De-duplication (MS-6) does not apply.

        Raises UidOrderError, MessageTooLargeError, BadFlagError, UnknownMailboxError.
        """
        mb = self.mailbox(name)
        expected = mb.uidnext
        modseq = mb.highestmodseq
        events: list[MessageAppended | MessagesExpunged] = []
        for m in messages:
            uid = m.uid
            if isinstance(uid, bool) or not isinstance(uid, int) or not 1 <= uid <= 0xFFFFFFFF:
                raise UidOrderError(f"UID {uid!r} is not a 32-bit number >= 1")
            if uid < expected:
                raise UidOrderError(
                    f"cannot import UID {uid} into {name!r}: UIDs must be strictly increasing and at least the "
                    f"mailbox's UIDNEXT ({expected})"
                )
            if max_message_bytes and len(m.body) > max_message_bytes:
                raise MessageTooLargeError(
                    f"message UID {uid} of {len(m.body)} bytes exceeds this node's limit of {max_message_bytes}"
                )
            modseq += 1
            events.append(MessageAppended(
                mailbox_id=mb.mailbox_id, uid=uid, modseq=modseq, guid=body_guid(m.body), body=m.body,
                flags=normalize_flags(m.flags), internaldate_ms=int(m.internaldate_ms), delivered_ms=now_ms,
            ))
            expected = uid + 1
        if uidnext is not None:
            if isinstance(uidnext, bool) or not isinstance(uidnext, int) or not 1 <= uidnext <= 0xFFFFFFFF:
                raise UidOrderError(f"UIDNEXT {uidnext!r} is not a 32-bit number >= 1")
            if uidnext < expected:
                raise UidOrderError(
                    f"UIDNEXT {uidnext} of {name!r} would be below {expected} (the last UID + 1 or the mailbox's "
                    f"UIDNEXT): UIDNEXT never decreases"
                )
            if uidnext > expected:
                placeholder = uidnext - 1
                events.append(MessageAppended(
                    mailbox_id=mb.mailbox_id, uid=placeholder, modseq=modseq + 1,
                    guid=body_guid(UIDNEXT_PLACEHOLDER), body=UIDNEXT_PLACEHOLDER, flags=("\\Deleted", "\\Seen"),
                    internaldate_ms=now_ms, delivered_ms=now_ms,
                ))
                events.append(MessagesExpunged(mb.mailbox_id, (placeholder,), modseq + 2, now_ms))
        return events

    def plan_flags(self, name: str, uids, op: str, flags, *, now_ms: int) -> FlagsChanged:
        mb = self.mailbox(name)
        if op not in FLAG_OPS:
            raise BadFlagError(f"flag operation must be one of {', '.join(FLAG_OPS)}")
        uids = self._existing(mb, uids)
        return FlagsChanged(mb.mailbox_id, uids, op, normalize_flags(flags), mb.highestmodseq + 1, now_ms)

    def plan_expunge(self, name: str, uids, *, now_ms: int = 0) -> MessagesExpunged:
        mb = self.mailbox(name)
        uids = self._existing(mb, uids)
        return MessagesExpunged(mb.mailbox_id, uids, mb.highestmodseq + 1, now_ms)

    def plan_renumber(self, name: str, order, *, now_s: int) -> MailboxRenumbered:
        """A new UIDVALIDITY for ``name`` and UIDs 1, 2, ... for the UIDs in ``order`` (REC-9).

        ``order`` lists the mailbox's current UIDs in their new order (the
        reconciler sorts by arrival time). The new UIDVALIDITY exceeds the
        mailbox's and every one given out before (RFC 3501 2.3.1.1).
        """
        mb = self.mailbox(name)
        order = [int(u) for u in order]
        if len(set(order)) != len(order):
            raise UnknownUidError("a UID appears twice in the new order")
        if order:
            self._existing(mb, order)
        uidvalidity = max(now_s & 0xFFFFFFFF, self.last_uidvalidity + 1, mb.uidvalidity + 1)
        if uidvalidity > 0xFFFFFFFF:
            raise RequestError("no UIDVALIDITY above the current one is left (the 32-bit space is used up)")
        pairs = sorted((old, i + 1) for i, old in enumerate(order))
        return MailboxRenumbered(mb.mailbox_id, uidvalidity, tuple(pairs), len(order) + 1, mb.highestmodseq + 1)

    def plan_append_many(self, name: str, messages, *, now_ms: int) -> MessageAppended | MessagesAppended:
        """An IMAP APPEND (MS-20): ``messages`` are ``(body, flags, internaldate_ms)``; one message is a
        plain ``MessageAppended``, several are one ``MessagesAppended`` (all or nothing). No
        de-duplication (MS-6 is for MTA retries: a client may append the same bytes twice)."""
        mb = self.mailbox(name)
        messages = list(messages)
        if not messages:
            raise RequestError("nothing to append")
        uids, guids, bodies, flags, dates = [], [], [], [], []
        for i, (body, f, idate) in enumerate(messages):
            uids.append(mb.uidnext + i)
            guids.append(body_guid(body))
            bodies.append(body)
            flags.append(normalize_flags(f))
            dates.append(int(idate))
        if uids[-1] > 0xFFFFFFFF:
            raise RequestError(f"mailbox {name!r} has no UIDs left (UIDNEXT {mb.uidnext})")
        if len(messages) == 1:
            return MessageAppended(mb.mailbox_id, uids[0], mb.highestmodseq + 1, guids[0], bodies[0], flags[0],
                                   dates[0], now_ms)
        return MessagesAppended(mb.mailbox_id, tuple(uids), mb.highestmodseq + 1, tuple(guids), tuple(bodies),
                                tuple(flags), tuple(dates), now_ms)

    def plan_copy(self, source: str, uids, target: str, sources: dict[int, SourceMessage], *, move: bool,
                  now_ms: int) -> MessagesCopied | None:
        """A COPY or MOVE of ``uids`` from ``source`` to ``target`` as one record (MS-20).

        ``sources`` holds each UID's GUID, flags and internal date as the store has them once it
        applied everything logged (the caller reads it under the write lock). UIDs the source no
        longer holds are left out; None when none is left. The target may be the source (the
        copies get new UIDs there). Raises UnknownMailboxError."""
        src = self.mailbox(source)
        dst = self.mailbox(target)
        todo = sorted(u for u in set(int(u) for u in uids) if u in src.uids)
        if not todo:
            return None
        missing = [u for u in todo if u not in sources]
        if missing:
            raise RequestError(f"the store does not hold UID {missing[0]} of {source!r} that the log has")
        if dst.uidnext + len(todo) - 1 > 0xFFFFFFFF:
            raise RequestError(f"mailbox {target!r} has no UIDs left (UIDNEXT {dst.uidnext})")
        pairs = tuple((u, dst.uidnext + i) for i, u in enumerate(todo))
        fields = dict(mailbox_id=dst.mailbox_id, source_mailbox_id=src.mailbox_id, uids=pairs,
                      guids=tuple(sources[u].guid for u in todo), flags=tuple(sources[u].flags for u in todo),
                      internaldate_ms=tuple(sources[u].internaldate_ms for u in todo),
                      modseq=dst.highestmodseq + 1, copied_ms=now_ms)
        if move:
            return MessagesMoved(**fields, source_modseq=src.highestmodseq + 1)
        return MessagesCopied(**fields)

    def plan_user_set(self, name: str, password_hash: str, *, now_ms: int, exists: bool | None = None) -> UserPasswordSet:
        """MS-21: add a user (``exists=False``: refused if there is one), change a password
        (``exists=True``: refused if there is none) or either (None)."""
        validate_user_name(name)
        if exists is False and name in self.users:
            raise UserExistsError(f"user {name!r} exists already")
        if exists is True and name not in self.users:
            raise UnknownUserError(f"no user named {name!r}")
        return UserPasswordSet(name, password_hash, now_ms)

    def plan_user_delete(self, name: str, *, now_ms: int) -> UserDeleted:
        if name not in self.users:
            raise UnknownUserError(f"no user named {name!r}")
        return UserDeleted(name, now_ms)

    def plan_subscription(self, user: str, mailbox: str, subscribed: bool, *, now_ms: int) -> SubscriptionChanged:
        """MS-22: the name need not exist (RFC 9051 6.3.7)."""
        validate_user_name(user)
        validate_mailbox_name(mailbox)
        return SubscriptionChanged(user, mailbox, bool(subscribed), now_ms)

    @staticmethod
    def _existing(mb: MailboxState, uids) -> tuple[int, ...]:
        uids = sorted(set(int(u) for u in uids))
        if not uids:
            raise UnknownUidError("no UIDs given")
        missing = [u for u in uids if u not in mb.uids]
        if missing:
            raise UnknownUidError(f"mailbox {mb.name!r} has no message with UID {', '.join(map(str, missing[:10]))}")
        return tuple(uids)

    # -- applying ------------------------------------------------------------

    def apply(self, event, *, dedup_window_ms: int = 0) -> None:
        """Apply a logged event. Events for unknown mailboxes are ignored
        (they were deleted); applying is deterministic."""
        if isinstance(event, MailboxCreated):
            mb = MailboxState(event.mailbox_id, event.name, event.uidvalidity, highestmodseq=self.modseq_floor)
            self.by_name[event.name] = mb
            self.by_id[event.mailbox_id] = mb
            self.last_uidvalidity = max(self.last_uidvalidity, event.uidvalidity)
        elif isinstance(event, MailboxRenamed):
            mb = self.by_id.get(event.mailbox_id)
            if mb is not None:
                old = mb.name
                moving = [mb] + ([self.by_name[n] for n in self.children(old)] if event.children else [])
                for m in moving:
                    self.by_name.pop(m.name, None)
                    self.retired_names.add(m.name)
                for m in moving:
                    m.name = event.new_name + m.name[len(old):]
                    self.by_name[m.name] = m
        elif isinstance(event, MailboxDeleted):
            mb = self.by_id.pop(event.mailbox_id, None)
            if mb is not None:
                self.by_name.pop(mb.name, None)
                self.retired_names.add(mb.name)
        elif isinstance(event, MessageAppended):
            mb = self.by_id.get(event.mailbox_id)
            if mb is not None:
                mb.uids.add(event.uid)
                mb.uids.discard(event.replaces)  # a move (MS-16); 0 is never a UID
                mb.uidnext = max(mb.uidnext, event.uid + 1)
                mb.highestmodseq = max(mb.highestmodseq, event.modseq)
                mb.recent[event.guid] = (event.uid, event.delivered_ms)
                if dedup_window_ms and len(mb.recent) > mb.recent_prune_at:
                    cutoff = event.delivered_ms - dedup_window_ms
                    mb.recent = {g: v for g, v in mb.recent.items() if v[1] >= cutoff}
                    mb.recent_prune_at = max(1024, 2 * len(mb.recent))
        elif isinstance(event, MessagesAppended):
            for one in event.messages():
                self.apply(one, dedup_window_ms=dedup_window_ms)
        elif isinstance(event, MessagesCopied):  # and MessagesMoved
            dst = self.by_id.get(event.mailbox_id)
            if dst is not None:
                for i, ((_, uid), guid) in enumerate(zip(event.uids, event.guids)):
                    dst.uids.add(uid)
                    dst.recent[guid] = (uid, event.copied_ms)
                dst.uidnext = max(dst.uidnext, event.uids[-1][1] + 1)
                dst.highestmodseq = max(dst.highestmodseq, event.modseq + len(event.uids) - 1)
            src = self.by_id.get(event.source_mailbox_id) if isinstance(event, MessagesMoved) else None
            if src is not None:
                src.uids.difference_update(event.source_uids)
                src.highestmodseq = max(src.highestmodseq, event.source_modseq)
        elif isinstance(event, EpochStarted):
            self.raise_modseq_floor(modseq_floor(event.epoch))
        elif isinstance(event, UserPasswordSet):
            self.users.add(event.name)
        elif isinstance(event, UserDeleted):
            self.users.discard(event.name)
        elif isinstance(event, FlagsChanged):
            mb = self.by_id.get(event.mailbox_id)
            if mb is not None:
                mb.highestmodseq = max(mb.highestmodseq, event.modseq)
        elif isinstance(event, MessagesExpunged):
            mb = self.by_id.get(event.mailbox_id)
            if mb is not None:
                mb.uids.difference_update(event.uids)
                mb.highestmodseq = max(mb.highestmodseq, event.modseq)
        elif isinstance(event, MailboxRenumbered):
            mb = self.by_id.get(event.mailbox_id)
            if mb is not None:
                mapping = renumbered_uids(event, mb.uids)
                mb.uids = set(mapping.values())
                mb.uidvalidity = event.uidvalidity
                mb.uidnext = max([event.uidnext] + [u + 1 for u in mb.uids])
                mb.highestmodseq = max(mb.highestmodseq, event.modseq)
                mb.recent = {g: (mapping[u], t) for g, (u, t) in mb.recent.items() if u in mapping}
                self.last_uidvalidity = max(self.last_uidvalidity, event.uidvalidity)

    def raise_modseq_floor(self, floor: int) -> None:
        """MS-18: every mailbox's HIGHESTMODSEQ, and every later mailbox's first one, is at least ``floor``."""
        if floor <= self.modseq_floor:
            return
        self.modseq_floor = floor
        for mb in self.by_id.values():
            mb.highestmodseq = max(mb.highestmodseq, floor)
