"""specs/vectors/*.json: the encoder reproduces them, the decoder gives the
verdicts they require, and they are what make_vectors.py generates.

The checks recompute every hash from the spec's definitions (blake3 and
struct here, not wal.format), so the vectors pin the format, not the code.
"""

import importlib.util
import json
import os
import struct
import zlib

import blake3
import pytest

import wal
from wal import codec
from wal.format import decode_frame_header, decode_segment_header, encode_frame, encode_segment_header
from wal.segment import scan_segment

from tests.support.helpers import read_text
from tests.support import ROOT
from tests.support import find_tests

VECTORS = os.path.join(ROOT, "specs", "vectors")


def load(name):
    with open(os.path.join(VECTORS, name), encoding="utf-8") as f:
        return json.load(f)


def from_json(value):
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return bytes.fromhex(value["$bytes"])
        if set(value) == {"$map"}:
            return {from_json(k): from_json(v) for k, v in value["$map"]}
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


LOG = load("log.json")
REJECT = load("log-reject.json")
CBOR = load("cbor.json")


def test_vectors_are_up_to_date():
    spec = importlib.util.spec_from_file_location("make_vectors", os.path.join(VECTORS, "make_vectors.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, text in mod.build().items():
        with open(os.path.join(VECTORS, name), encoding="utf-8") as f:
            assert f.read() == text, f"specs/vectors/{name} is stale: run python specs/vectors/make_vectors.py"


def test_LOG_1_LOG_6_segment_headers_of_the_valid_log():
    prev = bytes(32)
    for seg in LOG["segments"]:
        h = seg["header"]
        data = bytes.fromhex(seg["header_hex"])
        body = b"MAILWAL\n" + struct.pack("<HHI", 1, 96, 0) + bytes.fromhex(h["log_id"]) \
            + struct.pack("<QQ", h["first_lsn"], 0) + bytes.fromhex(h["prev_hash"]) + bytes(8)
        assert data == body + blake3.blake3(body).digest(8)
        assert bytes.fromhex(h["prev_hash"]) == prev  # LOG-6: zero hash, then the last hash before
        assert seg["name"] == f"{h['first_lsn']:020d}.seg"
        decoded = decode_segment_header(data)
        assert (decoded.version, decoded.log_id.hex(), decoded.first_lsn, decoded.prev_hash.hex()) == \
            (h["version"], h["log_id"], h["first_lsn"], h["prev_hash"])
        assert encode_segment_header(decoded) == data
        prev = bytes.fromhex(seg["records"][-1]["hash"])


def test_LOG_4_LOG_5_LOG_7_frames_and_hashes_of_the_valid_log():
    prev = bytes(32)
    for seg in LOG["segments"]:
        file_bytes = bytes.fromhex(seg["file_hex"])
        assert file_bytes.startswith(bytes.fromhex(seg["header_hex"])) and len(file_bytes) == seg["file_size"]
        offset = 96
        for rec in seg["records"]:
            payload = bytes.fromhex(rec["payload_hex"])
            if rec["payload_value"] is not None:
                assert codec.dumps(from_json(rec["payload_value"])) == payload  # LOG-7
            h = blake3.blake3(b"mailwal-record-v1\x00" + prev + struct.pack("<QQHI", rec["lsn"], rec["epoch"], rec["type"], len(payload))
                              + blake3.blake3(payload).digest()).digest()
            assert rec["hash"] == h.hex() and rec["payload_hash"] == blake3.blake3(payload).hexdigest()
            head = struct.pack("<IQQHHI", len(payload), rec["lsn"], rec["epoch"], rec["type"], 0, rec["batch_back"])
            frame = head + struct.pack("<I", zlib.crc32(head)) + h + payload
            assert rec["frame_hex"] == frame.hex()
            assert encode_frame(rec["lsn"], rec["epoch"], rec["type"], payload, h, batch_back=rec["batch_back"]) == frame
            assert rec["offset"] == offset and file_bytes[offset:offset + len(frame)] == frame
            fh = decode_frame_header(frame)
            assert (fh.lsn, fh.epoch, fh.type, fh.batch_back, fh.hash) == (rec["lsn"], rec["epoch"], rec["type"], rec["batch_back"], h)
            offset += len(frame)
            prev = h
        assert offset == len(file_bytes)
    assert LOG["last_hash"] == prev.hex()


def test_LOG_10_the_valid_log_opens_and_reads_back(tmp_path):
    path = tmp_path / "vectors.wal"
    path.mkdir()
    for seg in LOG["segments"]:
        (path / seg["name"]).write_bytes(bytes.fromhex(seg["file_hex"]))
    expected = [(r["lsn"], r["epoch"], r["type"], r["payload_hex"], r["hash"]) for s in LOG["segments"] for r in s["records"]]
    report = wal.verify(str(path))
    assert report.ok and report.last_lsn == LOG["last_lsn"] and report.last_hash == LOG["last_hash"]
    assert report.log_id.replace("-", "") == LOG["log_id"]
    with wal.Log.open(str(path)) as log:
        got = [(r.lsn, r.epoch, r.type, r.payload.hex(), r.hash.hex()) for r in log.read(1)]
        assert got == expected
        assert log.epoch == 2  # the last record's epoch
        assert log.append(1, codec.dumps({"more": True})).lsn == 6


@pytest.mark.parametrize("case", REJECT["cases"], ids=[c["name"] for c in REJECT["cases"]])
def test_decoder_verdicts_on_must_reject_and_must_trim_segments(tmp_path, case):
    path = tmp_path / case["segment"]
    data = bytes.fromhex(case["segment_hex"])
    path.write_bytes(data)
    ctx = case["context"]
    kwargs = dict(expected_first_lsn=ctx["expected_first_lsn"], expected_prev_hash=bytes.fromhex(ctx["expected_prev_hash"]),
                  log_id=bytes.fromhex(ctx["log_id"]), is_last=ctx["is_last"])
    verdict = case["verdict"]
    if "error" in verdict:
        err = getattr(wal, verdict["error"])
        with pytest.raises(err) as ei:
            scan_segment(str(path), **kwargs)
        if verdict["error"] == "UnsupportedVersionError":
            assert ei.value.version == verdict["version"]
        else:
            assert (ei.value.segment, ei.value.offset, ei.value.lsn) == (case["segment"], verdict["offset"], verdict["lsn"])
    elif "torn" in verdict:
        scan = scan_segment(str(path), **kwargs)
        assert scan.torn is not None and scan.torn.offset == verdict["torn"]["offset"]
        assert scan.torn.size == len(data) - verdict["torn"]["offset"]
        assert scan.last_lsn == verdict["torn"]["last_lsn"]
    else:
        scan = scan_segment(str(path), **kwargs)
        assert scan.torn is None and scan.last_lsn == verdict["ok"]["last_lsn"] and scan.end_offset == len(data)


def test_every_rule_with_a_reject_vector_is_named():
    rules = {r.strip() for c in REJECT["cases"] for r in c["rule"].split(",")}
    assert {"LOG-1", "LOG-3", "LOG-4", "LOG-5", "LOG-6", "LOG-8", "LOG-9"} <= rules


@pytest.mark.parametrize("case", CBOR["cases"], ids=[c["hex"][:16] for c in CBOR["cases"]])
def test_LOG_7_canonical_cbor_vectors(case):
    value = from_json(case["value"])
    assert codec.dumps(value).hex() == case["hex"]
    assert codec.loads(bytes.fromhex(case["hex"])) == value


# -- the spec's rules are all tested, and the code cites only rules that exist ------

SPEC = read_text(os.path.join(ROOT, "specs", "log-format.md"))


def _test_sources():
    for path in find_tests("test_wal_*.py", "test_spec_vectors.py"):
        with open(path, encoding="utf-8") as f:
            yield os.path.basename(path), f.read()


def test_every_LOG_rule_of_the_spec_has_a_test_named_after_it():
    import re

    defined = sorted({int(n) for n in re.findall(r"\*\*LOG-(\d+)", SPEC)}, key=int)
    assert defined == list(range(1, 17))
    names = " ".join(re.findall(r"def (test_\w+)", "\n".join(src for _, src in _test_sources())))
    missing = [n for n in defined if not re.search(rf"LOG_{n}(?!\d)", names)]
    assert missing == [], f"rules without a test named after them: {missing}"


def test_the_code_cites_only_rules_the_spec_defines():
    import re

    cited = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "wal")):
        for f in files:
            if f.endswith(".py"):
                cited |= {int(n) for n in re.findall(r"LOG-(\d+)", read_text(os.path.join(dirpath, f)))}
    defined = {int(n) for n in re.findall(r"\*\*LOG-(\d+)", SPEC)}
    assert cited <= defined


def test_the_stateful_invariants_carry_the_spec_names():
    import re

    section = SPEC.split("## 16. Invariants", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| \*(\w+)\* \|", section, re.M)
    assert len(names) == 5
    src = dict(_test_sources())["test_wal_stateful.py"]
    for name in names:
        assert re.search(rf"@invariant\(\)\n    def {name}\(", src), name
