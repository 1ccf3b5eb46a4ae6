"""Fuzzing the record decoder with damaged segments: never a corrupt record accepted, only typed errors.

The replication frame decoder has its own fuzz tests
(tests/replication/test_protocol_fuzz.py), the LMTP front over a real
``walctl serve`` too (tests/e2e/test_fuzz_lmtp.py).

The default run is short; `pytest --run-slow -k fuzz` runs the long mode
(FUZZ_EXAMPLES examples per test, default 2000).
"""

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wal import Log, LogReader, WalError, verify

from tests.support import LONG_FUZZ_EXAMPLES as LONG


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A valid 3-segment log and its records."""
    path = str(tmp_path_factory.mktemp("fz") / "p.wal")
    log = Log.create(path, segment_max_bytes=600)
    for i in range(25):
        log.append(1 + i % 3, os.urandom(i * 7 % 90))
    records = list(log.read(1))
    log.close()
    return path, records


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=200)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=80)),
)


def _mutate(src: str, dst: str, segment_index: int, muts) -> None:
    shutil.copytree(src, dst)
    segs = sorted(n for n in os.listdir(dst) if n.endswith(".seg"))
    target = os.path.join(dst, segs[segment_index % len(segs)])
    data = bytearray(open(target, "rb").read())
    for kind, pos, arg in muts:
        pos = pos % (len(data) + 1)
        if kind == "flip" and pos < len(data):
            data[pos] ^= arg
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = arg
        elif kind == "overwrite":
            data[pos:pos + len(arg)] = arg
    with open(target, "wb") as f:
        f.write(bytes(data))


def _check_record_decoder(pristine, segment_index, muts):
    src, records = pristine
    by_lsn = {r.lsn: r for r in records}
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "m.wal")
        _mutate(src, dst, segment_index, muts)
        rep = verify(dst)  # never raises for damage: it reports
        assert rep.ok or rep.error["reason"]
        try:
            got = list(LogReader(dst).records(1))
        except WalError:
            got = None
        if got is not None:  # whatever a reader returns is the true history
            assert [r.hash for r in got] == [by_lsn[r.lsn].hash for r in got]
            assert [r.lsn for r in got] == list(range(1, len(got) + 1))
        try:
            log = Log.open(dst)
        except WalError:
            return
        try:
            for r in log.read(1):  # damage in a sealed segment may surface here: loud and typed
                assert r.hash == by_lsn[r.lsn].hash and r.payload == by_lsn[r.lsn].payload
        except WalError:
            pass
        finally:
            log.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2), st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_record_decoder_accepts_no_corrupt_record(pristine, segment_index, muts):
    _check_record_decoder(pristine, segment_index, muts)


@pytest.mark.slow
@settings(max_examples=LONG, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2), st.lists(mutation, min_size=1, max_size=8))
def test_fuzz_record_decoder_long(pristine, segment_index, muts):
    _check_record_decoder(pristine, segment_index, muts)
