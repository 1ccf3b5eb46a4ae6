"""The narrow file-system interface the log uses for every write.

Everything that makes a byte durable goes through a :class:`FileOps`, so tests
can substitute a recording layer that models power loss (keep only what was
fsynced) or inject failures. Reads use plain ``open()``.
"""

from __future__ import annotations

import os

__all__ = ["FileOps", "OS_FILEOPS"]


class FileOps:
    """Real POSIX file operations. Subclass to inject faults."""

    def open_append(self, path: str) -> int:
        """Open an existing file for appending; returns an fd."""
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def create_exclusive(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

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

    def write_file_atomic(self, path: str, data: bytes) -> None:
        """Replace ``path`` with ``data``: temp file, fdatasync, rename, fsync dir."""
        directory = os.path.dirname(path) or "."
        tmp = os.path.join(directory, "." + os.path.basename(path) + ".tmp")
        try:
            self.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = self.create_exclusive(tmp)
        try:
            self.write_all(fd, data)
            self.fdatasync(fd)
        finally:
            self.close(fd)
        self.rename(tmp, path)
        self.fsync_dir(directory)


OS_FILEOPS = FileOps()
