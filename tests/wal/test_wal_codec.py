"""One frame codec (wal/format.py, LOG-4/LOG-5): the writer, the readers, the
frame walker and the replication protocol encode and decode frames through
it, and nothing else in the tree defines the layout."""

from __future__ import annotations

import ast
import os
import re

from hypothesis import given, settings
from hypothesis import strategies as st

import wal
import wal.reader
import wal.writer
from engine.replication import AppendBatch
from wal.format import (
    FRAME_HEADER_SIZE,
    decode_frame_header,
    encode_frame,
    encode_frame_header,
    parse_frame_header,
    unpack_frame_header,
)
from tests.support import ROOT

CODEC = os.path.join("wal", "format.py")


def _sources(*tops: str):
    for top in tops:
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        yield os.path.relpath(path, ROOT), f.read()


def test_LOG_4_the_frame_layout_and_record_hash_are_defined_once():
    """No module but the codec spells the frame header's fields, its CRC or the hash domain."""
    spelled = re.compile(r"IQQHHI|QQHI|mailwal-record-v1")
    found = [path for path, text in _sources("wal", "engine", "tools") if path != CODEC and spelled.search(text)]
    framing = [os.path.join("engine", "replication", m + ".py") for m in ("messages", "codec", "session")] + [p for p, _ in _sources("wal")]
    found += [path for path, text in _sources("wal", "engine")
              if path in framing and path != CODEC and "crc32" in text]
    assert found == []


def test_no_import_time_asserts_in_the_log_or_the_protocol():
    """An invariant that holds only when asserts run (not under python -O) is tested here, not asserted at import."""
    paths = [p for p, _ in _sources("wal")] + [os.path.join("engine", "replication", m + ".py") for m in ("messages", "codec", "session")]
    bad = []
    for path in paths:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        bad += [f"{path}:{node.lineno}" for node in tree.body if isinstance(node, ast.Assert)]
    assert bad == []


def test_LOG_4_replication_frames_are_the_logs_frames(tmp_path):
    """An AppendBatch of records carries, byte for byte, the frames the log wrote for them in one batch (REP-11)."""
    path = str(tmp_path / "x.wal")
    payloads = [b"", b"a", bytes(range(256)) * 9, b"last"]
    with wal.Log.create(path) as log:
        log.append(1, b"before")
        log.append_many([(7, p) for p in payloads], epoch=3)
    records = list(wal.LogReader(path).records(2))
    (seg,) = [n for n in os.listdir(path) if n.endswith(".seg")]
    with open(os.path.join(path, seg), "rb") as f:
        data = f.read()
    on_disk = data[-sum(FRAME_HEADER_SIZE + len(p) for p in payloads):]
    batch = AppendBatch(tuple(records))
    assert batch.frames() == on_disk
    assert batch.frames() == b"".join(
        encode_frame(r.lsn, r.epoch, r.type, r.payload, r.hash, batch_back=r.lsn - 2) for r in records)
    assert AppendBatch._parse_frames(on_disk).records == tuple(records)


@settings(max_examples=300)
@given(head=st.binary(min_size=28, max_size=28), hash_=st.binary(min_size=32, max_size=32),
       fix_crc=st.booleans(), offset=st.integers(0, 3))
def test_LOG_4_the_decoders_agree(head, hash_, fix_crc, offset):
    """unpack: layout and head CRC; parse: also the valid-looking rule; decode: parse as a value."""
    import struct

    fields = struct.unpack("<IQQHHI", head)
    data = encode_frame_header(fields[0], fields[1], fields[2], fields[3], fields[5], hash_, flags=fields[4])
    if not fix_crc:
        data = data[:28] + bytes(4) + data[32:]
    data = b"x" * offset + data
    unpacked = unpack_frame_header(data, offset)
    parsed = parse_frame_header(data, offset)
    decoded = decode_frame_header(data, offset)
    if unpacked is None:
        assert not fix_crc and parsed is None and decoded is None
        return
    assert unpacked[:6] == fields and unpacked[7] == hash_
    plen, lsn, _epoch, _type, flags, back = fields
    valid_looking = plen <= wal.MAX_PAYLOAD_BYTES and lsn >= 1 and flags == 0 and back < lsn
    assert (parsed is not None) == valid_looking == (decoded is not None)
    if parsed is not None:
        assert parsed == unpacked
        assert (decoded.payload_len, decoded.lsn, decoded.epoch, decoded.type, decoded.flags, decoded.batch_back,
                decoded.hash) == (*fields, hash_)
    assert unpack_frame_header(data[:offset + 63], offset) is None  # a header needs all 64 bytes


def test_writers_acknowledgements_equal_checked_ones():
    """The writer's unchecked Appended constructor gives the same value as Appended(...)."""
    assert wal.writer._appended(1, b"h", 2) == wal.Appended(1, b"h", 2)
