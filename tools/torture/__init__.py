"""``walctl torture``: a seeded fault-injection run of a real cluster, checked
by the history checker (:mod:`tools.torture.history`).

Theory of operation
-------------------
The harness starts ``--nodes`` nodes as real ``walctl serve``/``walctl
follow`` processes on 127.0.0.1 in a scratch directory. Every replication
link goes through a :class:`~tools.torture.faultproxy.FaultProxy` run by the
harness: node *i*'s ``--peer`` addresses are proxies in front of the other
nodes' replication ports, so the harness can cut, delay, slice or blackhole
any link in either direction. Every node runs with ``--auto-reconcile``.

While the fault schedule runs, client threads deliver unique messages over
LMTP to whichever node is master, one recipient or two per transaction, and
record every attempt with its outcome (``acked`` 2xx, ``temp`` 4xx or refused
before DATA, ``perm`` 5xx, ``unknown`` the connection died after DATA);
``temp`` and ``unknown`` recipients are retried later with the same bytes,
as an MTA would. Another thread changes flags through the master's control
channel, and a sampler polls the master's replica cursors.

The **schedule** is drawn up front from ``random.Random(seed)``: a list of
(time offset, fault) with every parameter decided (node and link choices are
drawn as numbers and mapped onto the nodes that qualify when the fault
runs). Same seed, same schedule. Faults run one after another, each healing
what it broke before the next starts (a fault never starts before its
offset; a slow one delays the next). Kinds: kill -9 and restart of a
replica or of the master, SIGSTOP/SIGCONT, a link cut (RST now, or FIN/RST
after N more bytes, mid-frame), a slow link, a sliced link (1-byte writes), a
blackholed link, a partitioned node, soft failover, hard failover (kill -9
the master, ``walctl promote`` a replica, later restart the old master with
``walctl follow``: its diverged tail is cut aside and reconciled into the new
master), disk full (the node lives on a small tmpfs, filled with a ballast
file; needs root), fsync and write errors (strace attaches to a node and
fails one ``fdatasync``, or one ``write``, of its log's current segment with
EIO), and wall-clock jumps (libfaketime).
Features whose tools are missing are skipped and the summary says so.

At the end the harness heals everything, restarts every node that is down
(an old master's tail is only reconciled once it runs again), retries the
deliveries still pending, waits for quiescence (one master; every node at
the same last LSN and hash, its store applied to it, no unreconciled tail),
collects the final observations and hands everything to
:func:`tools.torture.history.check`. Exit status 0 only when every verdict holds.

Where each part lives
---------------------
* :mod:`~tools.torture.schedule`: the fault kinds and the seeded schedule (pure);
* :mod:`~tools.torture.harness`: :class:`Torture`, one run from setup to summary
  (healing, draining the retries, quiescence);
* :mod:`~tools.torture.cluster` and :mod:`~tools.torture.nodes`: the node
  processes, the links' proxies, the master, what a service manager and an
  operator do (restart, promote); the host's features for faults;
* :mod:`~tools.torture.workload`: the LMTP clients, the flag changer, the cursor
  sampler, and the history they record;
* :mod:`~tools.torture.faults`: one injector per fault kind (processes, links,
  the operating system) and the runner that plays the schedule;
* :mod:`~tools.torture.faultproxy`: the fault-injecting TCP proxy (also used by
  the replication fault tests);
* :mod:`~tools.torture.checker` and :mod:`~tools.torture.history`: the final
  observations and the verdicts (the history checker is pure);
* :mod:`~tools.torture.journal`: the run's events, findings and progress lines;
* :mod:`~tools.torture.command`: the ``walctl torture`` command and its summary.
"""

from .command import torture
from .harness import Torture
from .schedule import FAULT_KINDS, Fault, draw_schedule

__all__ = ["torture", "Fault", "draw_schedule", "FAULT_KINDS", "Torture"]
