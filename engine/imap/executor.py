"""The IMAP command executor: commands in, responses out, over a :class:`~engine.imap.backend.Backend`.

Theory of operation
-------------------
One :class:`Executor` per connection holds what the session knows beyond the
protocol state: the logged-in user, the selected mailbox's
:class:`~engine.imap.view.SelectedView`, and the extensions in force
(CONDSTORE, QRESYNC, IMAP4rev2). :meth:`Executor.execute` takes a command
value the connection handed out and returns the responses to send, the last
one being the command's tagged status (IDLE ends with a continuation
request instead; :meth:`Executor.idle_updates` and :meth:`Executor.idle_done`
continue it).

The executor imports no I/O: the backend's coroutines are the only place it
waits. It is the one place where client names become store names
(``engine/imap/names.py``): every name a command carries is mapped under
``user/NAME/`` before the backend sees it, and every store name the backend
returns is shown only if it maps back (IMAP-12).

Each command follows the same steps: take the store's changes into the view
(EXISTS and flag updates may go out first; expunges never do, so the
sequence numbers in the command mean what the client meant), do the work
(writes return only once durable: IMAP-10), then release the updates RFC
9051 7.5.1 allows at the end of that command (IMAP-15).

A refused write is a :class:`~engine.imap.backend.BackendError`, answered
``NO [code]`` with the error's text (a replica names its master: IMAP-13).
Anything else raised here is a bug: it propagates to the transport, which
logs it and answers ``NO [SERVERBUG]``.
"""

from __future__ import annotations

import datetime as _dt
from typing import Callable

from . import commands as c
from .backend import Backend, BackendError, Cannot, NewMessage, NoSuchMailbox
from .commands import format_set
from .names import BadName, client_name, decode_mutf7, encode_mutf7, pattern_matcher, store_name, user_root
from .responses import (
    Code,
    Continuation,
    EnabledData,
    ESearchData,
    ExistsData,
    FetchData,
    FetchRaw,
    FlagsData,
    IdData,
    ListData,
    NamespaceData,
    Raw,
    RecentData,
    SearchData,
    Status,
    StatusData,
    VanishedData,
    encode_value,
)
from .search import SearchItem, compile_search, needs_body, uses_modseq
from ..store.structure import UnknownEncoding, binary_bytes, section_bytes
from .view import SelectedView, flag_atoms

__all__ = ["Executor", "SYSTEM_FLAGS", "SPECIAL_USE", "format_internaldate"]

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_SYSTEM_BY_LOWER = {f.lower(): f for f in SYSTEM_FLAGS}
SPECIAL_USE = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")
_SPECIAL_BY_LOWER = {f.lower(): f for f in SPECIAL_USE}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_ENABLEABLE = {"CONDSTORE": "CONDSTORE", "QRESYNC": "QRESYNC", "IMAP4REV2": "IMAP4rev2"}
SERVER_ID = (("name", "mailwal"), ("vendor", "mailwal"), ("support-url", None))


def format_internaldate(d: _dt.datetime) -> str:
    """RFC 9051 ``date-time``: ``"dd-Mon-yyyy hh:mm:ss +zzzz"``."""
    off = d.utcoffset() or _dt.timedelta(0)
    minutes = int(off.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return (f"{d.day:2d}-{_MONTHS[d.month - 1]}-{d.year:04d} {d.hour:02d}:{d.minute:02d}:{d.second:02d} "
            f"{sign}{minutes // 60:02d}{minutes % 60:02d}")


class _Refusal(Exception):
    """A command refused by the executor itself: answered with ``status [code] text``."""

    def __init__(self, status: str, text: str, code: str | None = None):
        super().__init__(text)
        self.status, self.text, self.code = status, text, code


class Executor:
    """Runs one connection's commands against a backend (see the module docstring).

    Args:
        backend: the mail store.
        capabilities: the capability list after login (for ``OK [CAPABILITY ...]``).
        admit: called with the user name after a correct password; returns a refusal text
            (too many sessions) or None. ``release`` is called with it when the session ends.
    """

    def __init__(self, backend: Backend, *, capabilities: Callable[[], tuple[str, ...]] = lambda: (),
                 admit: Callable[[str], str | None] | None = None, release: Callable[[str], None] | None = None):
        self.backend = backend
        self.capabilities = capabilities
        self.admit = admit
        self.release = release
        self.user: str | None = None
        self.view: SelectedView | None = None
        self.condstore = False
        self.qresync = False
        self.rev2 = False

    def close(self) -> None:
        """The session ended: give back its slot."""
        if self.user is not None and self.release is not None:
            self.release(self.user)
        self.user = None
        self.view = None

    # -- dispatch --------------------------------------------------------------------------

    async def execute(self, cmd: c.Command) -> list:
        handler = _HANDLERS[type(cmd)]
        out: list = []
        try:
            await handler(self, cmd, out)
        except _Refusal as exc:
            out.append(Status(exc.status, exc.text, Code(exc.code) if exc.code else None, cmd.tag))
        except BackendError as exc:
            text = _text(exc)
            if self.user is not None:  # show the client its own names, never the store's
                text = text.replace(user_root(self.user), "")
            out.append(Status("NO", text, Code(exc.code), cmd.tag))
        except BadName as exc:
            out.append(Status("NO", str(exc), Code("CANNOT"), cmd.tag))
        return out

    async def idle_updates(self) -> list:
        """Updates to send while IDLE (every kind is allowed: IDLE is a command in progress)."""
        return await self._updates(allow_expunge=True)

    async def idle_done(self, tag: str) -> list:
        out = await self._updates(allow_expunge=True)
        out.append(Status("OK", "IDLE terminated", None, tag))
        return out

    # -- helpers ---------------------------------------------------------------------------

    def _name(self, wire: str) -> str:
        """A client's mailbox name (wire form) -> store name."""
        name = wire if self.rev2 else decode_mutf7(wire)
        return store_name(self.user, name)

    def _wire(self, store: str) -> str | None:
        name = client_name(self.user, store)
        if name is None:
            return None
        return name if self.rev2 else encode_mutf7(name)

    async def _absorb(self) -> None:
        v = self.view
        if v is None:
            return
        ch = await self.backend.changes(v.name, v.highestmodseq)
        if ch.uidvalidity != v.uidvalidity:
            raise NoSuchMailbox("the selected mailbox was deleted or recreated; select it again")
        v.absorb(ch)
        read_only = self.backend.read_only() is not None
        if read_only != v.read_only and not v.examined:  # IMAP-13: promoted (or demoted) while selected
            v.note_access(read_only, [self._permanent_flags(read_only), Status(
                "OK", "this node is a read-only replica now" if read_only else "this node is the master now: the "
                "mailbox is writable", Code("READ-ONLY" if read_only else "READ-WRITE"))])

    @staticmethod
    def _permanent_flags(read_only: bool) -> Status:
        perm = "()" if read_only else "(" + " ".join(SYSTEM_FLAGS) + " \\*)"
        return Status("OK", "flags that can be changed" if not read_only else "no permanent flags",
                      Code("PERMANENTFLAGS", perm))

    async def _updates(self, *, allow_expunge: bool) -> list:
        if self.view is None:
            return []
        await self._absorb()
        return self.view.updates(allow_expunge=allow_expunge, qresync=self.qresync, condstore=self.condstore)

    def _pairs(self, cmd) -> list[tuple[int, int]]:
        v = self.view
        return v.by_uid(cmd.sequence) if cmd.uid else v.by_sequence(cmd.sequence)

    def _writable_view(self) -> SelectedView:
        refusal = self.backend.read_only()
        if refusal is not None:
            raise refusal
        v = self.view
        if v.examined:
            raise _Refusal("NO", "the mailbox is selected read-only (EXAMINE)", "CANNOT")
        return v

    def _enable_condstore(self) -> None:
        self.condstore = True

    @staticmethod
    def _flags(flags) -> frozenset[str]:
        out = set()
        for f in flags:
            if f.startswith("\\"):
                canon = _SYSTEM_BY_LOWER.get(f.lower())
                if canon is None:
                    raise _Refusal("BAD", f"{f} is not a flag that can be stored (system flags: "
                                          f"{' '.join(SYSTEM_FLAGS)})")
                out.add(canon)
            else:
                out.add(f)
        return frozenset(out)

    # -- any state ---------------------------------------------------------------------------

    async def _noop(self, cmd, out):
        out.extend(await self._updates(allow_expunge=True))
        out.append(Status("OK", f"{cmd.NAME} completed", None, cmd.tag))

    async def _id(self, cmd, out):
        out.append(IdData(SERVER_ID))
        out.append(Status("OK", "ID completed", None, cmd.tag))

    # -- not authenticated ---------------------------------------------------------------------

    async def _starttls(self, cmd: c.StartTls, out):
        out.append(Status("OK", "begin TLS negotiation now", None, cmd.tag))  # the transport starts TLS

    async def _login(self, cmd: c.Login, out):
        await self._log_in(cmd.tag, cmd.username, cmd.password, out)

    async def _authenticate(self, cmd: c.Authenticate, out):
        parts = (cmd.response or b"").split(b"\0")
        if len(parts) != 3:
            raise _Refusal("BAD", "a PLAIN response is authzid NUL authcid NUL password (RFC 4616)")
        try:
            authz, authc, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            raise _Refusal("BAD", "the PLAIN response is not UTF-8") from None
        if authz and authz.lower() != authc.lower():
            raise _Refusal("NO", "logging in as another user is not allowed", "AUTHORIZATIONFAILED")
        await self._log_in(cmd.tag, authc, password, out)

    async def _log_in(self, tag: str, username: str, password: str, out):
        name = await self.backend.authenticate(username, password)
        if name is None:
            raise _Refusal("NO", "invalid user name or password", "AUTHENTICATIONFAILED")
        if self.admit is not None:
            refusal = self.admit(name)
            if refusal is not None:
                raise _Refusal("NO", refusal, "LIMIT")
        self.user = name
        out.append(Status("OK", "logged in", Code("CAPABILITY", " ".join(self.capabilities())), tag))

    # -- authenticated -------------------------------------------------------------------------

    async def _enable(self, cmd: c.Enable, out):
        enabled = []
        for cap in cmd.capabilities:
            name = _ENABLEABLE.get(cap.upper())
            if name is None:
                continue  # RFC 5161: unknown capabilities are ignored
            if name == "QRESYNC":
                if not self.condstore:
                    self.condstore = True
                    enabled.append("CONDSTORE")
                if not self.qresync:
                    self.qresync = True
                    enabled.append("QRESYNC")
            elif name == "CONDSTORE" and not self.condstore:
                self.condstore = True
                enabled.append(name)
            elif name == "IMAP4rev2" and not self.rev2:
                self.rev2 = True
                enabled.append(name)
        out.append(EnabledData(tuple(dict.fromkeys(enabled))))
        out.append(Status("OK", "ENABLE completed", None, cmd.tag))

    async def _namespace(self, cmd, out):
        out.append(NamespaceData((("", "/"),)))
        out.append(Status("OK", "NAMESPACE completed", None, cmd.tag))

    async def _list(self, cmd: c.ListCmd, out):
        await self._list_or_lsub(cmd.tag, cmd.reference, cmd.patterns, set(cmd.selection), set(cmd.returns),
                                 cmd.status_items, "LIST", cmd.extended, out)

    async def _lsub(self, cmd: c.Lsub, out):
        await self._list_or_lsub(cmd.tag, cmd.reference, (cmd.pattern,), {"SUBSCRIBED"}, set(), (), "LSUB",
                                 False, out)

    async def _list_or_lsub(self, tag, reference, patterns, selection, returns, status_items, kind, extended, out):
        if kind == "LIST" and patterns == ("",) and not extended:
            out.append(ListData(("\\Noselect",), "/", ""))
            out.append(Status("OK", "LIST completed", None, tag))
            return
        decoded = []
        for p in patterns:
            full = reference + p
            decoded.append(pattern_matcher(full if self.rev2 else decode_mutf7(full)))
        root = user_root(self.user)
        entries = {client_name(self.user, e.name): e for e in await self.backend.list_mailboxes(root)}
        entries.pop(None, None)
        want_subs = "SUBSCRIBED" in selection or "SUBSCRIBED" in returns
        subs: set[str] = set()
        if want_subs:
            subs = {n for n in (client_name(self.user, s) for s in await self.backend.subscriptions(self.user))
                    if n is not None}
        all_names = set(entries) | (subs if "SUBSCRIBED" in selection else set())
        parents: set[str] = set()
        for name in all_names:
            parts = name.split("/")
            for i in range(1, len(parts)):
                parents.add("/".join(parts[:i]))

        def matches(name: str) -> bool:
            return any(m(name) for m in decoded)

        # (name, why): "match" a mailbox (or, with SUBSCRIBED, a subscription) the patterns match;
        # "parent" a level that exists only as a parent; "childinfo" a parent with a subscribed child
        # (RFC 5258 RECURSIVEMATCH)
        candidates: list[tuple[str, str]] = []
        base = subs if "SUBSCRIBED" in selection else set(entries)
        candidates.extend((name, "match") for name in base if matches(name))
        if kind == "LIST" and "SUBSCRIBED" not in selection:
            candidates.extend((name, "parent") for name in parents - set(entries) if matches(name))
        if "RECURSIVEMATCH" in selection and "SUBSCRIBED" in selection:
            listed = {n for n, _ in candidates}
            candidates.extend((name, "childinfo") for name in parents - listed
                              if matches(name) and any(x.startswith(name + "/") for x in subs))
        candidates.sort(key=lambda x: (x[0] != "INBOX", x[0]))
        for name, why in candidates:
            entry = entries.get(name)
            if "SPECIAL-USE" in selection and (entry is None or not entry.special_use):
                continue
            wire = name if self.rev2 else encode_mutf7(name)
            attrs: list[str] = []
            if entry is None:
                attrs.append("\\NonExistent" if extended and why != "parent" else "\\Noselect")
            if kind == "LIST":
                attrs.append("\\HasChildren" if name in parents else "\\HasNoChildren")
                if entry is not None:
                    attrs.extend(entry.special_use)
                if want_subs and name in subs:
                    attrs.append("\\Subscribed")
            child_info = ("SUBSCRIBED",) if why == "childinfo" else ()
            out.append(ListData(tuple(attrs), "/", wire, kind, child_info))
            if status_items and entry is not None:
                st = await self.backend.status(entry.name)
                out.append(StatusData(wire, _status_items(st, status_items)))
        out.append(Status("OK", f"{kind} completed", None, tag))

    async def _status(self, cmd: c.Status, out):
        name = self._name(cmd.mailbox)
        st = await self.backend.status(name)
        if "HIGHESTMODSEQ" in cmd.items:
            self._enable_condstore()
        out.append(StatusData(self._wire(name), _status_items(st, cmd.items)))
        out.extend(await self._updates(allow_expunge=True))
        out.append(Status("OK", "STATUS completed", None, cmd.tag))

    async def _create(self, cmd: c.Create, out):
        name = self._name(cmd.mailbox)
        use = []
        for u in cmd.special_use:
            canon = _SPECIAL_BY_LOWER.get(u.lower())
            if canon is None:
                raise _Refusal("NO", f"{u} is not a special-use attribute ({' '.join(SPECIAL_USE)})", "USEATTR")
            use.append(canon)
        await self.backend.create(name, tuple(use))
        out.extend(await self._updates(allow_expunge=True))
        out.append(Status("OK", "CREATE completed", None, cmd.tag))

    async def _delete(self, cmd: c.Delete, out):
        name = self._name(cmd.mailbox)
        if name == user_root(self.user) + "INBOX":
            raise Cannot("INBOX cannot be deleted")
        await self.backend.delete(name)
        if self.view is not None and self.view.name == name:
            out.append(Status("OK", "the selected mailbox was deleted", Code("CLOSED")))
            self.view = None
        out.append(Status("OK", "DELETE completed", None, cmd.tag))

    async def _rename(self, cmd: c.Rename, out):
        old, new = self._name(cmd.old), self._name(cmd.new)
        inbox = user_root(self.user) + "INBOX"
        if old == inbox:
            raise Cannot("renaming INBOX is not supported")
        await self.backend.rename(old, new)
        out.extend(await self._updates(allow_expunge=True))
        out.append(Status("OK", "RENAME completed", None, cmd.tag))

    async def _subscribe(self, cmd, out):
        name = self._name(cmd.mailbox)
        await self.backend.set_subscribed(self.user, name, isinstance(cmd, c.Subscribe))
        out.extend(await self._updates(allow_expunge=True))
        out.append(Status("OK", f"{cmd.NAME} completed", None, cmd.tag))

    async def _select(self, cmd: c.Select, out):
        verb = "EXAMINE" if cmd.read_only else "SELECT"
        if cmd.qresync is not None and not self.qresync:
            raise _Refusal("BAD", "QRESYNC parameters need ENABLE QRESYNC first (RFC 7162 3.2.5)")
        if self.view is not None:
            self.view = None
            out.append(Status("OK", "previous mailbox closed", Code("CLOSED")))
        name = self._name(cmd.mailbox)
        if cmd.condstore:
            self._enable_condstore()
        snap = await self.backend.snapshot(name)
        read_only = cmd.read_only or self.backend.read_only() is not None
        view = SelectedView(name, snap, read_only=read_only, examined=cmd.read_only)
        keywords = sorted({f for m in snap.messages for f in m.flags if not f.startswith("\\")})
        out.append(FlagsData(SYSTEM_FLAGS + tuple(keywords)))
        out.append(self._permanent_flags(read_only))
        out.append(ExistsData(len(snap.messages)))
        if not self.rev2:
            out.append(RecentData(0))
        out.append(Status("OK", "UIDs valid", Code("UIDVALIDITY", str(snap.uidvalidity))))
        out.append(Status("OK", "predicted next UID", Code("UIDNEXT", str(snap.uidnext))))
        out.append(Status("OK", "highest", Code("HIGHESTMODSEQ", str(snap.highestmodseq))))
        q = cmd.qresync
        if q is not None and q.uidvalidity == snap.uidvalidity:
            ch = await self.backend.changes(name, q.modseq)
            known = q.known_uids
            last = snap.uidnext - 1
            if ch.vanished is not None:
                vanished = [u for u in ch.vanished if known is None or known.contains(u, last)]
            else:
                present = set(view.uids)
                candidates = known.values(last, limit=last) if known is not None else range(1, last + 1)
                vanished = [u for u in candidates if u not in present]
            if vanished:
                out.append(VanishedData(format_set(vanished), earlier=True))
            for m in ch.changed:
                seq = view.seq_of(m.uid)
                if seq is not None and (known is None or known.contains(m.uid, last)):
                    out.append(FetchData(seq, (("UID", m.uid), ("FLAGS", flag_atoms(m.flags)),
                                               ("MODSEQ", (m.modseq,)))))
        self.view = view
        out.append(Status("OK", f"{verb} completed", Code("READ-ONLY" if read_only else "READ-WRITE"), cmd.tag))

    async def _append(self, cmd: c.Append, out):
        name = self._name(cmd.mailbox)
        messages = [NewMessage(m.message, tuple(sorted(self._flags(m.flags))), m.internaldate) for m in cmd.messages]
        try:
            result = await self.backend.append(name, messages)
        except NoSuchMailbox:
            raise _Refusal("NO", f"mailbox {cmd.mailbox} does not exist; create it first", "TRYCREATE") from None
        out.extend(await self._updates(allow_expunge=True))
        out.append(Status("OK", "APPEND completed",
                          Code("APPENDUID", f"{result.uidvalidity} {format_set(result.uids)}"), cmd.tag))

    async def _idle(self, cmd: c.Idle, out):
        out.extend(await self._updates(allow_expunge=True))
        out.append(Continuation("idling"))

    # -- selected ------------------------------------------------------------------------------

    async def _close(self, cmd, out):
        v = self.view
        if isinstance(cmd, c.Close) and not v.examined and self.backend.read_only() is None:
            await self._absorb()
            deleted = [u for u in v.uids if not v.is_gone(u) and "\\Deleted" in v.meta[u].flags]
            if deleted:
                await self.backend.expunge(v.name, deleted)  # CLOSE expunges silently (RFC 9051 6.4.1)
        self.view = None
        out.append(Status("OK", f"{cmd.NAME} completed", None, cmd.tag))

    async def _expunge(self, cmd: c.Expunge, out):
        v = self._writable_view()
        await self._absorb()
        out.extend(v.updates(allow_expunge=False, qresync=self.qresync, condstore=self.condstore))
        if cmd.uids is not None:
            targets = [u for _, u in v.by_uid(cmd.uids)]
        else:
            targets = v.uids
        deleted = [u for u in targets if not v.is_gone(u) and "\\Deleted" in v.meta[u].flags]
        if deleted:
            gone = await self.backend.expunge(v.name, deleted)
            v.note_expunged(gone)
        out.extend(await self._updates(allow_expunge=True))
        out.append(Status("OK", "EXPUNGE completed", None, cmd.tag))

    async def _fetch(self, cmd: c.Fetch, out):
        v = self.view
        await self._absorb()
        out.extend(v.updates(allow_expunge=False, qresync=self.qresync, condstore=self.condstore))
        atts = cmd.attributes
        if cmd.changed_since is not None or any(a.name == "MODSEQ" for a in atts):
            self._enable_condstore()
        pairs = self._pairs(cmd)
        if cmd.changed_since is not None:
            pairs = [(s, u) for s, u in pairs if v.meta[u].modseq > cmd.changed_since]
            if cmd.vanished:
                ch = await self.backend.changes(v.name, cmd.changed_since)
                last = v.uidnext - 1
                gone = [u for u in (ch.vanished or ()) if cmd.sequence.contains(u, last)]
                if gone:
                    out.append(VanishedData(format_set(gone), earlier=True))
        want_seen = (any(a.sets_seen for a in atts) and not v.examined and self.backend.read_only() is None)
        seen_now: set[int] = set()
        if want_seen:
            unseen = [u for _, u in pairs if not v.is_gone(u) and "\\Seen" not in v.meta[u].flags]
            if unseen:
                res = await self.backend.store(v.name, unseen, "add", frozenset({"\\Seen"}))
                for info in res.changed:
                    v.meta[info.uid] = info
                    seen_now.add(info.uid)
        bodies = {}
        if any(a.needs_body for a in atts):
            bodies = await self.backend.fetch_bodies(v.name, [u for _, u in pairs])
        has_flags = any(a.name == "FLAGS" for a in atts)
        has_modseq = any(a.name == "MODSEQ" for a in atts)
        add_modseq = (self.condstore and has_flags and not has_modseq) or cmd.changed_since is not None
        encoders = [_item_encoder(a) for a in atts]
        missing = False
        meta = v.meta
        for seq, uid in pairs:
            m = meta[uid]
            parts = []
            for a, enc in zip(atts, encoders):
                if enc is not None:
                    parts.append(enc(m))
                    continue
                raw = bodies.get(uid)
                value = None
                if raw is None:
                    missing = True
                else:
                    value = _body_item(a, raw, m.structure)
                    if a.name == "BINARY" and isinstance(value, bytes) and b"\0" in value:
                        value = Raw(b"~{%d}\r\n" % len(value) + value)  # literal8 (RFC 3516 4.3)
                parts.append(a.response_name().encode("ascii") + b" " + encode_value(value))
            if uid in seen_now and not has_flags:
                parts.append(_flags_item(m))
                if self.condstore and not has_modseq:
                    parts.append(b"MODSEQ (%d)" % m.modseq)
            elif add_modseq and not has_modseq:
                parts.append(b"MODSEQ (%d)" % m.modseq)
            out.append(FetchRaw(seq, b" ".join(parts)))
            if has_flags or uid in seen_now:
                v.note_told(m)
        out.extend(await self._updates(allow_expunge=cmd.uid))
        if missing:
            out.append(Status("NO", "some of the requested messages were expunged", Code("EXPUNGEISSUED"),
                              cmd.tag))
        else:
            out.append(Status("OK", "FETCH completed", None, cmd.tag))

    async def _store(self, cmd: c.Store, out):
        v = self._writable_view()
        await self._absorb()
        out.extend(v.updates(allow_expunge=False, qresync=self.qresync, condstore=self.condstore))
        flags = self._flags(f for f in cmd.flags)
        if cmd.unchanged_since is not None:
            self._enable_condstore()
        pairs = [(s, u) for s, u in self._pairs(cmd) if not v.is_gone(u)]
        mode = {"+": "add", "-": "remove", "": "replace"}[cmd.mode]
        res = await self.backend.store(v.name, [u for _, u in pairs], mode, flags, cmd.unchanged_since)
        by_uid = {i.uid: i for i in res.changed + res.unchanged}
        changed = {i.uid for i in res.changed}
        for seq, uid in pairs:
            info = by_uid.get(uid)
            if info is None:
                continue
            items: list = []
            if cmd.uid or self.qresync:
                items.append(("UID", uid))
            if not cmd.silent:
                items.append(("FLAGS", flag_atoms(info.flags)))
            if self.condstore:
                items.append(("MODSEQ", (info.modseq,)))
            if not cmd.silent or (self.condstore and uid in changed):
                out.append(FetchData(seq, tuple(items)))
                v.note_told(info)
            elif uid in changed:
                v.note_told(info)
        out.extend(await self._updates(allow_expunge=cmd.uid))
        code = None
        if res.modified:
            modified = set(res.modified)
            numbers = [u if cmd.uid else s for s, u in pairs if u in modified]
            code = Code("MODIFIED", format_set(numbers))
        out.append(Status("OK", "STORE completed" if code is None else "conditional STORE failed for some messages",
                          code, cmd.tag))

    async def _search(self, cmd: c.Search, out):
        v = self.view
        await self._absorb()
        out.extend(v.updates(allow_expunge=False, qresync=self.qresync, condstore=self.condstore))
        key = cmd.key
        modseq_used = uses_modseq(key)
        if modseq_used:
            self._enable_condstore()
        uids = v.uids
        bodies = await self.backend.fetch_bodies(v.name, list(uids)) if needs_body(key) else {}
        pred = compile_search(key, largest_seq=len(uids), largest_uid=uids[-1] if uids else 0)
        meta = v.meta
        found = [SearchItem(i + 1, meta[u], bodies.get(u)) for i, u in enumerate(uids)]
        found = [m for m in found if pred(m)]
        numbers = [m.info.uid if cmd.uid else m.seq for m in found]
        highest = max((m.info.modseq for m in found), default=None) if modseq_used else None
        if cmd.returns is not None or self.rev2:
            want = set(cmd.returns or ()) or {"ALL"}
            items: list = []
            if numbers:
                if "MIN" in want:
                    items.append(("MIN", min(numbers)))
                if "MAX" in want:
                    items.append(("MAX", max(numbers)))
                if "ALL" in want:
                    items.append(("ALL", format_set(numbers)))
            if "COUNT" in want:
                items.append(("COUNT", len(numbers)))
            if highest is not None and numbers:
                items.append(("MODSEQ", highest))
            out.append(ESearchData(cmd.tag, cmd.uid, tuple(items)))
        else:
            out.append(SearchData(tuple(numbers), highest))
        out.extend(await self._updates(allow_expunge=cmd.uid))
        out.append(Status("OK", "SEARCH completed", None, cmd.tag))

    async def _copy(self, cmd, out):
        v = self.view
        move = isinstance(cmd, c.Move)
        if move:
            self._writable_view()
        await self._absorb()
        out.extend(v.updates(allow_expunge=False, qresync=self.qresync, condstore=self.condstore))
        target = self._name(cmd.mailbox)
        uids = [u for _, u in self._pairs(cmd) if not v.is_gone(u)]
        try:
            if not uids:
                await self.backend.status(target)
                result = None
            else:
                result = await (self.backend.move if move else self.backend.copy)(v.name, uids, target)
        except NoSuchMailbox:
            raise _Refusal("NO", f"mailbox {cmd.mailbox} does not exist; create it first", "TRYCREATE") from None
        code = None
        if result is not None and result.source_uids:
            code = Code("COPYUID", f"{result.uidvalidity} {format_set(result.source_uids)} "
                                   f"{format_set(result.target_uids)}")
        if move:
            if code is not None:
                out.append(Status("OK", "moved", code))  # RFC 6851 4.3: COPYUID comes untagged before the expunges
                v.note_expunged(result.source_uids)
            out.extend(await self._updates(allow_expunge=True))
            out.append(Status("OK", "MOVE completed", None, cmd.tag))
            return
        out.extend(await self._updates(allow_expunge=cmd.uid))
        out.append(Status("OK", "COPY completed", code, cmd.tag))


def _text(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.replace("[", "(").replace("]", ")")


def _status_items(st, items) -> tuple[tuple[str, int], ...]:
    values = {"MESSAGES": st.messages, "UIDNEXT": st.uidnext, "UIDVALIDITY": st.uidvalidity, "UNSEEN": st.unseen,
              "DELETED": st.deleted, "SIZE": st.size, "HIGHESTMODSEQ": st.highestmodseq, "RECENT": 0}
    return tuple((i, values[i]) for i in items)


_FLAG_LISTS: dict[frozenset, bytes] = {}


def _flags_item(m) -> bytes:
    """``FLAGS (...)`` for a message; the encoded lists are shared (few distinct flag sets exist)."""
    item = _FLAG_LISTS.get(m.flags)
    if item is None:
        item = b"FLAGS " + encode_value(flag_atoms(m.flags))
        if len(_FLAG_LISTS) < 4096:
            _FLAG_LISTS[m.flags] = item
    return item


def _item_encoder(a: c.FetchAtt):
    """A function MessageInfo -> encoded ``NAME value`` for metadata items; None for items that need the body."""
    name = a.name
    if name == "UID":
        return lambda m: b"UID %d" % m.uid
    if name == "FLAGS":
        return _flags_item
    if name == "RFC822.SIZE":
        return lambda m: b"RFC822.SIZE %d" % m.size
    if name == "INTERNALDATE":
        return lambda m: b'INTERNALDATE "' + _internaldate_bytes(m.internaldate) + b'"'
    if name == "ENVELOPE":
        return lambda m: b"ENVELOPE " + m.structure["env"]
    if name == "BODYSTRUCTURE":
        return lambda m: b"BODYSTRUCTURE " + m.structure["bs"]
    if name == "BODY":
        return lambda m: b"BODY " + m.structure["body"]
    if name == "MODSEQ":
        return lambda m: b"MODSEQ (%d)" % m.modseq
    return None


_DATES: dict[_dt.datetime, bytes] = {}


def _internaldate_bytes(d: _dt.datetime) -> bytes:
    out = _DATES.get(d)
    if out is None:
        out = format_internaldate(d).encode("ascii")
        if len(_DATES) >= 1 << 16:
            _DATES.clear()
        _DATES[d] = out
    return out


def _body_item(a: c.FetchAtt, raw: bytes, structure) -> object:
    name = a.name
    if name == "RFC822":
        return raw
    if name == "RFC822.HEADER":
        return section_bytes(raw, structure, (), "HEADER")
    if name == "RFC822.TEXT":
        return section_bytes(raw, structure, (), "TEXT")
    sec = a.section
    if name == "BODY[]":
        data = section_bytes(raw, structure, sec.part, sec.text, sec.fields)
    else:
        try:
            data = binary_bytes(raw, structure, sec.part)
        except UnknownEncoding:
            raise _Refusal("NO", "the part's Content-Transfer-Encoding cannot be decoded", "UNKNOWN-CTE") from None
        if name == "BINARY.SIZE":
            return len(data) if data is not None else 0
    if data is None:
        return b"" if name == "BODY[]" else None
    if a.partial is not None:
        origin, length = a.partial
        data = data[origin:origin + length]
    return data


_HANDLERS = {
    c.Noop: Executor._noop, c.Check: Executor._noop, c.Id: Executor._id, c.Login: Executor._login,
    c.Authenticate: Executor._authenticate, c.StartTls: Executor._starttls, c.Enable: Executor._enable, c.Namespace: Executor._namespace,
    c.ListCmd: Executor._list, c.Lsub: Executor._lsub, c.Status: Executor._status, c.Create: Executor._create,
    c.Delete: Executor._delete, c.Rename: Executor._rename, c.Subscribe: Executor._subscribe,
    c.Unsubscribe: Executor._subscribe, c.Select: Executor._select, c.Append: Executor._append,
    c.Idle: Executor._idle, c.Close: Executor._close, c.Unselect: Executor._close, c.Expunge: Executor._expunge,
    c.Fetch: Executor._fetch, c.Store: Executor._store, c.Search: Executor._search, c.Copy: Executor._copy,
    c.Move: Executor._copy,
}
