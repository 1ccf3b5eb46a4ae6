"""Errors of the mail store (requests refused before anything is logged).

Every request error derives from :class:`MailStoreError`; the LMTP front maps
:class:`TemporaryFailure` subclasses to 4xx replies (the MTA retries) and
:class:`RequestError` subclasses to 5xx.
"""

from __future__ import annotations

__all__ = [
    "MailStoreError", "RequestError", "TemporaryFailure",
    "BadMailboxNameError", "BadFlagError", "UnknownMailboxError", "MailboxExistsError",
    "UnknownUidError", "ReadOnlyNodeError", "StoreUnavailableError", "MessageTooLargeError",
    "GuardRefusedError", "UidOrderError", "UidValidityReuseError", "BadUserNameError", "UnknownUserError",
    "UserExistsError", "BadPasswordHashError", "ReadNotNow",
]


class MailStoreError(Exception):
    """Base class of mail-store errors."""


class RequestError(MailStoreError):
    """The request is invalid; nothing was logged. Retrying will not help."""


class TemporaryFailure(MailStoreError):
    """The node cannot take writes right now; nothing was acknowledged. Retry later."""


class BadMailboxNameError(RequestError):
    """The mailbox name breaks the naming rules (MS-3)."""


class BadFlagError(RequestError):
    """A flag is not a storable system flag or a valid keyword (MS-4)."""


class UnknownMailboxError(RequestError):
    """No mailbox has that name."""


class MailboxExistsError(RequestError):
    """A mailbox with that name exists already."""


class UnknownUidError(RequestError):
    """A UID names no message in the mailbox (never existed or expunged)."""


class MessageTooLargeError(RequestError):
    """The message exceeds the node's size limit."""


class GuardRefusedError(RequestError):
    """The operation would delete more than the configured guard allows (MS-12)."""


class UidOrderError(RequestError):
    """An imported message's UID is not above the mailbox's UIDNEXT, or UIDNEXT would decrease (MS-14)."""


class UidValidityReuseError(RequestError):
    """An import asked for a UIDVALIDITY that clients may have cached for another mailbox of that name (MS-14)."""


class BadUserNameError(RequestError):
    """A user name breaks the naming rules (MS-21)."""


class UnknownUserError(RequestError):
    """No user has that name."""


class UserExistsError(RequestError):
    """A user of that name exists already."""


class BadPasswordHashError(RequestError):
    """An imported password hash is of a scheme this node cannot verify, or malformed (MS-21)."""


class ReadOnlyNodeError(TemporaryFailure):
    """This node is a replica (or draining for failover) and refuses writes."""


class StoreUnavailableError(TemporaryFailure):
    """The log failed (I/O error, disk full) or the node is closing; reopen to recover."""


class ReadNotNow(Exception):
    """A read asked to run at once (on an event loop) would have to wait: the store has not
    applied what it must show yet, its reader is in use by another thread, or the answer is
    larger than asked for. Not a refusal: the caller reads again the waiting way."""
