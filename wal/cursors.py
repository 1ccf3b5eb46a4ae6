"""Named cursors stored beside the log (LOG-13).

A cursor is ``name -> LSN``: the last LSN its consumer has finished with.
Each cursor is its own small file ``cursors/<name>.cursor`` holding canonical
CBOR ``{"lsn": int, "updated_ms": int}``, written by atomic replace
(:meth:`wal.FileOps.write_file_atomic`), so independent consumers never
contend and a crash leaves either the old or the new value.
"""

from __future__ import annotations

import os
import re
import threading
import time

from . import codec
from .errors import CursorError
from .fileops import FileOps

__all__ = ["CursorStore", "valid_cursor_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SUFFIX = ".cursor"


def valid_cursor_name(name: str) -> bool:
    return bool(_NAME.match(name))


class CursorStore:
    """Durable named cursors of one log directory. Thread-safe."""

    def __init__(self, log_path: str, ops: FileOps):
        self._dir = os.path.join(log_path, "cursors")
        self._ops = ops
        self._lock = threading.Lock()

    def _path(self, name: str) -> str:
        if not valid_cursor_name(name):
            raise CursorError(
                f"invalid cursor name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return os.path.join(self._dir, name + _SUFFIX)

    def list(self) -> dict[str, int]:
        """All cursors, name -> LSN."""
        if not os.path.isdir(self._dir):
            return {}
        out = {}
        for fname in sorted(os.listdir(self._dir)):
            if fname.endswith(_SUFFIX) and not fname.startswith("."):
                name = fname[: -len(_SUFFIX)]
                out[name] = self.get(name)
        return out

    def get(self, name: str) -> int:
        """The cursor's LSN. Raises CursorError if there is no such cursor."""
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                value = codec.loads(f.read())
        except FileNotFoundError:
            raise CursorError(f"no cursor named {name!r}") from None
        except Exception as exc:
            raise CursorError(f"cursor file {path} is unreadable: {exc}") from exc
        return int(value["lsn"])

    def set(self, name: str, lsn: int, *, allow_backwards: bool = False) -> None:
        """Store ``lsn`` durably under ``name``; returns once it is on disk.

        Raises:
            CursorError: bad name, negative LSN, or the move would go backwards
                (pass ``allow_backwards=True`` to rewind on purpose).
        """
        if lsn < 0:
            raise CursorError("cursor LSN must be >= 0")
        path = self._path(name)
        with self._lock:
            if not allow_backwards:
                try:
                    current = self.get(name)
                except CursorError:
                    current = None
                if current is not None and lsn < current:
                    raise CursorError(
                        f"cursor {name!r} is at LSN {current}; refusing to move it back to {lsn} "
                        f"(rewind explicitly if that is what you mean)"
                    )
            if not os.path.isdir(self._dir):
                try:
                    self._ops.mkdir(self._dir)  # through FileOps, like every durable change
                except FileExistsError:
                    pass
                self._ops.fsync_dir(os.path.dirname(self._dir))
            self._ops.write_file_atomic(path, codec.dumps({"lsn": lsn, "updated_ms": int(time.time() * 1000)}))

    def drop(self, name: str) -> None:
        """Remove a cursor. Raises CursorError if there is none."""
        path = self._path(name)
        with self._lock:
            try:
                self._ops.unlink(path)
            except FileNotFoundError:
                raise CursorError(f"no cursor named {name!r}") from None
            self._ops.fsync_dir(self._dir)

    def minimum(self) -> int | None:
        """The lowest cursor LSN, or None when there are no cursors."""
        values = self.list().values()
        return min(values) if values else None
