"""Stateful test of the log against a list model (specs/log-format.md,
"Invariants"). Rules append (also from threads), reopen, read, move cursors,
drop segments, and lose power in the middle of any of these; the
``@invariant`` methods carry the names the spec gives them.

A failing run prints as a short Python program of rule calls; every rule
also appends a line to ``self.steps`` so it can become a plain regression
test.
"""

import os
import shutil
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import wal
from wal.format import payload_hash, record_hash

from tests.support.helpers import CrashRecorder, SimulatedCrash, payload_for

SEGMENT_MAX_BYTES = 600
payloads = st.one_of(st.binary(max_size=40), st.integers(0, 900).map(lambda n: payload_for(n, n)))


def _pick(data, lo, hi, label):
    """An integer in lo..hi drawn from a fixed-range strategy.

    The bounds depend on the log's segment layout and crash states, which
    depend on how threads were batched; a strategy whose bounds changed
    between runs would make Hypothesis report a flaky definition."""
    return lo + data.draw(st.integers(0, 2**16), label=label) % (hi - lo + 1)


def _state_class(description):
    """'synced', 'dir ops', 'torn write', 'all writes' or 'zero hole'."""
    what = description.split(": ", 1)[1]
    if what == "synced only":
        return "synced"
    if "unforced dir op" in what:
        return "dir ops"
    if "torn at" in what:
        return "torn write"
    if "zero hole" in what:
        return "zero hole"
    return "all writes"


class WalMachine(RuleBasedStateMachine):
    """Model: ``records`` maps LSN -> (type, payload, hash) for every record the
    log must hold; ``first`` is the first retained LSN; ``cursors`` the last
    acknowledged value of each cursor."""

    @initialize()
    def create(self):
        self.roots = []
        self.steps = []
        self._new_root()
        self.log = wal.Log.create(self.path, segment_max_bytes=SEGMENT_MAX_BYTES, fileops=self.rec)
        self.records = {}
        self.first = 1
        self.cursors = {}
        self.allowed_first = 1  # the highest first LSN the drops so far may have produced

    def _new_root(self):
        root = tempfile.mkdtemp(prefix="walmachine-")
        self.roots.append(root)
        self.rec = CrashRecorder(root)
        self.path = os.path.join(root, "x.wal")

    def teardown(self):
        try:
            self.log.close()
        except Exception:
            pass
        for root in getattr(self, "roots", []):
            shutil.rmtree(root, ignore_errors=True)

    @property
    def last(self):
        return max(self.records, default=self.first - 1)

    def _last_hash(self):
        return self.records[self.last][2] if self.records else self.log.hash_at(self.first - 1)

    def _expect(self, items, epoch):
        """(lsn, hash) the log must give ``items`` appended after the model's end."""
        out, prev, lsn = [], self._last_hash(), self.last
        for type_, payload in items:
            lsn += 1
            prev = record_hash(prev, lsn, epoch, type_, len(payload), payload_hash(payload))
            out.append((lsn, type_, payload, prev))
        return out

    # -- rules -----------------------------------------------------------------

    @rule(type_=st.integers(0, 0xFFFF), payload=payloads)
    def append(self, type_, payload):
        self.steps.append(f"log.append({type_}, {payload!r})")
        expected = self._expect([(type_, payload)], self.log.epoch)
        a = self.log.append(type_, payload)
        assert (a.lsn, a.hash) == (expected[0][0], expected[0][3])
        self.records[a.lsn] = (type_, payload, a.hash)

    @rule(threads=st.integers(2, 4), per_thread=st.integers(1, 3), size=st.integers(0, 300))
    def append_many_from_threads(self, threads, per_thread, size):
        self.steps.append(f"append_many from {threads} threads x {per_thread}, {size} B")
        acks, errors = [], []

        def worker(t):
            try:
                items = [(t, payload_for(t * 10 + k, size)) for k in range(per_thread)]
                acks.extend(zip(self.log.append_many(items), items))
            except BaseException as exc:  # reported below
                errors.append(exc)

        ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert errors == []
        for a, (type_, payload) in sorted(acks, key=lambda x: x[0].lsn):
            self.records[a.lsn] = (type_, payload, a.hash)
        assert sorted(self.records)[-len(acks):] == list(range(self.last - len(acks) + 1, self.last + 1))

    @rule()
    def reopen(self):
        self.steps.append("reopen")
        self.log.close()
        self.log = wal.Log.open(self.path, segment_max_bytes=SEGMENT_MAX_BYTES, fileops=self.rec)

    @rule(data=st.data())
    def read_from(self, data):
        lsn = _pick(data, max(1, self.first - 2), self.last + 1, "lsn")
        self.steps.append(f"list(log.read({lsn}))")
        if lsn < self.first:
            with pytest.raises(wal.LsnNotAvailableError):
                list(self.log.read(lsn))
            return
        got = [(r.lsn, r.type, r.payload, r.hash) for r in self.log.read(lsn)]
        assert got == [(k, *self.records[k]) for k in range(lsn, self.last + 1)]

    @rule(name=st.sampled_from(["a", "b"]), data=st.data())
    def cursor_set(self, name, data):
        lsn = _pick(data, 0, self.last, "cursor_lsn")
        self.steps.append(f"log.cursors.set({name!r}, {lsn})")
        if lsn < self.cursors.get(name, 0):
            with pytest.raises(wal.CursorError):
                self.log.cursors.set(name, lsn)
            return
        self.log.cursors.set(name, lsn)
        self.cursors[name] = lsn

    @rule(data=st.data())
    def drop_before(self, data):
        lsn = _pick(data, self.first, self.last + 1, "drop_lsn")
        self.steps.append(f"log.drop_before({lsn})")
        floor = min(self.cursors.values(), default=None)
        if floor is not None and floor + 1 < lsn:
            with pytest.raises(wal.RetentionError):
                self.log.drop_before(lsn)
            return
        self.log.drop_before(lsn)
        self.allowed_first = max(self.allowed_first, lsn)  # lsn <= every cursor + 1 here
        new_first = self.log.first_lsn
        assert self.first <= new_first <= lsn
        self._forget_below(new_first)

    def _forget_below(self, first):
        for k in [k for k in self.records if k < first]:
            del self.records[k]
        self.first = first

    @rule(kind=st.sampled_from(["rest", "append", "append_big", "cursor", "drop"]), after=st.integers(0, 8), data=st.data())
    def crash_and_recover(self, kind, after, data):
        """Lose power ``after`` operations into ``kind`` (or at rest), pick one
        of the legal post-crash states, and recover from it."""
        self.steps.append(f"crash during {kind} after {after} ops")
        expected, cursor_try, old_first = [], None, self.first
        if kind != "rest":
            self.rec.crash_after(after)
        try:
            if kind in ("append", "append_big"):
                size = 700 if kind == "append_big" else 30
                items = [(9, payload_for(self.last + k, size)) for k in range(3)]
                expected = self._expect(items, self.log.epoch)
                for a, (lsn, type_, payload, h) in zip(self.log.append_many(items), expected):
                    self.records[lsn] = (type_, payload, h)
            elif kind == "cursor":
                cursor_try = ("a", max(self.cursors.get("a", 0), self.last))
                self.log.cursors.set(*cursor_try)
                self.cursors["a"] = cursor_try[1]
            elif kind == "drop":
                floor = min(self.cursors.values(), default=self.last)
                target = min(floor + 1, self.last + 1)
                self.allowed_first = max(self.allowed_first, target)
                self.log.drop_before(target)
        except (SimulatedCrash, wal.LogFailedError):
            pass
        self.rec.crash_after(0)  # the power is out now, whatever was running
        by_class = {}
        for state in self.rec.crash_states(max_cuts=6):
            by_class.setdefault(_state_class(state.description), []).append(state)
        classes = sorted(by_class)
        cls = classes[_pick(data, 0, len(classes) - 1, "state class")]
        state = by_class[cls][_pick(data, 0, len(by_class[cls]) - 1, "state")]
        self.steps.append(f"  recover from {state.description}")
        event(f"crash during {kind}: {cls}")
        try:
            self.log.close()
        except Exception:
            pass
        old_cursors = dict(self.cursors)
        self._new_root()
        state.materialise(os.path.dirname(self.path))
        self.rec = CrashRecorder(os.path.dirname(self.path))
        self.log = wal.Log.open(self.path, segment_max_bytes=SEGMENT_MAX_BYTES, fileops=self.rec)
        # NoAckedLoss and PrefixOfAppended for the in-flight batch:
        for lsn, type_, payload, h in expected:
            if lsn <= self.log.last_lsn:
                self.records[lsn] = (type_, payload, h)
        assert self.log.last_lsn == self.last, "recovered log end differs from acked + surviving in-flight"
        # CursorsDurable: the old value or the one being written
        for name, value in old_cursors.items():
            got = self.log.cursors.get(name)
            assert got == value or (cursor_try == (name, got)), (name, got, value)
        if cursor_try and cursor_try[0] not in old_cursors:
            try:
                got = self.log.cursors.get(cursor_try[0])
                assert got == cursor_try[1]
                self.cursors[cursor_try[0]] = got
            except wal.CursorError:
                self.cursors.pop(cursor_try[0], None)
        else:
            self.cursors = {n: self.log.cursors.get(n) for n in old_cursors}
        assert old_first <= self.log.first_lsn
        self._forget_below(self.log.first_lsn)

    # -- invariants (names from specs/log-format.md) ------------------------------

    @invariant()
    def NoAckedLoss(self):
        assert self.log.last_lsn == self.last
        if self.records:
            assert self.log.last_hash == self.records[self.last][2]

    @invariant()
    def PrefixOfAppended(self):
        got = [(r.lsn, r.type, r.payload, r.hash) for r in wal.LogReader(self.path).records(self.first)]
        assert got == [(k, *self.records[k]) for k in range(self.first, self.last + 1)]

    @invariant()
    def ChainIntact(self):
        report = wal.verify(self.path)
        assert report.ok, report.error
        assert report.last_lsn == self.last and report.first_lsn == self.first

    @invariant()
    def CursorsDurable(self):
        assert self.log.cursors.list() == self.cursors

    @invariant()
    def RetentionRespectsCursors(self):
        # every drop asked for no more than every cursor allowed at the time
        # (a larger request is refused, see drop_before); the log kept to it
        assert self.log.first_lsn <= self.allowed_first


WalMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestWalMachine = pytest.mark.heavy(WalMachine.TestCase)
