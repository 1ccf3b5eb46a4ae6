"""``walctl torture``: the command and its summary."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile

import click

from ..cliutil import CONTEXT_SETTINGS
from .harness import Torture

__all__ = ["torture", "print_summary"]


def print_summary(s: dict) -> None:
    """The summary of a run as text (the command's output without --json)."""
    echo = click.echo
    echo(f"torture seed {s['seed']}: {s['minutes']} min ({s['seconds']:g} s), {s['nodes']} nodes")
    d, fl = s["deliveries"], s["flag_changes"]
    echo(f"  operations   {s['attempted']} attempted, {s['acked']} acknowledged")
    echo(f"  deliveries   {d['attempted']} attempts of {d['messages']} messages: {d.get('acked', 0)} acked, "
         f"{d.get('temp', 0)} temp, {d.get('unknown', 0)} unknown, {d.get('perm', 0)} perm; "
         f"{d['still_pending']} still pending")
    echo(f"  flag changes {fl['attempted']} attempted: {fl.get('acked', 0)} acked, {fl.get('temp', 0)} temp, "
         f"{fl.get('unknown', 0)} unknown, {fl.get('perm', 0)} perm")
    echo("  faults       " + (", ".join(f"{k} {v}" for k, v in s["faults"].items()) or "none"))
    if s["faults_skipped"]:
        echo("  skipped      " + ", ".join(f"{k} {v}" for k, v in s["faults_skipped"].items()))
    for kind, why in s["skipped_features"].items():
        echo(f"  unavailable  {kind}: {why}")
    fd = s["failover_detail"]
    echo(f"  failovers    {s['failovers']} ({fd['soft']} soft, {fd['hard']} hard; {fd['soft_aborted']} soft aborted; "
         f"{fd['operator']} promotions by the operator after a failover left no master)")
    rc = s["reconcile"]
    echo(f"  reconciles   {rc.get('reports', 0)} reports, {rc.get('copy_message', 0)} messages copied back, "
         f"{rc.get('redeliver', 0)} renumbered, {rc.get('set_flags', 0)} flag changes, "
         f"{rc.get('conflicts', 0)} conflicts")
    echo(f"  unexpected node exits {s['unexpected_exits']}; final master {s['final']['master']} "
         f"epoch {s['final']['epoch']} at LSN {s['final']['last_lsn']}")
    echo(f"  lost {s['lost']}, duplicated {s['duplicated']}, diverged {s['diverged']}")
    for name, v in s["verdicts"].items():
        echo(f"  [{'ok' if v['ok'] else 'FAIL'}] {name} ({v['checked']} checked)")
        for viol in v["violations"][:3]:
            echo(f"         {json.dumps(viol, default=str)[:400]}")
    echo("verdict: " + ("every verdict holds" if s["ok"] else "VIOLATIONS FOUND") + f" (run directory {s['dir']})")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--minutes", type=click.FloatRange(min=0), default=None, help="Length of the fault phase (default 2).")
@click.option("--seconds", type=click.FloatRange(min=0), default=None, help="Length in seconds (added to --minutes).")
@click.option("--seed", type=int, default=None, help="Seed of the fault schedule (default: random, printed).")
@click.option("--nodes", type=click.IntRange(min=2, max=7), default=3, show_default=True, help="Cluster size.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (progress still goes to stderr).")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Run directory, kept (must be empty or absent). Default: a temporary directory, removed when "
                   "every verdict holds unless --keep.")
@click.option("--keep", is_flag=True, help="Keep the run directory (it is always kept when a verdict fails).")
@click.option("--clients", type=click.IntRange(min=1, max=64), default=4, show_default=True,
              help="Concurrent LMTP client threads.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def torture(minutes, seconds, seed, nodes, as_json, workdir, keep, clients, quiet) -> None:
    """Torture a real cluster with seeded faults, then check its history.

    Starts NODES nodes (walctl serve/follow) on 127.0.0.1 with fault proxies
    on every replication link, delivers over LMTP and changes flags while a
    fault schedule drawn from SEED runs (kill -9, SIGSTOP, link cuts, delays,
    1-byte slices, blackholes, partitions, soft and hard failovers, disk
    full, fsync errors, clock jumps), heals, waits for quiescence and checks
    that every acknowledged operation survived exactly once and every node
    holds the same log. Exit 0 only when every verdict holds. The same seed
    draws the same schedule.

    \b
    Example:
        walctl torture --minutes 2 --seed 7
        walctl torture --seconds 100 --seed 1 --json | jq '.lost, .faults'
    """
    total = (minutes or 0) * 60 + (seconds or 0)
    if minutes is None and seconds is None:
        total = 120.0
    if total < 10:
        raise click.BadParameter("a run needs at least 10 seconds", param_hint="--seconds")
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    created = workdir is None
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix=f"walctl-torture-{seed}-")
    elif os.path.exists(workdir) and os.listdir(workdir):
        raise click.BadParameter(f"{workdir} is not empty", param_hint="--dir")
    progress = (lambda text: None) if quiet else (lambda text: click.echo(text, err=True))
    t = Torture(seed=seed, seconds=total, nodes=nodes, workdir=os.path.abspath(workdir), clients=clients,
                progress=progress)
    try:
        summary = t.run()
    except KeyboardInterrupt:
        click.echo(f"interrupted; run directory {workdir}", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(summary, default=str))
    else:
        print_summary(summary)
    if summary["ok"] and not keep and created:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(0 if summary["ok"] else 1)
