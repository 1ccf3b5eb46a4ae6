"""Forks by hand, without processes: nodes copied from one base, failovers and
follows the way the cluster makes them (for the reconcile regression tests)."""

from __future__ import annotations

import shutil
from typing import Callable

from engine.failover import promote
from engine.node import Node
from wal.epochs import find_fork

__all__ = ["follow", "nodes_from_one", "take_over"]


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
