"""A mail node: the log, the decision state and the SQLite store, wired.

Lifecycle
---------
``Node.init(path)`` creates a node directory (``log.wal/``, ``store.sqlite``,
``node.json``). ``Node.open(path)`` opens it: the log recovers, the store
catches up from its applied LSN (MS-5), the decision state is loaded from the
store, and an applier thread keeps applying new durable records.

Writes (``deliver``, ``store_flags``, ``expunge``, mailbox operations) are
planned and enqueued under one state lock, so LSN order is decision order,
then wait for the log's group-committed fdatasync *outside* that lock. A
method returns only once its record is durable (MS-2). Reads go to the store
after it has applied everything durable at the time of the call
(read-your-writes).

A replica node (``role == "replica"``) refuses writes with
:class:`ReadOnlyNodeError`; its log is fed by replication and its applier
applies whatever arrives.

Damage is loud. Opening the log verifies its last segment and the ends of
the sealed ones (LOG-9); the store's catch-up reads (and so verifies) every
record it has not applied, and refuses to open at damage there. The inside
of the sealed segments, which the store applied before, is verified by a
background check right after open (at most half of one core). Damage found
by either, or an applier that stops on an error, is sticky: ``status()``
names it (segment, offset, LSN), it is logged at ERROR, and every write is
refused with :class:`StoreUnavailableError` saying what to do; reads go on
from the store while it has applied what they need.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict
from typing import Callable, Iterable

import blake3

from wal import OS_FILEOPS, CorruptRecordError, Log, LogClosedError, LogFailedError, Record, WalError
from wal.history import read_history_file, write_history
from wal.seek import SeekReader
from wal.segment import list_segments, read_segment_header, scan_segment

from ..store.events import (Checkpoint, MailboxCreated, UserDeleted, UserPasswordSet, encode_event, event_mailbox_ids,
                     modseq_floor)
from ..store.guard import Guard, GuardConfig
from ..store.errors import (
    MessageTooLargeError,
    ReadNotNow,
    ReadOnlyNodeError,
    RequestError,
    StoreUnavailableError,
    UnknownMailboxError,
    UnknownUidError,
)
from ..store.decisions import DecisionState, Duplicate, SourceMessage
from ..store.database import MailboxInfo, MessageInfo, Store, remove_store_files, store_digest

from .diverged import add_tail, mark_tail_reconciled, read_tails, requeue_applied_tails
from .layout import (
    CONFIG_FILE,
    CUT_INTENT_FILE,
    LOG_DIR,
    STORE_FILE,
    NodeConfig,
    read_config,
    write_config,
    write_json_atomic,
)
from .receipts import AppendReceipt, CopyReceipt, FlagsReceipt, PlannedDeliveries, Receipt

__all__ = ["Node", "rebuild_store"]

LOGIN_CACHE_S = 300.0  # a successful login is remembered this long (verify_user)
MAX_BODY_BYTES = 60 * 1024 * 1024  # a record payload is at most 64 MiB (LOG-4); leave room for the other fields
_log = logging.getLogger("mailwal.node")


class Node:
    """A mail store node. Thread-safe; see the module docstring."""

    def __init__(self, path: str, config: NodeConfig, log: Log, store: Store):
        self.path = os.path.abspath(path)
        self.config = config
        self.log = log
        self.store = store
        self.state = DecisionState()
        self._state_lock = threading.Lock()
        self._writes_paused: str | None = None
        self._stop = threading.Event()
        self._applied_cond = threading.Condition()
        self._applier_error: BaseException | None = None
        self._applier: threading.Thread | None = None
        self._log_damage: CorruptRecordError | None = None  # found by the sealed-segment check (sticky)
        self._log_checker: threading.Thread | None = None
        self._apply_lock = threading.RLock()  # held while applying; failover surgery takes it too
        self.applied_lsn = store.applied_lsn  # cached for cheap reads (acks, status)
        # Bumped when cut_diverged empties the store for a rebuild: a read that checked
        # freshness before the swap reads again once the rebuild caught up (_read_fresh).
        self._store_generation = 0
        self._checkpointer: threading.Thread | None = None
        self.checkpoint_error: BaseException | None = None
        self.on_delivered = None  # optional hook(receipt) for logging
        self._logins: dict[tuple[str, str], tuple[bytes, float]] = {}  # verify_user's recent successes
        self._login_key = os.urandom(32)
        self._listeners: list = []  # change listeners (add_change_listener); replaced, never mutated
        self._applied_listeners: list = []  # add_applied_listener; replaced, never mutated
        self._listeners_lock = threading.Lock()
        # mailbox id (or "user:NAME") -> LSN of the last record enqueued that changed it: a copy
        # plans from the store once the store applied that far (MS-20)
        self._mailbox_lsn: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------

    @classmethod
    def init(cls, path: str, *, role: str = "master", name: str = "", log_id: uuid.UUID | None = None,
             create_log: bool = True, **config) -> "Node":
        """Create a node directory and open it. ``create_log=False`` leaves the
        log to be created later (a replica awaiting seeding)."""
        path = os.path.abspath(path)
        if os.path.exists(os.path.join(path, CONFIG_FILE)):
            raise WalError(f"{path} is already a node; open it instead")
        os.makedirs(path, exist_ok=True)
        cfg = NodeConfig(role=role, name=name or os.path.basename(path), **config)
        write_json_atomic(os.path.join(path, CONFIG_FILE), asdict(cfg))
        if create_log:
            Log.create(os.path.join(path, LOG_DIR), log_id=log_id, segment_max_bytes=cfg.segment_max_bytes).close()
            return cls.open(path)
        return None  # type: ignore[return-value]

    @classmethod
    def open(cls, path: str, *, start_applier: bool = True, on_progress=None) -> "Node":
        """Open a node: recover the log, catch the store up, load the state.

        ``on_progress(applied_lsn, last_lsn)`` reports the catch-up (see :meth:`catch_up`).
        """
        path = os.path.abspath(path)
        cfg = read_config(path)
        log = Log.open(os.path.join(path, LOG_DIR), segment_max_bytes=cfg.segment_max_bytes)
        store = Store(os.path.join(path, STORE_FILE))
        node = cls(path, cfg, log, store)
        node._configure_guard()
        try:
            node._recover_cut()
            node._check_lineage()
            node.catch_up(on_progress=on_progress)
            node._load_state()
        except BaseException:
            store.close()
            log.close()
            raise
        if start_applier:
            node._applier = threading.Thread(target=node._apply_loop, name="mailwal-applier", daemon=True)
            node._applier.start()
            node._checkpointer = threading.Thread(target=node._checkpoint_loop, name="mailwal-checkpoint", daemon=True)
            node._checkpointer.start()
            node._log_checker = threading.Thread(target=node._check_sealed_segments, name="mailwal-log-check",
                                                 daemon=True)
            node._log_checker.start()
        return node

    def _checkpoint_loop(self) -> None:
        """Master: a checkpoint every N records or T seconds with new records."""
        last_lsn, last_time = self.log.last_lsn, time.monotonic()
        while not self._stop.wait(0.5):
            if self.config.role != "master" or self._writes_paused is not None or self.log.failed is not None:
                continue
            grown = self.log.last_lsn - last_lsn
            if grown <= 0:
                last_time = time.monotonic()
                continue
            if grown >= self.config.checkpoint_every_records or time.monotonic() - last_time >= self.config.checkpoint_every_s:
                try:
                    self.checkpoint()
                except Exception as exc:  # reported via status; writes are refused elsewhere
                    self.checkpoint_error = exc
                last_lsn, last_time = self.log.last_lsn, time.monotonic()

    def _configure_guard(self) -> None:
        c = self.config
        if c.role == "replica" and c.guard_enabled:
            self.store.set_guard(Guard(GuardConfig(True, c.guard_window_s, c.guard_max_deletes,
                                                   c.guard_max_expunge_ratio, c.guard_min_expunged)))
        else:
            self.store.set_guard(None)

    def _check_lineage(self) -> None:
        log_id = str(self.log.log_id)
        have = self.store.log_id
        if have is None:
            self.store.set_log_id(log_id)
        elif have != log_id:
            raise WalError(
                f"store {self.store.path} was built from log {have}, but the node's log is {log_id}: "
                f"run `walctl rebuild {self.path}`"
            )
        if self.store.applied_lsn > self.log.last_lsn:
            raise WalError(
                f"store has applied LSN {self.store.applied_lsn} but the log ends at {self.log.last_lsn}: "
                f"the log lost records; run `walctl rebuild {self.path}` after restoring the log"
            )

    def close(self) -> None:
        self._stop.set()
        self.log.wake_waiters()  # the applier waits for new records; it sees _stop now
        with self._applied_cond:
            self._applied_cond.notify_all()
        for t in (self._applier, self._checkpointer, self._log_checker):
            if t is not None:
                t.join(timeout=10)
        self.log.close()
        self.store.close()

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the store follows the log ------------------------------------------------

    def catch_up(self, batch: int = 512, on_progress=None) -> int:
        """Apply every durable record the store has not applied yet.

        ``on_progress(applied_lsn, last_lsn)`` is called after each batch (progress bars).
        Change listeners (:meth:`add_change_listener`) hear of the mailboxes each batch changed.
        """
        changed: set[str] = set()
        with self._apply_lock:
            start = self.store.applied_lsn + 1
            pending: list[Record] = []
            replica = self.config.role == "replica"
            notes = changed if self._listeners else None
            try:
                for rec in self.log.read(start):
                    pending.append(rec)
                    if len(pending) >= batch:
                        self.applied_lsn = self.store.apply_records(pending, replica=replica, changed=notes)
                        pending = []
                        if on_progress is not None:
                            on_progress(self.applied_lsn, self.log.last_lsn)
            except CorruptRecordError:
                # Damage met while reading leaves the store at the record before it: the
                # verified records read so far are applied first.
                if pending:
                    self.applied_lsn = self.store.apply_records(pending, replica=replica, changed=notes)
                raise
            if pending:
                self.applied_lsn = self.store.apply_records(pending, replica=replica, changed=notes)
            self.applied_lsn = self.store.applied_lsn
        with self._applied_cond:
            self._applied_cond.notify_all()
        self._notify_applied()
        if changed:
            self._notify_changed(changed)
        return self.applied_lsn

    # -- change notification (IMAP IDLE and live updates) ------------------------------

    def add_change_listener(self, callback) -> "Callable[[], None]":
        """Call ``callback(names)`` (a set of mailbox names) after the applier applied records that
        changed those mailboxes, on a master and a replica alike (a renamed or deleted mailbox is
        named by its old name too). The callback runs on the applier's thread: it must be cheap,
        thread-safe and must not block. Returns the function that removes it."""
        with self._listeners_lock:
            self._listeners = self._listeners + [callback]

        def remove() -> None:
            with self._listeners_lock:
                self._listeners = [c for c in self._listeners if c is not callback]
        return remove

    def add_applied_listener(self, callback) -> "Callable[[], None]":
        """Call ``callback()`` each time the store applied more of the log (read :attr:`applied_lsn`),
        and once when the applier stopped (:attr:`applier_error`). Runs on the applier's thread
        (or whichever thread caught the store up): cheap, thread-safe, never blocking. Returns
        the function that removes it."""
        with self._listeners_lock:
            self._applied_listeners = self._applied_listeners + [callback]

        def remove() -> None:
            with self._listeners_lock:
                self._applied_listeners = [c for c in self._applied_listeners if c is not callback]
        return remove

    def _notify_applied(self) -> None:
        for callback in self._applied_listeners:
            try:
                callback()
            except Exception:  # noqa: BLE001 - a listener's bug must not stop the applier
                _log.exception("applied listener %r failed", callback)

    def _notify_changed(self, changed: set[str]) -> None:
        names = self.store.mailbox_names(changed)
        for callback in self._listeners:
            try:
                callback(names)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop the applier
                _log.exception("change listener %r failed", callback)

    # -- roles and failover (specs/replication.md, failover) -------------------------

    def set_role(self, role: str) -> None:
        """Switch between master and replica durably (``node.json``).

        Becoming master waits until the store applied the whole log, then
        loads the decision state from it, so UIDs continue where the log ends.
        """
        if role not in ("master", "replica"):
            raise ValueError("role must be master or replica")
        with self._state_lock:
            self.config.role = role
            write_config(self.path, self.config)
            self._configure_guard()
        if role == "master":
            self.catch_up()
            with self._state_lock:
                self._load_state()

    def cut_diverged(self, fork_lsn: int) -> str:
        """Move this log's records after ``fork_lsn`` aside (LOG-16) and make the
        store match the cut log again. Returns the path of the diverged tail.

        The tail becomes a log directory ``diverged/<stamp>-after-<lsn>-<id>.wal``
        beside the node's log, listed in ``diverged.json`` until reconciled. The
        random id keeps the name unique: a node that follows, is promoted and
        follows again can cut twice at the same fork within one second.
        If the store applied past the fork, it is rebuilt from the log (the
        log must still start at LSN 1; otherwise reseed this node).

        The cut is several steps (copy aside, truncate, epoch history, store,
        listing), so it first writes its intent to ``NODE/cut.json``; a crash or
        an error (a full disk) part-way is finished or undone by the next
        :meth:`open` (:meth:`_recover_cut`, CTL-6). An error before the log is
        truncated changes nothing but the intent and a partial copy.

        The rebuild empties the same :class:`Store` object in place
        (:meth:`Store.reset`), never closing one another thread may still hold:
        every store user (reconcile apply, control operations, the LMTP front,
        the applier, status) waits for the swap and then reads the new store;
        the node's reads also wait until the rebuild caught up (CTL-6).
        """
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside_dir = os.path.join(self.path, "diverged")
        os.makedirs(aside_dir, exist_ok=True)
        aside = os.path.join(aside_dir, f"{stamp}-after-{fork_lsn}-{uuid.uuid4().hex[:8]}.wal")
        with self._apply_lock, self._state_lock:
            if self.store.applied_lsn > fork_lsn and self.log.first_lsn > 1:
                raise WalError(f"the store applied past the fork at LSN {fork_lsn} and the log no longer "
                               f"starts at LSN 1: reseed this node from its master")
            intent = {"path": aside, "fork_lsn": fork_lsn, "last_lsn": self.log.last_lsn, "cut_at": stamp}
            write_json_atomic(os.path.join(self.path, CUT_INTENT_FILE), intent)  # a full disk stops here
            self.log.truncate_after(fork_lsn, aside)
            self._finish_cut(intent)
        self.catch_up()
        return aside

    def _finish_cut(self, intent: dict) -> None:
        """The steps of a cut after the log was truncated (caller holds both locks):
        empty the store if it applied past the fork, list the tail, drop the intent."""
        fork_lsn = intent["fork_lsn"]
        if self.store.applied_lsn > fork_lsn:
            # Order matters for _read_fresh: a reader that sees the new generation
            # must also see applied_lsn 0 (it then waits for the rebuild), and one
            # that read the old generation finds it changed if it met the new store.
            self.applied_lsn = 0
            self._store_generation += 1
            self.store.reset(remove_files=remove_store_files)
            self.store.set_log_id(str(self.log.log_id))
            self._configure_guard()
        add_tail(self.path, {"path": intent["path"], "fork_lsn": fork_lsn, "last_lsn": intent["last_lsn"],
                             "records": intent["last_lsn"] - fork_lsn, "cut_at": intent["cut_at"],
                             "reconciled": False})
        # CTL-9: tails reconciled into this node whose apply the cut took away are pending again
        requeue_applied_tails(self.path, intent["path"], fork_lsn)
        OS_FILEOPS.unlink(os.path.join(self.path, CUT_INTENT_FILE))
        OS_FILEOPS.fsync_dir(self.path)

    def _recover_cut(self) -> None:
        """Finish or undo a cut that ``NODE/cut.json`` says was interrupted (on open).

        The log still holds records after the fork: it was not truncated, so the
        copy aside (complete or not) is redundant and removed; the node diverges
        again when it follows and cuts anew. The log ends at the fork: the copy
        aside was durable before the truncation (LOG-16), so the cut is finished:
        epoch history, store, listing. Anything else is refused, changing nothing.
        """
        intent_path = os.path.join(self.path, CUT_INTENT_FILE)
        try:
            with open(intent_path) as f:
                intent = json.load(f)
        except FileNotFoundError:
            return
        fork_lsn, aside = intent["fork_lsn"], intent["path"]
        last = self.log.last_lsn
        if last > fork_lsn:
            _log.warning("node %s: a diverged tail's cut after LSN %d was interrupted before the log was cut; "
                        "removing its partial copy %s (the log still holds the records)", self.path, fork_lsn, aside)
            shutil.rmtree(aside, ignore_errors=True)
            OS_FILEOPS.fsync_dir(os.path.dirname(aside))
            OS_FILEOPS.unlink(intent_path)
            OS_FILEOPS.fsync_dir(self.path)
            return
        try:
            with SeekReader(aside) as r:
                held = (r.log_id, r.first_lsn(), r.last()[0], r.hash_at(fork_lsn))
        except (OSError, WalError) as exc:
            held = exc
        want = (self.log.log_id, fork_lsn + 1, intent["last_lsn"], self.log.hash_at(fork_lsn) if fork_lsn else None)
        if last != fork_lsn or isinstance(held, Exception) or held[:3] != want[:3] or (fork_lsn and held[3] != want[3]):
            raise WalError(f"{intent_path}: a diverged tail's cut after LSN {fork_lsn} was interrupted, but the log "
                           f"ends at LSN {last} and the copy aside {aside} holds {held}: neither finished nor undoable; "
                           f"keep both and ask for help (nothing was changed)")
        _log.warning("node %s: finishing a diverged tail's cut after LSN %d that was interrupted (tail %s)",
                    self.path, fork_lsn, aside)
        entries = [e for e in read_history_file(self.log.path) if e.first_lsn <= fork_lsn]
        write_history(self.log.path, entries)
        with self._apply_lock, self._state_lock:
            self._finish_cut(intent)

    def diverged_tails(self) -> list[dict]:
        return read_tails(self.path)

    def mark_reconciled(self, tail_path: str, report: str | None = None) -> None:
        mark_tail_reconciled(tail_path, report)

    def store_snapshot(self, dest: str) -> tuple[int, bytes]:
        """Copy the store, consistently, to ``dest``; returns (applied LSN, its hash).

        Used to seed a replica: the copy is the state after that LSN.
        """
        with self._apply_lock:
            src = self.store.conn
            row = src.execute("SELECT value FROM meta WHERE key='applied_hash'").fetchone()
            applied = self.store.applied_lsn
            dst = sqlite3.connect(dest)
            try:
                src.backup(dst)
                dst.execute("DELETE FROM quarantine")
                dst.commit()
            finally:
                dst.close()
        return applied, bytes(row[0]) if row else bytes(32)

    def _apply_loop(self) -> None:
        try:
            while not self._stop.is_set():
                target = self.log.last_lsn
                self.retry_quarantined()
                if self.applied_lsn >= target:
                    self.log.wait_for(target + 1, timeout=0.2)
                    continue
                self.catch_up()
        except (LogClosedError,) :
            pass
        except BaseException as exc:  # surfaced through status; writes are refused from now on
            self._applier_error = exc
            _log.error("node %s: %s", self.config.name, self._not_writable_reason())
            with self._applied_cond:
                self._applied_cond.notify_all()
            self._notify_applied()

    # -- damage: sticky, in status, refuses writes ---------------------------------------

    def _check_sealed_segments(self) -> None:
        """Verify every record of the segments that were sealed at open, once (background thread).

        ``Log.open`` verifies the last segment and only the ends of the sealed ones (LOG-9); the
        store's catch-up verified what it had not applied. What is left is the inside of the
        sealed segments, records the store applied in an earlier run: the records replicas,
        rebuilds and reconciles would read. Each sealed segment's records are verified and its
        last record must chain onto the next segment's header. Runs at most half of the time on
        one core (it waits as long as each segment took). Damage is confirmed by a second read
        under the apply lock (a diverged tail's cut or retention may change the segments meanwhile)
        and then recorded for good (:meth:`status`, refused writes).
        """
        try:
            segs = list_segments(self.log.path)
            for (first, name), (_, next_name) in zip(segs, segs[1:]):
                if self._stop.is_set():
                    return
                started = time.monotonic()
                damage = self._sealed_segment_damage(first, name, next_name)
                if damage is not None:
                    with self._apply_lock:
                        sealed = {n for _, n in list_segments(self.log.path)[:-1]}
                        again = self._sealed_segment_damage(first, name, next_name) if name in sealed else None
                    if again is not None and (again.offset, again.lsn) == (damage.offset, damage.lsn):
                        self._log_damage = again
                        _log.error("node %s: %s", self.config.name, self._not_writable_reason())
                    return
                self._stop.wait(time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - a check that could not run is no damage found
            _log.warning("node %s: the check of the log's sealed segments stopped: %s", self.config.name, exc)

    def _sealed_segment_damage(self, first: int, name: str, next_name: str) -> CorruptRecordError | None:
        """The first damage in sealed segment ``name`` (or in how it chains onto ``next_name``), or None."""
        path = os.path.join(self.log.path, name)
        try:
            nxt = read_segment_header(os.path.join(self.log.path, next_name))
            scan = scan_segment(path, expected_first_lsn=first, expected_prev_hash=None,
                                log_id=self.log.log_id.bytes, is_last=False)
        except CorruptRecordError as exc:
            return exc
        except FileNotFoundError:
            return None  # dropped by retention or moved aside by a cut meanwhile
        if (scan.last_lsn, scan.last_hash) != (nxt.first_lsn - 1, nxt.prev_hash):
            return CorruptRecordError(name, scan.end_offset, scan.last_lsn + 1,
                                      f"sealed segment does not chain onto the next segment {next_name}")
        return None

    @property
    def log_damage(self) -> CorruptRecordError | None:
        """Damage the sealed-segment check found in this node's log (None: none found, or not yet)."""
        return self._log_damage

    def _not_writable_reason(self) -> str | None:
        """Why this node takes no writes because of damage or a stopped applier (None: it does)."""
        damage = self._log_damage
        if damage is None and isinstance(self._applier_error, CorruptRecordError):
            damage = self._applier_error
        where = ""
        if damage is not None:
            where = (f"the log {self.log.path} is damaged at segment {damage.segment}, offset {damage.offset}"
                     + (f", LSN {damage.lsn}" if damage.lsn is not None else "") + f": {damage.reason}")
        if self._applier_error is not None:
            what = (f"{where}; the store stopped applying the log after LSN {self.applied_lsn}" if where else
                    f"the store stopped applying the log after LSN {self.applied_lsn}: {self._applier_error}")
        elif where:
            what = where
        else:
            return None
        return (f"{what}. This node takes no writes: fail over to a replica, or stop it and restore the log "
                f"from a replica (`walctl verify {self.log.path}` shows the damage)")

    @property
    def applier_error(self) -> BaseException | None:
        return self._applier_error

    def wait_applied(self, lsn: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._applied_cond:
            while self.applied_lsn < lsn:
                if self._applier_error is not None or self._stop.is_set():
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._applied_cond.wait(min(remaining, 0.05))
        return True

    def _load_state(self) -> None:
        st = DecisionState()
        now_ms = int(time.time() * 1000)
        window_ms = self.config.dedup_window_s * 1000
        for mb in self.store.mailboxes():
            st.apply(MailboxCreated(mb.mailbox_id, mb.name, mb.uidvalidity))
            ms = st.by_id[mb.mailbox_id]
            ms.uidnext = mb.uidnext
            ms.highestmodseq = mb.highestmodseq
            ms.uids = set(self.store.uids(mb.mailbox_id))
            for guid, uid, delivered in self.store.recent_guids(mb.mailbox_id, now_ms - window_ms):
                ms.recent[bytes(guid)] = (uid, delivered)
        for (value,) in self.store._read("SELECT value FROM meta WHERE key='max_uidvalidity'"):
            st.last_uidvalidity = max(st.last_uidvalidity, int(value))
        st.modseq_floor = self.store.modseq_floor
        st.users = set(self.store.user_names())
        self.state = st

    # -- writes ------------------------------------------------------------------

    @property
    def role(self) -> str:
        return self.config.role

    def _check_writable(self) -> None:
        """Raise unless this node takes writes now (state lock held). A promotion's EpochStarted
        is appended to the log directly: the first write after it raises the decision state's
        MODSEQ floor to the log's epoch (MS-18), as applying that record does in the store."""
        if self.config.role != "master":
            raise ReadOnlyNodeError(f"node {self.config.name} is a replica: it is read-only until promoted")
        if self._writes_paused is not None:
            raise ReadOnlyNodeError(self._writes_paused)
        if self.log.failed is not None:
            raise StoreUnavailableError(str(self.log.failed))
        if self._applier_error is not None or self._log_damage is not None:
            raise StoreUnavailableError(self._not_writable_reason())
        floor = modseq_floor(self.log.epoch)
        if floor > self.state.modseq_floor:
            self.state.raise_modseq_floor(floor)

    def pause_writes(self, reason: str) -> None:
        """Refuse writes with ``reason`` (soft failover drains this way)."""
        with self._state_lock:
            self._writes_paused = reason

    def resume_writes(self) -> None:
        with self._state_lock:
            self._writes_paused = None

    def _commit(self, events: list) -> list[int]:
        """Enqueue planned events (state lock held) and apply them to the state."""
        items = [encode_event(e) for e in events]
        try:
            appended = self.log.enqueue(items)
        except (LogFailedError, LogClosedError) as exc:
            raise StoreUnavailableError(str(exc)) from exc
        window_ms = self.config.dedup_window_s * 1000
        for e, a in zip(events, appended):
            self.state.apply(e, dedup_window_ms=window_ms)
            for mid in event_mailbox_ids(e):
                self._mailbox_lsn[mid] = a.lsn
            if isinstance(e, (UserPasswordSet, UserDeleted)):
                self._mailbox_lsn[f"user:{e.name}"] = a.lsn
        return [a.lsn for a in appended]

    def _sync(self, lsn: int) -> None:
        try:
            self.log.sync_to(lsn)
        except (LogFailedError, LogClosedError) as exc:
            raise StoreUnavailableError(str(exc)) from exc

    def deliver(self, mailbox: str, body: bytes, *, flags: Iterable[str] = (), internaldate: float | None = None,
                create: bool = False) -> Receipt:
        """Deliver ``body`` to ``mailbox``; returns once the record is durable.

        ``create=True`` creates the mailbox first if it does not exist (one
        batch, one fsync). A second delivery of the same bytes to the same
        mailbox within the dedup window returns the first receipt with
        ``duplicate=True`` and stores nothing (MS-6).
        """
        result = self.deliver_many([(mailbox, tuple(flags))], body, internaldate=internaldate, create=create)[0]
        if isinstance(result, Exception):
            raise result  # deliver_many reports per-target refusals as values; one target raises it
        return result

    def deliver_many(self, targets: list[tuple[str, tuple[str, ...]]], body: bytes, *,
                     internaldate: float | None = None, create: bool = False) -> list[Receipt | Exception]:
        """Deliver one body to several mailboxes with one shared fsync.

        Returns one entry per target: a Receipt, or the RequestError that
        refused that target (others still deliver). Raises TemporaryFailure
        subclasses for node-wide problems (read-only, log failed).
        """
        planned = self.plan_deliveries(targets, body, internaldate=internaldate, create=create)
        self._sync(planned.sync_lsn)
        return planned.results

    def plan_deliveries(self, targets: list[tuple[str, tuple[str, ...]]], body: bytes, *,
                        internaldate: float | None = None, create: bool = False,
                        blocking: bool = True) -> "PlannedDeliveries | None":
        """The first half of :meth:`deliver_many`: decide and enqueue, do not wait.

        The returned receipts are NOT acknowledgements until
        ``log.sync_to(planned.sync_lsn)`` returned (``deliver_many`` does
        exactly that). ``sync_lsn`` also covers duplicates: a duplicate of a
        delivery still waiting for its fsync is acknowledged only once that
        one is durable. With ``blocking=False`` returns None instead of
        waiting for the state lock (an event loop must not block on it).
        """
        if len(body) > min(self.config.max_message_bytes, MAX_BODY_BYTES):
            raise MessageTooLargeError(
                f"message of {len(body)} bytes exceeds this node's limit of "
                f"{min(self.config.max_message_bytes, MAX_BODY_BYTES)}"
            )
        now = time.time()
        now_ms = int(now * 1000)
        idate_ms = int((internaldate if internaldate is not None else now) * 1000)
        window_ms = self.config.dedup_window_s * 1000
        results: list = [None] * len(targets)
        if not self._state_lock.acquire(blocking):
            return None
        try:
            self._check_writable()
            events = []
            owners: list[int | None] = []
            for i, (mailbox, flags) in enumerate(targets):
                try:
                    if create and mailbox not in self.state.by_name:
                        ev = self.state.plan_create(mailbox, new_id=uuid.uuid4().hex, now_s=int(now))
                        self.state.apply(ev)  # tentative: undone below if the batch fails to enqueue
                        events.append(ev)
                        owners.append(None)
                    plan = self.state.plan_append(mailbox, body, flags, internaldate_ms=idate_ms, now_ms=now_ms,
                                                  dedup_window_ms=window_ms)
                except Exception as exc:
                    if isinstance(exc, (ReadOnlyNodeError, StoreUnavailableError)):
                        raise
                    results[i] = exc
                    continue
                if isinstance(plan, Duplicate):
                    results[i] = Receipt(mailbox, plan.uidvalidity, plan.uid, plan.guid.hex(), self.log.last_lsn,
                                         duplicate=True)
                    continue
                self.state.apply(plan, dedup_window_ms=window_ms)
                events.append(plan)
                owners.append(i)
                results[i] = plan
            if events:
                try:
                    appended = self.log.enqueue([encode_event(e) for e in events])
                except BaseException as exc:
                    self._load_state()  # undo the tentative state changes: nothing was enqueued
                    if isinstance(exc, (LogFailedError, LogClosedError)):
                        raise StoreUnavailableError(str(exc)) from exc
                    raise
                for k, a in enumerate(appended):
                    self._mailbox_lsn[events[k].mailbox_id] = a.lsn
                    i = owners[k]
                    if i is not None:
                        ev = events[k]
                        mb = self.state.by_id.get(ev.mailbox_id)
                        results[i] = Receipt(targets[i][0], mb.uidvalidity if mb else 0, ev.uid, ev.guid.hex(), a.lsn)
            # Everything enqueued so far: a duplicate's original may still be in flight.
            sync_lsn = self.log._next_lsn - 1
        finally:
            self._state_lock.release()
        return PlannedDeliveries(results, sync_lsn)

    def wait_durable(self, lsn: int) -> None:
        """Block until ``lsn`` is durable (the second half of :meth:`deliver_many`)."""
        self._sync(lsn)

    def _write(self, plan_fn) -> int:
        with self._state_lock:
            self._check_writable()
            event = plan_fn()
            lsn = self._commit([event])[0]
        self._sync(lsn)
        return lsn

    def create_mailbox(self, name: str, *, uidvalidity: int | None = None, special_use=()) -> int:
        """Create a mailbox; returns the durable LSN.

        ``uidvalidity`` is for imports (MS-14): keep the value the mailbox had
        elsewhere. Raises UidValidityReuseError if the name was used on this
        node before and the value is not above every one given out here.
        ``special_use``: RFC 6154 attributes (``\\Sent`` ...) the mailbox carries.
        """
        if uidvalidity is None:
            return self._write(lambda: self.state.plan_create(name, new_id=uuid.uuid4().hex, now_s=int(time.time()),
                                                              special_use=special_use))
        used = name in self.store.tombstones().values()
        return self._write(lambda: self.state.plan_create(name, new_id=uuid.uuid4().hex, now_s=int(time.time()),
                                                          uidvalidity=uidvalidity, name_used_before=used))

    def import_messages(self, mailbox: str, messages, *, uidnext: int | None = None) -> list[Receipt]:
        """Append messages that keep the UIDs they had elsewhere (MS-14); one fsync.

        ``messages`` are :class:`engine.store.decisions.ImportedMessage` values with
        strictly increasing UIDs, each at least the mailbox's UIDNEXT.
        ``uidnext`` raises the mailbox's UIDNEXT afterwards (a placeholder is
        appended and expunged at ``uidnext - 1``). All or nothing: an invalid
        message refuses the whole batch (UidOrderError, MessageTooLargeError,
        BadFlagError) before anything is logged. Returns once durable.
        """
        messages = list(messages)
        with self._state_lock:
            self._check_writable()
            mb = self.state.mailbox(mailbox)
            events = self.state.plan_import(mailbox, messages, now_ms=int(time.time() * 1000), uidnext=uidnext,
                                            max_message_bytes=self.config.max_message_bytes)
            if not events:
                return []
            lsns = self._commit(events)
            uidvalidity = mb.uidvalidity
        self._sync(lsns[-1])
        return [Receipt(mailbox, uidvalidity, ev.uid, ev.guid.hex(), lsn)
                for ev, lsn, _ in zip(events, lsns, messages)]

    def rename_mailbox(self, old: str, new: str, *, children: bool = False) -> int:
        """Rename a mailbox; with ``children`` the mailboxes below it move along in the same record (MS-19)."""
        return self._write(lambda: self.state.plan_rename(old, new, children=children))

    def delete_mailbox(self, name: str, *, recursive: bool = False) -> int:
        """Delete a mailbox (with ``recursive``, also those below it); leaves tombstones.

        Raises GuardRefusedError when more than ``max_mailbox_deletes`` would go.
        """
        with self._state_lock:
            self._check_writable()
            events = self.state.plan_delete(name, now_ms=int(time.time() * 1000), recursive=recursive,
                                            max_mailboxes=self.config.max_mailbox_deletes)
            lsn = self._commit(events)[-1]
        self._sync(lsn)
        return lsn

    def store_flags(self, mailbox: str, uids: Iterable[int], op: str, flags: Iterable[str]) -> int:
        """Add, remove or replace flags on messages; returns the durable LSN."""
        uids = list(uids)
        flags = list(flags)
        return self._write(lambda: self.state.plan_flags(mailbox, uids, op, flags, now_ms=int(time.time() * 1000)))

    def expunge(self, mailbox: str, uids: Iterable[int]) -> int:
        uids = list(uids)
        return self._write(lambda: self.state.plan_expunge(mailbox, uids, now_ms=int(time.time() * 1000)))

    # -- IMAP writes: one record each, all or nothing, durable on return (MS-20) -----------

    def append_messages(self, mailbox: str, messages) -> "AppendReceipt":
        """Append ``messages`` (``(body, flags, internaldate)`` with the date in seconds or None for
        now) to ``mailbox`` in one record. No de-duplication (MS-6 is for MTA retries).

        Raises MessageTooLargeError (a message over the limit, or all of them over what one
        record holds), UnknownMailboxError, BadFlagError, and the TemporaryFailure errors."""
        messages = list(messages)
        limit = min(self.config.max_message_bytes, MAX_BODY_BYTES)
        for body, _, _ in messages:
            if len(body) > limit:
                raise MessageTooLargeError(f"message of {len(body)} bytes exceeds this node's limit of {limit}")
        total = sum(len(body) for body, _, _ in messages)
        if total > MAX_BODY_BYTES:
            raise MessageTooLargeError(f"{len(messages)} messages of {total} bytes in all exceed what one append "
                                       f"can hold ({MAX_BODY_BYTES} bytes): append them separately")
        now = time.time()
        planned = [(body, flags, int((now if date is None else date) * 1000)) for body, flags, date in messages]
        with self._state_lock:
            self._check_writable()
            ev = self.state.plan_append_many(mailbox, planned, now_ms=int(now * 1000))
            uidvalidity = self.state.mailbox(mailbox).uidvalidity
            lsn = self._commit([ev])[0]
        self._sync(lsn)
        uids = (ev.uid,) if hasattr(ev, "uid") else ev.uids
        return AppendReceipt(mailbox, uidvalidity, tuple(uids), lsn)

    def copy_messages(self, source: str, uids: Iterable[int], target: str, *, move: bool = False) -> "CopyReceipt":
        """Copy (or, with ``move``, move) the messages ``uids`` of ``source`` that still exist into
        ``target``, in one record; UIDs gone are left out (an empty receipt when none is left).

        The record carries each message's GUID and flags as the store has them once it applied
        every record that changed ``source``; that wait happens under the write lock only when
        such a record is not applied yet (MS-20)."""
        uids = list(uids)
        with self._state_lock:
            self._check_writable()
            src = self.state.mailbox(source)
            dst = self.state.mailbox(target)
            present = sorted(u for u in set(uids) if u in src.uids)
            if not present:
                return CopyReceipt(target, dst.uidvalidity, (), (), 0)
            sources = self._source_messages(src.mailbox_id, present)
            ev = self.state.plan_copy(source, present, target, sources, move=move, now_ms=int(time.time() * 1000))
            if ev is None:
                return CopyReceipt(target, dst.uidvalidity, (), (), 0)
            lsn = self._commit([ev])[0]
        self._sync(lsn)
        return CopyReceipt(target, dst.uidvalidity, ev.source_uids, ev.target_uids, lsn)

    def _store_caught_up(self, mailbox_id: str) -> None:
        """The store applied every record enqueued so far that changed ``mailbox_id`` (state lock held)."""
        need = self._mailbox_lsn.get(mailbox_id, 0)
        if need > self.applied_lsn:
            self._sync(need)
            if not self.wait_applied(need, timeout=30):
                raise StoreUnavailableError(f"the store did not apply LSN {need} in time; try again")

    def _source_messages(self, mailbox_id: str, uids: list[int]) -> dict[int, SourceMessage]:
        self._store_caught_up(mailbox_id)
        return {uid: SourceMessage(guid, flags, idate)
                for uid, guid, flags, idate in self.store.source_messages(mailbox_id, uids)}

    def change_flags(self, mailbox: str, uids: Iterable[int], op: str, flags: Iterable[str], *,
                     unchanged_since: int | None = None) -> "FlagsReceipt":
        """IMAP STORE: change the flags of the UIDs of ``mailbox`` that still exist (others are left
        out), in one record, durable on return. With ``unchanged_since`` (RFC 7162), a message whose
        MODSEQ is above it is left alone and listed in ``modified``. A UID whose flags are as asked
        already is in the record too (its MODSEQ does not move; the mailbox's HIGHESTMODSEQ does)."""
        receipt = self.plan_change_flags(mailbox, uids, op, flags, unchanged_since=unchanged_since)
        if receipt.lsn:
            self._sync(receipt.lsn)
        return receipt

    def plan_change_flags(self, mailbox: str, uids: Iterable[int], op: str, flags: Iterable[str], *,
                          unchanged_since: int | None = None, blocking: bool = True) -> "FlagsReceipt | None":
        """The first half of :meth:`change_flags`: decide and enqueue, do not wait. The receipt
        is NOT an acknowledgement until ``log.sync_to(receipt.lsn)`` returned (LSN 0: nothing
        was logged). With ``blocking=False`` returns None instead of waiting for the state lock,
        or when ``unchanged_since`` needs the store caught up (an event loop must not wait)."""
        uids = list(uids)
        flags = list(flags)
        if not self._state_lock.acquire(blocking):
            return None
        try:
            self._check_writable()
            mb = self.state.mailbox(mailbox)
            present = sorted(u for u in set(uids) if u in mb.uids)
            modified: list[int] = []
            if unchanged_since is not None and present:
                if not blocking and self._mailbox_lsn.get(mb.mailbox_id, 0) > self.applied_lsn:
                    return None
                self._store_caught_up(mb.mailbox_id)
                modseqs = dict(self.store.message_modseqs(mb.mailbox_id, present))
                modified = [u for u in present if modseqs.get(u, 0) > unchanged_since]
                present = [u for u in present if u not in modified]
            if not present:
                return FlagsReceipt(mailbox, (), tuple(modified), 0, 0)
            ev = self.state.plan_flags(mailbox, present, op, flags, now_ms=int(time.time() * 1000))
            lsn = self._commit([ev])[0]
        finally:
            self._state_lock.release()
        return FlagsReceipt(mailbox, ev.uids, tuple(modified), ev.modseq, lsn)

    def expunge_present(self, mailbox: str, uids: Iterable[int]) -> tuple[tuple[int, ...], int]:
        """Expunge the UIDs of ``mailbox`` that still exist (one record); ``(expunged UIDs, LSN)``."""
        uids = list(uids)
        with self._state_lock:
            self._check_writable()
            mb = self.state.mailbox(mailbox)
            present = sorted(u for u in set(uids) if u in mb.uids)
            if not present:
                return (), 0
            ev = self.state.plan_expunge(mailbox, present, now_ms=int(time.time() * 1000))
            lsn = self._commit([ev])[0]
        self._sync(lsn)
        return ev.uids, lsn

    # -- users and subscriptions: records in the log (MS-21, MS-22) --------------------------

    def add_user(self, name: str, password: str | None = None, *, password_hash: str | None = None,
                 create_inbox: bool = True) -> int:
        """Add a user with ``password`` (hashed with argon2id, outside the write lock) or an
        imported ``password_hash`` (Dovecot ``{SCHEME}`` or PHC form, checked first), and create
        ``user/NAME/INBOX`` in the same batch. Raises UserExistsError, BadUserNameError,
        BadPasswordHashError. A user that exists without an INBOX only gets the INBOX."""
        stored = self._password_hash(password, password_hash)
        now_ms = int(time.time() * 1000)
        with self._state_lock:
            self._check_writable()
            inbox = f"user/{name}/INBOX"
            missing_inbox = create_inbox and inbox not in self.state.by_name
            events = []
            if name not in self.state.users or not missing_inbox:  # refused if the user exists
                events.append(self.state.plan_user_set(name, stored, now_ms=now_ms, exists=False))
            if missing_inbox:
                events.append(self.state.plan_create(inbox, new_id=uuid.uuid4().hex, now_s=now_ms // 1000))
            lsn = self._commit(events)[-1]
        self._sync(lsn)
        return lsn

    def set_password(self, name: str, password: str | None = None, *, password_hash: str | None = None) -> int:
        """A new password (or imported hash) for an existing user. Raises UnknownUserError."""
        stored = self._password_hash(password, password_hash)
        return self._write(lambda: self.state.plan_user_set(name, stored, now_ms=int(time.time() * 1000),
                                                            exists=True))

    def delete_user(self, name: str) -> int:
        """The user can no longer log in; their subscriptions go; their mailboxes stay. Raises UnknownUserError."""
        return self._write(lambda: self.state.plan_user_delete(name, now_ms=int(time.time() * 1000)))

    @staticmethod
    def _password_hash(password: str | None, password_hash: str | None) -> str:
        from ..store import passwords

        if (password is None) == (password_hash is None):
            raise ValueError("give a password or a password hash")
        return passwords.hash_password(password) if password is not None else passwords.check_hash(password_hash)

    def list_users(self) -> list[str]:
        return self._read_fresh(lambda store: store.user_names())

    def verify_user(self, name: str, password: str) -> bool:
        """Whether ``password`` is ``name``'s (never says which part was wrong). Blocks for the hash
        function's time (argon2id: tens of ms): call it off an event loop. On a master a legacy
        hash (bcrypt, SHA512-CRYPT) that verified is replaced by an argon2id hash of the same
        password, best effort (MS-21)."""
        from ..store import passwords

        stored = self._read_fresh(lambda store: store.user_hash(name))
        if stored is None:
            return False
        # A login that verified recently against the same stored hash is not hashed again: a
        # keyed digest of the password (the key lives in this process only), never the password.
        seen = blake3.blake3(password.encode("utf-8"), key=self._login_key).digest()
        hit = self._logins.get((name, stored))
        if hit is not None and hit[0] == seen and time.monotonic() - hit[1] < LOGIN_CACHE_S:
            return True
        if not passwords.verify_password(stored, password):
            return False
        if len(self._logins) >= 4096:
            self._logins.clear()
        self._logins[(name, stored)] = (seen, time.monotonic())
        if passwords.needs_upgrade(stored) and self.config.role == "master":
            self._upgrade_hash(name, stored, passwords.hash_password(password))
        return True

    def _upgrade_hash(self, name: str, verified: str, new: str) -> None:
        try:
            with self._state_lock:
                self._check_writable()
                self._store_caught_up(f"user:{name}")
                if self.store.user_hash(name) != verified:
                    return  # changed meanwhile: leave it
                lsn = self._commit([self.state.plan_user_set(name, new, now_ms=int(time.time() * 1000),
                                                             exists=True)])[0]
            self._sync(lsn)
        except (RequestError, ReadOnlyNodeError, StoreUnavailableError) as exc:
            _log.info("user %s: the legacy password hash was not upgraded (%s)", name, exc)

    def set_subscribed(self, user: str, mailbox: str, subscribed: bool) -> int:
        """Subscribe ``user`` to ``mailbox`` (which need not exist) or unsubscribe; durable on return."""
        return self._write(lambda: self.state.plan_subscription(user, mailbox, subscribed,
                                                                now_ms=int(time.time() * 1000)))

    def subscriptions(self, user: str) -> list[str]:
        return self._read_fresh(lambda store: store.subscriptions(user))

    # -- IMAP reads: the store once it applied everything durable at the call -----------------

    def imap_mailboxes(self, prefix: str) -> list[tuple[str, str]]:
        """``(name, special_use)`` of every mailbox whose name starts with ``prefix``."""
        return self._read_fresh(lambda store: store.mailboxes_with_prefix(prefix))

    def imap_snapshot(self, mailbox: str):
        """``(MailboxInfo, [ImapRow ...])`` of one mailbox, consistent. Raises UnknownMailboxError."""
        return self._read_named(lambda store: store.imap_snapshot(mailbox), mailbox)

    def imap_changes(self, mailbox: str, since_modseq: int, *, now_after: int | None = None,
                     max_rows: int | None = None):
        """``(MailboxInfo, [ImapRow changed above since], vanished UIDs or None)``; see Store.imap_changes.
        ``now_after``: read at once, on this thread, what the store holds once it applied that LSN
        (:meth:`_read_now`; ``max_rows`` bounds the read)."""
        if now_after is not None:
            return self._read_now(lambda store: store.imap_changes(mailbox, since_modseq, wait=False,
                                                                   max_rows=max_rows), mailbox, now_after)
        return self._read_named(lambda store: store.imap_changes(mailbox, since_modseq), mailbox)

    def imap_rows(self, mailbox: str, uids: Iterable[int], *, now_after: int | None = None):
        """``(MailboxInfo, [ImapRow ...])`` of the listed messages the mailbox holds, by UID
        (``now_after``: read at once, see :meth:`imap_changes`)."""
        uids = list(uids)
        if now_after is not None:
            return self._read_now(lambda store: store.imap_rows(mailbox, uids, wait=False), mailbox, now_after)
        return self._read_named(lambda store: store.imap_rows(mailbox, uids), mailbox)

    def _read_now(self, read, mailbox: str, lsn: int):
        """``read(store)`` at once on the calling thread (an event loop's), never waiting: the store
        applied ``lsn`` already and its reader is free. Raises ReadNotNow when it would have to wait
        (the store has not applied ``lsn``, the reader is busy, a diverged tail's cut swapped the
        store meanwhile, or ``read`` said so); the caller then reads with a wait, in a thread."""
        generation = self._store_generation
        if self.applied_lsn < lsn or self._applier_error is not None:
            raise ReadNotNow(f"the store has not applied LSN {lsn} yet")
        got = read(self.store)
        if generation != self._store_generation:
            raise ReadNotNow("the store was swapped during the read")
        if got is None:
            raise UnknownMailboxError(f"no mailbox named {mailbox!r}")
        return got

    def imap_status(self, mailbox: str) -> dict:
        return self._read_named(lambda store: store.imap_status(mailbox), mailbox)

    def imap_bodies(self, mailbox: str, uids: Iterable[int]) -> dict[int, bytes]:
        uids = list(uids)
        return self._read_named(lambda store: store.imap_bodies(mailbox, uids), mailbox)

    def _read_named(self, read, mailbox: str):
        got = self._read_fresh(read)
        if got is None:
            raise UnknownMailboxError(f"no mailbox named {mailbox!r}")
        return got

    def fill_structures(self, guids: Iterable[bytes]) -> dict[bytes, bytes]:
        """The stored structures of bodies stored before structures were kept, computed and stored now."""
        return self.store.fill_structures(list(guids))

    def append_event(self, event) -> int:
        """Log a non-mail event (checkpoint, epoch start) as master; durable on return."""
        with self._state_lock:
            self._check_writable()
            lsn = self._commit([event])[0]
        self._sync(lsn)
        return lsn

    # -- integrity (MS-10..MS-13) ---------------------------------------------------

    def checkpoint(self) -> int:
        """Master: log a checkpoint of every mailbox digest at this point.

        Holds the state lock while the store catches up with everything
        logged so far, so the digests are exactly those at the checkpoint's
        LSN - 1 (writes wait for one fsync and the apply lag).
        """
        with self._state_lock:
            self._check_writable()
            last = self.log._next_lsn - 1
            self._sync(last)
            if not self.wait_applied(last, timeout=30):
                raise StoreUnavailableError("the store did not catch up with the log for a checkpoint")
            digests = self.store.digests_by_id()
            ev = Checkpoint(digests=digests, store_digest=bytes.fromhex(store_digest(
                {k: v for k, v in digests.items()})))
            lsn = self._commit([ev])[0]
        self._sync(lsn)
        return lsn

    def retry_quarantined(self, now_ms: int | None = None) -> None:
        """Retry mailboxes whose automatic retry is due (applier thread).

        Holds the apply lock like every other pass over the store: cut_diverged
        replaces the store under that lock, and must not close it under this loop.
        """
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._apply_lock:
            for mid in self.store.retries_due(now_ms):
                first = self.store.quarantine_first_lsn(mid)
                if first is not None:
                    self.store.reapply_mailbox(mid, self.log.read(first), now_ms=now_ms,
                                               max_attempts=self.config.apply_retries)

    def quarantined(self) -> list[dict]:
        return self.store.quarantined()

    def _quarantine_row(self, name: str) -> dict:
        for row in self.store.quarantined():
            if row["name"] == name or row["mailbox_id"] == name:
                return row
        raise UnknownMailboxError(f"mailbox {name!r} is not quarantined")

    def quarantine_show(self, name: str) -> dict:
        return self._quarantine_row(name)

    # The three operator repairs below hold the apply lock, like every pass over the
    # store: the applier thread shares the store's connection, and a repair running
    # beside an apply batch would interleave their transactions.

    def quarantine_retry(self, name: str) -> tuple[bool, str]:
        """Try the held records again now (after the admin fixed the cause)."""
        with self._apply_lock:
            row = self._quarantine_row(name)
            return self.store.reapply_mailbox(row["mailbox_id"], self.log.read(row["first_lsn"]),
                                              max_attempts=10**9)

    def quarantine_release(self, name: str) -> tuple[bool, str]:
        """Apply the held records with the guard bypassed (the admin confirmed them)."""
        with self._apply_lock:
            row = self._quarantine_row(name)
            return self.store.reapply_mailbox(row["mailbox_id"], self.log.read(row["first_lsn"]),
                                              bypass_guard=True, max_attempts=10**9)

    def resync_mailbox(self, snapshot: dict) -> int:
        """Replace one mailbox with a master's snapshot, then replay this
        node's later records for it (MS-13). Returns records replayed."""
        at = snapshot["at_lsn"]
        if not self.wait_applied(at, timeout=30):
            raise StoreUnavailableError(f"this node has not applied LSN {at} yet; retry when it caught up")
        with self._apply_lock:
            return self.store.replace_mailbox(snapshot, self.log.read(at + 1) if at < self.log.last_lsn else iter(()))

    def verify_store(self) -> dict[str, list[str]]:
        return self._read_fresh(lambda store: store.verify_mailboxes())

    # -- reads -------------------------------------------------------------------

    def _fresh(self) -> None:
        if not self.wait_applied(self.log.last_lsn):
            if self._applier_error is not None:
                raise StoreUnavailableError(self._not_writable_reason())

    def _read_fresh(self, read):
        """``read(store)`` after the store applied everything durable at the call.

        If a diverged tail's cut emptied the store meanwhile (its generation
        changed), the answer may come from the half-rebuilt store: read again
        once the rebuild caught up. An error raised by such a read is dropped
        the same way (e.g. UnknownMailboxError from a store not rebuilt yet).
        """
        while True:
            generation = self._store_generation
            self._fresh()
            try:
                result = read(self.store)
            except Exception:
                if generation != self._store_generation:
                    continue
                raise
            if generation == self._store_generation:
                return result

    def list_mailboxes(self) -> list[MailboxInfo]:
        return self._read_fresh(lambda store: store.mailboxes())

    @staticmethod
    def _mailbox_in(store: Store, name: str) -> MailboxInfo:
        mb = store.mailbox(name)
        if mb is None:
            raise UnknownMailboxError(f"no mailbox named {name!r}")
        return mb

    def _mailbox(self, name: str) -> MailboxInfo:
        return self._mailbox_in(self.store, name)

    def list_messages(self, mailbox: str) -> list[MessageInfo]:
        return self._read_fresh(lambda store: store.messages(self._mailbox_in(store, mailbox).mailbox_id))

    def fetch(self, mailbox: str, uid: int) -> bytes:
        body = self._read_fresh(lambda store: store.body(self._mailbox_in(store, mailbox).mailbox_id, uid))
        if body is None:
            raise UnknownUidError(f"mailbox {mailbox!r} has no message with UID {uid}")
        return body

    def digest(self) -> dict:
        return self._read_fresh(lambda store: store.digest())

    def mailbox_snapshot(self, mailbox: str) -> dict:
        """A mailbox's state and messages with bodies, as :meth:`resync_mailbox` takes it,
        once the store applied everything durable at the call (the source of a resync)."""
        snap = self._read_fresh(lambda store: store.mailbox_snapshot(mailbox))
        if snap is None:
            raise UnknownMailboxError(f"no mailbox named {mailbox!r}")
        return snap

    def status(self) -> dict:
        """The node's state for ``walctl status``. Never waits for the state lock; during
        a diverged tail's cut it waits for the store swap (the store's own locks), then
        counts the new store's quarantine (``applied_lsn`` shows the rebuild's progress).

        ``log_failed``: why the log takes no writes: a failed write or fsync (LOG-12), or
        damage found in it (then also ``log_damage``: segment, offset, LSN, reason).
        ``applier_error``: why the store stopped applying the log (damage names its
        segment, offset and LSN). Either refuses every write."""
        quarantined = len(self.store.quarantined())
        damage = self._log_damage
        return {
            "node": self.config.name,
            "role": self.config.role,
            "log_id": str(self.log.log_id),
            "epoch": self.log.epoch,
            "last_lsn": self.log.last_lsn,
            "last_hash": self.log.last_hash.hex(),
            "applied_lsn": self.applied_lsn,
            "writes_paused": self._writes_paused,
            "log_failed": str(self.log.failed) if self.log.failed else (
                self._not_writable_reason() if damage is not None else None),
            "log_damage": None if damage is None else {"segment": damage.segment, "offset": damage.offset,
                                                       "lsn": damage.lsn, "reason": damage.reason},
            "applier_error": self._not_writable_reason() if self._applier_error else None,
            "quarantined": quarantined,
            "checkpoint_mismatches": len(self.store.mismatches),
        }




def rebuild_store(path: str, on_progress=None) -> dict:
    """Recreate a node's store from its log alone; returns the new digest."""
    path = os.path.abspath(path)
    remove_store_files(os.path.join(path, STORE_FILE))
    node = Node.open(path, start_applier=False, on_progress=on_progress)
    try:
        if node.log.first_lsn > 1:
            raise WalError(
                f"the log starts at LSN {node.log.first_lsn} (older segments were dropped or the node was seeded); "
                f"a store cannot be rebuilt from it alone: reseed the node from its master"
            )
        return node.store.digest()
    finally:
        node.close()
