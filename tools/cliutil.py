"""Shared pieces of the ``walctl`` command line (no commands live here).

Every command module imports its options and its error mapping from here, so
each command stays a few lines over :mod:`wal`:

* :func:`wal_errors` turns the log's typed errors into ``click.ClickException``
  (``Error: ...`` on stderr, exit status :data:`EXIT_FAILED`), never a traceback.
* :data:`log_argument` / :data:`json_option` are the shared decorators.
* :func:`dump_json` prints one JSON document (bytes as hex, other odd values as
  strings) so ``--json`` output is always valid JSON.
* :func:`stderr_console` is the rich console for progress bars: it only draws
  when stderr is a terminal, so pipes and CI logs stay quiet.

Exit statuses (documented in README.md, section walctl):

====  =====================================================================
0     success (``verify``: the log is valid; a torn tail is still valid)
1     the log is damaged, or the operation failed (the message says why)
2     bad usage: unknown option, missing argument, LOG path does not exist
====  =====================================================================
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
from typing import Any, Iterator

import click

import wal

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "CONTEXT_SETTINGS",
    "log_argument",
    "json_option",
    "wal_errors",
    "require_log",
    "dump_json",
    "to_jsonable",
    "stderr_console",
    "stderr_is_tty",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

log_argument = click.argument(
    "log", metavar="LOG", type=click.Path(exists=True, file_okay=False, dir_okay=True)
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def _describe(exc: wal.WalError) -> str:
    """One operator-facing line for a wal error, with what to do about it."""
    if isinstance(exc, wal.CorruptRecordError):
        where = f"segment {exc.segment}, offset {exc.offset}"
        if exc.lsn is not None:
            where += f", LSN {exc.lsn}"
        return (
            f"log is corrupt at {where}: {exc.reason}. "
            f"Restore it from a replica, or cut it there with 'walctl repair' (cut bytes are kept)."
        )
    return str(exc)


@contextlib.contextmanager
def wal_errors() -> Iterator[None]:
    """Map :class:`wal.WalError` (and unreadable files) to a clean CLI error, exit 1."""
    try:
        yield
    except wal.WalError as exc:
        raise click.ClickException(_describe(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from exc


def require_log(path: str) -> str:
    """Raise a clean error unless ``path`` holds at least one segment file."""
    if not wal.LogReader(path).segments():
        raise click.ClickException(f"{path} is not a mailwal log (no segment files)")
    return path


def to_jsonable(value: Any) -> Any:
    """A JSON-safe copy of a decoded CBOR value: bytes become hex, map keys strings."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def dump_json(obj: Any, *, indent: int | None = None) -> None:
    click.echo(json.dumps(to_jsonable(obj), indent=indent, sort_keys=False))


def stderr_is_tty() -> bool:
    try:
        return os.isatty(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def stderr_console():
    """A rich Console on stderr, or None when stderr is not a terminal."""
    if not stderr_is_tty():
        return None
    from rich.console import Console

    return Console(stderr=True)
