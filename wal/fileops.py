"""The narrow file-system interface the log uses for every write.

Everything that makes a byte durable goes through a :class:`FileOps`, so tests
can substitute a recording layer that models power loss (keep only what was
fsynced) or inject failures. Reads use plain ``open()``.

:meth:`FileOps.write_file_atomic` (whole contents) and
:meth:`FileOps.open_atomic` (contents written piece by piece) are the one
*atomic replace* of the project (specs/log-format.md, section 1): write
``.NAME.tmp``, ``fdatasync`` it, rename it over ``NAME``, fsync the
directory. A crash leaves the old file or the new one, never a mix, and
the new file's directory entry is durable on return.
"""

from __future__ import annotations

import os

__all__ = ["FileOps", "OS_FILEOPS", "AtomicFile", "DEFAULT_FILE_MODE"]

DEFAULT_FILE_MODE = 0o644  # files of the log and the node; secrets ask for 0o600


class FileOps:
    """Real POSIX file operations. Subclass to inject faults."""

    def open_append(self, path: str) -> int:
        """Open an existing file for appending; returns an fd."""
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def create_exclusive(self, path: str, mode: int = DEFAULT_FILE_MODE) -> int:
        """Create ``path``, which must not exist, with ``mode`` (less the umask); returns an fd."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)

    def write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def truncate(self, path: str, size: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def open_atomic(self, path: str, *, mode: int = DEFAULT_FILE_MODE) -> "AtomicFile":
        """Start replacing ``path``: an :class:`AtomicFile` to write, then commit.

        The temporary file ``.NAME.tmp`` beside ``path`` is created with
        ``mode`` (less the umask) from its first byte, so a secret is never
        readable by others, not even half-written. A leftover temporary file
        of a failed or interrupted replace is removed first. One writer per ``path``
        at a time: callers serialise (the log's LOCK, the node's lock).
        """
        return AtomicFile(self, path, mode)

    def write_file_atomic(self, path: str, data: bytes, *, mode: int = DEFAULT_FILE_MODE) -> None:
        """Replace ``path`` with ``data`` atomically and durably (see :meth:`open_atomic`).

        Raises:
            OSError: from any step; ``path`` is then unchanged, unless only
                the final directory fsync failed (see :class:`AtomicFile`).
        """
        with self.open_atomic(path, mode=mode) as f:
            f.write(data)


class AtomicFile:
    """A file written under ``.NAME.tmp`` that replaces ``NAME`` on :meth:`commit`.

    Steps, each through the :class:`FileOps` that made it (so a fault or
    crash can be injected between any two): create the temporary file,
    ``write`` (any number of times), ``fdatasync``, close, rename over
    ``NAME``, fsync the directory. Until the rename ``NAME`` is untouched;
    after the directory fsync the new contents survive a crash.

    A step that fails closes the file and leaves ``.NAME.tmp`` where it is
    (nothing more is tried on a failing disk): it was never renamed, so
    never acknowledged, and the next replace of ``NAME`` or opening the log
    removes it (LOG-2). :meth:`abort` is the caller giving up: it closes and
    removes the temporary file. As a context manager it commits on a normal
    exit and aborts when the caller's code raises.
    """

    def __init__(self, ops: FileOps, path: str, mode: int):
        self._ops = ops
        self.path = path
        self.directory = os.path.dirname(path) or "."
        self.tmp = os.path.join(self.directory, "." + os.path.basename(path) + ".tmp")
        try:
            ops.unlink(self.tmp)  # left by a failed or interrupted replace: never acknowledged
        except FileNotFoundError:
            pass
        self._fd: int | None = ops.create_exclusive(self.tmp, mode)  # None once the write is over
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        """Append ``data`` to the temporary file."""
        fd = self._fd
        if fd is None:
            raise ValueError(f"{self.path}: the atomic write is over (committed, aborted or failed)")
        try:
            self._ops.write_all(fd, data)
        except BaseException:
            self._fail()
            raise
        self.bytes_written += len(data)

    def commit(self) -> None:
        """``fdatasync``, close, rename over the final name, fsync the directory.

        A failure before the rename leaves the final name as it was; a
        failure of the directory fsync leaves the new contents in place, not
        yet durable. Both raise.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            raise ValueError(f"{self.path}: the atomic write is over (committed, aborted or failed)")
        try:
            self._ops.fdatasync(fd)
        finally:
            self._ops.close(fd)
        self._ops.rename(self.tmp, self.path)
        self._ops.fsync_dir(self.directory)

    def abort(self) -> None:
        """Close and remove the temporary file; the final name is untouched.

        Does nothing once the write is over (committed, aborted or failed).
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self._ops.close(fd)
        finally:
            try:
                self._ops.unlink(self.tmp)
            except FileNotFoundError:
                pass

    def _fail(self) -> None:
        """A step failed: close the file, keep the temporary file (see the class docstring)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                self._ops.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


OS_FILEOPS = FileOps()
