"""Generate the log-format test vectors of specs/log-format.md.

    python specs/vectors/make_vectors.py          # rewrite the JSON files
    python specs/vectors/make_vectors.py --check  # exit 1 if they are stale

Writes three files next to this script:

* ``log.json``: a small valid log of two segments (fixed log id, epochs,
  types and payloads) with every header, frame and record hash in hex;
* ``log-reject.json``: segments a reader must refuse or trim, each with the
  verdict the spec requires;
* ``cbor.json``: canonical CBOR encodings of payload values (LOG-7).

The bytes come from ``wal.format`` and ``wal.codec``; tests/test_spec_vectors.py
checks them against the spec's definitions independently and checks that
these files are what this script produces.
"""

from __future__ import annotations

import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from wal import codec  # noqa: E402
from wal.format import (  # noqa: E402
    FORMAT_VERSION,
    FRAME_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    ZERO_HASH,
    SegmentHeader,
    decode_frame_header,
    encode_frame,
    encode_frame_header,
    encode_segment_header,
    payload_hash,
    record_hash,
)
from wal.segment import segment_name  # noqa: E402

LOG_ID = bytes.fromhex("6d61696c77616c2d766563746f727331")  # "mailwal-vectors1"

# (lsn, epoch, type, payload value or raw bytes, batch_back); two batches per segment.
RECORDS = [
    # segment 1
    (1, 1, 1, {"mailbox": "INBOX", "uid": 1}, 0),
    (2, 1, 2, {"flags": ["\\Seen"], "uid": 1}, 0),
    (3, 1, 2, b"", 1),  # an empty payload, second record of the batch 2..3
    # segment 2 (starts at LSN 4)
    (4, 2, 1, {"mailbox": "INBOX", "uid": 2, "size": 1000}, 0),
    (5, 2, 3, {"expunge": [1]}, 0),
]
SEGMENT_SPLIT = 4  # first LSN of the second segment


def _payload(value) -> bytes:
    return value if isinstance(value, bytes) else codec.dumps(value)


def _jsonable(value):
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _jsonable(v) for k, v in value.items()}
        return {"$map": [[_jsonable(k), _jsonable(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def build_log() -> tuple[dict, list[dict]]:
    """The valid log; also returns the raw segments for the reject cases."""
    segments = []
    prev = ZERO_HASH
    current = None
    for lsn, epoch, type_, value, back in RECORDS:
        if current is None or lsn == SEGMENT_SPLIT:
            header = SegmentHeader(FORMAT_VERSION, LOG_ID, lsn, prev)
            header_bytes = encode_segment_header(header)
            current = {
                "name": segment_name(lsn),
                "header": {"version": FORMAT_VERSION, "header_size": SEGMENT_HEADER_SIZE, "log_id": LOG_ID.hex(),
                           "first_lsn": lsn, "prev_hash": prev.hex()},
                "header_hex": header_bytes.hex(),
                "records": [],
                "_bytes": bytearray(header_bytes),
            }
            segments.append(current)
        payload = _payload(value)
        h = record_hash(prev, lsn, epoch, type_, len(payload), payload_hash(payload))
        frame = encode_frame(lsn, epoch, type_, payload, h, batch_back=back)
        current["records"].append({
            "lsn": lsn, "epoch": epoch, "type": type_, "batch_back": back,
            "payload_hex": payload.hex(),
            "payload_value": None if isinstance(value, bytes) else _jsonable(value),
            "payload_hash": payload_hash(payload).hex(),
            "hash": h.hex(),
            "offset": len(current["_bytes"]),
            "frame_hex": frame.hex(),
        })
        current["_bytes"] += frame
        prev = h
    raw = [bytes(s.pop("_bytes")) for s in segments]
    for s, data in zip(segments, raw):
        s["file_hex"] = data.hex()
        s["file_size"] = len(data)
    log = {
        "description": "A valid mailwal log (format version 1): two segments, five records, "
                       "batches {1}, {2,3} in the first segment and {4}, {5} in the second. "
                       "Readers MUST accept it and yield exactly these records and hashes.",
        "spec": "specs/log-format.md",
        "format_version": FORMAT_VERSION,
        "log_id": LOG_ID.hex(),
        "segments": segments,
        "last_lsn": RECORDS[-1][0],
        "last_hash": prev.hex(),
    }
    return log, [{"name": s["name"], "data": d} for s, d in zip(segments, raw)]


def _frame_bytes(log: dict, lsn: int) -> tuple[dict, dict]:
    for seg in log["segments"]:
        for rec in seg["records"]:
            if rec["lsn"] == lsn:
                return seg, rec
    raise KeyError(lsn)


def _with_bytes(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def _reframe_head(frame: bytes, **fields) -> bytes:
    """Rewrite fields of a (valid) frame's head and give it a correct head CRC."""
    fh = decode_frame_header(frame)
    values = {"payload_len": fh.payload_len, "lsn": fh.lsn, "epoch": fh.epoch, "type": fh.type, "flags": fh.flags,
              "batch_back": fh.batch_back, **fields}
    return encode_frame_header(values["payload_len"], values["lsn"], values["epoch"], values["type"],
                               values["batch_back"], fh.hash, flags=values["flags"]) + frame[FRAME_HEADER_SIZE:]


def _header_with(header_bytes: bytes, **fields) -> bytes:
    magic, version, size = struct.unpack_from("<8sHH", header_bytes)
    magic = fields.get("magic", magic)
    version = fields.get("version", version)
    body = magic + struct.pack("<HH", version, size) + header_bytes[12:48] + fields.get("prev_hash", header_bytes[48:80]) + header_bytes[80:88]
    if fields.get("keep_check"):
        return body + header_bytes[88:96]
    import blake3

    return body + blake3.blake3(body).digest(8)


def build_rejects(log: dict, raw: list[dict]) -> dict:
    seg1 = raw[0]["data"]
    seg2 = raw[1]["data"]
    s1, s2 = log["segments"]
    cases = []

    def case(name, rule, segment_name_, data, *, context, verdict, note):
        cases.append({"name": name, "rule": rule, "note": note, "segment": segment_name_,
                      "context": context, "segment_hex": data.hex(), "verdict": verdict})

    first_ctx = {"expected_first_lsn": 1, "expected_prev_hash": ZERO_HASH.hex(), "log_id": LOG_ID.hex(), "is_last": True}
    second_ctx = {"expected_first_lsn": 4, "expected_prev_hash": s1["records"][-1]["hash"], "log_id": LOG_ID.hex(), "is_last": True}
    r1 = s1["records"][0]
    r2 = s1["records"][1]
    o1, o2, o3 = (r["offset"] for r in s1["records"])

    # Frame damage in a record followed by a later batch: corruption (LOG-9).
    case("bad head CRC", "LOG-4, LOG-9", s1["name"], _with_bytes(seg1, o1 + 28, b"\0\0\0\0"),
         context=first_ctx, verdict={"error": "CorruptRecordError", "offset": o1, "lsn": 1},
         note="LSN 1's head CRC is zeroed; LSN 2 (a later batch) follows, so this is not a torn write")
    case("bad record hash", "LOG-5, LOG-9", s1["name"], _with_bytes(seg1, o1 + 64, bytes([seg1[o1 + 64] ^ 1])),
         context=first_ctx, verdict={"error": "CorruptRecordError", "offset": o1, "lsn": 1},
         note="one payload bit of LSN 1 flipped; its head is intact, its record hash is not")
    wrong = _reframe_head(bytes.fromhex(r2["frame_hex"]), lsn=7, batch_back=0)
    case("wrong LSN", "LOG-4, LOG-9", s1["name"], _with_bytes(seg1, o2, wrong),
         context=first_ctx, verdict={"error": "CorruptRecordError", "offset": o2, "lsn": 2},
         note="LSN 2's frame claims LSN 7 (with a good head CRC); a frame of a later batch follows")
    case("bad version header", "LOG-3", s1["name"], _header_with(seg1[:96], version=2) + seg1[96:],
         context=first_ctx, verdict={"error": "UnsupportedVersionError", "version": 2},
         note="a well-formed header (good check) of format version 2: refuse, do not call it damage")
    case("damaged version field", "LOG-1, LOG-3", s1["name"], _header_with(seg1[:96], version=3, keep_check=True) + seg1[96:],
         context=first_ctx, verdict={"error": "CorruptRecordError", "offset": 0, "lsn": None},
         note="version changed without a matching check: damage, not a newer format")
    case("bad magic", "LOG-1", s1["name"], b"MAILWAL?" + seg1[8:],
         context=first_ctx, verdict={"error": "CorruptRecordError", "offset": 0, "lsn": None},
         note="the first 8 bytes must be 'MAILWAL\\n'")
    case("bad header check", "LOG-1", s1["name"], _with_bytes(seg1, 20, bytes([seg1[20] ^ 0x10])),
         context=first_ctx, verdict={"error": "CorruptRecordError", "offset": 0, "lsn": None},
         note="one bit of the log id flipped")
    case("broken chain between segments", "LOG-6", s2["name"], _header_with(seg2[:96], prev_hash=bytes(32)) + seg2[96:],
         context=second_ctx, verdict={"error": "CorruptRecordError", "offset": 0, "lsn": 4},
         note="segment 2's header is well-formed but its prev_hash is not LSN 3's hash")
    case("flags set", "LOG-4", s1["name"], _with_bytes(seg1, o1, _reframe_head(bytes.fromhex(r1["frame_hex"]), flags=1)[:32]),
         context=first_ctx, verdict={"error": "CorruptRecordError", "offset": o1, "lsn": 1},
         note="flags MUST be 0 in version 1: the header is not valid-looking")
    case("batch_back not below LSN", "LOG-4", s1["name"], _with_bytes(seg1, o1, _reframe_head(bytes.fromhex(r1["frame_hex"]), batch_back=1)[:32]),
         context=first_ctx, verdict={"error": "CorruptRecordError", "offset": o1, "lsn": 1},
         note="batch_back must be < lsn: the header is not valid-looking")
    # Torn tails: accepted, trimmed (LOG-8).
    case("torn final record", "LOG-8", s2["name"], seg2[:-3],
         context=second_ctx, verdict={"torn": {"offset": s2["records"][-1]["offset"], "last_lsn": 4}},
         note="the last 3 bytes of LSN 5 are missing: trim from LSN 5's offset")
    case("damage inside the final batch", "LOG-8", s1["name"], _with_bytes(seg1, o2 + 64, bytes([seg1[o2 + 64] ^ 1])),
         context=first_ctx, verdict={"torn": {"offset": o2, "last_lsn": 1}},
         note="LSN 2 is damaged and only LSN 3 of the same batch (2..3) follows: indistinguishable from a torn write")
    case("zero-filled tail", "LOG-8", s2["name"], seg2 + bytes(4096),
         context=second_ctx, verdict={"torn": {"offset": len(seg2), "last_lsn": 5}},
         note="zeros after the last record (a file extended but never written)")
    case("complete frame after the tail", "LOG-8", s2["name"], seg2,
         context=second_ctx, verdict={"ok": {"last_lsn": 5}},
         note="the intact second segment: every record is kept")
    return {
        "description": "Segments a reader must refuse (error) or trim (torn), one damage each, built from "
                       "log.json. 'context' is what the hash chain before the segment requires; "
                       "'is_last' says the segment is the log's last (only it may be torn).",
        "spec": "specs/log-format.md",
        "cases": cases,
    }


CBOR_CASES = [
    0, 23, 24, 255, 256, 65536, 2**32, -1, -24, -25, b"", b"\x01\x02", "", "INBOX", "\u00e9",
    [], [1, [2, 3]], {}, {"uid": 1, "mailbox": "INBOX"}, {"b": 1, "aa": 2},
    {1000: "x", -1: "y"}, {"a": {"z": 1, "y": [True, False, None]}}, 1.5, 100000.0, True, None,
]


def build_cbor() -> dict:
    return {
        "description": "Canonical CBOR (LOG-7): RFC 8949 core deterministic encoding with length-first map key "
                       "order (RFC 8949 section 4.2.3, as cbor2 canonical=True). 'value' uses JSON, with "
                       "{\"$bytes\": hex} for byte strings and {\"$map\": [[k, v], ...]} for maps with non-text keys.",
        "spec": "specs/log-format.md",
        "cases": [{"value": _jsonable(v), "hex": codec.dumps(v).hex()} for v in CBOR_CASES],
    }


def build() -> dict[str, str]:
    log, raw = build_log()
    out = {
        "log.json": log,
        "log-reject.json": build_rejects(log, raw),
        "cbor.json": build_cbor(),
    }
    return {name: json.dumps(doc, indent=1, ensure_ascii=False) + "\n" for name, doc in out.items()}


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def main(argv: list[str]) -> int:
    files = build()
    stale = [n for n, text in files.items()
             if not os.path.exists(os.path.join(HERE, n)) or read_text(os.path.join(HERE, n)) != text]
    if "--check" in argv:
        for n in stale:
            print(f"stale: specs/vectors/{n}")
        return 1 if stale else 0
    for n, text in files.items():
        with open(os.path.join(HERE, n), "w", encoding="utf-8") as f:
            f.write(text)
    print(f"wrote {', '.join(sorted(files))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
