"""One session's view of its selected mailbox (pure).

Theory of operation
-------------------
A client numbers messages 1..N (sequence numbers) and caches flags by UID.
The store changes under it (other sessions, deliveries, replication), but
the client may learn about a change only at the points RFC 9051 allows
(IMAP-15):

* EXISTS (new messages) and FETCH FLAGS (flag changes) after any command;
* EXPUNGE (or, once QRESYNC is enabled, VANISHED) only at the end of a
  command other than FETCH, STORE and SEARCH (RFC 9051 7.5.1; the UID forms
  may), and never when no command is in progress -- IDLE counts as one.

:class:`SelectedView` keeps ``uids`` (index + 1 = sequence number, so a
UID -> sequence number lookup is a bisection) and what the client was told
(``told``: UID -> MODSEQ of the flags it last saw). :meth:`absorb` takes
the backend's :class:`~engine.imap.backend.Changes` since the view's
``highestmodseq`` and records them as pending; :meth:`updates` turns the
pending changes into responses allowed at this point. A message expunged in
the store but not yet announced stays in ``uids`` with its last metadata, so
sequence numbers the client holds stay valid until the EXPUNGE is sent.

Costs: absorbing k changes is O(k log n); announcing e expunges is one O(n)
rebuild of ``uids``; nothing is quadratic in the mailbox size.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Iterable

from .backend import Changes, MessageInfo, Snapshot
from .commands import SequenceSet, format_set
from .responses import Atom, ExistsData, ExpungeData, FetchData, VanishedData

__all__ = ["SelectedView", "flag_atoms"]


def flag_atoms(flags: Iterable[str]) -> tuple[Atom, ...]:
    return tuple(Atom(f) for f in sorted(flags))


class SelectedView:
    """The selected mailbox as one client sees it."""

    def __init__(self, name: str, snapshot: Snapshot, *, read_only: bool, examined: bool = False):
        self.name = name
        self.read_only = read_only  # what the client was told: [READ-ONLY] (true) or [READ-WRITE]
        self.examined = examined  # selected by EXAMINE: read-only whatever the node's role
        self._notices: list = []  # untagged status responses to send at the next update (note_access)
        self.uidvalidity = snapshot.uidvalidity
        self.uidnext = snapshot.uidnext
        self.highestmodseq = snapshot.highestmodseq
        self.uids: list[int] = [m.uid for m in snapshot.messages]
        self.meta: dict[int, MessageInfo] = {m.uid: m for m in snapshot.messages}
        self.told: dict[int, int] = {m.uid: m.modseq for m in snapshot.messages}
        self._new: list[int] = []  # UIDs in the store, not yet announced with EXISTS
        self._gone: set[int] = set()  # UIDs expunged in the store, still in self.uids
        self._dirty: set[int] = set()  # UIDs whose flags changed since the client was told

    # -- numbering ----------------------------------------------------------------------

    @property
    def exists(self) -> int:
        return len(self.uids)

    def seq_of(self, uid: int) -> int | None:
        i = bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def by_sequence(self, sequence: SequenceSet) -> list[tuple[int, int]]:
        """(seq, uid) for a sequence set; numbers above EXISTS are ignored."""
        n = len(self.uids)
        uids = self.uids
        return [(s, uids[s - 1]) for s in sequence.values(n, limit=n)]

    def by_uid(self, sequence: SequenceSet) -> list[tuple[int, int]]:
        """(seq, uid) for a UID set: the UIDs the view holds (``*`` is the largest of them)."""
        uids = self.uids
        if not uids:
            return []
        out: list[tuple[int, int]] = []
        for lo, hi in sequence.resolve(uids[-1]):
            i, j = bisect_left(uids, lo), bisect_right(uids, hi)
            out.extend(zip(range(i + 1, j + 1), uids[i:j]))
        return out

    def is_gone(self, uid: int) -> bool:
        return uid in self._gone

    # -- changes from the store ---------------------------------------------------------

    def absorb(self, changes: Changes) -> None:
        """Record what changed in the store since ``highestmodseq`` (nothing is sent yet)."""
        last = self.uids[-1] if self.uids else 0
        if self._new:
            last = max(last, self._new[-1])
        for m in changes.changed:
            if m.uid in self.meta:
                old = self.meta[m.uid]
                self.meta[m.uid] = m
                if m.modseq > self.told.get(m.uid, 0) and (m.flags != old.flags or m.modseq != old.modseq):
                    self._dirty.add(m.uid)
            elif m.uid > last:
                self.meta[m.uid] = m
                self.told[m.uid] = m.modseq
                self._new.append(m.uid)
                last = m.uid
            # else: a UID below the last one we know that we never saw: it was expunged before we saw it
        for uid in changes.vanished or ():
            if uid in self.meta:
                if uid in self._new:
                    self._new.remove(uid)
                    del self.meta[uid]
                    self.told.pop(uid, None)
                else:
                    self._gone.add(uid)
                    self._dirty.discard(uid)
        self.uidnext = max(self.uidnext, changes.uidnext)
        self.highestmodseq = max(self.highestmodseq, changes.highestmodseq)

    def note_told(self, info: MessageInfo) -> None:
        """This session's own command told the client ``info`` (STORE's FETCH, FETCH FLAGS)."""
        if info.uid in self.meta and info.uid not in self._gone:
            self.meta[info.uid] = info
            self.told[info.uid] = max(self.told.get(info.uid, 0), info.modseq)
            self._dirty.discard(info.uid)

    def note_expunged(self, uids: Iterable[int]) -> None:
        """This session expunged (or moved away) ``uids``: announce them at the next allowed point."""
        for uid in uids:
            if uid in self.meta:
                self._gone.add(uid)
                self._dirty.discard(uid)

    # -- what to tell the client -------------------------------------------------------

    def note_access(self, read_only: bool, notices: list) -> None:
        """The node's role changed while the mailbox is selected (a promotion makes it writable):
        ``notices`` (untagged ``OK [PERMANENTFLAGS ...]``, ``OK [READ-WRITE]`` or ``[READ-ONLY]``,
        RFC 9051 7.1) go out with the next updates, and the view is that from then on (IMAP-13)."""
        if self.examined or read_only == self.read_only:
            return
        self.read_only = read_only
        self._notices = list(notices)

    def updates(self, *, allow_expunge: bool, qresync: bool, condstore: bool) -> list:
        """The untagged responses pending changes allow now (see the module docstring)."""
        out: list = self._notices
        self._notices = []
        if allow_expunge and self._gone:
            gone = self._gone
            if qresync:
                out.append(VanishedData(format_set(gone)))
            else:
                # one EXPUNGE per message, highest sequence number first: each leaves the others' numbers valid
                seqs = [i + 1 for i, u in enumerate(self.uids) if u in gone] if len(gone) * 8 > len(self.uids) \
                    else sorted(s for s in (self.seq_of(u) for u in gone) if s is not None)
                out.extend(ExpungeData(s) for s in reversed(seqs))
            self.uids = [u for u in self.uids if u not in gone]
            for uid in gone:
                self.meta.pop(uid, None)
                self.told.pop(uid, None)
            self._gone = set()
        if self._new:
            self.uids.extend(self._new)
            self._new = []
            out.append(ExistsData(len(self.uids)))
        if self._dirty:
            for uid in sorted(self._dirty):
                seq = self.seq_of(uid)
                m = self.meta[uid]
                items: list = []
                if qresync:
                    items.append(("UID", uid))
                items.append(("FLAGS", flag_atoms(m.flags)))
                if condstore:
                    items.append(("MODSEQ", (m.modseq,)))
                out.append(FetchData(seq, tuple(items)))
                self.told[uid] = m.modseq
            self._dirty = set()
        return out

    @property
    def pending(self) -> bool:
        return bool(self._new or self._gone or self._dirty or self._notices)
