"""The tables of ``walctl bench``: one shape, printed as text or as markdown.

A bench measures into a plain dict (its ``--json`` output) and then builds a
:class:`BenchReport` from it: a :class:`Stamp` (commit, date, machine),
then blocks in order, each a :class:`Table` (title, columns, rows of
formatted cells) or a line of text. :meth:`BenchReport.print_text` draws it
with rich for a terminal; :meth:`BenchReport.markdown` returns it for the
docs (each table under its title in bold, the stamp first).

Ratios against a ceiling measured in the same run (or against a peer
server) are formatted by :func:`percent` and :func:`times`, so every bench
writes them the same way.

Example::

    report = BenchReport(Stamp.capture(machine_info(directory)))
    table = report.table("appends", ["appenders", "records/s", "log/raw"])
    table.add_row("1", "1,234", percent(0.93))
    report.line("verify peak RSS: 41.0 MiB")
    report.print_text()        # or: click.echo(report.markdown(), nl=False)

A command prints its report with :func:`print_report` (``--json``, ``--markdown`` or text).
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["BenchReport", "Table", "Column", "Stamp", "machine_info", "git_commit", "percent", "times",
           "markdown_text", "print_report", "progress_printer"]

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Width of the text output when stdout is not a terminal (a pipe, a file, a test's runner):
#: the widest tables fit without wrapping their cells.
PIPE_WIDTH = 200


def percent(ratio: float | None, digits: int = 0) -> str:
    """A ratio to a ceiling as a percentage (``0.93`` -> ``93%``); empty when there is none."""
    return "" if ratio is None else f"{ratio:.{digits}%}"


def times(ratio: float | None, digits: int = 2) -> str:
    """A ratio to a peer as a factor (``1.5`` -> ``1.50×``); empty when there is none."""
    return "" if ratio is None else f"{ratio:.{digits}f}×"


# -- the stamp: which code, which machine, when ------------------------------------------------


def git_commit(root: str = _REPO_ROOT) -> tuple[str, bool]:
    """The checkout's short commit and whether tracked files differ from it; ``("unknown", False)``
    outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    rev = git("rev-parse", "--short=7", "HEAD")
    if not rev:
        return "unknown", False
    return rev, bool(git("status", "--porcelain", "--untracked-files=no"))


def _mount_of(path: str) -> tuple[str, str, str]:
    """(mount point, fs type, device) of the file system holding ``path``."""
    path = os.path.realpath(path)
    best = ("/", "?", "?")
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mount_point = left.split()[4].replace("\\040", " ")
                fstype, device = (right.split() + ["?", "?"])[:2]
                if (path == mount_point or path.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) >= len(best[0]):
                    best = (mount_point, fstype, device)
    except OSError:
        pass
    return best


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_info(directory: str) -> dict:
    """The machine and the disk under ``directory`` (the ``machine`` object of every bench's ``--json``)."""
    mount_point, fstype, device = _mount_of(directory)
    usage = shutil.disk_usage(directory)
    rotational = "?"
    dev_name = os.path.basename(device)
    try:
        with open(f"/sys/block/{dev_name}/queue/rotational") as f:
            rotational = "rotational" if f.read().strip() == "1" else "non-rotational"  # as the kernel reports it
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "dir": os.path.abspath(directory),
        "mount_point": mount_point,
        "fs_type": fstype,
        "device": device,
        "device_kind": rotational,
        "disk_size_gib": round(usage.total / 2**30, 1),
    }


@dataclass(frozen=True)
class Stamp:
    """What a table was measured with: the commit, the date (UTC) and the machine
    (a :func:`machine_info` dict; missing keys are left out of the line)."""

    commit: str
    dirty: bool
    date: str
    machine: dict

    @classmethod
    def capture(cls, machine: dict) -> "Stamp":
        """This checkout's commit, now, and ``machine``."""
        commit, dirty = git_commit()
        return cls(commit, dirty, datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), machine)

    @classmethod
    def of_report(cls, report: dict) -> "Stamp":
        """The stamp a report carries (``commit``, ``dirty``, ``date``, ``machine``), captured
        now for what it lacks."""
        if "commit" in report and "date" in report:
            return cls(report["commit"], bool(report.get("dirty")), report["date"], report.get("machine") or {})
        return cls.capture(report.get("machine") or {})

    def line(self) -> str:
        """``commit abc1234, 2025-01-02T03:04:05+00:00; machine: 2 vCPU ..., ext4 on /dev/vda1 (...), dir ...``"""
        m = self.machine
        parts = []
        if "cpus" in m:
            parts.append(f"{m['cpus']} vCPU" + (f" {m['cpu_model']}" if "cpu_model" in m else ""))
        if "memory_gib" in m:
            parts.append(f"{m['memory_gib']} GiB RAM")
        if "python" in m:
            parts.append(f"Python {m['python']}")
        if "kernel" in m:
            parts.append(f"kernel {m['kernel']}")
        if "fs_type" in m:
            disk = [x for x in (m.get("device_kind"),
                                f"{m['disk_size_gib']} GiB" if "disk_size_gib" in m else None) if x and x != "?"]
            parts.append(f"{m['fs_type']} on {m.get('device', '?')}" + (f" ({', '.join(disk)})" if disk else ""))
        if "dir" in m:
            parts.append(f"dir {m['dir']}")
        dirty = " (with uncommitted changes)" if self.dirty else ""
        return f"commit {self.commit}{dirty}, {self.date}; machine: {', '.join(parts) or 'unknown'}"


# -- tables and the report -------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A column: its header, and whether its cells are figures (right-aligned)."""

    name: str
    figures: bool = True


@dataclass
class Table:
    """A titled table of formatted cells (strings; format figures before adding them)."""

    title: str
    columns: list[Column]
    rows: list[list[str]] = field(default_factory=list)

    def add_row(self, *cells: str) -> None:
        """Add a row of exactly one cell per column.

        Raises:
            ValueError: the row has more or fewer cells than the table has columns.
        """
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.title!r} has {len(self.columns)} columns, the row {len(cells)} cells")
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> list[str]:
        def cell(text: str) -> str:
            return markdown_text(text).replace("|", "\\|").replace("\n", " ")

        out = [f"**{markdown_text(self.title)}**", ""] if self.title else []
        out.append("| " + " | ".join(cell(c.name) for c in self.columns) + " |")
        out.append("|" + "|".join("---:" if c.figures else "---" for c in self.columns) + "|")
        out += ["| " + " | ".join(cell(x) for x in row) + " |" for row in self.rows]
        return out


def markdown_text(text: str) -> str:
    """``text`` with the characters markdown would read as emphasis or escapes escaped
    (a measure such as ``UID FETCH 1:*`` stays as written)."""
    return text.replace("\\", "\\\\").replace("*", "\\*")


class BenchReport:
    """A bench's output: its stamp line, then tables and lines of text in order."""

    def __init__(self, stamp: Stamp):
        self.stamp = stamp
        self.blocks: list[Table | str] = []

    def table(self, title: str, columns: list[str | Column]) -> Table:
        """Append a new table and return it; a column given as a string is a figures column,
        and the first column (the row's label) is never one unless given as a :class:`Column`."""
        cols = [c if isinstance(c, Column) else Column(c, figures=i > 0) for i, c in enumerate(columns)]
        t = Table(title, cols)
        self.blocks.append(t)
        return t

    def line(self, text: str) -> None:
        """Append a line of text (a figure that is not a table, a note)."""
        self.blocks.append(text)

    def print_text(self, file=None) -> None:
        """Draw the report with rich: in a terminal at its width, elsewhere at :data:`PIPE_WIDTH` columns."""
        from rich.console import Console
        from rich.table import Table as RichTable
        from rich.text import Text

        out = file or sys.stdout
        console = Console(file=out, width=None if out.isatty() else PIPE_WIDTH)
        console.print(Text(self.stamp.line()), soft_wrap=True)  # lines are not wrapped: copied whole
        for block in self.blocks:
            if isinstance(block, str):
                console.print(Text(block), soft_wrap=True)
                continue
            t = RichTable(title=Text(block.title) if block.title else None)
            for c in block.columns:
                t.add_column(Text(c.name), justify="right" if c.figures else "left")
            for row in block.rows:
                t.add_row(*(Text(x) for x in row))
            console.print(t)

    def markdown(self) -> str:
        """The report as markdown: ``**Measured:** <stamp>.``, then each block, blank lines between."""
        out = [f"**Measured:** {markdown_text(self.stamp.line())}."]
        for block in self.blocks:
            out.append("")
            out += [markdown_text(block)] if isinstance(block, str) else block.markdown()
        return "\n".join(out) + "\n"


def print_report(report: dict, tables: Callable[[dict], BenchReport], *, as_json: bool, markdown: bool = False,
                 markdown_tables: Callable[[dict], BenchReport] | None = None, json_indent: int = 2) -> None:
    """A bench command's output: the report as JSON (``--json``), its tables as markdown
    (``--markdown``, built by ``markdown_tables`` when the docs want other tables), or as text."""
    if as_json:
        from .cliutil import dump_json

        dump_json(report, indent=json_indent)
    elif markdown:
        import click

        click.echo((markdown_tables or tables)(report).markdown(), nl=False)
    else:
        tables(report).print_text()


def progress_printer():
    """A ``progress(text)`` callable that prints dim lines on stderr when it is a terminal, else None."""
    from .cliutil import stderr_console

    console = stderr_console()
    if console is None:
        return None
    return lambda text: console.print(f"bench: {text}", style="dim", markup=False, highlight=False)
