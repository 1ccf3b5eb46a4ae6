"""The workload of a torture run: LMTP deliveries, flag changes and the master's
replica cursors, each recorded as it happened for the history checker."""

from __future__ import annotations

import contextlib
import random
import re
import threading
import time
from dataclasses import dataclass, field

import blake3

from engine.cluster.control import ControlClient, ControlError

from ..lmtp_client import LmtpClient, TransactionInterrupted
from .cluster import Cluster
from .nodes import HOST, NodeProc

__all__ = ["PendingMessage", "History", "Mailer", "Flagger", "Sampler", "lmtp_deliver", "LMTP_TIMEOUT_S"]

FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "$Torture")
LMTP_TIMEOUT_S = 8.0
# control errors that prove a flag change was not made (refused before anything was logged)
_FLAG_PERM_TYPES = {"UnknownUidError", "UnknownMailboxError", "BadFlagError", "BadMailboxNameError", "RequestError"}


@dataclass
class PendingMessage:
    """A message some of whose recipients still wait for a delivery the client knows happened."""

    id: int
    body: bytes
    guid: str
    users: list[str]
    attempts: int = 0
    due: float = 0.0
    # per user: start of the first attempt that may have stored it without saying so
    # (a 4xx after DATA, or no reply after DATA): the earliest time it can be in the log
    maybe_stored_at: dict = field(default_factory=dict)


class History:
    """Every operation the clients attempted, with its outcome (the checker's input), and
    the messages waiting for a retry. One lock guards it all."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ops: list[dict] = []
        self.pending: list[PendingMessage] = []
        self.acked_keys: list[tuple[str, str]] = []  # (mailbox, guid) acknowledged at least once
        self.inflight = 0  # messages a client took and has not put back or finished
        self._op_seq = 0
        self._msg_seq = 0

    def next_message_id(self) -> int:
        with self.lock:
            self._msg_seq += 1
            return self._msg_seq

    def record(self, op: dict) -> None:
        """Number ``op`` and keep it."""
        with self.lock:
            self._op_seq += 1
            op["id"] = self._op_seq
            self.ops.append(op)
            if op["op"] == "deliver" and op["outcome"] == "acked":
                self.acked_keys.append((op["mailbox"], op["guid"]))

    def still_pending(self) -> int:
        """Recipients still waiting for a delivery."""
        return sum(len(p.users) for p in self.pending)


def lmtp_deliver(host: str, port: int, body: bytes, rcpts: list[str],
                 timeout: float) -> dict[str, tuple[str, int, str, bool]]:
    """One LMTP transaction; ``{rcpt: (outcome, code, text, after_data)}`` for every recipient.

    The outcome is the reply's (``acked``, ``temp``, ``perm``; see
    :class:`tools.lmtp_client.Reply`). A failure before the message went out
    is ``temp`` (nothing can have been stored), after it ``unknown``.
    """
    try:
        client = LmtpClient(host, port, timeout=timeout)
    except OSError as exc:
        return {r: ("temp", 0, f"{type(exc).__name__}: {exc}", False) for r in rcpts}
    with client:
        try:
            replies = client.deliver("torture@harness", rcpts, body)
        except TransactionInterrupted as exc:
            replies = exc.replies
            cause = exc.__cause__ or exc
            lost = ("unknown" if exc.after_data else "temp", 0, f"{type(cause).__name__}: {cause}", exc.after_data)
        else:
            lost = None
    out = {r: (reply.outcome, reply.code, reply.text, reply.after_data) for r, reply in replies.items()}
    for r in rcpts:
        out.setdefault(r, lost)
    return out


class Mailer:
    """The LMTP client threads: new unique messages to one or two users, to whichever node is
    master, and retries of ``temp`` and ``unknown`` recipients with the same bytes, as an MTA would."""

    def __init__(self, cluster: Cluster, history: History, *, seed: int, users: list[str]):
        self.cluster = cluster
        self.history = history
        self.seed = seed
        self.users = users

    def new_message(self, rng: random.Random) -> PendingMessage:
        mid = self.history.next_message_id()
        k = 1 if rng.random() < 0.8 else 2
        users = rng.sample(self.users, k)
        head = (f"From: <torture@harness>\r\nTo: {', '.join(f'<{u}@torture>' for u in users)}\r\n"
                f"Message-ID: <s{self.seed}.m{mid}@torture>\r\nSubject: torture {self.seed} message {mid}\r\n\r\n")
        filler = "".join(rng.choice("abcdefghij ") for _ in range(rng.randrange(100, 2500)))
        lines = [filler[i:i + 70] for i in range(0, len(filler), 70)]
        body = (head + "\r\n".join(lines) + "\r\n").encode()
        return PendingMessage(mid, body, blake3.blake3(body).hexdigest(), users)

    def deliver(self, msg: PendingMessage) -> list[str]:
        """One LMTP transaction for ``msg``'s pending users; records the outcomes; returns users to retry."""
        node = self.cluster.master
        msg.attempts += 1
        t0 = time.time()
        results = lmtp_deliver(HOST, node.lmtp_port, msg.body, [f"{u}@torture" for u in msg.users], LMTP_TIMEOUT_S)
        t1 = time.time()
        retry = []
        for u in msg.users:
            outcome, code, text, after_data = results[f"{u}@torture"]
            # t0 is the earliest time this delivery can have been stored (see PendingMessage), so
            # the checker's UID order compares a retry answered "already delivered" correctly.
            op = {"op": "deliver", "msg": msg.id, "mailbox": f"user/{u}/INBOX", "guid": msg.guid, "outcome": outcome,
                  "t0": msg.maybe_stored_at.get(u, t0), "t1": t1, "attempt_t0": t0, "node": node.name,
                  "attempt": msg.attempts, "code": code, "reply": text[:160]}
            if outcome in ("temp", "unknown") and after_data:
                msg.maybe_stored_at.setdefault(u, t0)
            m = re.search(r"UID (\d+)", text)
            if outcome == "acked" and m:
                op["uid"] = int(m.group(1))
            self.history.record(op)
            if outcome in ("temp", "unknown"):
                retry.append(u)
        return retry

    def run(self, k: int, stop: threading.Event, no_new_messages: threading.Event) -> None:
        """Client thread ``k``: new messages and retries of pending ones; only retries once
        ``no_new_messages`` is set; until ``stop``."""
        history = self.history
        rng = random.Random(f"{self.seed}-client-{k}")
        while not stop.is_set():
            msg = None
            with history.lock:
                now = time.monotonic()
                due = [p for p in history.pending if p.due <= now]
                if due and (no_new_messages.is_set() or rng.random() < 0.5):
                    msg = due[0]
                    history.pending.remove(msg)
                    history.inflight += 1
            if msg is None:
                if no_new_messages.is_set():
                    time.sleep(0.05)
                    continue
                msg = self.new_message(rng)
                with history.lock:
                    history.inflight += 1
            retry = []
            try:
                retry = self.deliver(msg)
            finally:
                with history.lock:
                    if retry:
                        msg.users = retry
                        msg.due = time.monotonic() + rng.uniform(0.5, 3.0)
                        history.pending.append(msg)
                    history.inflight -= 1
            if retry:
                time.sleep(0.1)  # a refusing or absent master: do not spin
            time.sleep(rng.uniform(0.0, 0.03))


class Flagger:
    """The thread that changes flags of acknowledged messages through the master's control channel."""

    def __init__(self, cluster: Cluster, history: History, *, seed: int):
        self.cluster = cluster
        self.history = history
        self.seed = seed
        self._uid_cache: dict[tuple, dict] = {}

    def _uid_of(self, node: NodeProc, st: dict, mailbox: str, guid: str) -> int | None:
        """The UID of ``guid`` on the master, from a listing at most 2 s old of this master incarnation."""
        key = (node.name, node.starts, st.get("epoch"), mailbox)
        entry = self._uid_cache.get(key)
        if entry is None or time.monotonic() - entry["at"] > 2.0:
            msgs = node.control("messages", mailbox=mailbox)
            entry = {"at": time.monotonic(), "uids": {m["guid"]: m["uid"] for m in msgs}}
            self._uid_cache = {k: v for k, v in self._uid_cache.items() if k[:3] == key[:3]}
            self._uid_cache[key] = entry
        return entry["uids"].get(guid)

    def run(self, no_new_messages: threading.Event) -> None:
        """Until ``no_new_messages``: a random flag added to or removed from a random acknowledged message."""
        rng = random.Random(f"{self.seed}-flags")
        while not no_new_messages.is_set():
            time.sleep(rng.uniform(0.05, 0.25))
            with self.history.lock:
                if not self.history.acked_keys:
                    continue
                mailbox, guid = rng.choice(self.history.acked_keys)
            node = self.cluster.master
            try:
                st = node.status(timeout=3)
                if st is None or st.get("role") != "master":
                    continue
                uid = self._uid_of(node, st, mailbox, guid)
            except (OSError, ControlError, ValueError):
                continue
            if uid is None:
                continue  # not on this master (yet): in a diverged tail, or expunged by a reconcile
            flag, action = rng.choice(FLAGS), rng.choice(("add", "remove"))
            skewed = sorted(n.name for n in self.cluster.nodes if n.clock_skewed)
            t0 = time.time()
            outcome, error = "acked", None
            try:
                client = ControlClient.unix(node.control_path, timeout=LMTP_TIMEOUT_S)
            except (OSError, ControlError, ValueError) as exc:
                outcome, error = "temp", str(exc)
            else:
                try:
                    client.call("store_flags", mailbox=mailbox, uids=[uid], action=action, flags=[flag])
                except ControlError as exc:
                    outcome = "perm" if exc.type in _FLAG_PERM_TYPES else (
                        "unknown" if "closed the control connection" in str(exc) else "temp")
                    error = f"{exc.type}: {exc}"
                except (OSError, ValueError) as exc:
                    outcome, error = "unknown", str(exc)
                finally:
                    with contextlib.suppress(OSError):
                        client.close()
            op = {"op": "flags", "mailbox": mailbox, "guid": guid, "uid": uid, "flag": flag, "action": action,
                  "outcome": outcome, "t0": t0, "t1": time.time(), "node": node.name}
            if error:
                op["error"] = error[:200]
            if skewed and outcome == "acked":
                # REC-8 orders conflicting flag changes by the nodes' clocks: while a clock is
                # jumped, an acknowledged change is not decisive for the history check.
                op["outcome"], op["real_outcome"], op["clock_skew"] = "unknown", "acked", skewed
            self.history.record(op)


class Sampler:
    """The thread that polls the master's view of its replicas (cursor samples) and its
    mailboxes' UIDVALIDITY, for the checker."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.cursor_samples: list[dict] = []
        self.uidvalidity_samples: list[dict] = []

    def run(self, stop: threading.Event) -> None:
        """Every half second until ``stop``."""
        last_uv = 0.0
        while not stop.wait(0.5):
            node = self.cluster.master
            st = node.status(timeout=3) if node is not None else None
            if not st or st.get("role") != "master":
                continue
            t = time.time()
            for r in st.get("replicas") or []:
                # durable_lsn is the hub's view in this process; cursor_lsn what is persisted
                self.cursor_samples.append({"master": f"{node.name}#{node.starts}", "epoch": st["epoch"],
                                            "replica": r["name"], "durable_lsn": r["durable_lsn"], "t": t})
                if r.get("cursor_lsn") is not None:
                    self.cursor_samples.append({"master": f"{node.name} (persisted)", "epoch": st["epoch"],
                                                "replica": r["name"], "durable_lsn": r["cursor_lsn"], "t": t})
            if t - last_uv > 2.0:
                last_uv = t
                # through the control channel: a CLI reading a node that just died would open it
                # offline, locking its log against the restart
                with contextlib.suppress(OSError, ControlError, ValueError):
                    for mb in node.control("mailboxes", timeout=5):
                        self.uidvalidity_samples.append({"t": t, "node": node.name, "mailbox": mb["name"],
                                                         "uidvalidity": mb["uidvalidity"]})
