"""The one atomic replace (specs/log-format.md section 1): FileOps.write_file_atomic / open_atomic.

* Power loss at every step (the CrashRecorder model: every tree a crash
  could leave) shows the old contents or the new, never a mix, and the new
  once the call returned.
* A failure injected at each step leaves the old contents (the new ones
  when only the final directory fsync failed); the next replace succeeds.
* Files are created with the mode asked, the temporary file too, from its
  first byte: a secret is never readable by others.
"""

import errno
import os
import stat

import pytest

import wal
from engine.replication.secret import create_secret, load_secret
from tests.support.helpers import CrashRecorder, SimulatedCrash

OLD = b"old contents\n" * 3
NEW = b"new contents, longer than the old ones\n" * 5
STEPS = ["create_exclusive", "write_all", "fdatasync", "close", "rename", "fsync_dir"]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _contents_after_each_crash(root, write) -> list[tuple[int, str, bytes | None]]:
    """Run ``write(recorder)`` on a CrashRecorder over ``root``; every post-crash content of ``f``."""
    rec = CrashRecorder(str(root / "d"))
    write(rec)
    seen = []
    for point in range(rec.op_count + 1):
        for n, state in enumerate(rec.crash_states(point)):
            dest = state.materialise(str(root / f"crash-{point}-{n}"))
            path = os.path.join(dest, "f")
            seen.append((point, state.description, open(path, "rb").read() if os.path.exists(path) else None))
    return seen


@pytest.mark.parametrize("existing", [True, False], ids=["replace", "create"])
def test_a_crash_at_any_step_leaves_the_old_file_or_the_new(tmp_path, existing):
    (tmp_path / "d").mkdir()
    if existing:
        (tmp_path / "d" / "f").write_bytes(OLD)
    seen = _contents_after_each_crash(tmp_path, lambda rec: rec.write_file_atomic(str(tmp_path / "d" / "f"), NEW))
    before = OLD if existing else None
    assert {c for _, _, c in seen} == {before, NEW}  # both occur, nothing else does
    last = max(p for p, _, _ in seen)
    assert {c for p, _, c in seen if p == last} == {NEW}  # durable once the call returned


def test_a_crash_while_streaming_leaves_the_old_file_or_the_whole_new_one(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(OLD)

    def stream(rec):
        with rec.open_atomic(str(tmp_path / "d" / "f")) as f:
            for i in range(0, len(NEW), 40):
                f.write(NEW[i:i + 40])
        assert f.bytes_written == len(NEW)

    seen = _contents_after_each_crash(tmp_path, stream)
    assert {c for _, _, c in seen} == {OLD, NEW}


class FailAt(wal.FileOps):
    """Real file operations; the first call of ``step`` raises EIO (after doing nothing)."""

    def __init__(self, step: str):
        self.step = step
        self.failed = False

    def _maybe_fail(self, name: str) -> None:
        if name == self.step and not self.failed:
            self.failed = True
            raise OSError(errno.EIO, f"injected EIO in {name}")

    def create_exclusive(self, path, mode=wal.fileops.DEFAULT_FILE_MODE):
        self._maybe_fail("create_exclusive")
        return super().create_exclusive(path, mode)

    def write_all(self, fd, data):
        self._maybe_fail("write_all")
        super().write_all(fd, data)

    def fdatasync(self, fd):
        self._maybe_fail("fdatasync")
        super().fdatasync(fd)

    def close(self, fd):
        super().close(fd)  # the fd is gone either way, as with close(2)
        self._maybe_fail("close")

    def rename(self, src, dst):
        self._maybe_fail("rename")
        super().rename(src, dst)

    def fsync_dir(self, path):
        self._maybe_fail("fsync_dir")
        super().fsync_dir(path)


@pytest.mark.parametrize("step", STEPS)
def test_a_failure_at_each_step_leaves_the_old_file(tmp_path, step):
    path = tmp_path / "f"
    path.write_bytes(OLD)
    ops = FailAt(step)
    with pytest.raises(OSError, match="injected"):
        ops.write_file_atomic(str(path), NEW)
    assert ops.failed
    assert path.read_bytes() == (NEW if step == "fsync_dir" else OLD)  # renamed, not yet durable: raised
    left = sorted(os.listdir(tmp_path))
    assert left in (["f"], [".f.tmp", "f"])  # a failed step keeps the temporary file (LOG-2: removed later)
    ops.write_file_atomic(str(path), NEW + b"again")  # the next replace removes it
    assert path.read_bytes() == NEW + b"again" and os.listdir(tmp_path) == ["f"]


def test_an_exception_inside_open_atomic_aborts(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(OLD)
    with pytest.raises(RuntimeError):
        with wal.OS_FILEOPS.open_atomic(str(path)) as f:
            f.write(NEW)
            raise RuntimeError("the source of the data failed")
    assert path.read_bytes() == OLD and os.listdir(tmp_path) == ["f"]
    with pytest.raises(ValueError, match="is over"):
        f.write(b"more")


def test_a_leftover_temporary_file_is_replaced(tmp_path):
    (tmp_path / ".f.tmp").write_bytes(b"an interrupted replace")
    wal.OS_FILEOPS.write_file_atomic(str(tmp_path / "f"), NEW)
    assert os.listdir(tmp_path) == ["f"] and (tmp_path / "f").read_bytes() == NEW


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.usefixtures("umask_022")
def test_files_get_the_mode_asked(tmp_path):
    wal.OS_FILEOPS.write_file_atomic(str(tmp_path / "plain"), b"x")
    assert _mode(tmp_path / "plain") == 0o644
    wal.OS_FILEOPS.write_file_atomic(str(tmp_path / "secret"), b"x", mode=0o600)
    assert _mode(tmp_path / "secret") == 0o600
    wal.OS_FILEOPS.write_file_atomic(str(tmp_path / "plain"), b"y", mode=0o600)  # replacing changes the mode
    assert _mode(tmp_path / "plain") == 0o600


class ModeSpy(wal.FileOps):
    """Records the temporary file's mode before its first byte is written."""

    modes: list

    def write_all(self, fd, data):
        self.modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        super().write_all(fd, data)


@pytest.mark.usefixtures("umask_022")
def test_the_temporary_file_has_the_mode_from_its_first_byte(tmp_path):
    spy = ModeSpy()
    spy.modes = []
    spy.write_file_atomic(str(tmp_path / "secret"), b"s" * 64, mode=0o600)
    assert spy.modes == [0o600]


@pytest.mark.usefixtures("umask_022")
def test_create_secret_writes_a_0600_file_through_the_helper(tmp_path, monkeypatch):
    calls = []
    real = wal.FileOps.write_file_atomic

    def spy(self, path, data, *, mode=wal.fileops.DEFAULT_FILE_MODE):
        calls.append((path, mode))
        return real(self, path, data, mode=mode)

    monkeypatch.setattr(wal.FileOps, "write_file_atomic", spy)
    path = tmp_path / "replication.secret"
    secret = create_secret(path)
    assert calls == [(str(path), 0o600)]
    assert _mode(path) == 0o600 and load_secret(path) == secret
    assert os.listdir(tmp_path) == ["replication.secret"]


def test_LOG_2_a_crash_while_creating_a_segment_leaves_no_segment_or_a_whole_one(tmp_path):
    (tmp_path / "d").mkdir()
    rec = CrashRecorder(str(tmp_path / "d"))
    header = wal.format.SegmentHeader(wal.FORMAT_VERSION, b"\x01" * 16, 7, b"\x02" * 32)
    rec.crash_after(4)  # create, write, sync, rename: the directory fsync never happens
    with pytest.raises(SimulatedCrash):
        wal.segment.create_segment(rec, str(tmp_path / "d"), header)
    name = wal.segment.segment_name(7)
    for n, state in enumerate(rec.crash_states()):
        dest = state.materialise(str(tmp_path / f"crash-{n}"))
        if os.path.exists(os.path.join(dest, name)):
            assert wal.segment.read_segment_header(os.path.join(dest, name)) == header
