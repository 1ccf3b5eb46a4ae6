"""A FUSE file system that loses what was not fsynced (FAULTS.md D5).

Run as its own process::

    unshare -m --propagation private python tests/support/lazyfs.py BACKING MOUNTPOINT

It mounts MOUNTPOINT as a pass-through to the directory BACKING and prints
one JSON line per event on stdout (``{"event": "ready"}`` once mounted). Then
``echo crash > MOUNTPOINT/.lazyfs_ctl`` simulates a power loss: everything
not made durable is undone in BACKING, and every later operation on the
mount fails with EIO (the machine is "off": kill the processes using it and
unmount, or let the private mount namespace die with its last process).
``echo "crash-torn SEED" > ...`` keeps, for each file, a random prefix of its
unsynced writes, the first write not kept torn at a random byte, and a random
prefix of the unsynced name operations. BACKING then holds exactly what the
disk holds after that power loss, and the application can be reopened on it,
directly or through a fresh instance of this file system. The crash prints
``{"event": "crash", ...}`` with what it dropped, per file.

What is modelled
----------------
* **File data** (``write``, ``truncate``, ``O_TRUNC``): kept in memory, page
  by page, on top of the backing file, until ``fsync``/``fdatasync`` of that
  file, which replays the file's writes onto the backing file in order. Reads
  see the newest data, like the page cache. ``crash`` drops every unsynced
  write; ``crash-torn`` keeps per file a prefix of them in the order they
  were made (files are independent: the kernel orders nothing across files
  without fsync).
* **Names** (``create``, ``mkdir``, ``mknod`` of a socket or FIFO,
  ``unlink``, ``rmdir``, ``rename``): done on the backing directory at once
  (an unlinked or replaced file is moved to a hidden trash directory, so it
  can come back) and remembered in one ordered journal. ``fsync`` of a
  *directory* makes every journalled name operation so far durable, like the
  single ordered metadata journal of ext4 or XFS; a crash undoes the others,
  newest first: a created file or directory disappears with its data even if
  the file's data was fsynced, a renamed file goes back to its old name and
  the file it replaced comes back, an unlinked file comes back with its
  durable data. ``fsync`` of a *file* does not make its name durable (POSIX:
  fsync the directory). This is stricter than ext4, where a file's fsync
  also commits its directory entry.
* A clean unmount (no crash) makes everything durable.

What is not modelled
--------------------
* Reordering of writes *within* one file (a kept prefix is in write order),
  sector-granular tearing (a tear may fall on any byte), garbled bytes, lying
  devices, and I/O errors other than "the machine is off".
* A directory fsync commits all earlier name operations, also those in other
  directories (one journal); per-directory durability is not modelled.
* File metadata other than size (mode, owner, times) is passed through and
  never lost. Hard links, symlinks, device nodes, xattrs and ``fallocate``
  are not supported (ENOSYS or EPERM). ``flock`` and POSIX locks are left to
  the kernel, which is enough on one machine.
* No memory limit or eviction: unsynced data stays in this process until
  fsync. The backing directory itself is never fsynced: the simulated crash
  is what is tested, the real machine does not lose power.
* Single-threaded on purpose (``nothreads``): every operation, and the crash,
  is atomic with respect to the others.

No ``direct_io``: SQLite in WAL mode maps its ``-shm`` file, which needs the
kernel page cache. Without ``writeback_cache`` the kernel sends every
``write`` through to this process at once, so it always has the newest data;
after a crash the mount must not be reused (its page cache may hold lost
data) and the processes that used it must be killed.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import stat
import sys
from dataclasses import dataclass

from mfusepy import FUSE, FuseOSError, Operations

PAGE_BYTES = 4096
CTL_NAME = ".lazyfs_ctl"
TRASH_NAME = ".lazyfs-trash"


def emit(event: str, **fields) -> None:
    """One JSON line on stdout for the process that started us."""
    sys.stdout.write(json.dumps({"event": event, **fields}, sort_keys=True) + "\n")
    sys.stdout.flush()


@dataclass
class DataOp:
    """One unsynced write (``data`` set) or truncate (``data`` None) of a file."""

    seq: int
    offset: int  # the new size for a truncate
    data: bytes | None


class FileState:
    """A backing file's newest content: durable bytes plus unsynced pages.

    Invariant: ``valid <= size``; bytes below ``valid`` not in ``pages`` are
    the backing file's; bytes at or above ``valid`` not in ``pages`` are zero
    (a shrink made them disappear, a later growth reads zeros).
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.size = os.fstat(fd).st_size  # what readers see
        self.valid = self.size
        self.pages: dict[int, bytearray] = {}
        self.ops: list[DataOp] = []
        self.opens = 0

    def _backing_page(self, index: int) -> bytearray:
        start = index * PAGE_BYTES
        n = max(0, min(PAGE_BYTES, self.valid - start))
        data = os.pread(self.fd, n, start) if n else b""
        return bytearray(data.ljust(PAGE_BYTES, b"\0"))

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        if not self.pages and end <= self.valid:
            return os.pread(self.fd, end - offset, offset)
        out = bytearray()
        pos = offset
        while pos < end:
            index, within = divmod(pos, PAGE_BYTES)
            n = min(PAGE_BYTES - within, end - pos)
            page = self.pages.get(index)
            if page is None:
                page = self._backing_page(index)
            out += page[within:within + n]
            pos += n
        return bytes(out)

    def write(self, seq: int, offset: int, data: bytes) -> None:
        pos, done = offset, 0
        while done < len(data):
            index, within = divmod(pos, PAGE_BYTES)
            n = min(PAGE_BYTES - within, len(data) - done)
            page = self.pages.get(index)
            if page is None:
                page = self.pages[index] = self._backing_page(index)
            page[within:within + n] = data[done:done + n]
            pos += n
            done += n
        self.size = max(self.size, offset + len(data))
        self.ops.append(DataOp(seq, offset, bytes(data)))

    def truncate(self, seq: int, size: int) -> None:
        if size < self.size:
            for index in [i for i in self.pages if i * PAGE_BYTES >= size]:
                del self.pages[index]
            index, within = divmod(size, PAGE_BYTES)
            if within and index in self.pages:
                self.pages[index][within:] = bytes(PAGE_BYTES - within)
            self.valid = min(self.valid, size)
        self.size = size
        self.ops.append(DataOp(seq, size, None))

    def sync(self) -> None:
        """fsync: replay the unsynced operations onto the backing file."""
        for op in self.ops:
            apply_op(self.fd, op, None)
        self.ops.clear()
        self.pages.clear()
        backing = os.fstat(self.fd).st_size
        if backing != self.size:
            raise AssertionError(f"lazyfs: replay gave {backing} bytes, expected {self.size}")
        self.valid = self.size

    def unsynced_bytes(self) -> int:
        return sum(len(op.data) for op in self.ops if op.data is not None)


def apply_op(fd: int, op: DataOp, keep_bytes: int | None) -> None:
    """Write ``op`` to the backing file, only its first ``keep_bytes`` if given."""
    if op.data is None:
        os.ftruncate(fd, op.offset)
        return
    data = op.data if keep_bytes is None else op.data[:keep_bytes]
    view = memoryview(data)
    pos = op.offset
    while view:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n


@dataclass
class NameOp:
    """One journalled name operation; ``trash`` holds what it unlinked or replaced."""

    kind: str  # create | mkdir | unlink | rmdir | rename
    path: str  # backing path (the source for a rename)
    new_path: str | None = None
    trash: str | None = None


class LazyFS(Operations):
    """See the module docstring."""

    use_ns = True

    def __init__(self, backing: str):
        self.backing = os.path.realpath(backing)
        self.trash_dir = os.path.join(self.backing, TRASH_NAME)
        shutil.rmtree(self.trash_dir, ignore_errors=True)  # left by a killed earlier run: already durable
        os.mkdir(self.trash_dir)
        self.files: dict[int, FileState] = {}  # backing inode -> state
        self.handles: dict[int, int] = {}  # fh -> backing inode
        self.journal: list[NameOp] = []
        self.seq = 0
        self.next_fh = 1
        self.trash_seq = 0
        self.crashed = False
        self.stats = {"fsyncs": 0, "dir_fsyncs": 0, "writes": 0}

    # -- helpers ---------------------------------------------------------------

    def _path(self, path: str) -> str:
        if self.crashed:
            raise FuseOSError(errno.EIO)
        parts = path.strip("/").split("/")
        if parts and parts[0] in (TRASH_NAME, CTL_NAME):
            raise FuseOSError(errno.ENOENT)
        return os.path.join(self.backing, path.lstrip("/"))

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _to_trash(self, backing_path: str) -> str:
        self.trash_seq += 1
        target = os.path.join(self.trash_dir, str(self.trash_seq))
        os.rename(backing_path, target)
        return target

    def _state(self, backing_path: str) -> FileState:
        st = os.lstat(backing_path)
        if not stat.S_ISREG(st.st_mode):
            raise FuseOSError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL)
        fs = self.files.get(st.st_ino)
        if fs is None:
            fs = self.files[st.st_ino] = FileState(os.open(backing_path, os.O_RDWR | os.O_CLOEXEC))
        return fs

    def _handle(self, fs: FileState) -> int:
        fh = self.next_fh
        self.next_fh += 1
        ino = os.fstat(fs.fd).st_ino
        self.handles[fh] = ino
        fs.opens += 1
        return fh

    def _by_handle(self, fh: int) -> FileState:
        if self.crashed:
            raise FuseOSError(errno.EIO)
        try:
            return self.files[self.handles[fh]]
        except KeyError:
            raise FuseOSError(errno.EBADF) from None

    def _forget(self, trashed: str) -> None:
        """A name operation became durable: its trashed file is gone for good."""
        try:
            st = os.lstat(trashed)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(trashed)
            return
        fs = self.files.pop(st.st_ino, None)
        if fs is not None:
            os.close(fs.fd)
            for fh in [h for h, ino in self.handles.items() if ino == st.st_ino]:
                del self.handles[fh]
        os.unlink(trashed)

    # -- the crash -------------------------------------------------------------

    def crash(self, seed: int | None) -> dict:
        """Drop (or, with a seed, partly keep) everything not durable; returns what happened."""
        rng = random.Random(seed) if seed is not None else None
        files = {}
        dirty = sorted((fs for fs in self.files.values() if fs.ops), key=lambda f: f.ops[0].seq)
        for fs in dirty:
            kept, torn_bytes = 0, None
            if rng is not None:  # each file keeps a prefix of its own writes: no order between files
                kept = rng.randint(0, len(fs.ops))
                for op in fs.ops[:kept]:
                    apply_op(fs.fd, op, None)
                if kept < len(fs.ops) and fs.ops[kept].data is not None:
                    torn_bytes = rng.randrange(0, len(fs.ops[kept].data) + 1)
                    apply_op(fs.fd, fs.ops[kept], torn_bytes)
            files[self._name_of(fs)] = {
                "unsynced_ops": len(fs.ops), "kept_ops": kept, "torn_bytes": torn_bytes,
                "dropped_bytes": sum(len(op.data) for op in fs.ops[kept:] if op.data is not None)
                - (torn_bytes or 0)}
        journal_kept = rng.randint(0, len(self.journal)) if rng is not None else 0
        for op in self.journal[:journal_kept]:
            if op.trash is not None:
                self._forget(op.trash)
        undone = self.journal[journal_kept:]
        for op in reversed(undone):
            self._undo(op)
        for fs in self.files.values():
            os.close(fs.fd)
        self.files.clear()
        self.handles.clear()
        self.journal.clear()
        self.crashed = True
        shutil.rmtree(self.trash_dir, ignore_errors=True)  # everything in it was restored or forgotten
        return {
            "seed": seed,
            "files": files,
            "dropped_bytes": sum(f["dropped_bytes"] for f in files.values()),
            "name_ops_kept": journal_kept,
            "name_ops_undone": [f"{op.kind} {os.path.relpath(op.path, self.backing)}" for op in undone],
            **self.stats,
        }

    def _name_of(self, fs: FileState) -> str:
        ino = os.fstat(fs.fd).st_ino
        for base, dirs, names in os.walk(self.backing):
            for n in names:
                p = os.path.join(base, n)
                try:
                    if os.lstat(p).st_ino == ino:
                        return os.path.relpath(p, self.backing)
                except FileNotFoundError:
                    pass
        return f"(inode {ino}, unlinked)"

    def _undo(self, op: NameOp) -> None:
        if op.kind == "create":
            os.unlink(op.path)
        elif op.kind == "mkdir":
            shutil.rmtree(op.path)  # empty unless an undone op left something: then it goes too
        elif op.kind in ("unlink", "rmdir"):
            os.rename(op.trash, op.path)
        elif op.kind == "rename":
            os.rename(op.new_path, op.path)
            if op.trash is not None:
                os.rename(op.trash, op.new_path)

    def _control(self, data: bytes) -> None:
        words = data.decode("ascii", "replace").split()
        if not words:
            return
        if words[0] == "crash" and len(words) == 1:
            seed = None
        elif words[0] == "crash-torn" and len(words) == 2 and words[1].isdigit():
            seed = int(words[1])
        else:
            emit("error", detail=f"unknown control command {data!r}")
            raise FuseOSError(errno.EINVAL)
        if self.crashed:
            raise FuseOSError(errno.EIO)
        emit("crash", **self.crash(seed))

    # -- FUSE operations -----------------------------------------------------

    def init(self, path: str) -> None:
        emit("ready", backing=self.backing)

    def getattr(self, path: str, fh: int | None = None) -> dict:
        if path == "/" + CTL_NAME:
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 0}
        st = os.lstat(self._path(path))
        attrs = {key: getattr(st, key) for key in
                 ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks")}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        fs = self.files.get(st.st_ino)
        if fs is not None and stat.S_ISREG(st.st_mode):
            attrs["st_size"] = fs.size
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        names = os.listdir(self._path(path))
        if path == "/":
            names = [n for n in names if n != TRASH_NAME]
        return [".", "..", *names]

    def statfs(self, path: str) -> dict:
        sv = os.statvfs(self.backing)
        return {key: getattr(sv, key) for key in
                ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                 "f_frsize", "f_namemax")}

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._path(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._path(path), uid, gid)
        return 0

    def utimens(self, path: str, times=None) -> int:
        if times is None:
            os.utime(self._path(path))
        else:
            os.utime(self._path(path), ns=tuple(times))
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        p = self._path(path)
        os.mkdir(p, mode)
        self.journal.append(NameOp("mkdir", p))
        return 0

    def rmdir(self, path: str) -> int:
        p = self._path(path)
        if not os.path.isdir(p) or os.path.islink(p):
            raise FuseOSError(errno.ENOTDIR)
        if os.listdir(p):
            raise FuseOSError(errno.ENOTEMPTY)
        self.journal.append(NameOp("rmdir", p, trash=self._to_trash(p)))
        return 0

    def unlink(self, path: str) -> int:
        p = self._path(path)
        if os.path.isdir(p) and not os.path.islink(p):
            raise FuseOSError(errno.EISDIR)
        self.journal.append(NameOp("unlink", p, trash=self._to_trash(p)))
        return 0

    def rename(self, old: str, new: str) -> int:
        src, dst = self._path(old), self._path(new)
        src_st = os.lstat(src)
        trash = None
        try:
            dst_st = os.lstat(dst)
        except FileNotFoundError:
            dst_st = None
        if dst_st is not None:
            if (dst_st.st_dev, dst_st.st_ino) == (src_st.st_dev, src_st.st_ino):
                return 0
            if stat.S_ISDIR(src_st.st_mode) != stat.S_ISDIR(dst_st.st_mode):
                raise FuseOSError(errno.EISDIR if stat.S_ISDIR(dst_st.st_mode) else errno.ENOTDIR)
            if stat.S_ISDIR(dst_st.st_mode) and os.listdir(dst):
                raise FuseOSError(errno.ENOTEMPTY)
            if stat.S_ISDIR(src_st.st_mode) and (dst + "/").startswith(src + "/"):
                raise FuseOSError(errno.EINVAL)
            trash = self._to_trash(dst)
        try:
            os.rename(src, dst)
        except OSError:
            if trash is not None:
                os.rename(trash, dst)
            raise
        self.journal.append(NameOp("rename", src, new_path=dst, trash=trash))
        return 0

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        p = self._path(path)
        existed = os.path.lexists(p)
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (flags & os.O_EXCL), mode)
        os.close(fd)
        if not existed:
            self.journal.append(NameOp("create", p))
        fs = self._state(p)
        if flags & os.O_TRUNC and fs.size:
            fs.truncate(self._next_seq(), 0)
        return self._handle(fs)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        """Unix sockets and FIFOs (``bind`` of a control socket): a name, no data."""
        if not (stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode)):
            raise FuseOSError(errno.EPERM)
        p = self._path(path)
        os.mknod(p, mode, dev)
        self.journal.append(NameOp("create", p))
        return 0

    def open(self, path: str, flags: int) -> int:
        if path == "/" + CTL_NAME:
            return 0
        fs = self._state(self._path(path))
        if flags & os.O_TRUNC and fs.size:
            fs.truncate(self._next_seq(), 0)
        return self._handle(fs)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if fh == 0:
            return b""
        return self._by_handle(fh).read(offset, size)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        if fh == 0:
            self._control(data)
            return len(data)
        fs = self._by_handle(fh)
        fs.write(self._next_seq(), offset, data)
        self.stats["writes"] += 1
        return len(data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if path == "/" + CTL_NAME:
            return 0
        fs = self._by_handle(fh) if fh else self._state(self._path(path))
        fs.truncate(self._next_seq(), length)
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        if fh == 0 or self.crashed:
            return 0
        ino = self.handles.pop(fh, None)
        fs = self.files.get(ino) if ino is not None else None
        if fs is not None:
            fs.opens -= 1
            if fs.opens == 0 and not fs.ops:
                os.close(fs.fd)
                del self.files[ino]
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        if fh == 0:
            return 0
        self._by_handle(fh).sync()
        self.stats["fsyncs"] += 1
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        self._path(path)  # EIO after a crash
        for op in self.journal:
            if op.trash is not None:
                self._forget(op.trash)
        self.journal.clear()
        self.stats["dir_fsyncs"] += 1
        return 0

    def destroy(self, path: str) -> None:
        """A clean unmount makes everything durable, as on a real file system."""
        if not self.crashed:
            for fs in self.files.values():
                fs.sync()
            for op in self.journal:
                if op.trash is not None:
                    self._forget(op.trash)
            self.journal.clear()
            shutil.rmtree(self.trash_dir, ignore_errors=True)
        for fs in self.files.values():
            os.close(fs.fd)
        self.files.clear()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: lazyfs.py BACKING MOUNTPOINT", file=sys.stderr)
        return 2
    backing, mountpoint = argv
    try:
        FUSE(LazyFS(backing), mountpoint, foreground=True, nothreads=True, fsname="lazyfs",
             attr_timeout=0, entry_timeout=0, negative_timeout=0)
    except RuntimeError as exc:  # fuse_main's status when a signal ended the loop
        emit("unmounted", status=str(exc))
        return 0
    emit("unmounted", status="0")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
