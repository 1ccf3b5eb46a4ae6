"""The history checker of `walctl torture` (specs/torture.md).

Clients record every operation they attempted with its outcome; at the end
the harness records what every node holds. :func:`check` proves, from those
records alone, the properties an operator cares about, and reports each
counterexample with the operation and the records involved.

Outcomes: ``acked`` (LMTP 250 / API return), ``temp`` (4xx: the MTA would
retry; the record may or may not be on disk), ``perm`` (5xx: must not be
stored), ``unknown`` (the connection died before the reply).

Pure: no I/O. Inputs are plain dicts (JSON-lines in the harness).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

__all__ = ["check", "Verdict"]


@dataclass
class Verdict:
    name: str
    ok: bool = True
    checked: int = 0
    violations: list[dict] = field(default_factory=list)

    def fail(self, **details) -> None:
        self.ok = False
        if len(self.violations) < 50:
            self.violations.append(details)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checked": self.checked, "violations": self.violations}


def _index(node: dict) -> dict:
    """(mailbox, guid) -> list of (uid, flags) on one node."""
    out: dict[tuple[str, str], list[tuple[int, frozenset]]] = defaultdict(list)
    for mailbox, mb in node.get("mailboxes", {}).items():
        for m in mb.get("messages", []):
            out[(mailbox, m["guid"])].append((m["uid"], frozenset(m.get("flags", ()))))
    return out


def check(ops: list[dict], nodes: list[dict], *, cursor_samples: list[dict] = (),
          reconcile_reports: list[dict] = ()) -> dict:
    """Check a run. ``nodes[0]`` is the final master.

    Args:
        ops: client operations, each with ``op`` (deliver|flags), ``id``,
            ``mailbox``, ``guid``, ``outcome``, ``t0``, ``t1``; deliveries may
            carry ``uid``/``uidvalidity`` from the reply; flag ops carry
            ``action`` (add|remove) and ``flag``.
        nodes: final observations: ``name``, ``last_lsn``, ``last_hash``,
            ``hashes`` ({lsn: hash} the harness read at other nodes' last
            LSNs), ``digest``, ``mailboxes`` ({name: {uidvalidity, messages:
            [{uid, guid, flags}]}}).
        cursor_samples: ``{"master", "epoch", "replica", "durable_lsn", "t"}``.
        reconcile_reports: reconcile decisions: ``renumbered`` [(mailbox,
            guid)], ``uidvalidity_changed`` [mailbox].

    Returns:
        ``{"ok", "lost", "duplicated", "diverged", "verdicts": {...}}``.
    """
    v_deliv = Verdict("every acknowledged delivery is present exactly once on every node")
    v_flags = Verdict("every acknowledged flag change is reflected unless overridden")
    v_uids = Verdict("UIDs are unique and increasing per mailbox; UIDVALIDITY changes only by reconcile")
    v_logs = Verdict("every replica log is a prefix of the master's; digests equal after quiescence")
    v_cursors = Verdict("no cursor moved backwards")
    lost = duplicated = 0

    indexes = [(n["name"], _index(n)) for n in nodes]
    attempted = {(o["mailbox"], o["guid"]) for o in ops if o["op"] == "deliver"}

    # -- deliveries --------------------------------------------------------------
    for o in ops:
        if o["op"] != "deliver":
            continue
        v_deliv.checked += 1
        key = (o["mailbox"], o["guid"])
        for name, idx in indexes:
            n = len(idx.get(key, ()))
            if o["outcome"] == "acked" and n != 1:
                v_deliv.fail(node=name, op=o, found=n, problem="lost" if n == 0 else "duplicated")
                lost += n == 0
                duplicated += n > 1
            elif o["outcome"] in ("temp", "unknown") and n > 1:
                v_deliv.fail(node=name, op=o, found=n, problem="duplicated")
                duplicated += 1
            elif o["outcome"] == "perm" and n != 0:
                v_deliv.fail(node=name, op=o, found=n, problem="stored although refused permanently")
    for name, idx in indexes:
        for key in idx:
            if key not in attempted:
                v_deliv.fail(node=name, mailbox=key[0], guid=key[1], problem="message nobody delivered")

    # -- flags -----------------------------------------------------------------------
    by_target: dict[tuple, list[dict]] = defaultdict(list)
    for o in ops:
        if o["op"] == "flags":
            by_target[(o["mailbox"], o["guid"], o["flag"])].append(o)
    for (mailbox, guid, flag), flag_ops in by_target.items():
        flag_ops.sort(key=lambda o: o["t0"])
        last_acked = None
        for i, o in enumerate(flag_ops):
            if o["outcome"] == "acked":
                last_acked = i
        if last_acked is None:
            continue
        decisive = flag_ops[last_acked]
        # Ambiguous if a later or overlapping op might have taken effect.
        later = flag_ops[last_acked + 1:]
        if any(o["outcome"] in ("temp", "unknown", "acked") for o in later):
            continue
        if any(o is not decisive and o["outcome"] != "perm" and o["t1"] >= decisive["t0"]
               for o in flag_ops[:last_acked]):
            continue
        want = decisive["action"] == "add"
        v_flags.checked += 1
        for name, idx in indexes:
            found = idx.get((mailbox, guid))
            if not found:
                continue  # expunged or missing: the delivery verdict speaks for it
            has = flag in found[0][1]
            if has != want:
                v_flags.fail(node=name, op=decisive, flags=sorted(found[0][1]), problem=f"flag {flag} {'missing' if want else 'present'}")

    # -- UIDs and UIDVALIDITY -------------------------------------------------------------
    renumbered = {tuple(x) for r in reconcile_reports for x in r.get("renumbered", ())}
    uv_changed = {m for r in reconcile_reports for m in r.get("uidvalidity_changed", ())}
    master_idx = indexes[0][1] if indexes else {}
    master = nodes[0] if nodes else {"mailboxes": {}}
    for name, node in ((n["name"], n) for n in nodes):
        for mailbox, mb in node.get("mailboxes", {}).items():
            uids = [m["uid"] for m in mb.get("messages", [])]
            v_uids.checked += 1
            if len(uids) != len(set(uids)):
                v_uids.fail(node=name, mailbox=mailbox, problem="duplicate UIDs")
    per_mailbox: dict[str, list[dict]] = defaultdict(list)
    for o in ops:
        if o["op"] == "deliver" and o["outcome"] == "acked":
            per_mailbox[o["mailbox"]].append(o)
    for mailbox, acked in per_mailbox.items():
        final_uv = master.get("mailboxes", {}).get(mailbox, {}).get("uidvalidity")
        for o in acked:
            if o.get("uidvalidity") and final_uv and o["uidvalidity"] != final_uv and mailbox not in uv_changed:
                v_uids.fail(mailbox=mailbox, op=o, final_uidvalidity=final_uv,
                            problem="UIDVALIDITY changed without a uidvalidity reconcile")
                break
        if mailbox in uv_changed:
            continue
        acked.sort(key=lambda o: o["t1"])
        final_uid = {o["id"]: master_idx.get((mailbox, o["guid"]), [(None, None)])[0][0] for o in acked}
        for a, b in zip(acked, acked[1:]):
            if a["t1"] < b["t0"] and (mailbox, a["guid"]) not in renumbered and (mailbox, b["guid"]) not in renumbered:
                ua, ub = final_uid[a["id"]], final_uid[b["id"]]
                if ua is not None and ub is not None and not ua < ub:
                    v_uids.fail(mailbox=mailbox, first=a, second=b, uids=[ua, ub],
                                problem="a later acknowledged delivery has a lower UID")

    # -- logs and digests ---------------------------------------------------------------------
    if nodes:
        m = nodes[0]
        for n in nodes[1:]:
            v_logs.checked += 1
            if n["last_lsn"] is None or m["last_lsn"] is None:
                v_logs.fail(node=n["name"], master=m["name"], problem="node could not be observed (not running?): "
                            "its log cannot be compared with the master's")
                continue
            want = m.get("hashes", {}).get(str(n["last_lsn"])) if n["last_lsn"] != m["last_lsn"] else m["last_hash"]
            if n["last_lsn"] > m["last_lsn"] or want != n["last_hash"]:
                v_logs.fail(node=n["name"], last_lsn=n["last_lsn"], last_hash=n["last_hash"],
                            master_last_lsn=m["last_lsn"], problem="log is not a prefix of the master's")
            elif n["last_lsn"] != m["last_lsn"]:
                v_logs.fail(node=n["name"], last_lsn=n["last_lsn"], master_last_lsn=m["last_lsn"],
                            problem="replica not caught up after quiescence")
            if n.get("digest") != m.get("digest"):
                v_logs.fail(node=n["name"], problem="digest differs from the master's")
    diverged = len(v_logs.violations)

    # -- cursors -----------------------------------------------------------------------
    last: dict[tuple, dict] = {}
    for s in sorted(cursor_samples, key=lambda s: s["t"]):
        key = (s["master"], s["epoch"], s["replica"])
        prev = last.get(key)
        v_cursors.checked += 1
        if prev is not None and s["durable_lsn"] < prev["durable_lsn"]:
            v_cursors.fail(before=prev, after=s, problem="cursor moved backwards")
        last[key] = s

    verdicts = [v_deliv, v_flags, v_uids, v_logs, v_cursors]
    return {
        "ok": all(v.ok for v in verdicts),
        "lost": lost,
        "duplicated": duplicated,
        "diverged": diverged,
        "verdicts": {v.name: v.to_dict() for v in verdicts},
    }
