"""The frame walker (wal/framewalk.py) reads frames as the codec (wal/format.py) decodes them.

walk_frames must accept exactly the frames that decode_frame_header calls
valid-looking (LOG-8), stop at the same place, and hand out the same payloads,
whatever the read-chunk size; the codec's hash functions must compute LOG-5
as the spec writes it, for bytes and memoryviews, small and large.
"""

import os
import struct

import blake3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wal
from wal import framewalk
from wal.format import (
    FRAME_HEADER_SIZE,
    FrameScan,
    decode_frame_header,
    decode_frames,
    encode_frame,
    payload_hash,
    record_hash,
)


def slow_frames(data: bytes, start: int):
    """The normative walk: decode_frame_header at each frame, stop at the first bad one."""
    out, pos = [], start
    while pos + FRAME_HEADER_SIZE <= len(data):
        fh = decode_frame_header(data, pos)
        if fh is None or pos + fh.frame_size > len(data):
            break
        out.append((pos, fh.payload_len, fh.lsn, fh.epoch, fh.type, fh.batch_back, fh.hash,
                    bytes(data[pos + FRAME_HEADER_SIZE: pos + fh.frame_size])))
        pos += fh.frame_size
    return out


def fast_frames(path: str, start: int):
    return [(o, n, lsn, ep, ty, bb, h, bytes(p)) for o, n, lsn, ep, ty, bb, h, p in framewalk.walk_frames(path, start)]


def frames_bytes(payloads, first_lsn=1):
    prev, out = wal.ZERO_HASH, b""
    for i, p in enumerate(payloads):
        lsn = first_lsn + i
        h = record_hash(prev, lsn, 1, 2, len(p), payload_hash(p))
        out += encode_frame(lsn, 1, 2, p, h, batch_back=i)
        prev = h
    return out


@settings(max_examples=150)
@given(
    payloads=st.lists(st.binary(max_size=300), min_size=0, max_size=8),
    cut=st.integers(min_value=0, max_value=4000),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=3000), st.integers(min_value=1, max_value=255)), max_size=3),
    chunk=st.sampled_from([1, 7, 64, 100, 1 << 20]),
    junk=st.binary(max_size=80),
)
def test_walk_frames_agrees_with_decode_frame_header(tmp_path_factory, payloads, cut, flips, chunk, junk):
    data = bytearray(b"H" * 10 + frames_bytes(payloads) + junk)
    for at, mask in flips:
        if at < len(data):
            data[at] ^= mask
    data = bytes(data[: max(10, len(data) - cut % (len(data) + 1))])
    path = str(tmp_path_factory.mktemp("fw") / "seg")
    with open(path, "wb") as f:
        f.write(data)
    old = framewalk.CHUNK_BYTES
    framewalk.CHUNK_BYTES = chunk
    try:
        assert fast_frames(path, 10) == slow_frames(data, 10)
    finally:
        framewalk.CHUNK_BYTES = old


def test_walk_frames_respects_end_offset(tmp_path):
    data = frames_bytes([b"a" * 10, b"b" * 20, b"c" * 30])
    path = str(tmp_path / "seg")
    with open(path, "wb") as f:
        f.write(data)
    second_end = 2 * FRAME_HEADER_SIZE + 30
    assert [f[2] for f in framewalk.walk_frames(path, 0, second_end)] == [1, 2]
    assert [f[2] for f in framewalk.walk_frames(path, 0, second_end - 1)] == [1]


def spec_hash(prev: bytes, lsn: int, epoch: int, type_: int, payload: bytes) -> bytes:
    """LOG-5 as specs/log-format.md writes it, with blake3 and struct only."""
    fields = struct.pack("<QQHI", lsn, epoch, type_, len(payload))
    return blake3.blake3(b"mailwal-record-v1\x00" + prev + fields + blake3.blake3(payload).digest()).digest()


def decode_verified(prev: bytes, lsn: int, data: bytes | memoryview) -> tuple[list, FrameScan]:
    scan = FrameScan(lsn, prev)
    return [f[2] for f in decode_frames(data, 0, len(data), scan)], scan


@settings(max_examples=100)
@given(prev=st.binary(min_size=32, max_size=32), lsn=st.integers(1, 2**64 - 2), epoch=st.integers(0, 2**64 - 1),
       type_=st.integers(0, 0xFFFF), payload=st.binary(max_size=5000))
def test_LOG_5_the_codec_computes_the_spec_hash(prev, lsn, epoch, type_, payload):
    """record_hash, and the decoder's chain check, are LOG-5 as the spec writes it."""
    want = spec_hash(prev, lsn, epoch, type_, payload)
    assert payload_hash(memoryview(payload)) == payload_hash(payload) == blake3.blake3(payload).digest()
    assert record_hash(prev, lsn, epoch, type_, len(payload), payload_hash(payload)) == want
    frame = encode_frame(lsn, epoch, type_, payload, want)
    for data in (frame, memoryview(frame)):
        lsns, scan = decode_verified(prev, lsn, data)
        assert lsns == [lsn] and scan.reason is None and (scan.lsn, scan.prev) == (lsn + 1, want)
    lsns, scan = decode_verified(bytes(32) if prev != bytes(32) else b"\x01" * 32, lsn, frame)
    assert lsns == [] and scan.reason == "record hash mismatch"
    lsns, scan = decode_verified(prev, lsn + 1, frame)
    assert lsns == [] and scan.reason == f"frame has LSN {lsn}, expected {lsn + 1}"


def test_LOG_5_hash_of_a_large_payload(tmp_path):
    payload = os.urandom((1 << 20) + 17)  # hashed on several threads
    want = spec_hash(wal.ZERO_HASH, 1, 1, 1, payload)
    assert record_hash(wal.ZERO_HASH, 1, 1, 1, len(payload), payload_hash(memoryview(payload))) == want
    lsns, scan = decode_verified(wal.ZERO_HASH, 1, memoryview(encode_frame(1, 1, 1, payload, want)))
    assert lsns == [1] and scan.reason is None


@pytest.mark.parametrize("chunk", [64, 5000, 1 << 20])
def test_verify_and_replay_across_chunk_boundaries(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(framewalk, "CHUNK_BYTES", chunk)
    path = str(tmp_path / "x.wal")
    sizes = [0, 1, 63, 64, 65, 4096, 70000, 3]
    with wal.Log.create(path, segment_max_bytes=50000) as log:
        acks = [log.append(1, os.urandom(n)) for n in sizes * 3]
    report = wal.verify(path)
    assert report.ok and report.records == len(acks) and report.last_hash == acks[-1].hash.hex()
    got = list(wal.LogReader(path).records())
    assert [r.hash for r in got] == [a.hash for a in acks]
    assert [len(r.payload) for r in got] == sizes * 3
