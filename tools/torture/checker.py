"""The end of a torture run: what every node holds, what the reconciles did, and the
verdicts (:func:`tools.torture.history.check` and the harness's own)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections import Counter

from engine.cluster.control import ControlError

from .cluster import Cluster
from .history import check
from .journal import Journal
from .nodes import NodeProc, walctl

__all__ = ["observe", "reconcile_reports", "judge"]


def observe(cluster: Cluster, journal: Journal) -> list[dict]:
    """Final observations of every node (master first); repeated if a node moved meanwhile.
    Also written to ``nodes.json`` in the run directory."""
    for _ in range(5):
        before = {n.name: (n.status() or {}).get("last_lsn") for n in cluster.nodes}
        nodes = [_observe_node(n) for n in sorted(cluster.nodes, key=lambda n: n is not cluster.master)]
        after = {n.name: (n.status() or {}).get("last_lsn") for n in cluster.nodes}
        if before == after:
            break
        journal.event("observe-again", before=before, after=after)
    master = nodes[0]
    for n in nodes[1:]:
        lsn = n["last_lsn"]
        if lsn is not None and lsn != master["last_lsn"] and 0 < lsn <= (master["last_lsn"] or 0):
            r = walctl(["replay", os.path.join(cluster.master.path, "log.wal"), "--from", str(lsn), "--to",
                        str(lsn), "--json"], check=False)
            with contextlib.suppress(ValueError, IndexError):
                master["hashes"][str(lsn)] = json.loads(r.stdout.splitlines()[0])["hash"]
    with open(os.path.join(cluster.dir, "nodes.json"), "w") as f:
        json.dump(nodes, f, indent=1)
    return nodes


def _observe_node(node: NodeProc) -> dict:
    st = node.status() or {}
    out = {"name": node.name, "role": st.get("role"), "epoch": st.get("epoch"), "last_lsn": st.get("last_lsn"),
           "last_hash": st.get("last_hash"), "applied_lsn": st.get("applied_lsn"), "hashes": {}, "mailboxes": {}}
    r = walctl(["digest", node.path, "--json"], check=False)
    try:
        d = json.loads(r.stdout)
        out["digest"] = {"mailboxes": d.get("mailboxes"), "store": d.get("store")}
    except ValueError:
        out["digest"] = {"error": r.stderr.strip()[-500:]}
    try:
        boxes = node.control("mailboxes", timeout=60)
    except (OSError, ControlError, ValueError) as exc:
        boxes = []
        out["mailbox_error"] = str(exc)
    for mb in boxes:
        try:
            msgs = node.control("messages", timeout=60, mailbox=mb["name"])
        except (OSError, ControlError, ValueError) as exc:
            r = walctl(["messages", node.path, mb["name"], "--json"], check=False)
            try:
                msgs = json.loads(r.stdout)
            except ValueError:
                msgs = []
                out.setdefault("errors", []).append(f"{mb['name']}: {exc}")
        out["mailboxes"][mb["name"]] = {"uidvalidity": mb["uidvalidity"],
                                        "messages": [{"uid": m["uid"], "guid": m["guid"], "flags": m["flags"]}
                                                     for m in msgs]}
    v = walctl(["verify", os.path.join(node.path, "log.wal"), "--json"], check=False)
    try:
        out["verify_ok"] = bool(json.loads(v.stdout).get("ok"))
    except ValueError:
        out["verify_ok"] = False
    out["quarantined"] = st.get("quarantined")
    return out


def reconcile_reports(run_dir: str) -> tuple[list[dict], dict]:
    """What the reconciles did, from every NODE/reconcile/*.json, for the checker; and action counts."""
    reports, counts = [], Counter()
    for path in sorted(glob.glob(os.path.join(run_dir, "n*", "reconcile", "*.json"))):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        names = {}
        for mb in doc.get("mailboxes") or []:
            if isinstance(mb, dict) and mb.get("mailbox_id"):
                names[mb["mailbox_id"]] = mb.get("mailbox")
        renumbered, uv_changed = [], []
        for act in (doc.get("plan") or {}).get("actions") or []:
            counts[act.get("kind")] += 1
            name = act.get("mailbox")
            if act.get("mailbox_id") and act.get("mailbox_id") in names:
                name = names[act["mailbox_id"]] or name
            if act.get("kind") in ("copy_message", "redeliver") and act.get("guid"):
                renumbered.append([name, act["guid"]])
            elif act.get("kind") == "renumber":
                uv_changed.append(name)
        apply = doc.get("apply") or {}
        counts["reports"] += 1
        if apply.get("status") != "done":
            counts[f"status {apply.get('status')}"] += 1
        reports.append({"path": path, "renumbered": renumbered, "uidvalidity_changed": uv_changed,
                        "status": apply.get("status"),
                        "conflicts": sum(len(m.get("uid_collisions") or []) + len(m.get("flag_conflicts") or [])
                                         for m in doc.get("mailboxes") or [] if isinstance(m, dict))})
    return reports, dict(counts)


def _uidvalidity_verdict(samples: list[dict], reports: list[dict]) -> tuple[str, dict]:
    """UIDVALIDITY seen on the masters during the run changes only where a reconcile renumbered."""
    name = "UIDVALIDITY seen on the masters changed only by a uidvalidity reconcile"
    allowed = {m for r in reports for m in r["uidvalidity_changed"]}
    seen: dict[str, int] = {}
    v = {"ok": True, "checked": 0, "violations": []}
    for s in sorted(samples, key=lambda s: s["t"]):
        v["checked"] += 1
        prev = seen.get(s["mailbox"])
        if prev is not None and prev != s["uidvalidity"] and s["mailbox"] not in allowed:
            v["ok"] = False
            if len(v["violations"]) < 20:
                v["violations"].append({"mailbox": s["mailbox"], "before": prev, "after": s["uidvalidity"],
                                        "node": s["node"], "t": s["t"]})
        seen[s["mailbox"]] = s["uidvalidity"]
    return name, v


def judge(ops: list[dict], nodes: list[dict], quiet: dict, *, cursor_samples: list[dict],
          uidvalidity_samples: list[dict], reports: list[dict], journal: Journal) -> tuple[dict, dict]:
    """Every verdict of the run, by name, and the history checker's counts (lost, duplicated, diverged).

    The history checker's verdicts come first, then the harness's: quiescence, every log
    verifies, UIDVALIDITY changed only by a reconcile, and no finding of the harness.
    """
    result = check(ops, nodes, cursor_samples=cursor_samples, reconcile_reports=reports)
    verdicts = dict(result["verdicts"])
    v_quiet = {"ok": quiet["ok"], "checked": 1, "violations": [] if quiet["ok"] else [quiet]}
    verdicts["the cluster reached quiescence after healing"] = v_quiet
    bad_logs = [n["name"] for n in nodes if not n.get("verify_ok")]
    verdicts["every node's log verifies"] = {"ok": not bad_logs, "checked": len(nodes),
                                             "violations": [{"node": b} for b in bad_logs]}
    uv = _uidvalidity_verdict(uidvalidity_samples, reports)
    verdicts[uv[0]] = uv[1]
    verdicts["the harness found no other problem (nodes start, promote, stay single-master)"] = {
        "ok": not journal.findings, "checked": len(journal.events), "violations": journal.findings[:20]}
    return verdicts, result
