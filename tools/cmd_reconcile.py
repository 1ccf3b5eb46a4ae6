"""``walctl reconcile A B``: fork point and differences of two logs; ``--apply NODE`` merges them.

A thin layer over :mod:`engine.reconcile` (rules in specs/reconcile.md).
Exit status: 0 one log is a prefix of the other, 1 the logs diverged, 2 an
error (bad usage, unreadable or foreign logs, an apply action that failed).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import click

import wal

from .cliutil import CONTEXT_SETTINGS, dump_json, json_option, stderr_console

__all__ = ["reconcile", "RichProgress"]

EXIT_PREFIX = 0
EXIT_DIVERGED = 1
EXIT_ERROR = 2
_BAR_MIN_BYTES = 8 << 20  # draw a bar only for reads at least this big


class ReconcileCliError(click.ClickException):
    exit_code = EXIT_ERROR


class RichProgress:
    """:class:`engine.reconcile.read.Progress` drawn with rich on a terminal (stderr)."""

    def __init__(self, console):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TimeRemainingColumn(), console=console, transient=True)
        self._task = None
        self._progress.start()

    def phase(self, name: str, total_bytes: int) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        if total_bytes >= _BAR_MIN_BYTES:
            self._task = self._progress.add_task(name, total=total_bytes)

    def advance(self, nbytes: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, nbytes)

    def stop(self) -> None:
        self._progress.stop()


@contextlib.contextmanager
def _progress() -> Iterator[RichProgress | None]:
    console = stderr_console()
    if console is None:
        yield None
        return
    bar = RichProgress(console)
    try:
        yield bar
    finally:
        bar.stop()


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    from engine.errors import EngineError
    from engine.store.errors import MailStoreError

    try:
        yield
    except (wal.WalError, EngineError, MailStoreError) as exc:
        raise ReconcileCliError(str(exc)) from exc
    except OSError as exc:
        raise ReconcileCliError(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from exc


def _short(h: str | None) -> str:
    return (h or "")[:16]


def _print_diff(doc: dict) -> None:
    f = doc["fork"]
    click.echo(f"fork point: LSN {f['lsn']}, epoch {f['epoch']}, hash {f['hash']}")
    for side in ("a", "b"):
        s = doc[side]
        after = s["last_lsn"] - f["lsn"]
        click.echo(f"{side.upper()}: {s['path']}: last LSN {s['last_lsn']}, {after} record(s) after the fork, "
                   f"epochs {', '.join(str(e['epoch']) + '@' + str(e['first_lsn']) for e in s['epochs'])}")
    if doc["diverged"]:
        click.echo("diverged: yes, both logs have records after the fork point")
    else:
        click.echo(f"diverged: no, {doc['prefix'].upper()} is a prefix of the other")
    for m in doc["mailboxes"]:
        state = "existed at the fork" if m["existed_at_fork"] else "created after the fork"
        click.echo(f"mailbox {m['mailbox']!r} ({state})")
        for side in ("a", "b"):
            t = m[side]
            if t is None:
                continue
            S = side.upper()
            if t["created"]:
                click.echo(f"  created in {S} at LSN {t['created_lsn']}")
            for r in t["renamed"]:
                click.echo(f"  renamed in {S}: {r['from']!r} -> {r['to']!r} (LSN {r['lsn']})")
            if t["deleted"]:
                click.echo(f"  deleted in {S} at LSN {t['deleted']['lsn']}")
            for r in t["renumbered"]:
                click.echo(f"  renumbered in {S}: UIDVALIDITY {r['uidvalidity']} (LSN {r['lsn']})")
        for key, label in (("only_in_a", "only in A"), ("only_in_b", "only in B")):
            if m[key]:
                click.echo(f"  {label}: {len(m[key])}")
                for x in m[key][:20]:
                    gone = ", expunged" if x["expunged"] else ""
                    click.echo(f"    UID {x['uid']} GUID {_short(x['guid'])} LSN {x['lsn']} {x['size']} B{gone}")
                if len(m[key]) > 20:
                    click.echo(f"    ... {len(m[key]) - 20} more (use --json)")
        if m["both"]:
            click.echo(f"  delivered on both sides (one message): {len(m['both'])}")
        for c in m["uid_collisions"]:
            click.echo(f"  UID collision: UID {c['uid']} is {_short(c['guid_a'])} in A, {_short(c['guid_b'])} in B")
        fa, fb = len(m["flag_changes"]["a"]), len(m["flag_changes"]["b"])
        if fa or fb:
            click.echo(f"  flag changes: {fa} in A, {fb} in B")
        for c in m["flag_conflicts"]:
            click.echo(f"  flag conflict: UID {c['uid_a']}/{c['uid_b']} {c['flag']}: A {c['a']['op']}, "
                       f"B {c['b']['op']}; {c['winner'].upper()}'s later change wins ({c['result']})")
        for side in ("a", "b"):
            if m["expunged"][side]:
                click.echo(f"  expunged in {side.upper()}: UIDs {', '.join(map(str, m['expunged'][side]))}")
    c = doc["counts"]
    click.echo(
        f"total: {c['only_in_a']} only in A, {c['only_in_b']} only in B, {c['both']} on both sides, "
        f"{c['uid_collisions']} UID collision(s), {c['flag_conflicts']} flag conflict(s)"
    )
    r = doc["read"]
    click.echo(f"read: fork search {r['fork_search']['bytes_read']:,} bytes in {r['fork_search']['probes']} probes; "
               f"{r['total_bytes']:,} bytes in all")


def _print_apply(doc: dict) -> None:
    p = doc["plan"]
    a = doc["apply"]
    click.echo(f"survivor: {doc['survivor']['side'].upper()} ({doc['survivor']['path']}), strategy {p['strategy']}"
               f"{', destructive' if p['destructive'] else ''}")
    verb = "would do" if a["dry_run"] else "planned"
    click.echo(f"{verb}: {len(p['actions'])} action(s)")
    results = {r["index"]: r for r in doc["results"]}
    for i, act in enumerate(p["actions"]):
        r = results.get(i)
        status = f" [{r['status']}{': ' + r['why'] if r.get('why') else ''}]" if r else ""
        what = act.get("guid", "")[:16] or act.get("new_name", "") or ",".join(map(str, act.get("uids", [])))
        click.echo(f"  {act['rule']} {act['kind']} {act['mailbox']!r} {what}: {act['reason']}{status}")
    for d in p["decisions"]:
        click.echo(f"  {d['rule']} {d['mailbox']!r}: {d['decision']}")
    for w in p["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if not a["dry_run"]:
        click.echo(f"applied: {a['done']} done, {a['skipped']} skipped, {a['failed']} failed; status {a['status']}")
        click.echo(f"report: {doc['report']}")


def _tail_owner(path: str) -> str | None:
    """The node directory owning ``path`` when it is one of its diverged tails
    (``NODE/diverged/X.wal`` beside ``NODE/diverged.json`` and ``NODE/log.wal``)."""
    from engine.node import DIVERGED_FILE, LOG_DIR

    path = os.path.abspath(path)
    node_dir = os.path.dirname(os.path.dirname(path))
    if os.path.basename(os.path.dirname(path)) != "diverged":
        return None
    if not os.path.exists(os.path.join(node_dir, DIVERGED_FILE)) or not os.path.isdir(os.path.join(node_dir, LOG_DIR)):
        return None
    return node_dir


def _stranded_hint(paths: tuple[str, str]) -> str:
    """Why the fork point is unknown when a side is a stranded diverged tail (CTL-9), else ''."""
    from engine.reconcile import locate_tail_base
    from engine.node import LOG_DIR

    for label, path in zip("AB", paths):
        owner = _tail_owner(path)
        if owner is None:
            continue
        others = [t["path"] for t in _node_tails(owner)]
        try:
            base = locate_tail_base(os.path.join(owner, LOG_DIR), path, others)
        except (wal.WalError, OSError):
            continue
        if base.state == "stranded":
            return (f"; {label} is a diverged tail whose fork point (LSN {base.fork_lsn}) was cut aside later with "
                    f"{base.container} (CTL-9): run with --apply NODE (the master) to merge it into that tail and "
                    f"reconcile the merged tail")
        if base.state == "nowhere":
            return f"; {base.reason}"
    return ""


def _node_tails(node_dir: str) -> list[dict]:
    import json

    from engine.node import DIVERGED_FILE

    with open(os.path.join(node_dir, DIVERGED_FILE)) as f:
        return json.load(f)["tails"]


def _place_stranded(path: str, strategy: str, destructive: bool) -> tuple[str, list[dict]]:
    """CTL-9: when ``path`` is a node's diverged tail stranded inside a later tail of that
    node, merge it (``engine.reconcile.placement.place_tail``, recorded in that node's
    ``diverged.json``); returns the tail to reconcile and the merges made."""
    from engine.reconcile import place_tail
    from engine.node import LOG_DIR

    owner = _tail_owner(path)
    if owner is None:
        return path, []
    made = place_tail(owner, os.path.join(owner, LOG_DIR), os.path.abspath(path), strategy=strategy,
                      destructive=destructive)
    for e in made:
        click.echo(f"{e['merged_from'][0]}: its fork point is in the later tail {e['merged_from'][1]}, off the "
                   f"master's history; merged into {e['path']} (CTL-9; report {e['merge_report']})", err=True)
    return (made[-1]["path"], made) if made else (path, [])


def _running(node: str) -> bool:
    from .cmd_node import log_in_use

    return log_in_use(node) and os.path.exists(os.path.join(node, "control.sock"))


@click.command(name="reconcile", context_settings=CONTEXT_SETTINGS)
@click.argument("log_a", metavar="A", type=click.Path(exists=True, file_okay=False, dir_okay=True))
@click.argument("log_b", metavar="B", type=click.Path(exists=True, file_okay=False, dir_okay=True))
@json_option
@click.option("--strategy", type=click.Choice(["renumber", "uidvalidity"]), default="renumber", show_default=True,
              help="UID collisions: 'renumber' moves both messages to fresh UIDs and expunges the collided UID; "
                   "'uidvalidity' gives the mailbox a new UIDVALIDITY and renumbers it by arrival time.")
@click.option("--apply", "apply_node", metavar="NODE", type=click.Path(exists=True, file_okay=False),
              help="Merge the losing tail into NODE, the surviving master's node directory (its log must "
                   "contain the end of A or of B). Writes NODE/reconcile/<n>-<time>-fork<lsn>.json.")
@click.option("--apply-destructive", is_flag=True,
              help="With --apply: also apply the loser's expunges and mailbox deletes (reported otherwise).")
@click.option("--dry-run", is_flag=True, help="With --apply: plan against NODE's store, print the plan, write nothing.")
@click.option("--names/--no-names", default=True, show_default=True,
              help="Name mailboxes created before the fork by scanning A's shared prefix (reads it once); "
                   "--no-names shows their ids. With --apply, NODE's store names them.")
def reconcile(log_a: str, log_b: str, as_json: bool, strategy: str, apply_node: str | None,
              apply_destructive: bool, dry_run: bool, names: bool) -> None:
    """Find where two copies of a log forked and what differs after that point.

    A and B are log directories (they need not be stopped: no lock is
    taken). Prints the fork point (LSN, epoch, hash) and, per mailbox,
    messages only in A or only in B, the same message delivered on both
    sides, UID collisions, flag changes and conflicts, and mailbox creates,
    renames and deletes. Finding the fork reads O(log n) records, not the
    shared prefix.

    With --apply NODE the losing tail is merged into NODE (specs/reconcile.md
    REC-5..REC-12); running it again changes nothing. A diverged tail
    (OWNER/diverged/X.wal) whose fork point was cut aside later with another
    tail of OWNER is first merged into that tail (specs/control.md CTL-9,
    recorded in OWNER/diverged.json), and the merged tail is reconciled.

    Exit status: 0 one log is a prefix of the other, 1 they diverged, 2 error.

    \b
    Example:
        walctl reconcile nodeA/log.wal nodeB/log.wal
        walctl reconcile nodeA/log.wal nodeB/log.wal --apply nodeA --json
    """
    if (apply_destructive or dry_run) and not apply_node:
        raise click.UsageError("--apply-destructive and --dry-run need --apply NODE")
    from wal import ForkUnknownError

    for path in (log_a, log_b):
        if not wal.LogReader(path).segments():
            raise ReconcileCliError(f"{path} is not a mailwal log (no segment files)")
    merged: list[dict] = []
    if apply_node and not dry_run:
        # CTL-9: a stranded diverged tail is first merged into the later tail holding its
        # fork point (a dry run writes nothing, so it reports the unknown fork point instead).
        with _errors():
            log_a, merged_a = _place_stranded(log_a, strategy, apply_destructive)
            log_b, merged_b = _place_stranded(log_b, strategy, apply_destructive)
        merged = merged_a + merged_b
    try:
        doc, failed = _run(log_a, log_b, names, strategy, apply_node, apply_destructive, dry_run)
    except ReconcileCliError as exc:
        if isinstance(exc.__cause__, ForkUnknownError):  # CTL-9: say so when a side is a stranded tail
            raise ReconcileCliError(f"{exc.message}{_stranded_hint((log_a, log_b))}") from exc.__cause__
        raise
    if merged:
        doc["merged_tails"] = merged
    if as_json:
        dump_json(doc, indent=1)
    else:
        _print_diff(doc)
        if apply_node:
            _print_apply(doc)
    if failed:
        click.echo("Error: some actions failed (see the report); fix the cause and rerun", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_DIVERGED if doc["diverged"] else EXIT_PREFIX)


def _run(log_a: str, log_b: str, names: bool, strategy: str, apply_node: str | None, apply_destructive: bool,
         dry_run: bool) -> tuple[dict, bool]:
    """The diff, or the apply into ``apply_node``: (document, whether an action failed)."""
    from engine.reconcile import apply_reconcile
    from engine.reconcile import reconcile as run_reconcile

    with _errors(), _progress() as bar:
        doc: dict = {}
        if apply_node and _running(apply_node):
            # The survivor runs (`walctl serve`): apply through its control channel.
            from engine.cluster.control import ControlClient, ControlError

            try:
                with ControlClient.unix(os.path.join(apply_node, "control.sock"), timeout=3600) as c:
                    doc = c.call("reconcile_apply", dir_a=os.path.abspath(log_a), dir_b=os.path.abspath(log_b),
                                 strategy=strategy, destructive=apply_destructive, dry_run=dry_run)
            except (OSError, ControlError) as exc:
                raise ReconcileCliError(f"the running node {apply_node} could not apply: {exc}") from exc
            failed = doc.get("failed", False)
        elif apply_node:
            from engine.node import Node

            node = Node.open(os.path.abspath(apply_node))
            try:
                result = apply_reconcile(node, log_a, log_b, strategy=strategy, destructive=apply_destructive,
                                         dry_run=dry_run, progress=bar)
            finally:
                node.close()
            doc = result.to_dict()
            failed = result.counts()["failed"] > 0
        if apply_node and not dry_run and not failed:
            from engine.node import mark_tail_reconciled

            for path in (log_a, log_b):
                mark_tail_reconciled(path, doc.get("report"))
        if not apply_node:
            doc = run_reconcile(log_a, log_b, scan_prefix_names=names, progress=bar).to_dict()
            failed = False
    return doc, failed
