"""The mail store: what a node knows about mailboxes and messages.

Layers inside, bottom up:

* :mod:`.errors`: the mail-store request errors (refused before anything is
  logged); :mod:`.events`: the record payloads (one frozen dataclass per
  record type, with its CBOR encoding, MS-1).
* :mod:`.decisions`: the master's decision state, pure: plans an event for a
  request (UIDs, MODSEQs, UIDVALIDITY) and applies events (MS-2).
* :mod:`.guard`: the mass-deletion guard (MS-12).
* :mod:`.database`: the SQLite projection of the log, applied in LSN order
  (MS-5), with per-mailbox digests (MS-7).
* :mod:`.structure` (with :mod:`.imap_values`): a message's IMAP structure,
  computed once when a delivery is applied and stored with its body (MS-24).
* :mod:`.passwords`: users' password hashes (argon2id, imported Dovecot
  schemes), MS-21.
* :mod:`.maildir` and :mod:`.maildir_migration`: the Maildir format, and
  export/import between a store and Maildir trees.

The store imports :mod:`wal` and nothing else of ours.
"""

from .database import (
    ImapRow,
    MailboxInfo,
    MessageInfo,
    Store,
    mailbox_digest,
    message_hash,
    remove_store_files,
    store_digest,
)

__all__ = [
    "Store",
    "MailboxInfo",
    "MessageInfo",
    "ImapRow",
    "message_hash",
    "mailbox_digest",
    "store_digest",
    "remove_store_files",
]
