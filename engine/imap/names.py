"""Mailbox names: what a client sees versus what the store holds (pure).

A user ``alice`` owns exactly the store mailboxes under ``user/alice/``.
She sees them in one personal namespace with prefix ``""`` and delimiter
``/`` (RFC 2342): ``user/alice/INBOX`` is ``INBOX``, ``user/alice/INBOX/x``
is ``INBOX/x``, ``user/alice/Sent`` is ``Sent``. The mapping is a prefix
join, so every name a client can give maps under her own root and no
command can name another user's mailbox (IMAP-12). ``INBOX`` is
case-insensitive as the first component (RFC 9051 5.1).

On the wire, names are modified UTF-7 (RFC 3501 5.1.3) unless the client
enabled IMAP4rev2, which sends UTF-8 (RFC 9051 5.1).
"""

from __future__ import annotations

import base64
import re

__all__ = ["BadName", "USER_ROOT", "DELIMITER", "store_name", "client_name", "user_root", "decode_mutf7",
           "encode_mutf7", "pattern_matcher", "check_user_name", "MAX_NAME_BYTES"]

USER_ROOT = "user/"
DELIMITER = "/"
MAX_NAME_BYTES = 255


class BadName(ValueError):
    """A name a client gave that cannot name a mailbox (answered NO [CANNOT])."""


def check_user_name(user: str) -> str:
    """A user name is 1..64 lower-case characters without '/', wildcards, controls or spaces."""
    if not user or len(user) > 64 or user != user.lower() or any(
            c in "/*% \"\\" or ord(c) < 0x21 or ord(c) == 0x7F for c in user) or user in (".", ".."):
        raise BadName(f"{user!r} is not a valid user name")
    return user


def user_root(user: str) -> str:
    return f"{USER_ROOT}{check_user_name(user)}/"


def store_name(user: str, name: str) -> str:
    """The store name of a client's mailbox name (already decoded from its wire form).

    Raises:
        BadName: empty components, '.' or '..', wildcards, control characters, too long.
    """
    if name.endswith(DELIMITER):
        name = name.rstrip(DELIMITER)
    if not name:
        raise BadName("the mailbox name is empty")
    parts = name.split(DELIMITER)
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    for p in parts:
        if p in ("", ".", ".."):
            raise BadName(f"mailbox name {name!r} has an empty, '.' or '..' component")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in p) or "*" in p or "%" in p:
            raise BadName(f"mailbox name {name!r} contains a control character or a wildcard")
    full = user_root(user) + DELIMITER.join(parts)
    if len(full.encode("utf-8")) > MAX_NAME_BYTES:
        raise BadName(f"mailbox name {name!r} is too long")
    return full


def client_name(user: str, store: str) -> str | None:
    """The name ``user`` sees for a store mailbox, or None when it is not hers."""
    root = user_root(user)
    if not store.startswith(root) or len(store) == len(root):
        return None
    return store[len(root):]


# -- modified UTF-7 (RFC 3501 5.1.3) -------------------------------------------------------------


def encode_mutf7(name: str) -> str:
    out = []
    buf: list[str] = []

    def flush():
        if buf:
            data = "".join(buf).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",") + "-")
            buf.clear()
    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            buf.append(ch)
    flush()
    return "".join(out)


_MUTF7 = re.compile(r"&([^-]*)-")


def decode_mutf7(name: str) -> str:
    """Modified UTF-7 -> text. Raises BadName for a malformed sequence."""
    if "&" not in name:
        return name

    def one(m):
        body = m.group(1)
        if not body:
            return "&"
        data = body.replace(",", "/")
        data += "=" * (-len(data) % 4)
        try:
            return base64.b64decode(data, validate=True).decode("utf-16-be")
        except (ValueError, UnicodeDecodeError):
            raise BadName(f"mailbox name {name!r} is not valid modified UTF-7") from None
    out = _MUTF7.sub(one, name)
    if "&" in _MUTF7.sub("", name):
        raise BadName(f"mailbox name {name!r} has an unterminated '&' sequence")
    return out


# -- LIST patterns ----------------------------------------------------------------------------------


def pattern_matcher(pattern: str):
    """``*`` matches anything, ``%`` anything but the delimiter; INBOX matches case-insensitively."""
    parts = pattern.split(DELIMITER)
    if parts and parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    regex = []
    for i, ch in enumerate(DELIMITER.join(parts)):
        if ch == "*":
            regex.append(".*")
        elif ch == "%":
            regex.append("[^/]*")
        else:
            regex.append(re.escape(ch))
    compiled = re.compile("".join(regex) + r"\Z", re.DOTALL)
    return lambda name: compiled.match(name) is not None
