"""The processes of a torture run: one node each, and the features the host offers for faults."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys

from engine.cluster.control import ControlClient, ControlError

__all__ = ["HOST", "WALCTL", "NodeProc", "Features", "detect_features", "SmallDisk", "walctl"]

HOST = "127.0.0.1"
WALCTL = [sys.executable, "-m", "tools"]
FAKETIME_LIBS = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
                 "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def walctl(args: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``walctl ARGS`` to completion (a timeout is returned as exit status -1).

    Raises:
        RuntimeError: ``check`` and the command failed.
    """
    try:
        r = subprocess.run(WALCTL + args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        r = subprocess.CompletedProcess(exc.cmd, -1, "", f"timed out after {timeout} s: {exc.stderr or ''}")
    if check and r.returncode != 0:
        raise RuntimeError(f"walctl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


class NodeProc:
    """One node directory, the process running it (if any), and what is attached to it:
    an strace that injects errors, a libfaketime clock file."""

    def __init__(self, index: int, path: str, listen_port: int, lmtp_port: int, log_path: str):
        self.index = index
        self.name = f"n{index}"
        self.path = path
        self.listen_port = listen_port
        self.lmtp_port = lmtp_port
        self.log_path = log_path  # the process's stdout and stderr, every start appended
        self.proc: subprocess.Popen | None = None
        self.mode: str | None = None  # serve | follow
        self.stopped = False  # SIGSTOPped
        self.expected_down = True
        self.starts = 0
        self.tracer: subprocess.Popen | None = None  # strace attached
        self.clock_file: str | None = None
        self.clock_skewed = False  # its wall clock is (or may still be) jumped: set and cleared by the fault

    @property
    def control_path(self) -> str:
        return os.path.join(self.path, "control.sock")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        return f"<{self.name} {self.mode} pid={self.proc.pid if self.proc else None}>"

    def status(self, timeout: float = 5.0) -> dict | None:
        """The node's ``status`` over its control socket; None when it is down, stopped or does not answer."""
        if not self.alive() or self.stopped:
            return None
        try:
            with ControlClient.unix(self.control_path, timeout=timeout) as c:
                return c.call("status")
        except (OSError, ControlError, ValueError):
            return None

    def control(self, op: str, timeout: float = 10.0, **args):
        """One control request.

        Raises:
            OSError, ControlError, ValueError: the node did not answer, or refused.
        """
        with ControlClient.unix(self.control_path, timeout=timeout) as c:
            return c.call(op, **args)

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def set_clock(self, offset: str) -> None:
        """Set the libfaketime offset of its wall clock (``+0``, ``-42m``); the library rereads it every second."""
        with open(self.clock_file, "w") as fh:
            fh.write(f"{offset}\n")

    def detach_tracer(self) -> None:
        if self.tracer is not None:
            with contextlib.suppress(ProcessLookupError):
                self.tracer.send_signal(signal.SIGTERM)  # strace detaches cleanly (SIGINT may be ignored)
            try:
                self.tracer.wait(15)
            except subprocess.TimeoutExpired:
                self.tracer.kill()
                self.tracer.wait()
            self.tracer = None

    def resume_and_signal(self, sig: int, *, wait_s: float) -> None:
        """SIGCONT (it may be stopped), then ``sig``, and wait up to ``wait_s`` for a live node to exit."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(wait_s)


class Features:
    """What the host lacks for some fault kinds: each attribute is the reason, or None."""

    def __init__(self):
        self.tmpfs: str | None = None
        self.strace: str | None = None
        self.faketime: str | None = None
        self.faketime_lib: str | None = None  # the library's path when it is installed

    def unavailable(self) -> dict[str, str]:
        """Fault kind -> why it cannot run here."""
        out = {}
        if self.tmpfs:
            out["disk-full"] = self.tmpfs
        if self.strace:
            out["fsync-error"] = self.strace
            out["write-error"] = self.strace
        if self.faketime:
            out["clock-jump"] = self.faketime
        return out


def detect_features() -> Features:
    f = Features()
    if os.geteuid() != 0:
        f.tmpfs = "needs root to mount a tmpfs"
    elif not shutil.which("mount"):
        f.tmpfs = "no mount command"
    if not shutil.which("strace"):
        f.strace = "strace is not installed (Debian package strace)"
    lib = next((p for p in FAKETIME_LIBS if os.path.exists(p)), None)
    if lib is None:
        f.faketime = "libfaketime is not installed (Debian package faketime)"
    f.faketime_lib = lib
    return f


class SmallDisk:
    """The 512 MiB tmpfs one node lives on, so that the disk-full fault can fill it
    with a ballast file (mounting needs root)."""

    def __init__(self, node: NodeProc):
        self.node = node
        self.mount_point: str | None = None
        self.ballast: str | None = None  # the ballast file while the disk is full

    def mount(self) -> str | None:
        """Mount the tmpfs on the node's (new) directory; the reason when that failed."""
        os.makedirs(self.node.path, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m,mode=0755", "tmpfs", self.node.path],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return f"mount -t tmpfs failed: {r.stderr.strip() or r.returncode}"
        self.mount_point = self.node.path
        return None

    @property
    def full(self) -> bool:
        return self.ballast is not None

    def fill(self, leave_bytes: int) -> None:
        """Allocate all but ``leave_bytes`` of the free space to the ballast file."""
        st = os.statvfs(self.mount_point)
        free = st.f_bavail * st.f_frsize
        self.ballast = os.path.join(self.mount_point, "ballast")
        fd = os.open(self.ballast, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, 0, max(1, free - leave_bytes))
        finally:
            os.close(fd)

    def empty(self) -> None:
        """Remove the ballast (if any)."""
        if self.ballast and os.path.exists(self.ballast):
            os.unlink(self.ballast)
        self.ballast = None

    def unmount(self) -> None:
        """Unmount, after copying the node's directory out and back in place, so a kept run directory is complete."""
        if not self.mount_point:
            return
        saved = self.mount_point + ".saved"
        with contextlib.suppress(OSError):
            shutil.copytree(self.mount_point, saved, symlinks=True,
                            ignore=shutil.ignore_patterns("control.sock", "ballast"))
        r = subprocess.run(["umount", self.mount_point], capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", self.mount_point], capture_output=True)
        if os.path.isdir(saved):
            with contextlib.suppress(OSError):
                os.rmdir(self.mount_point)
                os.rename(saved, self.mount_point)
        self.mount_point = None
