"""Test helpers for the write-ahead log: fault-injecting and crash-simulating
file layers, byte surgery on segments, and the child process used by the
``kill -9`` and ``strace`` tests.

Crash simulation (FAULTS.md D8, the ALICE / CrashMonkey idea)
--------------------------------------------------------------
:class:`CrashRecorder` is a :class:`wal.FileOps` that performs every
operation for real *and* records it. From the record, :func:`crash_states`
rebuilds every directory tree a power loss at a given point could leave:

* file data is durable only up to the file's last ``fdatasync`` (or the
  synced ``truncate``); writes after it may survive as any prefix, the last
  surviving write torn at any byte, or with a zero-filled sector-sized hole
  (the file size reached the disk, the data did not);
* directory operations (create, mkdir, rename, unlink) reach the disk in the
  order they were made (as a journalling file system commits them); any
  prefix of the not-yet-forced ones may survive; ``fsync_dir(d)`` forces the
  prefix up to the last operation that changed ``d``.

The model only sees what goes through :class:`wal.FileOps`: a durable write
that bypasses it makes :class:`CrashRecorder` fail loudly (``ModelError``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Iterator

import wal
from wal.format import FRAME_HEADER_SIZE, SEGMENT_HEADER_SIZE
from wal.segment import list_segments

from tests.support import ROOT


# ---------------------------------------------------------------------------
# Small utilities


def body_of(i: int) -> bytes:
    """The message body of record ``i`` of :func:`make_log`."""
    return f"Subject: message {i}\r\n\r\nHello number {i}.\r\n".encode()


def make_log(path, count: int = 40, *, segment_max_bytes: int = 2048) -> str:
    """A closed log of ``count`` CBOR-map records, one append (one batch) each, several segments."""
    path = str(path)
    with wal.Log.create(path, segment_max_bytes=segment_max_bytes) as log:
        for i in range(1, count + 1):
            log.append(7, wal.codec.dumps({"mailbox": "INBOX", "uid": i, "body": body_of(i)}))
    return path


def assert_no_traceback(output: str | bytes, args=(), what: str = "walctl") -> None:
    """Fail the test when a ``walctl`` process showed a traceback.

    Every ``walctl`` failure is one ``Error:`` line; a traceback only with
    ``--debug`` (in ``args``). The helpers that run ``walctl`` as a process
    call this on its stderr (or its log file), so every failure the suite
    provokes is checked.
    """
    if isinstance(output, bytes):
        output = output.decode("utf-8", errors="replace")
    if "--debug" in [str(a) for a in args]:
        return
    assert "Traceback (most recent call last)" not in output, (
        f"{what} {' '.join(map(str, args))} printed a traceback:\n{output[-4000:]}")


def seg_paths(log_dir: str) -> list[str]:
    """Absolute paths of the log's segment files, oldest first."""
    return [os.path.join(log_dir, name) for _, name in list_segments(log_dir)]


def frame_offsets(seg_path: str) -> list[tuple[int, int, int]]:
    """(offset, size, lsn) of every complete valid-looking frame of a segment."""
    return [(off, fh.frame_size, fh.lsn) for off, fh, _ in wal.segment.iter_frames(seg_path, SEGMENT_HEADER_SIZE)]


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def flip_bit(path: str, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def truncate_file(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def append_bytes(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def all_records(path: str) -> list[wal.Record]:
    """Every record of the log at ``path`` through an independent reader."""
    reader = wal.LogReader(path)
    return list(reader.records(reader.first_lsn()))


def payload_for(seed: int, size: int) -> bytes:
    """Deterministic, cheap pseudo-random payload bytes."""
    import random

    return random.Random(seed).randbytes(size)


# ---------------------------------------------------------------------------
# Fault injection


class FaultyFileOps(wal.FileOps):
    """Real file operations with injected failures, counted per kind.

    Args:
        fail_fdatasync_at: the 1-based number of the ``fdatasync`` call that
            raises ``OSError(fdatasync_errno)`` (the real call is skipped,
            as strace's injection does).
        fail_write_at: the 1-based number of the ``write_all`` call that
            writes ``short_write`` bytes of its data and then raises
            ``OSError(write_errno)`` (a disk filling up mid-write).
    """

    def __init__(
        self,
        *,
        fail_fdatasync_at: int | None = None,
        fdatasync_errno: int = errno.EIO,
        fail_write_at: int | None = None,
        write_errno: int = errno.ENOSPC,
        short_write: int = 0,
    ):
        self.fail_fdatasync_at = fail_fdatasync_at
        self.fdatasync_errno = fdatasync_errno
        self.fail_write_at = fail_write_at
        self.write_errno = write_errno
        self.short_write = short_write
        self.fdatasync_calls: list[int] = []  # fds, in call order (failed one included)
        self.write_calls = 0
        self.failed_fd: int | None = None
        self.lock = threading.Lock()

    def fdatasync(self, fd: int) -> None:
        with self.lock:
            self.fdatasync_calls.append(fd)
            n = len(self.fdatasync_calls)
        if n == self.fail_fdatasync_at:
            self.failed_fd = fd
            raise OSError(self.fdatasync_errno, os.strerror(self.fdatasync_errno) + " (injected)")
        super().fdatasync(fd)

    def write_all(self, fd: int, data: bytes) -> None:
        with self.lock:
            self.write_calls += 1
            n = self.write_calls
        if n == self.fail_write_at:
            if self.short_write:
                super().write_all(fd, bytes(data[: self.short_write]))
            raise OSError(self.write_errno, os.strerror(self.write_errno) + " (injected)")
        super().write_all(fd, data)


# ---------------------------------------------------------------------------
# Crash simulation


class SimulatedCrash(Exception):
    """The recorder 'lost power': this and every later operation fails."""


class ModelError(AssertionError):
    """The code did something durable that bypassed FileOps (or outside the root)."""


@dataclass
class _Op:
    kind: str  # create mkdir rename unlink fsync_dir write sync truncate
    path: str = ""
    dst: str = ""
    fid: int = -1
    offset: int = 0
    data: bytes = b""
    size: int = 0


@dataclass
class _FileState:
    durable: bytearray
    pending: list[_Op] = field(default_factory=list)

    def current(self) -> bytes:
        return bytes(_apply_data(bytearray(self.durable), self.pending))


def _apply_data(content: bytearray, ops: list[_Op]) -> bytearray:
    for op in ops:
        if op.kind == "write":
            end = op.offset + len(op.data)
            if len(content) < op.offset:
                content.extend(bytes(op.offset - len(content)))
            content[op.offset:end] = op.data
        elif op.kind == "truncate":
            del content[op.size:]
            if len(content) < op.size:
                content.extend(bytes(op.size - len(content)))
    return content


class _Model:
    """The file-system state after a sequence of recorded operations."""

    def __init__(self, initial_tree: dict, initial_files: dict[int, bytes]):
        self.initial_tree = initial_tree
        self.files = {fid: _FileState(bytearray(data)) for fid, data in initial_files.items()}
        self.meta: list[_Op] = []
        self.durable_meta = 0
        self.live = _copy_tree(initial_tree)

    def apply(self, op: _Op) -> None:
        if op.kind in ("create", "mkdir", "rename", "unlink"):
            if op.kind == "create":
                self.files[op.fid] = _FileState(bytearray())
            _apply_meta(self.live, op)
            self.meta.append(op)
        elif op.kind == "fsync_dir":
            for i in range(len(self.meta) - 1, self.durable_meta - 1, -1):
                if op.path in _touched_dirs(self.meta[i]):
                    self.durable_meta = i + 1
                    break
        elif op.kind == "write":
            self.files[op.fid].pending.append(op)
        elif op.kind == "sync":
            st = self.files[op.fid]
            st.durable = bytearray(st.current())
            st.pending = []
        elif op.kind == "truncate":  # FileOps.truncate syncs
            st = self.files[op.fid]
            st.pending.append(op)
            st.durable = bytearray(st.current())
            st.pending = []

    def tree(self, meta_count: int) -> dict:
        t = _copy_tree(self.initial_tree)
        for op in self.meta[:meta_count]:
            _apply_meta(t, op)
        return t


def _parts(rel: str) -> list[str]:
    return [p for p in rel.split("/") if p]


def _copy_tree(t: dict) -> dict:
    return {k: (_copy_tree(v) if isinstance(v, dict) else v) for k, v in t.items()}


def _lookup_parent(tree: dict, rel: str) -> tuple[dict, str]:
    parts = _parts(rel)
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            raise ModelError(f"parent directory of {rel!r} is unknown to the model")
        node = nxt
    return node, parts[-1]


def _apply_meta(tree: dict, op: _Op) -> None:
    parent, name = _lookup_parent(tree, op.path)
    if op.kind == "create":
        parent[name] = op.fid
    elif op.kind == "mkdir":
        parent[name] = {}
    elif op.kind == "unlink":
        parent.pop(name, None)
    elif op.kind == "rename":
        node = parent.pop(name)
        dparent, dname = _lookup_parent(tree, op.dst)
        dparent[dname] = node


def _touched_dirs(op: _Op) -> set[str]:
    dirs = {os.path.dirname(op.path) or "."}
    if op.kind == "rename":
        dirs.add(os.path.dirname(op.dst) or ".")
    return dirs


@dataclass
class CrashState:
    """One directory tree a power loss could leave. ``materialise`` writes it."""

    description: str
    tree: dict
    contents: dict[int, bytes]

    def materialise(self, dest: str) -> str:
        """Write the tree as the contents of the (new or empty) directory ``dest``."""
        os.makedirs(dest, exist_ok=True)
        self._write(dest, self.tree)
        return dest

    def _write(self, path: str, node: dict) -> None:
        for name, child in node.items():
            p = os.path.join(path, name)
            if isinstance(child, dict):
                os.makedirs(p, exist_ok=True)
                self._write(p, child)
            else:
                with open(p, "wb") as f:
                    f.write(self.contents[child])


class CrashRecorder(wal.FileOps):
    """A FileOps that does everything for real and records it for crash states.

    Everything the log makes durable must happen under ``root``; files that
    exist there when the recorder starts count as durable. ``op_count`` is
    the number of operations recorded so far: a *crash point*.
    ``crash_after(n)`` makes the recorder lose power after ``n`` more
    operations: from then on every operation raises :class:`SimulatedCrash`
    and changes nothing.
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.ops: list[_Op] = []
        self._lock = threading.RLock()
        self._fd_fid: dict[int, int] = {}
        self._fd_append: dict[int, bool] = {}
        tree, files = self._snapshot()
        self._initial_tree = tree
        self._initial_files = files
        self._next_fid = max(files, default=0) + 1
        self._live = _Model(tree, files)
        self._crash_at: int | None = None
        self.crashed = False

    # -- bookkeeping -------------------------------------------------------

    def _snapshot(self) -> tuple[dict, dict[int, bytes]]:
        files: dict[int, bytes] = {}
        counter = [0]

        def walk(path: str) -> dict:
            node = {}
            for name in sorted(os.listdir(path)):
                p = os.path.join(path, name)
                if os.path.isdir(p):
                    node[name] = walk(p)
                else:
                    counter[0] += 1
                    with open(p, "rb") as f:
                        files[counter[0]] = f.read()
                    node[name] = counter[0]
            return node

        return walk(self.root), files

    def _rel(self, path: str) -> str:
        path = os.path.abspath(path)
        if path != self.root and not path.startswith(self.root + os.sep):
            raise ModelError(f"{path} is outside the recorded root {self.root}")
        return os.path.relpath(path, self.root) if path != self.root else "."

    @property
    def op_count(self) -> int:
        return len(self.ops)

    def crash_after(self, n: int) -> None:
        """Lose power once ``n`` more operations have been recorded."""
        with self._lock:
            self._crash_at = len(self.ops) + n
            if n <= 0:
                self.crashed = True

    def _check(self) -> None:
        if self.crashed:
            raise SimulatedCrash("the simulated machine lost power")

    def _record(self, op: _Op) -> None:
        self._live.apply(op)
        self.ops.append(op)
        if self._crash_at is not None and len(self.ops) >= self._crash_at:
            self.crashed = True

    def _fid_of_path(self, rel: str) -> int:
        parent, name = _lookup_parent(self._live.live, rel)
        fid = parent.get(name)
        if not isinstance(fid, int):
            raise ModelError(f"{rel!r} is not a file known to the model")
        return fid

    # -- FileOps -----------------------------------------------------------

    def open_append(self, path: str) -> int:
        with self._lock:
            self._check()
            fid = self._fid_of_path(self._rel(path))
            fd = super().open_append(path)
            self._fd_fid[fd] = fid
            return fd

    def create_exclusive(self, path: str, mode: int = wal.fileops.DEFAULT_FILE_MODE) -> int:
        with self._lock:
            self._check()
            rel = self._rel(path)
            _lookup_parent(self._live.live, rel)  # parent must be known
            fd = super().create_exclusive(path, mode)
            fid = self._next_fid
            self._next_fid += 1
            self._fd_fid[fd] = fid
            self._record(_Op("create", path=rel, fid=fid))
            return fd

    def write_all(self, fd: int, data: bytes) -> None:
        with self._lock:
            self._check()
            fid = self._fd_fid[fd]
            super().write_all(fd, data)
            end = os.lseek(fd, 0, os.SEEK_CUR)
            self._record(_Op("write", fid=fid, offset=end - len(data), data=bytes(data)))

    def fdatasync(self, fd: int) -> None:
        with self._lock:
            self._check()
            super().fdatasync(fd)
            self._record(_Op("sync", fid=self._fd_fid[fd]))

    def close(self, fd: int) -> None:
        with self._lock:
            self._fd_fid.pop(fd, None)
            super().close(fd)

    def rename(self, src: str, dst: str) -> None:
        with self._lock:
            self._check()
            op = _Op("rename", path=self._rel(src), dst=self._rel(dst))
            super().rename(src, dst)
            self._record(op)

    def unlink(self, path: str) -> None:
        with self._lock:
            self._check()
            rel = self._rel(path)
            super().unlink(path)  # raises FileNotFoundError before recording
            self._record(_Op("unlink", path=rel))

    def truncate(self, path: str, size: int) -> None:
        with self._lock:
            self._check()
            fid = self._fid_of_path(self._rel(path))
            super().truncate(path, size)
            self._record(_Op("truncate", fid=fid, size=size))

    def fsync_dir(self, path: str) -> None:
        with self._lock:
            self._check()
            rel = self._rel(path)
            super().fsync_dir(path)
            self._record(_Op("fsync_dir", path=rel))

    def mkdir(self, path: str) -> None:
        with self._lock:
            self._check()
            rel = self._rel(path)
            _lookup_parent(self._live.live, rel)
            super().mkdir(path)
            self._record(_Op("mkdir", path=rel))

    # -- crash states ------------------------------------------------------

    def model_at(self, point: int | None = None) -> _Model:
        m = _Model(self._initial_tree, self._initial_files)
        for op in self.ops[: self.op_count if point is None else point]:
            m.apply(op)
        return m

    def crash_states(self, point: int | None = None, *, max_cuts: int = 12) -> Iterator[CrashState]:
        """Every post-crash tree at crash point ``point`` (default: now).

        Yields, in order: the synced state ("only what was fsynced"); each
        prefix of the unforced directory operations; and, with all directory
        operations applied, each file's unsynced writes as a prefix with the
        last write torn at up to ``max_cuts`` byte positions (every byte when
        the write is short enough), all of them kept, and with a zero-filled
        512-byte hole.
        """
        point = self.op_count if point is None else point
        m = self.model_at(point)
        durable = {fid: bytes(st.durable) for fid, st in m.files.items()}
        yield CrashState(f"@{point}: synced only", m.tree(m.durable_meta), durable)
        for k in range(m.durable_meta + 1, len(m.meta) + 1):
            yield CrashState(f"@{point}: {k - m.durable_meta} unforced dir op(s)", m.tree(k), durable)
        full_tree = m.tree(len(m.meta))
        for fid, st in m.files.items():
            writes = [op for op in st.pending if op.kind == "write"]
            if not writes or len(writes) != len(st.pending):
                continue
            for j, w in enumerate(writes):
                for cut in _cut_points(len(w.data), max_cuts):
                    content = _apply_data(bytearray(st.durable), writes[:j] + [_Op("write", offset=w.offset, data=w.data[:cut])])
                    yield CrashState(f"@{point}: file {fid} write {j} torn at {cut}/{len(w.data)}", full_tree, {**durable, fid: bytes(content)})
            full = _apply_data(bytearray(st.durable), writes)
            yield CrashState(f"@{point}: file {fid} all {len(writes)} write(s)", full_tree, {**durable, fid: bytes(full)})
            last = writes[-1]
            if len(last.data) > 1:
                hole_at = (last.offset // 512) * 512
                holed = bytearray(full)
                start = max(hole_at, last.offset)
                holed[start:min(hole_at + 512, len(holed))] = bytes(min(hole_at + 512, len(holed)) - start)
                yield CrashState(f"@{point}: file {fid} last write with zero hole", full_tree, {**durable, fid: bytes(holed)})


def _cut_points(n: int, max_cuts: int) -> list[int]:
    """Byte positions to tear a write of ``n`` bytes at (``n`` excluded)."""
    if n <= max_cuts:
        return list(range(n))
    points = {0, 1, n - 1, FRAME_HEADER_SIZE - 1, FRAME_HEADER_SIZE, FRAME_HEADER_SIZE + 1, 28, 32}
    step = max(1, n // max(1, max_cuts - len(points)))
    points.update(range(0, n, step))
    return sorted(p for p in points if 0 <= p < n)


# ---------------------------------------------------------------------------
# The child process of the kill -9 / strace tests


CHILD_CODE = (
    "import sys; sys.path[:0] = [{root!r}]; from tests.support import helpers; helpers.child_main({args!r})"
)


def child_command(args: dict) -> list[str]:
    """argv that runs :func:`child_main` with ``args`` in a new interpreter."""
    return [sys.executable, "-c", CHILD_CODE.format(root=ROOT, args=json.dumps(args))]


def child_main(args_json: str) -> None:
    """Append from several threads, reporting each acknowledged record.

    Writes one JSON line per event to stdout (flushed at once, one ``write``
    per line, so a kill never splits a line the parent counts):
    ``{"ack": lsn, "hash": hex}`` after each append returns, ``{"error": name,
    "thread": i}`` when an append raises, and ``{"done": true}`` at the end.
    """
    args = json.loads(args_json)
    path = args["path"]
    threads = args.get("threads", 4)
    per_thread = args.get("per_thread", 1000)
    size = args.get("size", 100)
    after_error = args.get("after_error", False)
    if os.path.exists(path):
        log = wal.Log.open(path, segment_max_bytes=args.get("segment_max_bytes", 1 << 16))
    else:
        log = wal.Log.create(path, segment_max_bytes=args.get("segment_max_bytes", 1 << 16))
    out_lock = threading.Lock()
    fd = sys.stdout.fileno()

    def emit(obj: dict) -> None:
        line = (json.dumps(obj) + "\n").encode()
        with out_lock:
            os.write(fd, line)

    emit({"ready": True, "last_lsn": log.last_lsn})

    def worker(i: int) -> None:
        for n in range(per_thread):
            payload = payload_for(i * 1_000_003 + n, size)
            try:
                if n % 3 == 2:
                    acks = log.append_many([(7, payload), (8, payload[::-1])])
                else:
                    acks = [log.append(7, payload)]
            except wal.WalError as exc:
                emit({"error": type(exc).__name__, "thread": i, "message": str(exc)})
                if after_error:
                    try:
                        log.append(7, b"after")
                        emit({"after_error": "accepted"})
                    except wal.WalError as exc2:
                        emit({"after_error": type(exc2).__name__})
                return
            for a in acks:
                emit({"ack": a.lsn, "hash": a.hash.hex()})

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    emit({"done": True, "failed": log.failed is not None})
    log.close()


def read_json_lines(data: bytes) -> list[dict]:
    out = []
    for line in data.splitlines():
        line = line.strip()
        if line:
            out.append(json.loads(line))
    return out


def run_child(args: dict, prefix: list[str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run((prefix or []) + child_command(args), capture_output=True, timeout=timeout)


def frame_at(path: str, offset: int) -> tuple[int, int, int]:
    """(payload_len, lsn, batch_back) of the frame header at ``offset``."""
    with open(path, "rb") as f:
        f.seek(offset)
        head = f.read(28)
    payload_len, lsn, _epoch, _type, _flags, batch_back = struct.unpack("<IQQHHI", head)
    return payload_len, lsn, batch_back


def copy_log(src: str, dst: str) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("LOCK"))
    return dst
