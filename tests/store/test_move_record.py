"""MS-16: a move is one record. Applying it puts the message at its new UID and
takes the old UID away in one step, on the live store, on a store rebuilt from
the log, and in the decision state (the old UID is refused afterwards)."""

import pytest

from engine.store.errors import UnknownUidError
from engine.node import Node, rebuild_store
from tests.support.forks import deliver_again

MAILBOX = "user/u/INBOX"


def test_ms16_a_move_record_takes_the_old_uid_away_everywhere(tmp_path):
    path = str(tmp_path / "n")
    node = Node.init(path, name="n")
    try:
        first = node.deliver(MAILBOX, b"Subject: 1\r\n\r\nmoved\r\n", create=True, flags=["\\Seen"])
        second = node.deliver(MAILBOX, b"Subject: 2\r\n\r\nstays\r\n")
        mb = node.state.by_name[MAILBOX]
        deliver_again(node, MAILBOX, first.uid, uid_floor=mb.uidnext + 3, move=True)
        msgs = {m.uid: m for m in node.list_messages(MAILBOX)}
        assert sorted(msgs) == [second.uid, second.uid + 4]
        moved = msgs[second.uid + 4]
        assert moved.guid == first.guid and moved.flags == ("\\Seen",)
        assert node.fetch(MAILBOX, moved.uid) == b"Subject: 1\r\n\r\nmoved\r\n"
        with pytest.raises(UnknownUidError):
            node.store_flags(MAILBOX, [first.uid], "add", ["\\Flagged"])
        with pytest.raises(UnknownUidError):
            node.fetch(MAILBOX, first.uid)
        info = {m.name: m for m in node.list_mailboxes()}[MAILBOX]
        assert info.uidnext == moved.uid + 1 and info.messages == 2
        live = node.digest()
    finally:
        node.close()
    assert rebuild_store(path) == live  # MS-5: a pure function of the log, the move included
