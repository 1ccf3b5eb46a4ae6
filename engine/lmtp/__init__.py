"""The LMTP front (RFC 2033): how an MTA hands mail to a node.

* :mod:`.session`: :class:`LmtpSession`, the sans-I/O protocol (bytes in,
  events and replies out; address syntax, LMTP-n in specs/lmtp.md).
* :mod:`.server`: :class:`LmtpServer`, the session on asyncio sockets; each
  recipient's reply is written only once its delivery is durable.
"""

from .server import UNKNOWN_RECIPIENT_POLICIES, LmtpConfig, LmtpServer, reply_for
from .session import (
    ConnectionClosed,
    LmtpSession,
    MessageReceived,
    MessageRefused,
    Recipient,
    RecipientRequested,
    Reply,
    route_recipient,
)

__all__ = [
    "LmtpSession", "Reply", "Recipient", "RecipientRequested", "MessageReceived", "MessageRefused",
    "ConnectionClosed", "route_recipient",
    "LmtpConfig", "LmtpServer", "reply_for", "UNKNOWN_RECIPIENT_POLICIES",
]
