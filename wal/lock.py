"""The writer lock of a log directory (LOG-14).

At most one holder at a time: the process appending (:meth:`wal.Log.open`)
or the one cutting the log (:func:`wal.repair`, ``walctl repair``). The lock
is ``flock(LOCK, LOCK_EX | LOCK_NB)`` on the empty file ``LOCK`` in the log
directory. The kernel drops it when its holder exits, ``kill -9`` included,
so a crash never leaves a log locked. ``flock`` locks belong to an open file
description: two holders in one process exclude each other too.

This module is the only code that takes or tests the lock; everything else
goes through :class:`LogLock` and :func:`log_in_use`.
"""

from __future__ import annotations

import fcntl
import os

from .errors import LogLockedError, WalError

__all__ = ["LOCK_FILE", "LogLock", "log_in_use"]

LOCK_FILE = "LOCK"


class LogLock:
    """The exclusive writer lock of one log directory, held from :meth:`acquire`
    (or ``with``) to :meth:`release`.

    Args:
        log_dir: the log directory (``NAME.wal``); ``LOCK`` is created in it
            if missing (mode 0644, empty: its bytes never change).
        purpose: what the holder is about to do, in the words of the error
            message ("opening it for writing", "repairing it").

    Raises (from :meth:`acquire`):
        LogLockedError: another holder has the lock; the message names its
            process when the system tells (Linux ``/proc/locks``).
    """

    def __init__(self, log_dir: str, *, purpose: str = "opening it for writing"):
        self.log_dir = log_dir
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True between a successful :meth:`acquire` and :meth:`release`."""
        return self._fd is not None

    def acquire(self) -> "LogLock":
        """Take the lock without waiting; returns self."""
        if self._fd is not None:
            raise WalError(f"the writer lock of {self.log_dir} is already held by this LogLock")
        path = os.path.join(self.log_dir, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            os.close(fd)
            raise LogLockedError(self.log_dir, pid, self.purpose, _command_of(pid),
                                 in_this_process=pid == os.getpid()) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "LogLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def log_in_use(log_dir: str) -> bool:
    """Whether some holder has ``log_dir``'s writer lock right now.

    Read-only: creates nothing when ``LOCK`` is missing (then no one holds
    it). The test takes the lock for an instant and drops it at once, so a
    writer opening the log in that instant is refused as by any holder.
    """
    try:
        fd = os.open(os.path.join(log_dir, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops our lock, if we took it
    return False


def _holder_pid(fd: int) -> int | None:
    """The process holding an ``flock`` on ``fd``'s file, from ``/proc/locks``
    (Linux); None where the system does not say.

    A line is ``N: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF``. Some
    file systems (btrfs subvolumes) list another device number than
    ``fstat`` gives: then the one FLOCK line of the inode is taken.
    """
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    try:
        with open("/proc/locks") as f:
            lines = f.readlines()
    except OSError:
        return None
    exact, same_inode = [], []
    for line in lines:
        fields = line.split()  # a waiter's line reads "N: -> FLOCK ...": fields[1] is "->"
        if len(fields) < 6 or fields[1] != "FLOCK" or not fields[4].isdigit():
            continue
        dev, _, inode = fields[5].rpartition(":")
        if inode == str(st.st_ino):
            (exact if dev == device else same_inode).append(int(fields[4]))
    pids = exact or (same_inode if len(same_inode) == 1 else [])
    return pids[0] if pids and pids[0] > 0 else None


def _command_of(pid: int | None) -> str | None:
    """The command line of process ``pid`` (``/proc/PID/cmdline``), shortened; None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return None
    args = [os.path.basename(a) if i == 0 else a
            for i, a in enumerate(raw.decode(errors="replace").split("\0")) if a]
    text = " ".join(" ".join(args).split())  # one line: arguments may hold newlines
    return (text[:77] + "...") if len(text) > 80 else (text or None)
