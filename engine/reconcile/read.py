"""Reading for a reconcile: the fork point, both tails, names and GUIDs from the prefix, the survivor's store.

* :func:`reconcile` finds the fork point of two log directories (no writer
  lock needed; O(log n) records, REC-3), reads both tails into a
  :class:`~engine.reconcile.tail_diff.Diff` and returns a
  :class:`Reconciliation` (fork point, diff, what it read). Mailboxes the
  tails do not name are named from the survivor's store or, on request, by
  a scan of the shared prefix.
* :func:`guids_at_fork` reads the GUIDs of messages alive at the fork from
  the shared prefix, backwards from the fork (REC-14).
* :func:`choose_survivor` tells which side a node's log continues.
* :class:`StoreView` is the planner's
  :class:`~engine.reconcile.planner.SurvivorView` over a node's store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Protocol

from wal import WalError
from wal import ForkSearch, SeekReader, search_fork

from ..store.events import (MailboxCreated, MailboxDeleted, MailboxRenamed, MailboxRenumbered, MessageAppended,
                            MessagesAppended, MessagesCopied, MessagesMoved, body_guid, decode_event)
from .errors import NotSurvivorError, UndecodableRecordError
from .planner import MailboxView, MessageView
from .replay import SideReplay
from .reports import REPORT_FORMAT
from .tail_diff import Diff, compare

__all__ = ["Progress", "NoProgress", "Reconciliation", "reconcile", "guids_at_fork", "body_at_fork", "choose_survivor",
           "StoreView", "store_names"]


class Progress(Protocol):
    """Where a long read reports progress (the CLI draws a bar)."""

    def phase(self, name: str, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


class NoProgress:
    """A :class:`Progress` that reports nowhere."""

    def phase(self, name: str, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass


@dataclass
class Reconciliation:
    """Fork point and diff of two logs."""

    dir_a: str
    dir_b: str
    search: ForkSearch
    diff: Diff
    names_from: str  # "tails", "store", "prefix-scan" or "ids"
    bytes_read: int = 0  # by the whole reconcile (search, tails, name scan)
    records_read: int = 0

    @property
    def diverged(self) -> bool:
        return self.search.diverged

    def to_dict(self) -> dict:
        s = self.search.to_dict()
        return {
            "format": REPORT_FORMAT,
            "a": dict(s["a"], path=self.dir_a),
            "b": dict(s["b"], path=self.dir_b),
            "fork": s["fork"],
            "diverged": self.diverged,
            "prefix": None if self.diverged else ("a" if self.search.last_a <= self.search.last_b else "b"),
            **self.diff.to_dict(),
            "names_from": self.names_from,
            "read": {"fork_search": s["search"], "total_bytes": self.bytes_read, "total_records": self.records_read},
        }


def _decoded(reader: SeekReader, from_lsn: int, progress: Progress) -> Iterator[tuple[int, object]]:
    for rec in reader.records(from_lsn, on_bytes=progress.advance):
        try:
            ev = decode_event(rec.type, rec.payload)
        except ValueError as exc:
            raise UndecodableRecordError(reader.directory, rec.lsn, str(exc)) from exc
        yield rec.lsn, ev


def _names_from_prefix(reader: SeekReader, fork_lsn: int, wanted: set[str], progress: Progress) -> dict[str, str]:
    """Names at the fork of ``wanted`` mailbox ids, from the shared prefix (a full scan)."""
    out: dict[str, str] = {}
    first = reader.first_lsn()
    if fork_lsn < first:
        return out
    progress.phase("names in the shared prefix", reader.bytes_after(first - 1))
    for rec in reader.records(first, on_bytes=progress.advance):
        if rec.lsn > fork_lsn:
            break
        if rec.type not in (MailboxCreated.TYPE, MailboxRenamed.TYPE, MailboxDeleted.TYPE):
            continue
        ev = decode_event(rec.type, rec.payload)
        if ev.mailbox_id not in wanted:
            continue
        if isinstance(ev, MailboxCreated):
            out[ev.mailbox_id] = ev.name
        elif isinstance(ev, MailboxRenamed):
            out[ev.mailbox_id] = ev.new_name
        else:
            out.pop(ev.mailbox_id, None)
    return out


_GUID_WINDOW = 256  # first window of the backward search for pre-fork deliveries (doubles each step)


def guids_at_fork(reader: SeekReader, fork_lsn: int, wanted: dict[str, set[int]]) -> dict[tuple, bytes]:
    """REC-14: the GUIDs of messages alive at the fork, read from the shared prefix.

    ``wanted`` maps a mailbox id to UIDs at the fork; the result maps
    ``("pre", mailbox id, uid)`` to the GUID of the ``MessageAppended`` that
    gave that message its UID. The prefix is read backwards from the fork in
    windows that double (256, 512, ... records), each read forward and
    verified like any read, and the search stops as soon as every wanted
    message is found. The windows do not overlap: no record is read twice,
    and what is read is at most the greater of 256 records and twice the
    distance from the fork back to the oldest wanted delivery (and never more
    than the retained prefix). A ``MailboxRenumbered``
    met on the way maps the UIDs back to the ones they had before it; a UID
    it does not list, a mailbox's creation, or the oldest retained record
    ends the search for that message, which then has no GUID (unknown is
    never guessed).
    """
    # current UID (in the era the backward search has reached) -> UID at the fork
    pending = {mid: {u: u for u in uids} for mid, uids in wanted.items() if uids}
    found: dict[tuple, bytes] = {}
    first = reader.first_lsn()
    hi, width = fork_lsn, _GUID_WINDOW
    while hi >= first and any(pending.values()):
        lo = max(first, hi - width + 1)
        events = []
        for rec in reader.records(lo):
            if rec.lsn > hi:
                break
            if rec.type not in _GUID_TYPES:
                continue
            try:
                ev = decode_event(rec.type, rec.payload)
            except ValueError as exc:
                raise UndecodableRecordError(reader.directory, rec.lsn, str(exc)) from exc
            if ev.mailbox_id in pending:
                events.append(ev)
        for ev in reversed(events):
            want = pending[ev.mailbox_id]
            if isinstance(ev, (MessageAppended, MessagesAppended, MessagesCopied)):
                given = ([(ev.uid, ev.guid)] if isinstance(ev, MessageAppended) else
                         list(zip(ev.uids, ev.guids)) if isinstance(ev, MessagesAppended) else
                         list(zip(ev.target_uids, ev.guids)))  # MS-20: a copy gives its target UIDs
                for uid, guid in given:
                    at_fork = want.pop(uid, None)
                    if at_fork is not None:
                        found[("pre", ev.mailbox_id, at_fork)] = guid
            elif isinstance(ev, MailboxRenumbered):
                back = {new: old for old, new in ev.uids}
                pending[ev.mailbox_id] = {back[u]: f for u, f in want.items() if u in back}
            else:  # MailboxCreated: the mailbox began here
                want.clear()
        hi, width = lo - 1, width * 2
    return found


_GUID_TYPES = (MessageAppended.TYPE, MessagesAppended.TYPE, MessagesCopied.TYPE, MessagesMoved.TYPE,
               MailboxRenumbered.TYPE, MailboxCreated.TYPE)


def body_at_fork(reader: SeekReader, fork_lsn: int, guid: bytes) -> bytes | None:
    """REC-5, REC-17: the bytes of GUID ``guid`` from the shared prefix, read backwards from the fork
    in windows that double (like :func:`guids_at_fork`); None when the retained log lacks them."""
    first = reader.first_lsn()
    hi, width = fork_lsn, _GUID_WINDOW
    while hi >= first:
        lo = max(first, hi - width + 1)
        found = None
        for rec in reader.records(lo):
            if rec.lsn > hi:
                break
            if rec.type not in (MessageAppended.TYPE, MessagesAppended.TYPE):
                continue
            ev = decode_event(rec.type, rec.payload)
            for body in ([ev.body] if isinstance(ev, MessageAppended) else ev.bodies):
                if len(body) and body_guid(body) == guid:
                    found = body
        if found is not None:
            return found
        hi, width = lo - 1, width * 2
    return None


def reconcile(dir_a: str, dir_b: str, *, names: dict[str, str] | None = None, scan_prefix_names: bool = False,
              tail_dirs: dict[str, str] | None = None, progress: Progress | None = None) -> Reconciliation:
    """Find the fork point of two logs and diff their tails.

    Args:
        dir_a, dir_b: log directories; neither needs to be closed or unlocked.
        names: mailbox id -> name, for mailboxes created before the fork
            (e.g. from a node's store).
        scan_prefix_names: name the remaining ones by scanning A's shared
            prefix for mailbox creates and renames (reads the prefix once;
            off: such mailboxes are shown by id).
        tail_dirs: read a side's tail from another directory that extends
            it (``{"a": node_log}``: the survivor's live log).
        progress: receives byte counts while tails and prefix are read.

    Raises:
        wal.ForeignLogError, wal.ForkUnknownError, WalError,
        UndecodableRecordError.
    """
    progress = progress or NoProgress()
    ra, rb = SeekReader(dir_a), SeekReader(dir_b)
    extra: list[SeekReader] = []
    try:
        search = search_fork(dir_a, dir_b, reader_a=ra, reader_b=rb)
        fork = search.fork.lsn
        sides = {"a": SideReplay("a"), "b": SideReplay("b")}
        for label, reader in (("a", ra), ("b", rb)):
            if tail_dirs and label in tail_dirs:
                reader = SeekReader(tail_dirs[label])
                extra.append(reader)
                if reader.hash_at(fork) != search.fork.hash:
                    raise NotSurvivorError(f"{tail_dirs[label]} does not contain the fork point of {dir_a} and {dir_b}")
            progress.phase(f"tail of {label.upper()}", reader.bytes_after(fork))
            for lsn, ev in _decoded(reader, fork + 1, progress):
                sides[label].feed(lsn, ev)
        known = dict(names or {})
        wanted = {mid for s in sides.values() for mid, t in s.mailboxes.items()
                  if not t.created and t.fork_name is None and mid not in known}
        names_from = "tails" if not wanted else ("store" if names else "ids")
        if wanted and scan_prefix_names:
            known.update(_names_from_prefix(ra, fork, wanted, progress))
            names_from = "prefix-scan"
        d = compare(sides["a"], sides["b"], names=known)
        readers = [ra, rb, *extra]
        return Reconciliation(
            dir_a, dir_b, search, d, names_from,
            bytes_read=sum(r.bytes_read for r in readers), records_read=sum(r.records_read for r in readers),
        )
    finally:
        for r in (ra, rb, *extra):
            r.close()


def choose_survivor(node_log_dir: str, search: ForkSearch, search_dirs: tuple[str, str] | None = None) -> str:
    """``"a"`` or ``"b"``: the side whose last record the node's log contains.

    When it contains both ends (one log is a prefix of the other) the longer
    side is the survivor; equal logs: the one in the node's own directory, else
    A. Raises NotSurvivorError when it contains neither.
    """
    with SeekReader(node_log_dir) as r:
        last = r.last()[0]
        hits = []
        for side, lsn, h in (("a", search.last_a, search.hash_a), ("b", search.last_b, search.hash_b)):
            if lsn <= last:
                try:
                    if r.hash_at(lsn) == h:
                        hits.append((lsn, side))
                except WalError:
                    pass
    if not hits:
        raise NotSurvivorError(
            f"the node's log ({node_log_dir}) contains the end of neither log: it is not their survivor; "
            f"pass the surviving master's node directory to --apply"
        )
    same_dir = {"a": os.path.realpath(search_dirs[0]) == os.path.realpath(node_log_dir),
                "b": os.path.realpath(search_dirs[1]) == os.path.realpath(node_log_dir)} if search_dirs else {}
    return max(hits, key=lambda h: (h[0], same_dir.get(h[1], False), h[1] == "a"))[1]


# ---------------------------------------------------------------------------
# The survivor's store as the planner sees it


class StoreView:
    """A :class:`engine.reconcile.planner.SurvivorView` over a node's store, read on demand."""

    def __init__(self, node):
        self._node = node
        self._infos = {m.mailbox_id: m for m in node.list_mailboxes()}  # waits for the store to catch up
        self._cache: dict[str, MailboxView] = {}

    def by_id(self, mailbox_id: str) -> MailboxView | None:
        info = self._infos.get(mailbox_id)
        if info is None:
            return None
        view = self._cache.get(mailbox_id)
        if view is None:
            msgs = {uid: MessageView(uid, guid, frozenset(flags), idate, delivered)
                    for uid, guid, flags, idate, delivered in self._node.store.message_rows(mailbox_id)}
            view = self._cache[mailbox_id] = MailboxView(mailbox_id, info.name, info.uidvalidity, info.uidnext, msgs)
        return view

    def by_name(self, name: str) -> MailboxView | None:
        for info in self._infos.values():
            if info.name == name:
                return self.by_id(info.mailbox_id)
        return None

    def user_hash(self, name: str) -> str | None:
        return self._node.store.user_hash(name)

    def subscribed(self, user: str, mailbox: str) -> bool:
        return mailbox in self._node.store.subscriptions(user)


def store_names(node) -> dict[str, str]:
    """Mailbox id -> name of every mailbox the node's store knows, deleted ones (tombstones) included."""
    names = dict(node.store.tombstones())
    names.update({m.mailbox_id: m.name for m in node.list_mailboxes()})
    return names
