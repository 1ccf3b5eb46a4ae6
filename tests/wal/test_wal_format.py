"""Byte layouts, hashes and encodings of specs/log-format.md (LOG-1..LOG-7).

Each test names the rule it checks. Layout tests decode bytes by hand with
``struct`` and ``blake3`` at the offsets the spec's tables give, so they
check the code against the spec rather than against itself.
"""

import os
import struct
import uuid
import zlib

import blake3
import cbor2
import pytest

import wal
from wal import codec
from wal.format import (
    FRAME_HEADER_SIZE,
    MAX_PAYLOAD_BYTES,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    ZERO_HASH,
    SegmentHeader,
    SegmentHeaderError,
    decode_frame_header,
    decode_segment_header,
    encode_frame,
    encode_segment_header,
    payload_hash,
    record_hash,
)
from wal.segment import read_segment_header, segment_name

from tests.support.helpers import all_records, seg_paths, read_bytes

LOG_ID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff").bytes
PREV = bytes(range(32))


def spec_header_bytes(version=1, header_size=96, log_id=LOG_ID, first_lsn=7, prev_hash=PREV, magic=SEGMENT_MAGIC):
    """A segment header built from the spec's table, independently of wal.format."""
    body = (
        magic + struct.pack("<HHI", version, header_size, 0) + log_id + struct.pack("<QQ", first_lsn, 0)
        + prev_hash + struct.pack("<Q", 0)
    )
    body += bytes(max(0, header_size - 8 - len(body)))
    return body + blake3.blake3(body).digest(8)


def spec_record_hash(prev, lsn, epoch, type_, payload):
    return blake3.blake3(
        b"mailwal-record-v1\x00" + prev + struct.pack("<QQHI", lsn, epoch, type_, len(payload))
        + blake3.blake3(payload).digest()
    ).digest()


# -- LOG-1 segment header ----------------------------------------------------


def test_LOG_1_segment_header_matches_the_spec_table():
    h = SegmentHeader(1, LOG_ID, 7, PREV)
    data = encode_segment_header(h)
    assert len(data) == SEGMENT_HEADER_SIZE == 96
    assert data == spec_header_bytes()
    assert data[0:8] == b"MAILWAL\n"
    assert struct.unpack_from("<HHI", data, 8) == (1, 96, 0)
    assert data[16:32] == LOG_ID
    assert struct.unpack_from("<QQ", data, 32) == (7, 0)
    assert data[48:80] == PREV
    assert data[80:88] == bytes(8)
    assert data[88:96] == blake3.blake3(data[:88]).digest(8)
    assert decode_segment_header(data) == h


def test_LOG_1_segment_name_is_the_zero_padded_first_lsn():
    assert segment_name(1) == "00000000000000000001.seg"
    assert segment_name(12345678901234567890) == "12345678901234567890.seg"


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d[:95], "short"),
        (lambda d: b"MAILWAL?" + d[8:], "magic"),
        (lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:], "check"),
        (lambda d: d[:90] + bytes([d[90] ^ 0x80]) + d[91:], "check"),
    ],
)
def test_LOG_1_damaged_segment_header_is_rejected(mutate, reason):
    with pytest.raises(SegmentHeaderError, match=reason):
        decode_segment_header(mutate(spec_header_bytes()))


def test_LOG_1_damaged_header_of_a_segment_is_corruption_at_offset_0(tmp_path):
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path, segment_max_bytes=200) as log:
        for i in range(5):
            log.append(1, bytes(100))
    second = seg_paths(path)[1]
    with open(second, "r+b") as f:
        f.seek(40)  # inside the first_lsn reserved field
        f.write(b"\x01")
    with pytest.raises(wal.CorruptRecordError) as ei:
        wal.Log.open(path)
    assert ei.value.segment == os.path.basename(second) and ei.value.offset == 0


# -- LOG-3 versioning ----------------------------------------------------------


def test_LOG_3_unknown_version_with_a_good_check_is_refused(tmp_path):
    path = str(tmp_path / "x.wal")
    wal.Log.create(path).close()
    seg = seg_paths(path)[0]
    h = read_segment_header(seg)
    with open(seg, "r+b") as f:
        f.write(spec_header_bytes(version=2, log_id=h.log_id, first_lsn=1, prev_hash=ZERO_HASH))
    with pytest.raises(wal.UnsupportedVersionError) as ei:
        wal.Log.open(path)
    assert ei.value.version == 2 and ei.value.segment == os.path.basename(seg)
    assert "upgrade" in str(ei.value)
    report = wal.verify(path)
    assert not report.ok and "version 2" in report.error["reason"]


def test_LOG_3_a_future_version_may_change_the_header_size(tmp_path):
    """The first 16 bytes and 'check = last 8 bytes' are fixed for all versions."""
    data = spec_header_bytes(version=3, header_size=128) + b"\x00" * 64
    with pytest.raises(SegmentHeaderError) as ei:
        decode_segment_header(data)
    assert getattr(ei.value, "version", None) == 3
    seg = tmp_path / segment_name(1)
    seg.write_bytes(data)
    with pytest.raises(wal.UnsupportedVersionError):
        read_segment_header(str(seg))


def test_LOG_3_a_damaged_version_field_is_corruption_not_a_new_version():
    data = bytearray(spec_header_bytes())
    data[8] ^= 0x02  # version 1 -> 3, check not recomputed
    with pytest.raises(SegmentHeaderError) as ei:
        decode_segment_header(bytes(data))
    assert getattr(ei.value, "version", None) is None


def test_LOG_3_version_1_with_another_header_size_is_corruption():
    with pytest.raises(SegmentHeaderError) as ei:
        decode_segment_header(spec_header_bytes(header_size=128) + bytes(64))
    assert getattr(ei.value, "version", None) is None


def test_LOG_3_repair_refuses_a_log_with_an_unknown_version(tmp_path):
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path, segment_max_bytes=200) as log:
        for i in range(4):
            log.append(1, bytes(150))
    last = seg_paths(path)[-1]
    h = read_segment_header(last)
    with open(last, "r+b") as f:
        f.write(spec_header_bytes(version=2, log_id=h.log_id, first_lsn=h.first_lsn, prev_hash=h.prev_hash))
    before = {p: read_bytes(p) for p in seg_paths(path)}
    with pytest.raises(wal.UnsupportedVersionError):
        wal.repair(path)
    assert {p: read_bytes(p) for p in seg_paths(path)} == before


# -- LOG-4 frame layout and valid-looking headers -----------------------------


def test_LOG_4_frame_matches_the_spec_table():
    payload = b"hello, frame"
    h = spec_record_hash(PREV, 9, 3, 0x0102, payload)
    data = encode_frame(9, 3, 0x0102, payload, h, batch_back=2)
    assert len(data) == FRAME_HEADER_SIZE + len(payload) == 64 + 12
    assert struct.unpack_from("<IQQHHI", data, 0) == (12, 9, 3, 0x0102, 0, 2)
    assert struct.unpack_from("<I", data, 28)[0] == zlib.crc32(data[:28])
    assert data[32:64] == h and data[64:] == payload
    fh = decode_frame_header(data)
    assert (fh.payload_len, fh.lsn, fh.epoch, fh.type, fh.flags, fh.batch_back, fh.hash) == (12, 9, 3, 0x0102, 0, 2, h)


def _frame_with(**kw):
    fields = dict(payload_len=0, lsn=5, epoch=1, type=1, flags=0, batch_back=0)
    fields.update(kw)
    head = struct.pack("<IQQHHI", *fields.values())
    return head + struct.pack("<I", zlib.crc32(head)) + bytes(32)


@pytest.mark.parametrize(
    "data",
    [
        _frame_with()[:63],
        _frame_with()[:28] + b"\0\0\0\0" + bytes(32),
        _frame_with(payload_len=MAX_PAYLOAD_BYTES + 1),
        _frame_with(lsn=0),
        _frame_with(flags=1),
        _frame_with(batch_back=5),
    ],
    ids=["short", "head-crc", "too-long", "lsn-0", "flags", "batch-back"],
)
def test_LOG_4_not_valid_looking_headers(data):
    assert decode_frame_header(data) is None


def test_LOG_4_valid_looking_header_is_accepted():
    assert decode_frame_header(_frame_with(payload_len=MAX_PAYLOAD_BYTES, batch_back=4)) is not None


def test_LOG_4_oversized_payload_is_refused_and_nothing_is_appended(tmp_path):
    with wal.Log.create(str(tmp_path / "x.wal")) as log:
        log.append(1, b"a")
        with pytest.raises(wal.WalError, match="exceeds"):
            log.append(1, bytes(MAX_PAYLOAD_BYTES + 1))
        assert log.append(1, b"b").lsn == 2


@pytest.mark.parametrize(
    "items, epoch",
    [
        ([(1, b"ok"), (0x10000, b"bad type")], None),
        ([(1, b"ok"), (-1, b"bad type")], None),
        ([(1, b"ok")], -1),
        ([(1, b"ok")], 1 << 64),
        ([(1, b"ok"), (2, "not bytes")], None),
    ],
    ids=["type-too-big", "type-negative", "epoch-negative", "epoch-too-big", "payload-str"],
)
def test_LOG_4_bad_record_fields_are_refused_and_nothing_is_appended(tmp_path, items, epoch):
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path) as log:
        log.append(1, b"first")
        with pytest.raises((wal.WalError, TypeError)):
            log.append_many(items, epoch=epoch)
        assert log.failed is None
        assert log.append(1, b"second").lsn == 2
    assert [r.payload for r in all_records(path)] == [b"first", b"second"]


def test_LOG_4_sync_to_an_lsn_never_enqueued_is_refused_without_failing_the_log(tmp_path):
    with wal.Log.create(str(tmp_path / "x.wal")) as log:
        log.append(1, b"a")
        with pytest.raises(wal.WalError):
            log.sync_to(5)
        assert log.failed is None
        assert log.append(1, b"b").lsn == 2
        assert log.append_many([]) == []


# -- LOG-5 record hash ---------------------------------------------------------


def test_LOG_5_record_hash_covers_exactly_the_spec_bytes(tmp_path):
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path) as log:
        a1 = log.append(4, b"one", epoch=2)
        a2 = log.append(5, b"")
    assert a1.hash == spec_record_hash(ZERO_HASH, 1, 2, 4, b"one")
    assert a2.epoch == 2  # the explicit epoch became the log's epoch
    assert a2.hash == spec_record_hash(a1.hash, 2, 2, 5, b"")
    assert record_hash(ZERO_HASH, 1, 2, 4, 3, payload_hash(b"one")) == a1.hash
    assert [r.hash for r in all_records(path)] == [a1.hash, a2.hash]


@pytest.mark.parametrize("field", ["prev", "lsn", "epoch", "type", "payload"])
def test_LOG_5_every_covered_field_changes_the_hash(field):
    base = dict(prev=PREV, lsn=3, epoch=1, type_=1, payload=b"x")
    changed = dict(base)
    key = "type_" if field == "type" else field
    changed[key] = {"prev": ZERO_HASH, "lsn": 4, "epoch": 2, "type_": 2, "payload": b"y"}[key]
    assert spec_record_hash(**base) != spec_record_hash(**changed)


def test_LOG_5_append_records_checks_the_chain(tmp_path):
    src = wal.Log.create(str(tmp_path / "a.wal"))
    dst = wal.Log.create(str(tmp_path / "b.wal"))
    with src, dst:
        for i in range(3):
            src.append(1, bytes([i]))
        recs = list(src.read(1))
        dst.append_records(recs[:2])
        with pytest.raises(wal.OutOfOrderError) as ei:
            dst.append_records(recs[:1])
        assert (ei.value.expected, ei.value.got) == (3, 1)
        forged = wal.Record(3, recs[2].epoch, recs[2].type, b"forged", recs[2].hash)
        with pytest.raises(wal.OutOfOrderError, match="chain"):
            dst.append_records([forged])
        dst.append_records(recs[2:])
        assert dst.last_hash == src.last_hash


# -- LOG-6 chain across segments, zero hash -----------------------------------


def test_LOG_6_chain_starts_at_the_zero_hash_and_crosses_segments(tmp_path):
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path, segment_max_bytes=300) as log:
        acks = [log.append(1, bytes(100)) for _ in range(7)]
        assert log.hash_at(0) == ZERO_HASH == bytes(32)
        assert log.hash_at(4) == acks[3].hash
    segs = seg_paths(path)
    assert len(segs) > 2
    headers = [read_segment_header(p) for p in segs]
    assert headers[0].prev_hash == ZERO_HASH
    by_lsn = {a.lsn: a.hash for a in acks}
    for h in headers[1:]:
        assert h.prev_hash == by_lsn[h.first_lsn - 1]
        assert len({x.log_id for x in headers}) == 1


def test_LOG_6_a_log_seeded_mid_history_chains_onto_the_given_hash(tmp_path):
    seed = b"\x42" * 32
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path, first_lsn=100, prev_hash=seed) as log:
        assert log.last_lsn == 99 and log.last_hash == seed and log.hash_at(99) == seed
        a = log.append(1, b"x")
        assert a.lsn == 100 and a.hash == spec_record_hash(seed, 100, 1, 1, b"x")


def test_LOG_6_a_broken_link_between_segments_is_corruption(tmp_path):
    path = str(tmp_path / "x.wal")
    with wal.Log.create(path, segment_max_bytes=300) as log:
        for _ in range(6):
            log.append(1, bytes(100))
    second = seg_paths(path)[1]
    h = read_segment_header(second)
    with open(second, "r+b") as f:
        f.write(spec_header_bytes(log_id=h.log_id, first_lsn=h.first_lsn, prev_hash=b"\x01" * 32))
    with pytest.raises(wal.CorruptRecordError, match="chain") as ei:
        list(wal.LogReader(path).records(1))
    assert ei.value.segment == os.path.basename(second)
    report = wal.verify(path)
    assert not report.ok and report.error["segment"] == os.path.basename(second) and report.error["offset"] == 0


# -- LOG-7 canonical CBOR -------------------------------------------------------


@pytest.mark.parametrize(
    "value, hex_",
    [
        (0, "00"),
        (23, "17"),
        (24, "1818"),
        (1000, "1903e8"),
        (-1, "20"),
        (b"ab", "426162"),
        ("é", "62c3a9"),
        ([1, [2]], "82018102"),
        ({"b": 1, "a": 2}, "a2616102616201"),
        ({"aa": 1, "b": 2}, "a261620262616101"),  # length-first (RFC 8949 4.2.3)
        ({1000: 0, -1: 0}, "a220001903e800"),  # length-first: -1 (1 byte) before 1000 (3 bytes)
        (1.5, "f93e00"),  # shortest float that keeps the value
        (True, "f5"),
        (None, "f6"),
    ],
)
def test_LOG_7_canonical_cbor_encoding(value, hex_):
    assert codec.dumps(value).hex() == hex_
    assert codec.loads(bytes.fromhex(hex_)) == value


def test_LOG_7_same_value_same_bytes_same_hash():
    a = codec.dumps({"z": 1, "a": [1, 2], "m": {"y": b"", "x": 0}})
    b = codec.dumps({"m": {"x": 0, "y": b""}, "a": [1, 2], "z": 1})
    assert a == b
    non_canonical = cbor2.dumps({"z": 1, "a": [1, 2], "m": {"y": b"", "x": 0}})
    assert cbor2.loads(non_canonical) == cbor2.loads(a) and non_canonical != a
    assert payload_hash(non_canonical) != payload_hash(a)
