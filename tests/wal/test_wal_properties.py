"""Property: whatever is appended reads back identical, from any LSN, after
reopen, across segment rollovers (LOG-4, LOG-5, LOG-6, LOG-10)."""

import struct
import tempfile

import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wal

from tests.support.helpers import payload_for

MiB = 1 << 20
TOTAL_BYTES_CAP = 3 * MiB  # per example, to keep the suite fast

sizes = st.one_of(
    st.integers(0, 300),
    st.integers(0, 5000),
    st.sampled_from([0, 1, 63, 64, 65, 4095, 4096, 4097, MiB]),
    st.integers(0, MiB),
)


@st.composite
def workloads(draw):
    raw = draw(st.lists(st.tuples(sizes, st.integers(0, 0xFFFF), st.booleans()), min_size=1, max_size=25))
    out, total = [], 0
    for size, type_, joins in raw:
        if total + size > TOTAL_BYTES_CAP:
            size = 0
        total += size
        out.append((size, type_, joins))
    seed = draw(st.integers(0, 2**32))
    return [(type_, payload_for(seed + i, size), joins) for i, (size, type_, joins) in enumerate(out)]


def spec_hash(prev, lsn, epoch, type_, payload):
    return blake3.blake3(
        b"mailwal-record-v1\x00" + prev + struct.pack("<QQHI", lsn, epoch, type_, len(payload))
        + blake3.blake3(payload).digest()
    ).digest()


@settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    work=workloads(),
    segment_max_bytes=st.sampled_from([1, 300, 4096, 64 * 1024, 4 * MiB]),
    reopen_max=st.sampled_from([1, 1000, 4 * MiB]),
    epoch=st.integers(1, 2**40),
    data=st.data(),
)
def test_LOG_10_random_appends_read_back_identical_from_any_lsn_after_reopen(work, segment_max_bytes, reopen_max, epoch, data):
    with tempfile.TemporaryDirectory() as d:
        path = d + "/x.wal"
        acks = []
        with wal.Log.create(path, segment_max_bytes=segment_max_bytes, epoch=epoch) as log:
            batch = []
            for i, (type_, payload, joins) in enumerate(work):
                batch.append((type_, payload))
                last = i == len(work) - 1
                if last or not work[i + 1][2]:  # the next item does not join this batch
                    acks += log.append_many(batch)
                    batch = []
        # model: the spec's hash chain over what was appended (LOG-5, LOG-6)
        prev, expected = wal.ZERO_HASH, []
        for lsn, (type_, payload, _) in enumerate(work, start=1):
            prev = spec_hash(prev, lsn, epoch, type_, payload)
            expected.append((lsn, epoch, type_, payload, prev))
        assert [(a.lsn, a.hash, a.epoch) for a in acks] == [(e[0], e[4], e[1]) for e in expected]

        with wal.Log.open(path, segment_max_bytes=reopen_max) as log:
            assert (log.last_lsn, log.last_hash) == (len(work), prev)
            start = data.draw(st.integers(1, len(work) + 1), label="from_lsn")
            got = [(r.lsn, r.epoch, r.type, r.payload, r.hash) for r in log.read(start)]
            assert got == expected[start - 1:]
            extra = log.append(1, b"after reopen")
            assert extra.lsn == len(work) + 1
        reader = wal.LogReader(path)
        start = data.draw(st.integers(1, len(work) + 1), label="reader_from_lsn")
        got = [(r.lsn, r.payload, r.hash) for r in reader.records(start)]
        assert got[:-1] == [(e[0], e[3], e[4]) for e in expected[start - 1:]]
        assert got[-1][1] == b"after reopen"
        report = wal.verify(path)
        assert report.ok and report.records == len(work) + 1
        if segment_max_bytes == 1 and len(work) > 1:
            assert report.segments >= len({i for i, w in enumerate(work) if i == 0 or not w[2]})
