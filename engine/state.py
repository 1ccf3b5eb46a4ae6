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
    FlagsChanged,
    MailboxCreated,
    MailboxDeleted,
    MailboxRenamed,
    MailboxRenumbered,
    MessageAppended,
    MessagesExpunged,
    body_guid,
    normalize_flags,
    renumbered_uids,
    validate_mailbox_name,
)
from .mailerrors import (
    BadFlagError,
    GuardRefusedError,
    MailboxExistsError,
    UnknownMailboxError,
    UnknownUidError,
    RequestError,
)

__all__ = ["MailboxState", "DecisionState", "Duplicate"]


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

    # -- lookups -----------------------------------------------------------

    def mailbox(self, name: str) -> MailboxState:
        mb = self.by_name.get(name)
        if mb is None:
            raise UnknownMailboxError(f"no mailbox named {name!r}")
        return mb

    # -- planning (pure: raises RequestError or returns an event) ----------

    def plan_create(self, name: str, *, new_id: str, now_s: int) -> MailboxCreated:
        validate_mailbox_name(name)
        if name in self.by_name:
            raise MailboxExistsError(f"mailbox {name!r} exists already")
        # RFC 3501 2.3.1.1: a recreated name must get a greater UIDVALIDITY.
        uidvalidity = max(now_s & 0xFFFFFFFF, self.last_uidvalidity + 1)
        return MailboxCreated(new_id, name, uidvalidity)

    def plan_rename(self, old: str, new: str) -> MailboxRenamed:
        mb = self.mailbox(old)
        validate_mailbox_name(new)
        if new in self.by_name:
            raise MailboxExistsError(f"mailbox {new!r} exists already")
        return MailboxRenamed(mb.mailbox_id, old, new)

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
            mb = MailboxState(event.mailbox_id, event.name, event.uidvalidity)
            self.by_name[event.name] = mb
            self.by_id[event.mailbox_id] = mb
            self.last_uidvalidity = max(self.last_uidvalidity, event.uidvalidity)
        elif isinstance(event, MailboxRenamed):
            mb = self.by_id.get(event.mailbox_id)
            if mb is not None:
                self.by_name.pop(mb.name, None)
                mb.name = event.new_name
                self.by_name[mb.name] = mb
        elif isinstance(event, MailboxDeleted):
            mb = self.by_id.pop(event.mailbox_id, None)
            if mb is not None:
                self.by_name.pop(mb.name, None)
        elif isinstance(event, MessageAppended):
            mb = self.by_id.get(event.mailbox_id)
            if mb is not None:
                mb.uids.add(event.uid)
                mb.uidnext = max(mb.uidnext, event.uid + 1)
                mb.highestmodseq = max(mb.highestmodseq, event.modseq)
                mb.recent[event.guid] = (event.uid, event.delivered_ms)
                if dedup_window_ms and len(mb.recent) > mb.recent_prune_at:
                    cutoff = event.delivered_ms - dedup_window_ms
                    mb.recent = {g: v for g, v in mb.recent.items() if v[1] >= cutoff}
                    mb.recent_prune_at = max(1024, 2 * len(mb.recent))
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
