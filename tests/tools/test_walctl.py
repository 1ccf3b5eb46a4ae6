"""walctl verify / replay / cursor / repair: behaviour and exit statuses (CliRunner, real logs).

walctl as a real process (``--follow`` until Ctrl-C, ``python -m tools``, the
progress bar on a terminal) is in ``tests/e2e/test_walctl_processes.py``.
"""

from __future__ import annotations

import base64
import json
import os

import blake3
import pytest
from click.testing import CliRunner

import wal
from wal import codec
from wal.format import SEGMENT_HEADER_SIZE
from wal.segment import iter_frames, list_segments

from tests.support.helpers import body_of, make_log
from tools.walctl import cli


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def frames(log: str):
    """[(segment name, offset, lsn, frame size)] of every frame, in order."""
    out = []
    for _, name in list_segments(log):
        for off, fh, _payload in iter_frames(os.path.join(log, name), SEGMENT_HEADER_SIZE):
            out.append((name, off, fh.lsn, fh.frame_size))
    return out


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def corrupt_record(log: str, lsn: int) -> tuple[str, int]:
    """Flip the last payload byte of record ``lsn``; returns (segment, offset)."""
    for name, off, l, size in frames(log):
        if l == lsn:
            flip_byte(os.path.join(log, name), off + size - 1)
            return name, off
    raise AssertionError(f"no LSN {lsn}")


def tear_last_record(log: str) -> tuple[str, int]:
    """Cut the last record in half, as a crash during its write would."""
    name, off, _lsn, size = frames(log)[-1]
    with open(os.path.join(log, name), "r+b") as f:
        f.truncate(off + size // 2)
    return name, off


@pytest.fixture
def log(tmp_path):
    return make_log(tmp_path / "node.wal")


# -- verify ----------------------------------------------------------------


def test_verify_valid_log_exits_0(log):
    r = run("verify", log)
    assert r.exit_code == 0, r.output
    assert "valid" in r.output
    assert "40 (LSN 1..40)" in r.output


def test_verify_json_report_fields(log):
    r = run("verify", log, "--json")
    assert r.exit_code == 0
    rep = json.loads(r.output)
    assert rep["ok"] is True
    assert rep["records"] == 40
    assert rep["first_lsn"] == 1 and rep["last_lsn"] == 40
    assert rep["segments"] == len(list_segments(log)) > 1
    assert rep["torn_tail"] is None and rep["error"] is None
    assert len(rep["last_hash"]) == 64


def test_verify_torn_tail_is_reported_but_valid(log):
    seg, off = tear_last_record(log)
    r = run("verify", log)
    assert r.exit_code == 0, r.output
    assert "torn tail" in r.output and seg in r.output and f"offset {off}" in r.output
    rep = json.loads(run("verify", log, "--json").output)
    assert rep["ok"] is True
    assert rep["torn_tail"]["segment"] == seg and rep["torn_tail"]["offset"] == off
    assert rep["last_lsn"] == 39


def test_verify_corrupt_record_exits_1_naming_segment_offset_lsn(log):
    seg, off = corrupt_record(log, 12)
    r = run("verify", log)
    assert r.exit_code == 1
    assert "DAMAGED" in r.output
    assert f"segment {seg}, offset {off}, LSN 12" in r.output
    assert "records    11 (LSN 1..11 verified before the damage)" in r.stdout
    assert "Error: log is damaged" in r.stderr


def test_verify_corrupt_json_exits_1_with_error_fields(log):
    seg, off = corrupt_record(log, 3)
    r = run("verify", "--json", log)
    assert r.exit_code == 1
    rep = json.loads(r.stdout)
    assert rep["ok"] is False
    assert rep["error"]["segment"] == seg
    assert rep["error"]["offset"] == off
    assert rep["error"]["lsn"] == 3
    assert "Error: log is damaged" in r.stderr


def test_verify_damaged_segment_header_exits_1(log):
    second = list_segments(log)[1][1]
    flip_byte(os.path.join(log, second), 40)
    r = run("verify", log)
    assert r.exit_code == 1
    assert second in r.output


def test_verify_not_a_log_exits_1(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("verify", empty)
    assert r.exit_code == 1
    assert "not a mailwal log" in r.output


def test_verify_missing_path_is_usage_error(tmp_path):
    r = run("verify", tmp_path / "nope.wal")
    assert r.exit_code == 2


# -- replay ----------------------------------------------------------------


def replay_json(*args):
    r = run("replay", *args, "--json")
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines()]  # stderr may carry a note (an empty range)


def test_replay_from_lsn_text(log):
    r = run("replay", log, "--from", "38")
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert [ln.split()[1] for ln in lines] == ["38", "39", "40"]
    assert "uid=39" in lines[1] and "body_size=" in lines[1]


def test_replay_json_fields_and_body_digest(log):
    recs = replay_json(log, "--from", "5", "--to", "6")
    assert [r["lsn"] for r in recs] == [5, 6]
    expected = {r.lsn: r for r in wal.LogReader(log).records(5, 6)}
    for rec in recs:
        assert rec["epoch"] == 1 and rec["type"] == 7
        assert rec["hash"] == expected[rec["lsn"]].hash.hex()
        assert rec["mailbox"] == "INBOX" and rec["uid"] == rec["lsn"]
        body = body_of(rec["lsn"])
        assert rec["body_size"] == len(body)
        assert rec["body_guid"] == blake3.blake3(body).hexdigest()
        assert "body" not in rec


def test_replay_bodies_prints_base64_in_json_and_text(log):
    (rec,) = replay_json(log, "--from", "9", "--to", "9", "--bodies")
    assert base64.b64decode(rec["body"]) == body_of(9)
    assert "body_size" not in rec
    r = run("replay", log, "--from", "9", "--to", "9", "--bodies")
    assert "Hello number 9." in r.output


def test_replay_to_is_inclusive_and_default_from_is_first(log):
    recs = replay_json(log, "--to", "3")
    assert [r["lsn"] for r in recs] == [1, 2, 3]
    assert len(replay_json(log)) == 40


def test_replay_from_cursor_name_starts_after_its_lsn(log):
    wal.CursorStore(log, wal.OS_FILEOPS).set("indexer", 30)
    recs = replay_json(log, "--from", "indexer")
    assert [r["lsn"] for r in recs] == list(range(31, 41))


def test_replay_from_cursor_with_digit_name(log):
    wal.CursorStore(log, wal.OS_FILEOPS).set("2024", 38)
    assert [r["lsn"] for r in replay_json(log, "--from", "cursor:2024")] == [39, 40]
    assert [r["lsn"] for r in replay_json(log, "--from", "2024")] == []  # an LSN past the end


def test_replay_unknown_cursor_exits_1(log):
    r = run("replay", log, "--from", "nobody")
    assert r.exit_code == 1
    assert "no cursor named 'nobody'" in r.output


def test_replay_payload_shapes(tmp_path):
    path = str(tmp_path / "shapes.wal")
    with wal.Log.create(path) as lg:
        lg.append(1, codec.dumps([1, "two", b"\x03"]))
        lg.append(2, b"\xff\xfe not one CBOR item")
        lg.append(3, codec.dumps({"lsn": "payload field", "hash": b"\x01\x02", "flags": ["\\Seen"]}))
        lg.append(4, codec.dumps({"body": "a text body is not bytes"}))
    r1, r2, r3, r4 = replay_json(path, "--from", "1")
    assert r1["payload"] == [1, "two", "03"]
    assert r2["raw_size"] == len(b"\xff\xfe not one CBOR item")
    assert r2["raw_blake3"] == blake3.blake3(b"\xff\xfe not one CBOR item").hexdigest()
    assert r3["lsn"] == 3 and r3["payload"] == {"lsn": "payload field", "hash": "0102"}
    assert r3["flags"] == ["\\Seen"]
    assert r4["body"] == "a text body is not bytes"
    (raw,) = replay_json(path, "--from", "2", "--to", "2", "--bodies")
    assert base64.b64decode(raw["raw"]) == b"\xff\xfe not one CBOR item"


def test_replay_corruption_exits_1_after_printing_good_records(log):
    seg, off = corrupt_record(log, 20)
    r = run("replay", log, "--from", "15", "--json")
    assert r.exit_code == 1
    good = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g["lsn"] for g in good] == [15, 16, 17, 18, 19]
    assert f"segment {seg}, offset {off}, LSN 20" in r.stderr


def test_replay_torn_tail_ends_quietly(log):
    tear_last_record(log)
    recs = replay_json(log, "--from", "35")
    assert [r["lsn"] for r in recs] == [35, 36, 37, 38, 39]


def test_replay_below_retained_lsn_exits_1(tmp_path):
    path = make_log(tmp_path / "short.wal", 40)
    with wal.Log.open(path) as lg:
        dropped = lg.drop_before(30)
    assert dropped
    first = list_segments(path)[0][0]
    r = run("replay", path, "--from", "1")
    assert r.exit_code == 1
    assert "LSN 1 is not in the log" in r.output
    assert replay_json(path)[0]["lsn"] == first


def test_replay_follow_stops_at_to(log):
    """--follow with --to returns once the last wanted record arrives (appended concurrently)."""
    import threading

    def append_more():
        with wal.Log.open(log, segment_max_bytes=2048) as lg:
            for i in range(41, 46):
                lg.append(7, codec.dumps({"uid": i}))

    t = threading.Thread(target=append_more)
    t.start()
    r = run("replay", log, "--from", "39", "--to", "45", "--follow", "--json")
    t.join()
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["lsn"] for x in r.output.splitlines()] == [39, 40, 41, 42, 43, 44, 45]


# -- cursor ----------------------------------------------------------------


def test_cursor_list_empty(log):
    r = run("cursor", log, "list")
    assert r.exit_code == 0 and "no cursors" in r.output
    assert json.loads(run("cursor", log, "list", "--json").output) == {}


def test_cursor_set_get_list_drop(log):
    assert run("cursor", log, "set", "indexer", "12").exit_code == 0
    assert run("cursor", log, "set", "backup", "0").exit_code == 0
    assert run("cursor", log, "get", "indexer").output.strip() == "12"
    assert json.loads(run("cursor", log, "get", "indexer", "--json").output) == {"name": "indexer", "lsn": 12}
    assert json.loads(run("cursor", log, "list", "--json").output) == {"backup": 0, "indexer": 12}
    text = run("cursor", log, "list").output
    assert "indexer" in text and "12" in text
    assert wal.CursorStore(log, wal.OS_FILEOPS).get("indexer") == 12
    r = run("cursor", log, "drop", "indexer")
    assert r.exit_code == 0
    assert json.loads(run("cursor", log, "list", "--json").output) == {"backup": 0}


def test_cursor_errors_exit_1(log):
    assert run("cursor", log, "get", "missing").exit_code == 1
    assert run("cursor", log, "drop", "missing").exit_code == 1
    r = run("cursor", log, "set", "bad/name", "1")
    assert r.exit_code == 1 and "invalid cursor name" in r.output
    assert run("cursor", log, "set", "c", "-1").exit_code == 2


def test_cursor_refuses_backwards_unless_rewind(log):
    run("cursor", log, "set", "c", "20")
    r = run("cursor", log, "set", "c", "10")
    assert r.exit_code == 1 and "refusing to move it back" in r.output
    assert run("cursor", log, "get", "c").output.strip() == "20"
    assert run("cursor", log, "set", "c", "10", "--rewind").exit_code == 0
    assert run("cursor", log, "get", "c").output.strip() == "10"


def test_cursor_refuses_lsn_past_end_unless_force(log):
    r = run("cursor", log, "set", "c", "41")
    assert r.exit_code == 1 and "past the end" in r.output
    assert run("cursor", log, "set", "c", "41", "--force").exit_code == 0
    assert run("cursor", log, "get", "c").output.strip() == "41"


def test_cursor_works_while_a_writer_holds_the_log(log):
    with wal.Log.open(log) as lg:
        assert run("cursor", log, "set", "live", "40").exit_code == 0
        assert lg.cursors.get("live") == 40


def test_cursor_on_non_log_exits_1(tmp_path):
    r = run("cursor", tmp_path, "list")
    assert r.exit_code == 1 and "not a mailwal log" in r.output


# -- repair ----------------------------------------------------------------


def test_repair_valid_log_changes_nothing(log):
    before = {n: os.path.getsize(os.path.join(log, n)) for _, n in list_segments(log)}
    r = run("repair", log, "--yes")
    assert r.exit_code == 0 and "nothing to repair" in r.output
    assert {n: os.path.getsize(os.path.join(log, n)) for _, n in list_segments(log)} == before


def test_repair_cuts_at_damage_and_keeps_the_bytes(log):
    seg, off = corrupt_record(log, 25)
    r = run("repair", log, "--yes", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["cut_segment"] == seg and rep["cut_offset"] == off
    assert rep["first_lost_lsn"] == 25 and rep["last_lsn"] == 24
    assert all(os.path.exists(p) for p in rep["backups"])
    assert run("verify", log).exit_code == 0


def test_repair_asks_first_and_aborts_on_no(log):
    corrupt_record(log, 25)
    r = run("repair", log, input="n\n")
    assert r.exit_code == 1
    assert run("verify", log).exit_code == 1  # untouched


def test_repair_refuses_while_writer_holds_log(log):
    with wal.Log.open(log):
        r = run("repair", log, "--yes")
    assert r.exit_code == 1 and "open for writing" in r.output
