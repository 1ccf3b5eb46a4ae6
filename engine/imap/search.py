"""SEARCH evaluation over message metadata and stored structure (pure).

:func:`compile_search` turns a :class:`~engine.imap.commands.SearchKey`
tree into one predicate, built once per command; the predicate takes a
:class:`SearchItem` (sequence number, :class:`~engine.imap.backend.MessageInfo`
and, only for keys that read the message, its bytes). :func:`needs_body`
says whether any key reads the bytes (HEADER, BODY, TEXT), so the executor
fetches bodies only then (IMAP-16).

Semantics (RFC 9051 6.4.4): string keys match a case-insensitive substring
(after RFC 2047 decoding for FROM/TO/CC/BCC/SUBJECT, after transfer decoding
for BODY/TEXT); dates compare calendar dates, ignoring time and zone
(SENT* use the Date header, the internal date when there is none); NEW and
RECENT match nothing and OLD everything (there is no ``\\Recent``); MODSEQ
matches messages whose MODSEQ is at least the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .backend import MessageInfo
from .commands import SearchKey
from ..store.structure import UnknownEncoding, decode_transfer, header_values

__all__ = ["SearchItem", "compile_search", "needs_body", "uses_modseq"]


@dataclass(frozen=True, slots=True)
class SearchItem:
    seq: int
    info: MessageInfo
    raw: bytes | None = None  # the message's bytes: present when needs_body(key)


_FLAG_KEYS = {"ANSWERED": "\\Answered", "DELETED": "\\Deleted", "DRAFT": "\\Draft", "FLAGGED": "\\Flagged",
              "SEEN": "\\Seen"}
_BODY_KEYS = {"HEADER", "BODY", "TEXT"}


def needs_body(key: SearchKey) -> bool:
    return any(k.op in _BODY_KEYS for k in key.walk())


def uses_modseq(key: SearchKey) -> bool:
    return any(k.op == "MODSEQ" for k in key.walk())


def _fold(s: str) -> str:
    return s.casefold()


def _body_text(item: SearchItem) -> str:
    raw = item.raw or b""
    tree = item.info.structure["tree"]
    texts: list[str] = []

    def walk(node):
        if "p" in node:
            for child in node["p"]:
                walk(child)
        elif "m" in node:
            inner = node["m"]
            texts.append(raw[inner["h"]:inner["b"]].decode("utf-8", "replace"))
            walk(inner)
        else:
            data = raw[node["b"]:node["e"]]
            if node["t"].startswith(("text/", "message/")):
                try:
                    data = decode_transfer(data, node["c"])
                except UnknownEncoding:
                    pass
            texts.append(data.decode("utf-8", "replace"))
    walk(tree)
    return _fold("\n".join(texts))


def compile_search(key: SearchKey, *, largest_seq: int, largest_uid: int) -> Callable[[SearchItem], bool]:
    """One predicate for ``key``; ``*`` in sets resolves to ``largest_seq`` / ``largest_uid``."""
    op, arg = key.op, key.arg
    if op == "ALL" or op == "OLD":
        return lambda m: True
    if op in ("NEW", "RECENT"):
        return lambda m: False
    if op in _FLAG_KEYS:
        flag = _FLAG_KEYS[op]
        return lambda m: flag in m.info.flags
    if op.startswith("UN") and op[2:] in _FLAG_KEYS:
        flag = _FLAG_KEYS[op[2:]]
        return lambda m: flag not in m.info.flags
    if op == "KEYWORD":
        return lambda m: arg in m.info.flags
    if op == "UNKEYWORD":
        return lambda m: arg not in m.info.flags
    if op in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
        field, needle = op.lower(), _fold(arg)
        return lambda m: needle in m.info.structure["find"].get(field, "")
    if op == "HEADER":
        name, needle = arg[0], _fold(arg[1])

        def header(m: SearchItem) -> bool:
            tree = m.info.structure["tree"]
            values = header_values((m.raw or b"")[tree["h"]:tree["b"]], name)
            return any(needle in _fold(v) for v in values)
        return header
    if op == "BODY":
        needle = _fold(arg)
        return lambda m: needle in _body_text(m)
    if op == "TEXT":
        needle = _fold(arg)

        def text(m: SearchItem) -> bool:
            tree = m.info.structure["tree"]
            head = (m.raw or b"")[tree["h"]:tree["b"]].decode("utf-8", "replace")
            return needle in _fold(head) or needle in _body_text(m)
        return text
    if op in ("BEFORE", "ON", "SINCE"):
        day = arg.toordinal()
        get = lambda m: m.info.internaldate.date().toordinal()  # noqa: E731
        return _date_compare(op, day, get)
    if op in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        day = arg.toordinal()

        def sent(m: SearchItem) -> int:
            value = m.info.structure.get("sent")
            return value if value is not None else m.info.internaldate.date().toordinal()
        return _date_compare(op[4:], day, sent)
    if op == "LARGER":
        return lambda m: m.info.size > arg
    if op == "SMALLER":
        return lambda m: m.info.size < arg
    if op == "UID":
        ranges = arg.resolve(largest_uid)
        return lambda m: any(a <= m.info.uid <= b for a, b in ranges)
    if op == "SEQ":
        ranges = arg.resolve(largest_seq)
        return lambda m: any(a <= m.seq <= b for a, b in ranges)
    if op == "MODSEQ":
        return lambda m: m.info.modseq >= arg
    if op == "NOT":
        inner = compile_search(arg, largest_seq=largest_seq, largest_uid=largest_uid)
        return lambda m: not inner(m)
    if op == "OR":
        a = compile_search(arg[0], largest_seq=largest_seq, largest_uid=largest_uid)
        b = compile_search(arg[1], largest_seq=largest_seq, largest_uid=largest_uid)
        return lambda m: a(m) or b(m)
    if op == "AND":
        preds = [compile_search(k, largest_seq=largest_seq, largest_uid=largest_uid) for k in arg]
        return lambda m: all(p(m) for p in preds)
    raise ValueError(f"search key {op} has no evaluation")  # SearchKey validation makes this unreachable


def _date_compare(op: str, day: int, get) -> Callable[[SearchItem], bool]:
    if op == "BEFORE":
        return lambda m: get(m) < day
    if op == "ON":
        return lambda m: get(m) == day
    return lambda m: get(m) >= day
