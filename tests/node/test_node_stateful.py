"""A Hypothesis state machine: the node against a plain in-memory model of IMAP semantics.

Random sequences of mailbox create / rename / delete, deliveries (with
repeats, to exercise retry de-duplication), flag changes (add / remove /
replace) and expunges, with crashes in between: the node is closed and
reopened, or reopened *without* its applier so that operations reach only
the log, then reopened normally (the store must catch up from the log and
apply each record exactly once). After every step the store must show what
the model says:

* UIDs are handed out in increasing order and never reused (UIDNEXT only
  grows; an expunged UID stays gone);
* HIGHESTMODSEQ grows by one per change; flags are right per message;
* a recreated mailbox gets a greater UIDVALIDITY (RFC 3501 2.3.1.1);
* the same bytes delivered again to the same mailbox return the first UID;

and ``rebuild_store`` (the store recreated from the log alone) has the same
digest as the live store.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine.store.events import body_guid
from engine.store.errors import MailboxExistsError, UnknownMailboxError, UnknownUidError
from engine.node import Node, rebuild_store

NAMES = ["user/a/INBOX", "user/a/lists", "user/b/INBOX", "user/a/lists/x", "Archive"]
BODIES = [b"Subject: one\r\n\r\n1\r\n", b"Subject: two\r\n\r\n2\r\n", b"Subject: three\r\n\r\n3\r\n",
          b"Subject: four\r\n\r\n4\r\n"]
FLAGS = ["\\Seen", "\\Flagged", "\\Deleted", "\\Answered", "work", "$Junk"]


@dataclass
class ModelMailbox:
    uidvalidity: int
    uidnext: int = 1
    highestmodseq: int = 0
    messages: dict[int, tuple[str, frozenset]] = field(default_factory=dict)  # uid -> (guid, flags)
    recent: dict[str, int] = field(default_factory=dict)  # guid -> uid of its last real delivery


class NodeMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="mailwal-stateful-")
        self.path = self.dir + "/node"
        self.node = Node.init(self.path)
        self.model: dict[str, ModelMailbox] = {}
        self.max_uidvalidity = 0
        self.unapplied = False  # the node runs without its applier (writes reach only the log)
        self.counter = 0

    def teardown(self):
        try:
            self.node.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- mailboxes -------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES))
    def create(self, name):
        if name in self.model:
            with pytest.raises(MailboxExistsError):
                self.node.create_mailbox(name)
            return
        self.node.create_mailbox(name)
        uidvalidity = self.node.state.by_name[name].uidvalidity
        assert uidvalidity > self.max_uidvalidity  # recreated names included
        self.max_uidvalidity = uidvalidity
        self.model[name] = ModelMailbox(uidvalidity)

    @rule(old=st.sampled_from(NAMES), new=st.sampled_from(NAMES))
    def rename(self, old, new):
        if old not in self.model:
            with pytest.raises(UnknownMailboxError):
                self.node.rename_mailbox(old, new)
        elif new in self.model:
            with pytest.raises(MailboxExistsError):
                self.node.rename_mailbox(old, new)
        else:
            self.node.rename_mailbox(old, new)
            self.model[new] = self.model.pop(old)

    @rule(name=st.sampled_from(NAMES), recursive=st.booleans())
    def delete(self, name, recursive):
        if name not in self.model:
            with pytest.raises(UnknownMailboxError):
                self.node.delete_mailbox(name, recursive=recursive)
            return
        self.node.delete_mailbox(name, recursive=recursive)
        del self.model[name]
        if recursive:
            for child in [n for n in self.model if n.startswith(name + "/")]:
                del self.model[child]

    # -- messages ----------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), body=st.one_of(st.sampled_from(BODIES), st.none()),
          flags=st.sets(st.sampled_from(FLAGS), max_size=3))
    def deliver(self, name, body, flags):
        if body is None:  # a fresh message
            self.counter += 1
            body = b"Subject: fresh %d\r\n\r\nbody\r\n" % self.counter
        guid = body_guid(body).hex()
        if name not in self.model:
            with pytest.raises(UnknownMailboxError):
                self.node.deliver(name, body, flags=flags)
            return
        mb = self.model[name]
        receipt = self.node.deliver(name, body, flags=flags)
        assert receipt.guid == guid and receipt.uidvalidity == mb.uidvalidity
        seen = mb.recent.get(guid)
        if seen is not None and seen in mb.messages:
            assert receipt.duplicate and receipt.uid == seen
            return
        assert not receipt.duplicate
        assert receipt.uid == mb.uidnext  # strictly increasing, never reused
        mb.messages[receipt.uid] = (guid, frozenset(flags))
        mb.recent[guid] = receipt.uid
        mb.uidnext += 1
        mb.highestmodseq += 1

    def _uids(self, name, data, allow_missing):
        mb = self.model.get(name)
        existing = sorted(mb.messages) if mb else []
        pool = existing + ([existing[-1] + 1000] if existing and allow_missing else []) + ([1] if not existing else [])
        return data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4))

    @rule(name=st.sampled_from(NAMES), op=st.sampled_from(["add", "remove", "replace"]),
          flags=st.sets(st.sampled_from(FLAGS), max_size=3), data=st.data())
    def store_flags(self, name, op, flags, data):
        uids = self._uids(name, data, allow_missing=True)
        mb = self.model.get(name)
        if mb is None:
            with pytest.raises(UnknownMailboxError):
                self.node.store_flags(name, uids, op, flags)
            return
        if any(u not in mb.messages for u in uids):
            with pytest.raises(UnknownUidError):
                self.node.store_flags(name, uids, op, flags)
            return
        self.node.store_flags(name, uids, op, flags)
        for u in set(uids):
            guid, cur = mb.messages[u]
            new = cur | flags if op == "add" else cur - flags if op == "remove" else frozenset(flags)
            mb.messages[u] = (guid, new)
        mb.highestmodseq += 1

    @rule(name=st.sampled_from(NAMES), data=st.data())
    def expunge(self, name, data):
        uids = self._uids(name, data, allow_missing=True)
        mb = self.model.get(name)
        if mb is None:
            with pytest.raises(UnknownMailboxError):
                self.node.expunge(name, uids)
            return
        if any(u not in mb.messages for u in uids):
            with pytest.raises(UnknownUidError):
                self.node.expunge(name, uids)
            return
        self.node.expunge(name, uids)
        for u in set(uids):
            del mb.messages[u]
        mb.highestmodseq += 1

    # -- crashes ----------------------------------------------------------------------
    # One rule with a choice, so that restarts (each costs a close and an open)
    # are a small share of the steps.

    @rule(kind=st.sampled_from(["reopen", "run_without_applier", "crash_before_apply", "rebuild"]))
    def restart(self, kind):
        if self.unapplied:
            # Writes since run_without_applier reached only the log: the store
            # must catch up on open and apply each of them exactly once.
            applied, last = self.node.store.applied_lsn, self.node.log.last_lsn
            self.node.close()
            self.node = Node.open(self.path)
            assert self.node.store.applied_lsn == last >= applied
            self.unapplied = False
        elif kind == "run_without_applier":
            self.node.close()
            self.node = Node.open(self.path, start_applier=False)
            self.unapplied = True
        elif kind == "rebuild":
            live = self.node.digest()
            self.node.close()
            assert rebuild_store(self.path) == live  # the store is a function of the log
            self.node = Node.open(self.path)
        else:  # a plain restart: the decision state is rebuilt from the store
            self.node.close()
            self.node = Node.open(self.path)

    # -- the model's view must be the store's ------------------------------------------

    @invariant()
    def store_matches_model(self):
        if self.unapplied:
            return  # no applier: the store is behind on purpose until crash_before_apply
        boxes = {mb.name: mb for mb in self.node.list_mailboxes()}
        assert set(boxes) == set(self.model)
        for name, want in self.model.items():
            got = boxes[name]
            assert (got.uidvalidity, got.uidnext, got.highestmodseq, got.messages) == (
                want.uidvalidity, want.uidnext, want.highestmodseq, len(want.messages)), name
            msgs = {m.uid: (m.guid, frozenset(m.flags)) for m in self.node.list_messages(name)}
            assert msgs == want.messages, name


NodeMachine.TestCase.settings = settings(NodeMachine.TestCase.settings, stateful_step_count=30,
                                           max_examples=min(NodeMachine.TestCase.settings.max_examples, 40))
TestNodeStateMachine = pytest.mark.heavy(NodeMachine.TestCase)
