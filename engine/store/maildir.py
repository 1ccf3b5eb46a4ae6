"""Maildir as Dovecot lays it out: names, flags, keywords, dovecot-uidlist (MS-15).

This module knows the on-disk conventions and nothing about nodes
(engine/migrate.py drives exports and imports with it).

Layout (Dovecot's default Maildir++, one tree per user)
-------------------------------------------------------
``ROOT/`` holds INBOX (``cur/ new/ tmp/``); every other mailbox is a
directory ``ROOT/.A.B`` for the mailbox ``A/B`` below the user's prefix
(``user/NAME/``), its components in IMAP's modified UTF-7 (RFC 3501 5.1.3),
as Dovecot stores them by default. ``.INBOX.child`` is ``INBOX/child``. A
component containing ``.`` cannot be written (``.`` separates levels).

Files
-----
* A message is ``cur/<base>:2,<info>``: the base is unique in its folder
  and may carry ``,S=<bytes>`` and ``,W=<bytes with CRLF line ends>``; the
  info letters are the Maildir flags ``D`` \\Draft, ``F`` \\Flagged, ``P``
  passed (the keyword ``$Forwarded`` here), ``R`` \\Answered, ``S`` \\Seen,
  ``T`` \\Deleted, and ``a``..``z`` for keywords. Anything after a further
  ``,`` in the info is Dovecot's and ignored. The file's mtime is the
  message's INTERNALDATE.
* ``dovecot-keywords`` maps letters to keywords: lines ``<n> <keyword>``,
  ``0`` meaning ``a``. At most 26 keywords fit in one folder.
* ``dovecot-uidlist`` maps UIDs to file bases. Version 3: a header
  ``3 V<uidvalidity> N<uidnext> [G<mailbox guid>] [...]`` (fields in any
  order), then ``<uid> [<extension fields>] :<file name>`` per message.
  Version 1 (Courier's): ``1 <uidvalidity> <uidnext>``, then ``<uid> <file
  name>``. A listed file that is gone was expunged; a file the list does not
  name arrived later and gets the next UIDs.

Files named with a leading ``.`` and everything in ``tmp/`` are not
messages (Maildir readers skip them). Writers create a file in ``tmp/``,
fsync it and rename it into ``cur/``, then fsync the directory.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass, field

from wal import OS_FILEOPS

from .events import SYSTEM_FLAGS, normalize_flags
from .errors import BadFlagError, RequestError

__all__ = [
    "MaildirError", "MaildirFormatError", "MaildirLayoutError", "ExportTargetError",
    "FLAG_LETTERS", "FORWARDED_KEYWORD", "MAX_KEYWORDS",
    "mutf7_encode", "mutf7_decode", "folder_dirname", "folder_name", "is_maildir", "list_folders",
    "ParsedName", "parse_filename", "info_letters", "flags_from_letters", "keyword_letters",
    "parse_keywords", "format_keywords", "Uidlist", "parse_uidlist", "format_uidlist",
    "FolderMessage", "Folder", "read_folder", "message_base", "virtual_size", "FolderWriter",
    "check_export_target", "info_for", "UIDLIST", "KEYWORDS",
]

FORWARDED_KEYWORD = "$Forwarded"  # RFC 5788's keyword for Maildir's 'P' (passed)
FLAG_LETTERS = {"D": "\\Draft", "F": "\\Flagged", "P": FORWARDED_KEYWORD, "R": "\\Answered", "S": "\\Seen",
                "T": "\\Deleted"}
_LETTER_BY_FLAG = {v: k for k, v in FLAG_LETTERS.items()}
MAX_KEYWORDS = 26
UIDLIST = "dovecot-uidlist"
KEYWORDS = "dovecot-keywords"
MAILDIRFOLDER = "maildirfolder"  # Maildir++ marks every folder below the root with this empty file


class MaildirError(RequestError):
    """A Maildir tree cannot be read or written as asked; nothing was imported or overwritten."""


class MaildirFormatError(MaildirError):
    """A file of the tree breaks the format (``path``, ``line`` when it is a line, ``reason``)."""

    def __init__(self, path: str, reason: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class MaildirLayoutError(MaildirError):
    """A mailbox (name or contents) has no Maildir++ representation."""


class ExportTargetError(MaildirError):
    """The export target already holds mail; exports never mix with or overwrite earlier ones."""


# -- modified UTF-7 (RFC 3501 5.1.3) ------------------------------------------------


def mutf7_encode(text: str) -> str:
    """``text`` in IMAP's modified UTF-7: printable ASCII stays, ``&`` is ``&-``,
    other characters are ``&`` + base64 of UTF-16BE with ``,`` for ``/`` + ``-``."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in text:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def mutf7_decode(text: str) -> str:
    """Inverse of :func:`mutf7_encode`. Raises ValueError for malformed input."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "&":
            if not 0x20 <= ord(ch) <= 0x7E:
                raise ValueError(f"{text!r}: character {ch!r} is not printable ASCII (modified UTF-7)")
            out.append(ch)
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise ValueError(f"{text!r}: '&' without a closing '-'")
        chunk = text[i + 1:end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
            if len(raw) % 2:
                raise ValueError(f"{text!r}: odd number of UTF-16 bytes")
            out.append(raw.decode("utf-16-be"))
        i = end + 1
    return "".join(out)


# -- layout ---------------------------------------------------------------------------


def folder_dirname(relative: str) -> str:
    """The Maildir++ directory (relative to the user's root) of mailbox ``relative``
    (its name below the prefix): ``""`` for INBOX, ``.A.B`` for ``A/B``.

    Raises MaildirLayoutError for a component containing ``.``.
    """
    if relative == "INBOX":
        return ""
    parts = relative.split("/")
    for part in parts:
        if "." in part:
            raise MaildirLayoutError(
                f"mailbox component {part!r} of {relative!r} contains '.', which separates levels in Maildir++; "
                f"rename the mailbox before exporting it"
            )
    return "." + ".".join(mutf7_encode(p) for p in parts)


def folder_name(dirname: str) -> str:
    """Inverse of :func:`folder_dirname`: ``.A.B`` -> ``A/B``, ``""`` -> INBOX.

    A component with non-ASCII characters cannot be modified UTF-7, so it is
    taken as UTF-8 as it stands (Dovecot's ``:UTF-8`` layout option).
    Raises ValueError for bytes that are not UTF-8 or malformed modified UTF-7.
    """
    if dirname == "":
        return "INBOX"
    if not dirname.startswith(".") or dirname in (".", ".."):
        raise ValueError(f"{dirname!r} is not a Maildir++ folder directory")
    if any("\udc80" <= c <= "\udcff" for c in dirname):
        raise ValueError(f"{dirname!r} is not valid UTF-8")
    return "/".join(p if any(ord(c) > 0x7E for c in p) else mutf7_decode(p) for p in dirname[1:].split("."))


def is_maildir(path: str) -> bool:
    """Whether ``path`` holds messages of a mailbox (a ``cur/`` or ``new/`` directory)."""
    return os.path.isdir(os.path.join(path, "cur")) or os.path.isdir(os.path.join(path, "new"))


def list_folders(root: str) -> list[tuple[str, str]]:
    """``(relative mailbox name, directory)`` of every mailbox of a Maildir++ tree, INBOX first.

    The root is INBOX if it has ``cur/`` or ``new/``; every ``.Name``
    directory with ``cur/`` or ``new/`` is a folder (``.Name`` entries
    without them are skipped: Dovecot shows them as \\NoSelect parents).
    Raises MaildirFormatError for a folder name that is not modified UTF-7.
    """
    out: list[tuple[str, str]] = []
    if is_maildir(root):
        out.append(("INBOX", root))
    folders = []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if not entry.startswith(".") or entry in (".", "..") or not os.path.isdir(path) or not is_maildir(path):
            continue
        try:
            name = folder_name(entry)
        except ValueError as exc:
            raise MaildirFormatError(path, f"not a Maildir++ folder name: {exc}") from None
        folders.append((name, path))
    return out + sorted(folders)


# -- file names and flags -------------------------------------------------------------


@dataclass(frozen=True)
class ParsedName:
    base: str  # the unique part: everything before the info separator
    info: str | None  # after ':' (None: no info, as in new/)
    size: int | None  # ,S=
    vsize: int | None  # ,W=


_SIZE_FIELD = re.compile(r",([SW])=(\d+)")


def parse_filename(name: str) -> ParsedName:
    """Split a message file name into its base, info and size fields."""
    base, sep, info = name.rpartition(":")
    if not sep:
        base, info = name, None
    sizes = {k: int(v) for k, v in _SIZE_FIELD.findall(base)}
    return ParsedName(base, info, sizes.get("S"), sizes.get("W"))


def flags_from_letters(letters: str, keywords: dict[str, str]) -> tuple[tuple[str, ...], list[str]]:
    """Flags for the info letters (the part after ``2,`` up to a further ``,``).

    Returns ``(flags, problems)``: unknown letters and keyword letters that
    ``dovecot-keywords`` does not name are skipped and reported (Dovecot
    ignores them too).
    """
    flags = set()
    problems = []
    for ch in letters:
        if ch in FLAG_LETTERS:
            flags.add(FLAG_LETTERS[ch])
        elif "a" <= ch <= "z":
            kw = keywords.get(ch)
            if kw is None:
                problems.append(f"keyword letter {ch!r} is not in {KEYWORDS}: ignored")
            else:
                flags.add(kw)
        else:
            problems.append(f"unknown flag letter {ch!r}: ignored")
    return tuple(sorted(flags)), problems


def info_letters(info: str | None) -> tuple[str, list[str]]:
    """The flag letters of an info part, and problems (not ``2,`` info)."""
    if info is None:
        return "", []
    if not info.startswith("2,"):
        return "", [f"info {info!r} is not ':2,<flags>': imported without flags"]
    return info[2:].split(",", 1)[0], []


def keyword_letters(keywords) -> dict[str, str]:
    """keyword -> letter for a folder's keywords (sorted, ``a`` first).

    Raises MaildirLayoutError for more than 26 keywords.
    """
    kws = sorted(set(keywords))
    if len(kws) > MAX_KEYWORDS:
        raise MaildirLayoutError(
            f"{len(kws)} keywords are in use, but a Maildir folder can name at most {MAX_KEYWORDS} "
            f"(letters a-z): remove some keywords first"
        )
    return {kw: chr(ord("a") + i) for i, kw in enumerate(kws)}


def info_for(flags, letters: dict[str, str]) -> str:
    """``2,<letters>`` for ``flags`` (letters in ASCII order, as the Maildir spec asks)."""
    out = set()
    for f in flags:
        if f in _LETTER_BY_FLAG:
            out.add(_LETTER_BY_FLAG[f])
        if f not in SYSTEM_FLAGS:
            out.add(letters[f])
    return "2," + "".join(sorted(out))


def virtual_size(body: bytes) -> int:
    """RFC822.SIZE: the size with every bare LF counted as CRLF (Dovecot's ,W=)."""
    return len(body) + body.count(b"\n") - body.count(b"\r\n")


def message_base(uid: int, internaldate_ms: int, body: bytes) -> str:
    """A unique, deterministic file base: ``<secs>.M<usecs>U<uid>.mailwal,S=<size>,W=<vsize>``."""
    secs, ms = divmod(internaldate_ms, 1000)
    return f"{secs}.M{ms * 1000}U{uid}.mailwal,S={len(body)},W={virtual_size(body)}"


# -- dovecot-keywords -----------------------------------------------------------------


def parse_keywords(path: str) -> dict[str, str]:
    """letter -> keyword from a ``dovecot-keywords`` file ({} if there is none).

    Raises MaildirFormatError for a line that is not ``<0..25> <keyword>``,
    a number given twice or a keyword IMAP does not allow.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    out: dict[str, str] = {}
    for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        idx, sep, kw = line.partition(" ")
        if not sep or not idx.isdigit() or not 0 <= int(idx) < MAX_KEYWORDS or not kw:
            raise MaildirFormatError(path, f"expected '<0-{MAX_KEYWORDS - 1}> <keyword>', got {line!r}", n)
        letter = chr(ord("a") + int(idx))
        if letter in out:
            raise MaildirFormatError(path, f"keyword number {idx} is given twice", n)
        try:
            (kw,) = normalize_flags([kw])
        except (BadFlagError, ValueError) as exc:
            raise MaildirFormatError(path, str(exc), n) from None
        if kw in SYSTEM_FLAGS:
            raise MaildirFormatError(path, f"{kw} is a system flag, not a keyword", n)
        out[letter] = kw
    return out


def format_keywords(letters: dict[str, str]) -> bytes:
    """``dovecot-keywords`` content for keyword -> letter."""
    return "".join(f"{ord(letter) - ord('a')} {kw}\n" for kw, letter in sorted(letters.items(), key=lambda x: x[1])
                   ).encode()


# -- dovecot-uidlist ------------------------------------------------------------------


@dataclass
class Uidlist:
    version: int
    uidvalidity: int
    uidnext: int | None
    guid: str | None
    uids: dict[str, int] = field(default_factory=dict)  # file base -> UID


def _u32(value: str, what: str, path: str, line: int) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 0xFFFFFFFF:
        raise MaildirFormatError(path, f"{what} {value!r} is not a 32-bit number >= 1", line)
    return int(value)


def parse_uidlist(path: str) -> Uidlist | None:
    """Read a ``dovecot-uidlist`` (None if there is none).

    Raises MaildirFormatError (with the line number) for an unknown version,
    a header without UIDVALIDITY, a line that is not ``<uid> ... :<name>``,
    or a UID or file named twice.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    lines = raw.decode("utf-8", "surrogateescape").split("\n")
    if not lines or not lines[0].strip():
        raise MaildirFormatError(path, "empty file: no header line", 1)
    head = lines[0].split()
    if head[0] == "3":
        fields = {f[0]: f[1:] for f in head[1:] if f}
        if "V" not in fields:
            raise MaildirFormatError(path, "header has no V<uidvalidity> field", 1)
        ul = Uidlist(3, _u32(fields["V"], "UIDVALIDITY", path, 1),
                     _u32(fields["N"], "UIDNEXT", path, 1) if "N" in fields else None, fields.get("G"))
    elif head[0] == "1":
        if len(head) < 3:
            raise MaildirFormatError(path, "version 1 header must be '1 <uidvalidity> <uidnext>'", 1)
        ul = Uidlist(1, _u32(head[1], "UIDVALIDITY", path, 1), _u32(head[2], "UIDNEXT", path, 1), None)
    else:
        raise MaildirFormatError(path, f"unsupported dovecot-uidlist version {head[0]!r} (only 1 and 3 are known)", 1)
    by_uid: dict[int, int] = {}
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        uid_s, sep, rest = line.partition(" ")
        uid = _u32(uid_s, "UID", path, n)
        if ul.version == 3:
            if rest.startswith(":"):
                name = rest[1:]
            else:
                cut = rest.find(" :")
                if cut < 0:
                    raise MaildirFormatError(path, f"expected '<uid> [fields] :<file name>', got {line!r}", n)
                name = rest[cut + 2:]
        else:
            name = rest.strip()
        if not sep or not name or "/" in name:
            raise MaildirFormatError(path, f"line names no file: {line!r}", n)
        base = parse_filename(name).base
        if uid in by_uid:
            raise MaildirFormatError(path, f"UID {uid} is listed twice (lines {by_uid[uid]} and {n})", n)
        if base in ul.uids:
            raise MaildirFormatError(path, f"file {base!r} is listed twice (UIDs {ul.uids[base]} and {uid})", n)
        by_uid[uid] = n
        ul.uids[base] = uid
    return ul


def format_uidlist(uidvalidity: int, uidnext: int, guid: str | None, entries) -> bytes:
    """Version 3 ``dovecot-uidlist`` content; ``entries`` are ``(uid, file name)`` by UID."""
    head = f"3 V{uidvalidity} N{uidnext}" + (f" G{guid}" if guid else "")
    return (head + "\n" + "".join(f"{uid} :{name}\n" for uid, name in entries)).encode("utf-8", "surrogateescape")


# -- reading a folder -----------------------------------------------------------------


@dataclass(frozen=True)
class FolderMessage:
    uid: int
    path: str
    flags: tuple[str, ...]
    internaldate_ms: int
    size: int


@dataclass
class Folder:
    """A folder as read: what to import, with the UIDs and UIDVALIDITY to keep."""

    path: str
    uidvalidity: int | None  # None: no dovecot-uidlist, a fresh one is given
    uidnext: int  # at least the last UID + 1
    messages: list[FolderMessage]
    uid_source: str  # "dovecot-uidlist" or "file names"
    warnings: list[str] = field(default_factory=list)


def _name_key(name: str):
    """File-name order with the leading timestamp compared as a number."""
    head, _, rest = name.partition(".")
    return (int(head) if head.isdigit() else -1, head, rest)


def read_folder(path: str) -> Folder:
    """Read one Maildir folder: its messages' UIDs, flags and dates (not bodies).

    UIDs come from ``dovecot-uidlist`` when present; files it does not list
    get UIDs from its UIDNEXT on, in file-name order. Without a uidlist,
    UIDs are 1, 2, ... in file-name order. Flags come from the info letters
    and ``dovecot-keywords``; INTERNALDATE from the file's mtime.

    Raises MaildirFormatError for a bad uidlist or keywords file, a base in
    both ``cur/`` and ``new/`` (or twice in one), or a file whose size
    differs from its ``,S=`` field (a truncated or altered message).
    Problems Dovecot tolerates (unknown letters, ``cur/`` files without
    ``:2,``, files in ``tmp/``) become ``warnings``.
    """
    keywords = parse_keywords(os.path.join(path, KEYWORDS))
    uidlist = parse_uidlist(os.path.join(path, UIDLIST))
    warnings: list[str] = []
    files: dict[str, tuple[str, ParsedName, str]] = {}  # base -> (path, parsed, sub)
    for sub in ("cur", "new"):
        d = os.path.join(path, sub)
        if not os.path.isdir(d):
            continue
        for entry in os.listdir(d):
            if entry.startswith("."):
                continue
            fpath = os.path.join(d, entry)
            if not os.path.isfile(fpath):
                warnings.append(f"{fpath}: not a regular file: skipped")
                continue
            parsed = parse_filename(entry)
            if parsed.base in files:
                raise MaildirFormatError(fpath, f"the message {parsed.base!r} is also {files[parsed.base][0]}")
            files[parsed.base] = (fpath, parsed, sub)
    tmp = os.path.join(path, "tmp")
    if os.path.isdir(tmp):
        pending = [e for e in os.listdir(tmp) if not e.startswith(".")]
        if pending:
            warnings.append(f"{tmp}: {len(pending)} unfinished deliveries: not imported")
    if uidlist is not None:
        listed = sorted(((uid, base) for base, uid in uidlist.uids.items() if base in files))
        last = max(uidlist.uids.values(), default=0)
        uidnext = uidlist.uidnext or last + 1
        if uidnext <= last:
            warnings.append(f"{os.path.join(path, UIDLIST)}: UIDNEXT {uidnext} is not above UID {last}: "
                            f"using {last + 1}")
            uidnext = last + 1
        unlisted = sorted((b for b in files if b not in uidlist.uids), key=_name_key)
        order = listed + [(uidnext + i, b) for i, b in enumerate(unlisted)]
        uidnext += len(unlisted)
        uidvalidity, source = uidlist.uidvalidity, UIDLIST
    else:
        order = [(i + 1, b) for i, b in enumerate(sorted(files, key=_name_key))]
        uidnext, uidvalidity, source = len(order) + 1, None, "file names"
    if uidnext > 0xFFFFFFFF:
        raise MaildirFormatError(path, f"UIDs would run past the 32-bit space (UIDNEXT {uidnext})")
    messages = []
    for uid, base in order:
        fpath, parsed, sub = files[base]
        st = os.stat(fpath)
        if parsed.size is not None and parsed.size != st.st_size:
            raise MaildirFormatError(fpath, f"the file has {st.st_size} bytes but its name says S={parsed.size}: "
                                            f"truncated or altered; fix or remove it")
        letters, problems = info_letters(parsed.info)
        if parsed.info is None and sub == "cur":
            problems.append("no ':2,' info in cur/: imported without flags")
        flags, more = flags_from_letters(letters, keywords)
        warnings += [f"{fpath}: {p}" for p in problems + more]
        messages.append(FolderMessage(uid, fpath, flags, st.st_mtime_ns // 1_000_000, st.st_size))
    return Folder(path, uidvalidity, uidnext, messages, source, warnings)


# -- writing a folder -------------------------------------------------------------------


def _fsync_path(path: str) -> None:
    OS_FILEOPS.fsync_dir(path)


def _mkdir(path: str) -> bool:
    """Create ``path`` (and missing parents), fsyncing each parent; True if it was created."""
    if os.path.isdir(path):
        return False
    parent = os.path.dirname(path.rstrip("/"))
    if parent and not os.path.isdir(parent):
        _mkdir(parent)
    os.mkdir(path, 0o700)
    _fsync_path(parent or ".")
    return True


def check_export_target(path: str) -> None:
    """Raise ExportTargetError if the folder at ``path`` already holds mail or a uidlist."""
    for sub in ("cur", "new", "tmp"):
        d = os.path.join(path, sub)
        if os.path.isdir(d) and any(not e.startswith(".") for e in os.listdir(d)):
            raise ExportTargetError(f"{d} already holds files: export into an empty directory")
    if os.path.exists(os.path.join(path, UIDLIST)):
        raise ExportTargetError(f"{os.path.join(path, UIDLIST)} exists: export into an empty directory")


class FolderWriter:
    """Writes one exported folder: message files, then keywords, then the uidlist.

    Every message file is written to ``tmp/``, its mtime set to the
    INTERNALDATE, fsynced (fsync, not fdatasync: the mtime is data here) and
    renamed into ``cur/``; :meth:`finish` fsyncs ``cur/`` and writes
    ``dovecot-keywords`` and ``dovecot-uidlist`` atomically (temporary file,
    fsync, rename, directory fsync). The uidlist is written last: a folder
    without it was not finished.
    """

    def __init__(self, path: str, *, subfolder: bool, keywords: dict[str, str]):
        self.path = path
        check_export_target(path)
        _mkdir(path)
        for sub in ("cur", "new", "tmp"):
            _mkdir(os.path.join(path, sub))
        if subfolder and not os.path.exists(os.path.join(path, MAILDIRFOLDER)):
            OS_FILEOPS.write_file_atomic(os.path.join(path, MAILDIRFOLDER), b"")
        self.letters = keywords
        self.entries: list[tuple[int, str]] = []

    def add(self, uid: int, body: bytes, flags, internaldate_ms: int) -> str:
        """Write one message; returns its file name."""
        name = message_base(uid, internaldate_ms, body) + ":" + info_for(flags, self.letters)
        tmp = os.path.join(self.path, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            OS_FILEOPS.write_all(fd, body)
            ns = internaldate_ms * 1_000_000
            os.utime(fd, ns=(ns, ns))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.path, "cur", name))
        self.entries.append((uid, name))
        return name

    def finish(self, uidvalidity: int, uidnext: int, guid: str | None) -> None:
        _fsync_path(os.path.join(self.path, "cur"))
        _fsync_path(os.path.join(self.path, "tmp"))
        if self.letters:
            OS_FILEOPS.write_file_atomic(os.path.join(self.path, KEYWORDS), format_keywords(self.letters))
        OS_FILEOPS.write_file_atomic(os.path.join(self.path, UIDLIST),
                                     format_uidlist(uidvalidity, uidnext, guid, sorted(self.entries)))
