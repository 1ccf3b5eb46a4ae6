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
* :class:`WalctlGroup` is the last line of defence: an exception no command
  turned into a clean error becomes one ``Error: ...`` line (exit status
  :data:`EXIT_FAILED`) instead of a traceback, unless ``walctl --debug``.

Exit statuses (documented with the commands, docs/walctl.md):

====  =====================================================================
0     success (``verify``: the log is valid; a torn tail is still valid)
1     the log is damaged, or the operation failed (the message says why)
2     bad usage: unknown option, missing argument, LOG path does not exist,
      or a bad node.toml (the message names the file and the key)
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
    "describe_damage",
    "error_message",
    "WalctlGroup",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

#: ``ctx.meta`` key set by ``walctl --debug``: errors then show their traceback.
DEBUG_KEY = "walctl.debug"

log_argument = click.argument(
    "log", metavar="LOG", type=click.Path(exists=True, file_okay=False, dir_okay=True)
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def describe_damage(where: str, reason: str, log: str | None = None) -> str:
    """The one sentence every command uses for a damaged log, with the one advice.

    ``where`` names the place (segment, offset, LSN), ``log`` the log
    directory when the caller knows it (the advice then names it).
    """
    target = log or "LOG"
    return (f"log is damaged at {where}: {reason}. Restore it from a replica, or cut it there with "
            f"`walctl repair {target}` (the cut bytes are kept); `walctl verify {target}` shows the damage")


def _describe(exc: wal.WalError, log: str | None = None) -> str:
    """One operator-facing line for a wal error, with what to do about it."""
    if isinstance(exc, wal.CorruptRecordError):
        where = f"segment {exc.segment}, offset {exc.offset}"
        if exc.lsn is not None:
            where += f", LSN {exc.lsn}"
        return describe_damage(where, exc.reason, log)
    return str(exc)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups; ``[exc]`` for a plain one."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def error_message(exc: BaseException, log: str | None = None) -> tuple[str, bool]:
    """(one line for the operator, whether the error is one of ours).

    Typed errors of the log, the engine and the control channel say what
    happened and what to do in their own words; anything else is named by
    its class. Exception groups (anyio task groups) are looked through.
    """
    from engine.cluster.control import ControlError
    from engine.errors import EngineError
    from engine.store.errors import MailStoreError

    leaves = _leaves(exc)
    parts, typed = [], True
    for leaf in leaves:
        if isinstance(leaf, wal.WalError):
            parts.append(_describe(leaf, log))
        elif isinstance(leaf, (EngineError, MailStoreError, ControlError, click.ClickException)):
            parts.append(leaf.format_message() if isinstance(leaf, click.ClickException) else str(leaf))
        else:
            typed = False
            parts.append(f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__)
    text = "; ".join(dict.fromkeys(p for p in parts if p)) or type(exc).__name__
    return " ".join(text.split()), typed


class WalctlGroup(click.Group):
    """The walctl group: no command prints a traceback unless ``--debug`` was given.

    Click itself turns :class:`click.ClickException` into ``Error: ...`` and
    usage errors into exit status 2; this catches what is left. An error of
    ours (log, engine, control channel) keeps its own message; anything
    else becomes ``Error: unexpected ... (run with --debug for the
    traceback)``. Both exit with :data:`EXIT_FAILED`.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if ctx.meta.get(DEBUG_KEY):
                raise
            leaves = _leaves(exc)
            if len(leaves) == 1 and isinstance(leaves[0], (click.ClickException, click.exceptions.Exit)):
                raise leaves[0] from None  # a clean error raised inside a task group
            if len(leaves) == 1 and isinstance(leaves[0], BrokenPipeError):
                raise leaves[0] from None  # the reader went away (`| head`): click exits quietly
            message, typed = error_message(exc)
            if not typed:
                message = f"unexpected {message} (run with --debug for the traceback)"
            raise click.ClickException(message) from None


@contextlib.contextmanager
def wal_errors(log: str | None = None) -> Iterator[None]:
    """Map :class:`wal.WalError` (and unreadable files) to a clean CLI error, exit 1.

    ``log``: the log directory, named in the advice for a damaged log.
    """
    try:
        yield
    except wal.WalError as exc:
        raise click.ClickException(_describe(exc, log)) from exc
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
