"""A message's IMAP structure, computed once from its bytes and stored (pure).

Theory of operation
-------------------
:func:`analyze` reads an RFC 5322 message once and returns a compact,
CBOR-able ``dict`` (the *stored structure*) holding everything FETCH and
SEARCH need that is not the bytes themselves:

=========  ==================================================================
key        value
=========  ==================================================================
``v``      format version (1)
``size``   RFC822.SIZE: the message's length in octets
``env``    ENVELOPE, already in its wire form (bytes)
``bs``     BODYSTRUCTURE, in its wire form (bytes)
``body``   BODY (the non-extensible form), in its wire form (bytes)
``tree``   the MIME tree: one node per entity, ``{"h": header offset,
           "b": body offset, "e": end offset, "t": "type/subtype",
           "c": transfer encoding, "p": [child nodes] (multipart),
           "m": node (the embedded message of message/rfc822)}``
``sent``   the Date header's calendar date as a proleptic ordinal (SENTON,
           SENTBEFORE, SENTSINCE), or None
``find``   case-folded, RFC 2047-decoded FROM/TO/CC/BCC/SUBJECT text (SEARCH)
=========  ==================================================================

So FETCH ENVELOPE/BODYSTRUCTURE copies bytes, and FETCH BODY[section] is a
slice of the message bytes found by walking ``tree`` (:func:`section_bytes`):
no message is parsed again after delivery (IMAP-14).

Invariants: offsets satisfy ``0 <= h <= b <= e <= size`` for every node and
children lie inside their parent's body; analysing the same bytes always
gives the same structure; malformed MIME never raises (a multipart without
parts is shown as one empty text part, nesting deeper than
:data:`MAX_DEPTH` is shown as an opaque part).
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import email.errors
import email.header
import email.utils
import quopri
import re

from .imap_values import Raw, encode_value

__all__ = ["analyze", "section_bytes", "binary_bytes", "header_fields", "header_values", "STRUCTURE_VERSION",
           "MAX_DEPTH", "UnknownEncoding", "parse_addresses", "decode_transfer"]

STRUCTURE_VERSION = 1
MAX_DEPTH = 20


class UnknownEncoding(ValueError):
    """BINARY of a part whose Content-Transfer-Encoding we cannot decode (NO [UNKNOWN-CTE])."""


# -- header parsing ------------------------------------------------------------------


def _header_end(raw: bytes, start: int, end: int) -> int:
    """The offset where the body starts (after the blank line), or ``end`` when there is none."""
    if raw.startswith(b"\r\n", start) or raw.startswith(b"\n", start):
        return start + (2 if raw.startswith(b"\r\n", start) else 1)
    i = raw.find(b"\n\r\n", start, end)
    j = raw.find(b"\n\n", start, end)
    if i < 0 and j < 0:
        return end
    if j < 0 or (0 <= i < j):
        return i + 3
    return j + 2


def header_fields(block: bytes) -> list[tuple[str, bytes]]:
    """The fields of a header block: (lower-cased name, raw octets of the whole field incl. folds and CRLF)."""
    fields: list[tuple[str, bytes]] = []
    for line in block.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            name, data = fields[-1]
            fields[-1] = (name, data + line)
            continue
        colon = line.find(b":")
        if colon <= 0:
            continue  # not a field (mbox From_ line, garbage): skip it
        fields.append((line[:colon].strip().decode("ascii", "replace").lower(), line))
    return fields


def _value(field: bytes) -> str:
    """A field's value, unfolded, as text (undecodable octets kept as surrogates)."""
    value = field[field.find(b":") + 1:]
    value = re.sub(rb"\r?\n[ \t]", b" ", value).strip(b"\r\n")
    return value.decode("utf-8", "surrogateescape").strip()


def header_values(block: bytes, name: str) -> list[str]:
    """Every value of field ``name`` (case-insensitive) in a header block, unfolded."""
    name = name.lower()
    return [_value(raw) for n, raw in header_fields(block) if n == name]


def _first(fields: dict[str, str], name: str) -> str | None:
    return fields.get(name)


# -- Content-Type and friends ------------------------------------------------------------


def _tokens(text: str):
    """RFC 2045 tokens: quoted strings unquoted, comments dropped, specials as themselves."""
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
        elif ch == "(":
            depth = 0
            while i < n:
                if text[i] == "\\":
                    i += 2
                    continue
                if text[i] == "(":
                    depth += 1
                elif text[i] == ")":
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
        elif ch == '"':
            i += 1
            out = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                out.append(text[i])
                i += 1
            i += 1
            yield "q", "".join(out)
        elif ch in "()<>@,;:\\/[]?=":
            i += 1
            yield "s", ch
        else:
            j = i
            while j < n and text[j] not in ' \t\r\n()<>@,;:\\"/[]?=':
                j += 1
            yield "a", text[i:j]
            i = j


def _content_header(value: str | None) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """``type/subtype; a=b`` -> (type, subtype, params); any part may be missing."""
    if not value:
        return None, None, []
    toks = list(_tokens(value))
    main = sub = None
    i = 0
    if i < len(toks) and toks[i][0] == "a":
        main = toks[i][1]
        i += 1
        if i + 1 < len(toks) and toks[i] == ("s", "/") and toks[i + 1][0] == "a":
            sub = toks[i + 1][1]
            i += 2
    params: list[tuple[str, str]] = []
    while i < len(toks):
        if toks[i] == ("s", ";") and i + 3 < len(toks) and toks[i + 1][0] == "a" and toks[i + 2] == ("s", "=") \
                and toks[i + 3][0] in ("a", "q"):
            params.append((toks[i + 1][1], toks[i + 3][1]))
            i += 4
        else:
            i += 1
    return main, sub, params


def _params_value(params: list[tuple[str, str]]):
    if not params:
        return None
    return tuple(x for k, v in params for x in (_text(k.upper()), _text(v)))


def _text(s: str | None):
    """A header-derived string for the wire: str when it is ASCII, else its original octets."""
    if s is None:
        return None
    if s.isascii():
        return s
    return s.encode("utf-8", "surrogateescape")


# -- addresses ---------------------------------------------------------------------------


def _addr_tokens(text: str):
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
        elif ch == "(":
            depth = 0
            while i < n:
                if text[i] == "\\":
                    i += 2
                    continue
                depth += text[i] == "("
                depth -= text[i] == ")"
                i += 1
                if depth == 0:
                    break
        elif ch == '"':
            i += 1
            out = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                out.append(text[i])
                i += 1
            i += 1
            yield "q", "".join(out)
        elif ch in "<>@,;:.[]":
            i += 1
            yield "s", ch
        else:
            j = i
            while j < n and text[j] not in ' \t\r\n()<>@,;:."[]':
                j += 1
            yield "a", text[i:j]
            i = j


def parse_addresses(text: str) -> list[tuple[str | None, str | None, str | None, str | None]]:
    """An address-list -> envelope addresses (name, adl, mailbox, host); groups as RFC 9051 7.5.2 shows them
    (``(NIL NIL group NIL)`` ... ``(NIL NIL NIL NIL)``). Never raises: what cannot be read is skipped."""
    toks = list(_addr_tokens(text))
    out: list[tuple[str | None, str | None, str | None, str | None]] = []
    i = 0
    n = len(toks)
    in_group = False

    def words(ts) -> str:
        parts: list[str] = []
        for kind, val in ts:
            if kind == "s" and val == ".":
                parts.append(".")
            else:
                if parts and parts[-1] != ".":
                    parts.append(" ")
                parts.append(val)
        return "".join(parts).replace(" .", ".").replace(". ", ".")

    def spec(ts) -> tuple[str | None, str | None]:
        at = max((k for k, t in enumerate(ts) if t == ("s", "@")), default=-1)
        if at < 0:
            local = "".join(v for _, v in ts)
            return (local or None), ""
        return "".join(v for _, v in ts[:at]), "".join(v for _, v in ts[at + 1:])

    while i < n:
        if toks[i] == ("s", ","):
            i += 1
            continue
        if toks[i] == ("s", ";"):
            if in_group:
                out.append((None, None, None, None))
                in_group = False
            i += 1
            continue
        j = i
        while j < n and toks[j] not in (("s", "<"), ("s", ":"), ("s", ","), ("s", ";")):
            j += 1
        if j < n and toks[j] == ("s", ":") and not in_group:
            out.append((None, None, words(toks[i:j]) or "", None))
            in_group = True
            i = j + 1
            continue
        if j < n and toks[j] == ("s", "<"):
            name = words(toks[i:j]) or None
            k = j + 1
            while k < n and toks[k] != ("s", ">"):
                k += 1
            inner = toks[j + 1:k]
            adl = None
            colon = next((x for x, t in enumerate(inner) if t == ("s", ":")), -1)
            if colon >= 0 and inner and inner[0] == ("s", "@"):
                adl = "".join(v for _, v in inner[:colon])
                inner = inner[colon + 1:]
            mailbox, host = spec(inner)
            if mailbox is not None or host:
                out.append((name, adl, mailbox or "", host))
            i = k + 1
            continue
        mailbox, host = spec(toks[i:j])
        if mailbox is not None:
            out.append((None, None, mailbox, host))
        i = j
    if in_group:
        out.append((None, None, None, None))
    return out


def _address_value(text: str | None):
    if text is None:
        return None
    addrs = parse_addresses(text)
    if not addrs:
        return None
    # env-from etc.: "(" 1*address ")": the addresses are adjacent, without spaces
    return Raw(b"(" + b"".join(encode_value(tuple(_text(x) for x in a)) for a in addrs) + b")")


def _envelope(fields: dict[str, str]) -> bytes:
    from_ = _address_value(fields.get("from"))
    sender = _address_value(fields.get("sender")) or from_
    reply_to = _address_value(fields.get("reply-to")) or from_
    value = (
        _text(fields.get("date")), _text(fields.get("subject")), from_, sender, reply_to,
        _address_value(fields.get("to")), _address_value(fields.get("cc")), _address_value(fields.get("bcc")),
        _text(fields.get("in-reply-to")), _text(fields.get("message-id")),
    )
    return encode_value(value)


# -- the MIME tree -------------------------------------------------------------------------


def _first_fields(block: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, raw in header_fields(block):
        out.setdefault(name, _value(raw))
    return out


def _lines(raw: bytes, start: int, end: int) -> int:
    n = raw.count(b"\n", start, end)
    if end > start and raw[end - 1:end] != b"\n":
        n += 1
    return n


def _split_multipart(raw: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int]]:
    """Body ranges of the parts between ``--boundary`` lines (RFC 2046 5.1.1)."""
    delim = b"--" + boundary.encode("utf-8", "surrogateescape")
    spans: list[tuple[int, int]] = []
    pos = start
    part_start = None
    while pos <= end:
        k = raw.find(delim, pos, end)
        if k < 0:
            break
        at_line_start = k == start or raw[k - 1:k] == b"\n"
        if not at_line_start:
            pos = k + len(delim)
            continue
        line_end = raw.find(b"\n", k, end)
        line_end = end if line_end < 0 else line_end + 1
        closing = raw.startswith(b"--", k + len(delim))
        if part_start is not None:
            part_end = k
            if part_end > part_start and raw[part_end - 1:part_end] == b"\n":
                part_end -= 1
                if part_end > part_start and raw[part_end - 1:part_end] == b"\r":
                    part_end -= 1
            spans.append((part_start, max(part_start, part_end)))
        if closing:
            part_start = None
            break
        part_start = line_end
        pos = line_end
    if part_start is not None and part_start < end:
        spans.append((part_start, end))  # no closing delimiter: the last part runs to the end
    return spans


def _entity(raw: bytes, h: int, e: int, depth: int, default_type: str):
    """Analyse one entity (header + body) -> (node, bodystructure value, body value)."""
    b = _header_end(raw, h, e)
    fields = _first_fields(raw[h:b])
    main, sub, params = _content_header(fields.get("content-type"))
    if not main or not sub:
        main, sub = default_type.split("/")
        params = params if fields.get("content-type") else ([("charset", "us-ascii")] if main == "text" else [])
    main_l, sub_l = main.lower(), sub.lower()
    enc = (fields.get("content-transfer-encoding") or "7bit").strip()
    node: dict = {"h": h, "b": b, "e": e, "t": f"{main_l}/{sub_l}", "c": enc.lower()}
    dsp = _disposition(fields.get("content-disposition"))
    lang = _language(fields.get("content-language"))
    loc = _text(fields.get("content-location"))
    if main_l == "multipart" and depth < MAX_DEPTH:
        boundary = next((v for k, v in params if k.lower() == "boundary"), None)
        spans = _split_multipart(raw, b, e, boundary) if boundary else []
        child_default = "message/rfc822" if sub_l == "digest" else "text/plain"
        if spans:
            children = [_entity(raw, s, t, depth + 1, child_default) for s, t in spans]
            node["p"] = [c[0] for c in children]
            ext = b"".join(b" " + encode_value(x) for x in (_params_value(params), dsp, lang, loc))
            subtype = encode_value(_text(sub.upper()))
            # body-type-mpart: 1*body SP media-subtype [SP body-ext-mpart]; the bodies are adjacent
            bs_v = b"(" + b"".join(c[1] for c in children) + b" " + subtype + ext + b")"
            body_v = b"(" + b"".join(c[2] for c in children) + b" " + subtype + b")"
            return node, bs_v, body_v
        main_l, sub_l, main, sub = "text", "plain", "text", "plain"
        node["t"] = "text/plain"
    basic = (_text(main.upper()), _text(sub.upper()), _params_value(params), _text(fields.get("content-id")),
             _text(fields.get("content-description")), _text(enc.upper()), e - b)
    extra_bs: tuple = ()
    extra_body: tuple = ()
    if main_l == "message" and sub_l in ("rfc822", "global") and depth < MAX_DEPTH:
        inner, inner_bs, inner_body = _entity(raw, b, e, depth + 1, "text/plain")
        node["m"] = inner
        env = _envelope(_first_fields(raw[b:inner["b"]]))
        extra_bs = (Raw(env), Raw(inner_bs), _lines(raw, b, e))
        extra_body = (Raw(env), Raw(inner_body), _lines(raw, b, e))
    elif main_l == "text":
        extra_bs = extra_body = (_lines(raw, b, e),)
    bs_v = encode_value(basic + extra_bs + (_text(fields.get("content-md5")), dsp, lang, loc))
    body_v = encode_value(basic + extra_body)
    return node, bs_v, body_v


def _disposition(value: str | None):
    main, _sub, params = _content_header(value)
    if not main:
        return None
    return (_text(main.upper()), _params_value(params))


def _language(value: str | None):
    if not value:
        return None
    langs = [t for k, t in _tokens(value) if k == "a"]
    return tuple(_text(x) for x in langs) if langs else None


def _decoded(value: str | None) -> str:
    if not value:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(value))).casefold()
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return value.casefold()


def _sent_ordinal(value: str | None) -> int | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
    except (TypeError, ValueError, IndexError):
        return None
    if not parsed:
        return None
    try:
        return _dt.date(parsed[0], parsed[1], parsed[2]).toordinal()
    except ValueError:
        return None


def analyze(raw: bytes) -> dict:
    """The stored structure of a message (see the module docstring). Never raises on malformed mail."""
    node, bs, body = _entity(raw, 0, len(raw), 0, "text/plain")
    fields = _first_fields(raw[:node["b"]])
    find = {k: _decoded(v) for k in ("from", "to", "cc", "bcc", "subject")
            if (v := ", ".join(header_values(raw[:node["b"]], k)) if k != "subject" else fields.get(k))}
    return {"v": STRUCTURE_VERSION, "size": len(raw), "env": _envelope(fields), "bs": bs, "body": body,
            "tree": node, "sent": _sent_ordinal(fields.get("date")), "find": find}


# -- sections ------------------------------------------------------------------------------


def _message_children(node: dict) -> list[dict]:
    """The numbered parts of a message entity: its parts if multipart, else its body as part 1."""
    return node["p"] if "p" in node else [node]


def _walk(tree: dict, part: tuple[int, ...]) -> dict | None:
    node = tree
    for depth, n in enumerate(part):
        if depth == 0:
            kids = _message_children(node)
        elif "p" in node:
            kids = node["p"]
        elif "m" in node:
            kids = _message_children(node["m"])
        else:
            return None
        if not 1 <= n <= len(kids):
            return None
        node = kids[n - 1]
    return node


def _filter_fields(block: bytes, names: tuple[str, ...], keep: bool) -> bytes:
    wanted = {n.lower() for n in names}
    out = b"".join(data for name, data in header_fields(block) if (name in wanted) == keep)
    return out + b"\r\n"


def section_bytes(raw: bytes, structure: dict, part: tuple[int, ...] = (), text: str | None = None,
                  fields: tuple[str, ...] = ()) -> bytes | None:
    """The octets of ``BODY[part.text (fields)]`` (RFC 9051 6.4.5), or None where the section does not exist."""
    tree = structure["tree"]
    if not part:
        node = tree
        target = tree
    else:
        node = _walk(tree, part)
        if node is None:
            return None
        target = node.get("m") if text in ("HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT") else node
        if target is None:
            return None
    if text is None:
        if not part:
            return raw
        return raw[node["b"]:node["e"]]
    if text == "MIME":
        return raw[node["h"]:node["b"]]
    if text == "HEADER":
        return raw[target["h"]:target["b"]]
    if text == "TEXT":
        return raw[target["b"]:target["e"]]
    return _filter_fields(raw[target["h"]:target["b"]], fields, text == "HEADER.FIELDS")


def binary_bytes(raw: bytes, structure: dict, part: tuple[int, ...]) -> bytes | None:
    """``BINARY[part]`` (RFC 3516): the part's content with its transfer encoding removed.

    Raises:
        UnknownEncoding: the part uses an encoding other than 7bit/8bit/binary/base64/quoted-printable.
    """
    if not part:
        return raw
    node = _walk(structure["tree"], part)
    if node is None:
        return None
    data = raw[node["b"]:node["e"]]
    if "p" in node or "m" in node:
        return data
    return decode_transfer(data, node["c"])


def decode_transfer(data: bytes, encoding: str) -> bytes:
    """Remove a Content-Transfer-Encoding (RFC 2045 6).

    Raises:
        UnknownEncoding: not 7bit/8bit/binary/base64/quoted-printable, or base64 that does not decode.
    """
    enc = encoding.lower()
    if enc in ("7bit", "8bit", "binary", ""):
        return data
    if enc == "base64":
        try:
            return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", data) + b"==", validate=False)
        except (binascii.Error, ValueError):
            raise UnknownEncoding("the base64 content does not decode") from None
    if enc == "quoted-printable":
        return quopri.decodestring(data)
    raise UnknownEncoding(f"unknown Content-Transfer-Encoding {enc!r}")
