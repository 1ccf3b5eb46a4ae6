"""walctl export / import: Maildir trees as Dovecot lays them out (MS-14, MS-15).

Real nodes, real files: export a node, import the tree into a fresh node,
compare digests (UIDVALIDITY, UIDNEXT, UIDs, GUIDs, flags) and bodies;
import hand-made Dovecot-style trees; refuse bad input with clear errors.
"""

from __future__ import annotations

import json
import os

import blake3
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from engine.store.events import MAX_MAILBOX_NAME_BYTES
from engine.store.maildir import (
    MaildirFormatError,
    folder_dirname,
    folder_name,
    mutf7_decode,
    mutf7_encode,
    parse_uidlist,
    read_folder,
    virtual_size,
)
from engine.store.errors import (
    BadFlagError,
    MailboxExistsError,
    ReadOnlyNodeError,
    UidOrderError,
    UidValidityReuseError,
)
from engine.store.maildir_migration import PLACEHOLDER_GUID, export_store, import_maildir
from engine.node import Node
from engine.store.decisions import UIDNEXT_PLACEHOLDER, ImportedMessage
from tools.walctl import cli


def run(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + (repr(result.exception) if result.exception else "")
    return result


def body(tag: str, crlf: bool = False) -> bytes:
    nl = "\r\n" if crlf else "\n"
    return f"From: a@example.org{nl}Subject: {tag}{nl}{nl}Body of {tag}.{nl}".encode()


def digests(node_dir: str) -> dict:
    return json.loads(run("digest", node_dir, "--json").output)["mailboxes"]


def contents(node_dir: str) -> dict:
    """name -> (uidvalidity, uidnext, [(uid, guid, flags, internaldate_ms, body)])."""
    out = {}
    with Node.open(node_dir) as n:
        for mb in n.list_mailboxes():
            msgs = [(m.uid, m.guid, m.flags, m.internaldate_ms, n.fetch(mb.name, m.uid))
                    for m in n.list_messages(mb.name)]
            out[mb.name] = (mb.uidvalidity, mb.uidnext, msgs)
    return out


KEYWORDS = ["$Forwarded", "$Junk", "work", "Later"]


def rich_node(path: str) -> str:
    """Two users, nested and non-ASCII folders, every flag, keywords, expunged gaps
    (in the middle and at the end), an emptied mailbox and a never-used one."""
    n = Node.init(path)
    try:
        inbox = "user/bob/INBOX"
        for i in range(1, 9):
            n.deliver(inbox, body(f"bob {i}", crlf=i % 2 == 0), create=True,
                      internaldate=1_600_000_000 + i * 3600 + i / 1000)
        n.store_flags(inbox, [1, 2], "add", ["\\Seen", "\\Answered"])
        n.store_flags(inbox, [3], "add", ["\\Flagged", "\\Draft", "\\Deleted", "\\Seen"])
        n.store_flags(inbox, [4], "add", KEYWORDS)
        n.store_flags(inbox, [5], "add", ["$Forwarded"])
        n.expunge(inbox, [2, 6, 8])  # gaps in the middle; UIDNEXT 9 is above the last UID 7
        n.deliver("user/bob/Archive/2020", b"binary \x00\xff\r\nbytes", create=True, flags=["work"],
                  internaldate=1_500_000_000.123)
        n.deliver("user/bob/Entwürfe & Notizen", body("draft"), create=True, flags=["\\Draft"])
        n.deliver("user/bob/INBOX/child", body("child"), create=True)
        n.deliver("user/bob/Trash", body("gone"), create=True)
        n.expunge("user/bob/Trash", [1])  # empty, UIDNEXT 2
        n.create_mailbox("user/bob/Empty")  # never used: UIDNEXT 1
        n.deliver("user/alice/INBOX", body("alice"), create=True, flags=["\\Seen", "Later"])
    finally:
        n.close()
    return path


# -- round trip ---------------------------------------------------------------------------


def test_round_trip_keeps_uids_uidvalidity_uidnext_flags_guids_bodies_and_digests(tmp_path):
    """MS-14, MS-15: export then import gives the same digests (UIDNEXT included) and bodies."""
    src = rich_node(str(tmp_path / "src"))
    out = tmp_path / "export"
    res = run("export", src, "--maildir", out)
    assert "7 mailboxes as of applied LSN" in res.output
    # Dovecot's Maildir++ layout, one tree per user.
    bob = out / "bob"
    assert (bob / "cur").is_dir() and (bob / "new").is_dir() and (bob / "tmp").is_dir()
    assert (bob / ".Archive.2020" / "maildirfolder").exists()
    assert (bob / ".INBOX.child" / "cur").is_dir()
    assert (bob / f".{mutf7_encode('Entwürfe & Notizen')}" / "cur").is_dir()
    assert (out / "alice" / "cur").is_dir()
    header = (bob / "dovecot-uidlist").read_text().splitlines()[0].split()
    assert header[0] == "3" and "N9" in header

    dst = str(tmp_path / "dst")
    run("init", dst)
    res = run("import", dst, "--maildir", out)
    assert "7 mailboxes imported" in res.output
    assert digests(dst) == digests(src)
    assert contents(dst) == contents(src)
    # The UIDNEXT placeholder left nothing behind.
    for _, _, msgs in contents(dst).values():
        assert all(m[1] != PLACEHOLDER_GUID for m in msgs)
    # Exporting the import gives the same files and uidlists byte for byte (mailbox GUIDs aside).
    again = tmp_path / "again"
    run("export", dst, "--maildir", again)
    assert _tree(again, ignore_guid=True) == _tree(out, ignore_guid=True)


def _tree(root, *, ignore_guid: bool = False) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                data = fh.read()
            if ignore_guid and f == "dovecot-uidlist":
                first, rest = data.split(b"\n", 1)
                data = b" ".join(w for w in first.split() if not w.startswith(b"G")) + b"\n" + rest
            # A message file's mtime is its INTERNALDATE; other files' mtimes are just when they were written.
            mtime = os.stat(p).st_mtime_ns // 1_000_000 if os.path.basename(dirpath) == "cur" else None
            out[os.path.relpath(p, root)] = (data, mtime)
    return out


def test_export_file_names_flags_keywords_and_mtime(tmp_path):
    src = rich_node(str(tmp_path / "src"))
    out = tmp_path / "x"
    run("export", src, "user/bob/INBOX", "--maildir", out, "--user", "bob")
    assert sorted(os.listdir(out)) == ["cur", "dovecot-keywords", "dovecot-uidlist", "new", "tmp"]
    kw = (out / "dovecot-keywords").read_text()
    assert kw == "0 $Forwarded\n1 $Junk\n2 Later\n3 work\n"
    uidlist = parse_uidlist(str(out / "dovecot-uidlist"))
    by_uid = {uid: base for base, uid in uidlist.uids.items()}
    assert sorted(by_uid) == [1, 3, 4, 5, 7] and uidlist.uidnext == 9
    names = {f.split(":")[0]: f for f in os.listdir(out / "cur")}
    info = {uid: names[by_uid[uid]].rsplit(":", 1)[1] for uid in by_uid}
    assert info == {1: "2,RS", 3: "2,DFST", 4: "2,Pabcd", 5: "2,Pa", 7: "2,"}
    with Node.open(src) as n:
        for m in n.list_messages("user/bob/INBOX"):
            path = out / "cur" / names[by_uid[m.uid]]
            data = path.read_bytes()
            assert blake3.blake3(data).hexdigest() == m.guid
            assert os.stat(path).st_mtime_ns // 1_000_000 == m.internaldate_ms
            assert f",S={len(data)},W={virtual_size(data)}" in path.name
    assert virtual_size(b"a\nb\r\nc\n") == 9


def test_export_one_user_then_import_under_another_prefix(tmp_path):
    src = rich_node(str(tmp_path / "src"))
    out = tmp_path / "bob"
    run("export", src, "--maildir", out, "--user", "bob")
    dst = str(tmp_path / "dst")
    run("init", dst)
    run("import", dst, "--maildir", out, "--mailbox-prefix", "user/carol")
    s, d = digests(src), digests(dst)
    bob = {k[len("user/bob/"):]: v for k, v in s.items() if k.startswith("user/bob/")}
    assert {k[len("user/carol/"):]: v for k, v in d.items()} == bob


def test_import_refuses_existing_mailbox_and_writes_nothing(tmp_path):
    src = rich_node(str(tmp_path / "src"))
    out = tmp_path / "x"
    run("export", src, "--maildir", out)
    dst = str(tmp_path / "dst")
    with Node.init(dst) as n:
        n.create_mailbox("user/bob/Trash")
        last = n.log.last_lsn
    res = run("import", dst, "--maildir", out, ok=False)
    assert res.exit_code == 1 and "'user/bob/Trash' exists already" in res.output
    with Node.open(dst) as n:
        assert n.log.last_lsn == last


def test_interrupted_import_resumes_to_the_same_digests(tmp_path, monkeypatch):
    src = rich_node(str(tmp_path / "src"))
    out = str(tmp_path / "x")
    run("export", src, "--maildir", out)
    dst = str(tmp_path / "dst")
    Node.init(dst).close()
    calls = {"n": 0}
    real = Node.import_messages

    def failing(self, mailbox, messages, **kw):  # fault injection: the 3rd batch dies
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("injected: the import process died")
        return real(self, mailbox, messages, **kw)

    monkeypatch.setattr(Node, "import_messages", failing)
    with Node.open(dst) as n, pytest.raises(OSError):
        import_maildir(n, out, batch_messages=2)
    monkeypatch.setattr(Node, "import_messages", real)
    res = run("import", dst, "--maildir", out, ok=False)
    assert res.exit_code == 1 and "--resume" in res.output
    res = run("import", dst, "--maildir", out, "--resume")
    assert "already there" in res.output
    assert digests(dst) == digests(src)
    assert contents(dst) == contents(src)


def test_resume_refuses_a_uid_that_was_expunged_after_the_interruption(tmp_path):
    src = rich_node(str(tmp_path / "src"))
    out = str(tmp_path / "x")
    run("export", src, "--maildir", out, "--user", "bob")
    dst = str(tmp_path / "dst")
    with Node.init(dst) as n:
        import_maildir(n, out, prefix="user/bob/")
        n.expunge("user/bob/INBOX", [3])
    with Node.open(dst) as n, pytest.raises(UidOrderError, match="UID 3 is below UIDNEXT"):
        import_maildir(n, out, prefix="user/bob/", resume=True)


def test_resume_expunges_a_placeholder_whose_expunge_was_torn_off(tmp_path):
    src = rich_node(str(tmp_path / "src"))
    out = str(tmp_path / "x")
    run("export", src, "user/bob/INBOX", "--maildir", out, "--user", "bob")
    folder = read_folder(out)
    dst = str(tmp_path / "dst")
    with Node.init(dst) as n:
        n.create_mailbox("user/bob/INBOX", uidvalidity=folder.uidvalidity)
        msgs = [ImportedMessage(m.uid, open(m.path, "rb").read(), m.flags, m.internaldate_ms) for m in folder.messages]
        # What a torn final batch leaves: the placeholder appended, its expunge lost.
        n.import_messages("user/bob/INBOX", msgs + [ImportedMessage(folder.uidnext - 1, UIDNEXT_PLACEHOLDER)])
        import_maildir(n, out, prefix="user/bob/", resume=True)
    assert digests(dst)["user/bob/INBOX"] == digests(src)["user/bob/INBOX"]


# -- Dovecot-style trees ---------------------------------------------------------------------


def put(path, data: bytes, mtime_ms: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    if mtime_ms is not None:
        ns = mtime_ms * 1_000_000
        os.utime(path, ns=(ns, ns))


def dovecot_name(ts: int, tag: str, data: bytes, info: str | None) -> str:
    base = f"{ts}.M{len(tag)}P8566V0000000000000015I0000000004F3030E_0.mx1.example.com,S={len(data)}," \
           f"W={virtual_size(data)}"
    return base + (f":{info}" if info is not None else "")


def test_import_dovecot_tree_without_uidlist_assigns_uids_in_file_name_order(tmp_path):
    md = tmp_path / "Maildir"
    a, b, c, d = body("a"), body("b"), body("c"), body("d")
    # 999999999 sorts before 1000000000 as a number (not as text).
    put(md / "cur" / dovecot_name(1000000000, "b", b, "2,STb"), b, 1_000_000_000_250)
    put(md / "cur" / dovecot_name(999999999, "a", a, "2,RF"), a, 999_999_999_000)
    put(md / "new" / dovecot_name(1000000001, "c", c, None), c, 1_000_000_001_000)
    put(md / "tmp" / "1000000002.half-delivered", b"partial")
    put(md / "dovecot-keywords", b"0 $Junk\n1 $NonJunk\n")
    put(md / ".Sent" / "cur" / dovecot_name(1000000005, "d", d, "2,S"), d, 1_000_000_005_000)
    put(md / ".Archive.2019" / "cur" / dovecot_name(1000000006, "d", d, "2,"), d)
    os.makedirs(md / ".Parent.Only")  # no cur/new: a \NoSelect parent, not a mailbox
    put(md / "subscriptions", b"Sent\n")
    put(md / "dovecot.index.log", b"\x00\x01")
    node = str(tmp_path / "n")
    run("init", node)
    res = run("import", node, "--maildir", md, "--user", "bob", "--json")
    report = json.loads(res.output)
    assert any("unfinished deliveries" in w for w in report["warnings"])
    with Node.open(node) as n:
        names = [mb.name for mb in n.list_mailboxes()]
        assert names == ["user/bob/Archive/2019", "user/bob/INBOX", "user/bob/Sent"]
        inbox = n.list_messages("user/bob/INBOX")
        assert [(m.uid, m.flags, m.internaldate_ms) for m in inbox] == [
            (1, ("\\Answered", "\\Flagged"), 999_999_999_000),
            (2, ("$NonJunk", "\\Deleted", "\\Seen"), 1_000_000_000_250),
            (3, (), 1_000_000_001_000),
        ]
        assert [n.fetch("user/bob/INBOX", u) for u in (1, 2, 3)] == [a, b, c]
        mb = {m.name: m for m in n.list_mailboxes()}["user/bob/INBOX"]
        assert mb.uidnext == 4
        assert [m.flags for m in n.list_messages("user/bob/Sent")] == [("\\Seen",)]


def test_import_dovecot_uidlist_v3_keeps_uids_and_numbers_unlisted_files_from_uidnext(tmp_path):
    md = tmp_path / "Maildir"
    msgs = {name: body(name) for name in ("m10", "m12", "late1", "late2")}
    n10 = dovecot_name(1276528487, "m10", msgs["m10"], "2,S")
    n12 = dovecot_name(1276533073, "m12", msgs["m12"], "2,Fa")
    put(md / "cur" / n10, msgs["m10"], 1276528487_000)
    put(md / "cur" / n12, msgs["m12"], 1276533073_000)
    put(md / "new" / dovecot_name(1276600001, "late2", msgs["late2"], None), msgs["late2"], 1)
    put(md / "new" / dovecot_name(1276600000, "late1", msgs["late1"], None), msgs["late1"], 1)
    put(md / "dovecot-keywords", b"0 $Label1\n")
    gone = "1276500000.M1P1.kurkku,S=10:2,S"  # listed but the file is gone: expunged
    put(md / "dovecot-uidlist",
        f"3 V1275660208 N25 G3085f01b7f11094c501100008c4a11c1 Xfuture\n"
        f"9 :{gone}\n"
        f"10 :{n10.split(':')[0]}:2,\n"  # an older name: flags come from the file, not the list
        f"12 W2481 :{n12}\n".encode())
    node = str(tmp_path / "n")
    run("init", node)
    run("import", node, "--maildir", md, "--user", "bob")
    with Node.open(node) as n:
        mb = n.list_mailboxes()[0]
        assert (mb.name, mb.uidvalidity, mb.uidnext) == ("user/bob/INBOX", 1275660208, 27)
        got = [(m.uid, m.flags) for m in n.list_messages(mb.name)]
        assert got == [(10, ("\\Seen",)), (12, ("$Label1", "\\Flagged")), (25, ()), (26, ())]
        assert n.fetch(mb.name, 25) == msgs["late1"] and n.fetch(mb.name, 26) == msgs["late2"]


def test_import_courier_style_uidlist_version_1(tmp_path):
    md = tmp_path / "Maildir"
    m = body("one")
    name = dovecot_name(1300000000, "one", m, "2,S")
    put(md / "cur" / name, m)
    put(md / "dovecot-uidlist", f"1 4242 8\n5 {name.split(':')[0]}\n".encode())
    node = str(tmp_path / "n")
    run("init", node)
    run("import", node, "--maildir", md, "--user", "u")
    with Node.open(node) as n:
        mb = n.list_mailboxes()[0]
        assert (mb.uidvalidity, mb.uidnext, [x.uid for x in n.list_messages(mb.name)]) == (4242, 8, [5])


# -- bad input ---------------------------------------------------------------------------------


def _tree_with_uidlist(tmp_path, uidlist: bytes, *, keywords: bytes | None = None):
    md = tmp_path / "Maildir"
    m = body("x")
    name = dovecot_name(1300000000, "x", m, "2,S")
    put(md / "cur" / name, m)
    put(md / "dovecot-uidlist", uidlist.replace(b"NAME", name.split(":")[0].encode()))
    if keywords is not None:
        put(md / "dovecot-keywords", keywords)
    return md


@pytest.mark.parametrize("uidlist,keywords,message", [
    (b"3 V1 N5\n1 :NAME\nnot-a-number :x\n", None, "dovecot-uidlist:3: UID 'not-a-number' is not a 32-bit number"),
    (b"3 V1 N5\n1 W12\n", None, "dovecot-uidlist:2: expected '<uid> [fields] :<file name>'"),
    (b"3 V1 N5\n1 :NAME\n1 :other\n", None, "dovecot-uidlist:3: UID 1 is listed twice (lines 2 and 3)"),
    (b"3 V1 N5\n1 :NAME\n2 :NAME:2,S\n", None, "is listed twice (UIDs 1 and 2)"),
    (b"3 N5\n1 :NAME\n", None, "dovecot-uidlist:1: header has no V<uidvalidity> field"),
    (b"2 V1 N5\n", None, "unsupported dovecot-uidlist version '2'"),
    (b"3 V0 N5\n", None, "UIDVALIDITY '0' is not a 32-bit number >= 1"),
    (b"", None, "dovecot-uidlist:1: empty file"),
    (b"3 V1 N5\n1 :NAME\n", b"0 $Junk\nfoo\n", "dovecot-keywords:2: expected '<0-25> <keyword>'"),
    (b"3 V1 N5\n1 :NAME\n", b"0 $Junk\n0 $Other\n", "dovecot-keywords:2: keyword number 0 is given twice"),
    (b"3 V1 N5\n1 :NAME\n", b"0 bad(kw\n", "dovecot-keywords:1:"),
], ids=["bad-uid", "no-file-name", "duplicate-uid", "duplicate-file", "no-uidvalidity", "version-2",
        "zero-uidvalidity", "empty", "keywords-bad-line", "keywords-duplicate", "keywords-bad-atom"])
def test_bad_uidlist_or_keywords_is_a_clear_error_and_imports_nothing(tmp_path, uidlist, keywords, message):
    """MS-15: the file and line are named; nothing is imported."""
    md = _tree_with_uidlist(tmp_path, uidlist, keywords=keywords)
    node = str(tmp_path / "n")
    run("init", node)
    res = run("import", node, "--maildir", md, "--user", "bob", ok=False)
    assert res.exit_code == 1, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert digests(node) == {}


def test_file_names_dovecot_tolerates_become_warnings(tmp_path):
    md = tmp_path / "Maildir"
    a, b, c = body("a"), body("b"), body("c")
    put(md / "cur" / "1300000000.no-info", a)  # cur/ without :2,
    put(md / "cur" / "1300000001.odd:2,SXz", b)  # unknown letter X, keyword z not in dovecot-keywords
    put(md / "cur" / "1300000002.experimental:1,foo", c)  # info that is not ':2,'
    put(md / "cur" / ".hidden", b"not a message")
    node = str(tmp_path / "n")
    run("init", node)
    res = run("import", node, "--maildir", md, "--user", "bob")
    assert "no ':2,' info in cur/: imported without flags" in res.output
    assert "unknown flag letter 'X': ignored" in res.output
    assert "keyword letter 'z' is not in dovecot-keywords: ignored" in res.output
    assert "info '1,foo' is not ':2,<flags>'" in res.output
    with Node.open(node) as n:
        assert [(m.uid, m.flags) for m in n.list_messages("user/bob/INBOX")] == [(1, ()), (2, ("\\Seen",)), (3, ())]


def test_size_field_that_does_not_match_the_file_is_refused(tmp_path):
    md = tmp_path / "Maildir"
    put(md / "cur" / "1300000000.M1P1.host,S=999:2,S", b"short")
    with pytest.raises(MaildirFormatError, match="the file has 5 bytes but its name says S=999"):
        read_folder(str(md))


def test_same_message_in_cur_and_new_is_refused(tmp_path):
    md = tmp_path / "Maildir"
    put(md / "new" / "1300000000.M1P1.host", b"x")
    put(md / "cur" / "1300000000.M1P1.host:2,S", b"x")
    with pytest.raises(MaildirFormatError, match="is also"):
        read_folder(str(md))


def test_uidnext_at_or_below_a_listed_uid_falls_back_with_a_warning(tmp_path):
    md = _tree_with_uidlist(tmp_path, b"3 V7 N3\n3 :NAME\n")
    f = read_folder(str(md))
    assert f.uidnext == 4 and [m.uid for m in f.messages] == [3]
    assert any("UIDNEXT 3 is not above UID 3: using 4" in w for w in f.warnings)


def test_usage_errors(tmp_path):
    md = tmp_path / "Maildir"
    put(md / "cur" / "1.a:2,", b"x")
    node = str(tmp_path / "n")
    run("init", node)
    res = run("import", node, "--maildir", md, ok=False)
    assert res.exit_code == 1 and "one user's Maildir" in res.output and "--user NAME" in res.output
    res = run("import", node, "--maildir", md, "--user", "a", "--mailbox-prefix", "b", ok=False)
    assert res.exit_code == 2 and "not both" in res.output
    res = run("import", node, "--maildir", tmp_path / "missing", "--user", "a", ok=False)
    assert res.exit_code == 1 and "is not a directory" in res.output
    res = run("import", node, "--maildir", md, "--user", "a/b", ok=False)
    assert res.exit_code == 1 and "contain no '/'" in res.output
    res = run("export", node, "user/nobody/INBOX", "--maildir", tmp_path / "o", ok=False)
    assert res.exit_code == 1 and "no mailbox named 'user/nobody/INBOX'" in res.output


def test_import_refuses_a_message_above_the_node_limit_before_writing(tmp_path):
    md = tmp_path / "Maildir"
    put(md / "cur" / "1.small:2,", b"x" * 10)
    put(md / "cur" / "2.big:2,", b"x" * 2000)
    node = str(tmp_path / "n")
    run("init", node, "--max-message-bytes", "1000")
    res = run("import", node, "--maildir", md, "--user", "bob", ok=False)
    assert res.exit_code == 1 and "2000 bytes exceed the node's limit of 1000" in res.output
    assert digests(node) == {}


# -- export refusals --------------------------------------------------------------------------


def test_export_refuses_names_and_targets_it_cannot_write(tmp_path):
    src = str(tmp_path / "src")
    with Node.init(src) as n:
        n.deliver("user/bob/INBOX", body("x"), create=True)
        n.deliver("shared/news", body("n"), create=True)
        n.deliver("user/eve/v1.2", body("v"), create=True)
        n.deliver("user/kw/INBOX", body("k"), create=True, flags=[f"k{i}" for i in range(27)])
        n.deliver("user/.dot/INBOX", body("d"), create=True)
    res = run("export", src, "--maildir", tmp_path / "a", ok=False)
    assert res.exit_code == 1 and "'shared/news' is not a user's" in res.output and "--mailbox-prefix" in res.output
    assert not (tmp_path / "a").exists()  # checked before anything was written
    res = run("export", src, "user/.dot/INBOX", "--maildir", tmp_path / "b", ok=False)
    assert res.exit_code == 1 and "would be hidden" in res.output
    res = run("export", src, "user/eve/v1.2", "--maildir", tmp_path / "b", ok=False)
    assert res.exit_code == 1 and "contains '.'" in res.output
    res = run("export", src, "user/kw/INBOX", "--maildir", tmp_path / "c", ok=False)
    assert res.exit_code == 1 and "27 keywords are in use" in res.output
    run("export", src, "user/bob/INBOX", "--maildir", tmp_path / "d")
    res = run("export", src, "user/bob/INBOX", "--maildir", tmp_path / "d", ok=False)
    assert res.exit_code == 1 and "already holds files" in res.output
    # The whole namespace as one tree: shared/news becomes .shared.news.
    run("export", src, "shared/news", "user/bob/INBOX", "--maildir", tmp_path / "e", "--mailbox-prefix", "")
    assert (tmp_path / "e" / ".shared.news" / "dovecot-uidlist").exists()
    assert (tmp_path / "e" / ".user.bob.INBOX" / "dovecot-uidlist").exists()


def test_an_interrupted_export_leaves_no_uidlist_and_is_not_overwritten(tmp_path, monkeypatch):
    src = rich_node(str(tmp_path / "src"))
    from engine.store import maildir as maildir

    real = maildir.FolderWriter.add
    count = {"n": 0}

    def dying(self, *a, **kw):  # fault injection: the export dies on its 3rd message
        count["n"] += 1
        if count["n"] == 3:
            raise OSError("injected: disk gone")
        return real(self, *a, **kw)

    monkeypatch.setattr(maildir.FolderWriter, "add", dying)
    with pytest.raises(OSError):
        export_store(os.path.join(src, "store.sqlite"), str(tmp_path / "x"), prefix="user/bob/")
    monkeypatch.setattr(maildir.FolderWriter, "add", real)
    unfinished = [d for d, _, files in os.walk(tmp_path / "x") if "cur" in os.listdir(d) and "dovecot-uidlist" not in files]
    assert unfinished
    res = run("export", src, "--maildir", tmp_path / "x", "--user", "bob", ok=False)
    assert res.exit_code == 1 and "export into an empty directory" in res.output


# -- a running node --------------------------------------------------------------------------


def test_export_of_a_running_node_reads_its_store_read_only(tmp_path):
    from tests.support.lmtp import ServeProcess

    src = rich_node(str(tmp_path / "src"))
    offline = tmp_path / "offline"
    run("export", src, "--maildir", offline)
    with ServeProcess(src) as proc:
        res = run("export", src, "--maildir", tmp_path / "live", "--json")
        report = json.loads(res.output)
        assert "node is running" in report["note"]
        assert proc.proc.poll() is None
        assert proc.terminate() == 0
    assert _tree(tmp_path / "live") == _tree(offline)


# -- engine import operations (MS-14) ---------------------------------------------------------


def test_import_operations_refuse_out_of_order_uids_and_reused_uidvalidity(tmp_path):
    """MS-14: UIDs at least UIDNEXT and increasing, all or nothing; UIDVALIDITY of a used name refused."""
    path = str(tmp_path / "n")
    with Node.init(path) as n:
        n.create_mailbox("user/a/INBOX", uidvalidity=77)  # any value for a name never used here
        n.import_messages("user/a/INBOX", [ImportedMessage(5, b"five")])
        last = n.log.last_lsn
        with pytest.raises(UidOrderError, match="at least the mailbox's UIDNEXT \\(6\\)"):
            n.import_messages("user/a/INBOX", [ImportedMessage(5, b"again")])
        with pytest.raises(UidOrderError, match="strictly increasing"):
            n.import_messages("user/a/INBOX", [ImportedMessage(9, b"a"), ImportedMessage(8, b"b")])
        with pytest.raises(UidOrderError, match="UIDNEXT never decreases"):
            n.import_messages("user/a/INBOX", [ImportedMessage(9, b"a")], uidnext=9)
        with pytest.raises(BadFlagError):  # all or nothing: the good first message is not logged either
            n.import_messages("user/a/INBOX", [ImportedMessage(9, b"a"), ImportedMessage(10, b"b", ("bad(",))])
        assert n.log.last_lsn == last
        n.import_messages("user/a/INBOX", [], uidnext=100)
        mb = n.list_mailboxes()[0]
        assert (mb.uidnext, mb.messages) == (100, 1)
        n.delete_mailbox("user/a/INBOX")
        with pytest.raises(UidValidityReuseError, match="was used on this node before"):
            n.create_mailbox("user/a/INBOX", uidvalidity=77)
    with Node.open(path) as n:  # after a restart the tombstone still remembers the name
        with pytest.raises(UidValidityReuseError):
            n.create_mailbox("user/a/INBOX", uidvalidity=77)
        n.create_mailbox("user/a/INBOX", uidvalidity=n.state.last_uidvalidity + 1)
        n.create_mailbox("user/a/Sent")
        n.rename_mailbox("user/a/Sent", "user/a/Sent2")
        with pytest.raises(UidValidityReuseError):  # renamed away: the name is retired too
            n.create_mailbox("user/a/Sent", uidvalidity=1)
        with pytest.raises(MailboxExistsError):
            n.create_mailbox("user/a/Sent2", uidvalidity=5)


def test_a_replica_refuses_imports(tmp_path):
    path = str(tmp_path / "r")
    with Node.init(path, role="replica") as n:
        with pytest.raises(ReadOnlyNodeError):
            n.create_mailbox("user/a/INBOX", uidvalidity=3)


# -- names --------------------------------------------------------------------------------


def test_modified_utf7_examples():
    assert mutf7_encode("Entwürfe") == "Entw&APw-rfe"
    assert mutf7_encode("a&b") == "a&-b"
    assert mutf7_encode("日本語") == "&ZeVnLIqe-"
    assert mutf7_decode("&ZeVnLIqe-") == "日本語"
    assert folder_dirname("INBOX") == "" and folder_name("") == "INBOX"
    assert folder_dirname("A/B c") == ".A.B c" and folder_name(".INBOX.child") == "INBOX/child"
    with pytest.raises(ValueError):
        mutf7_decode("&AB")
    # Dovecot's :UTF-8 layout option: a component that cannot be modified UTF-7 is UTF-8 as it stands.
    assert folder_name(".Entwürfe.x") == "Entwürfe/x"
    with pytest.raises(ValueError):
        folder_name(".bad\udcff")


_component = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/.*%"),
                     min_size=1, max_size=12).filter(lambda s: s not in ("INBOX",))


@given(st.lists(_component, min_size=1, max_size=4))
def test_folder_names_round_trip(parts):
    name = "/".join(parts)
    if len(name.encode()) > MAX_MAILBOX_NAME_BYTES:
        return
    d = folder_dirname(name)
    assert "/" not in d and d.startswith(".")
    assert folder_name(d) == name
