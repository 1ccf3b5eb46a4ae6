"""Forks by hand, without processes: nodes copied from one base, failovers and
follows the way the cluster makes them (for the reconcile regression tests)."""

from __future__ import annotations

import shutil
from typing import Callable

from engine.cluster.failover import promote
from engine.node import Node
from engine.store.events import MessageAppended
from wal import find_fork

__all__ = ["deliver_again", "follow", "nodes_from_one", "take_over", "two_record_redeliver"]


def follow(node: Node, master: Node) -> str | None:
    """``node`` becomes ``master``'s replica; returns its diverged tail cut aside, if any."""
    node.set_role("replica")
    fork = find_fork(node.log.path, master.log.path).lsn
    tail = node.cut_diverged(fork) if node.log.last_lsn > fork else None
    node.log.append_records(list(master.log.read(fork + 1)))
    node.catch_up()
    return tail


def take_over(node: Node, epoch: int) -> None:
    """``node`` becomes a master at ``epoch`` (a failover to it)."""
    node.set_role("master")
    promote(node, epoch=epoch)


def nodes_from_one(tmp_path, names: list[str], setup: Callable[[Node], object], **config) -> list[Node]:
    """The first node after ``setup(node)``, and copies of it under the other names as its
    replicas; ``config`` goes to every node's node.toml (they are copies)."""
    first = Node.init(str(tmp_path / names[0]), name=names[0], **config)
    setup(first)
    first.close()
    for name in names[1:]:
        shutil.copytree(tmp_path / names[0], tmp_path / name)
    nodes = [Node.open(str(tmp_path / n)) for n in names]
    for n in nodes[1:]:
        n.set_role("replica")
    return nodes


def deliver_again(node: Node, mailbox: str, uid: int, *, uid_floor: int = 0, move: bool = False) -> int:
    """Deliver the message at ``uid`` again at a fresh UID >= ``uid_floor`` (same bytes, flags
    and dates); returns the fresh UID. With ``move`` the record also takes ``uid`` away (MS-16).
    Without it the message stays at ``uid`` too: a move written as a redelivery whose expunge
    of the old UID never came, a shape a log may hold and the reconciler handles (also what a
    REC-6 expunge of a second collided copy that did not happen leaves)."""
    row = node._read_fresh(lambda store: store.message_row(node.state.by_name[mailbox].mailbox_id, uid))
    body = node.fetch(mailbox, uid)
    box = {}

    def plan_fn():
        mb = node.state.by_name[mailbox]
        box["ev"] = MessageAppended(mb.mailbox_id, max(mb.uidnext, uid_floor), mb.highestmodseq + 1, row[1], body,
                                    row[2], row[3], row[4], replaces=uid if move else 0)
        return box["ev"]

    node._write(plan_fn)
    return box["ev"].uid


def two_record_redeliver(executor, act) -> dict:
    """A stand-in for ``_Executor._do_redeliver`` that writes a REC-6 move as a redelivery and
    stops before the expunge of the old UID (not one record, MS-16): the message is at both UIDs."""
    uid = deliver_again(executor.node, act.mailbox, act.detail["uid"], uid_floor=act.detail["uid_floor"])
    return {"status": "done", "uid": uid}
