"""The IMAP front (RFC 9051 IMAP4rev2 and RFC 3501 IMAP4rev1): see ``specs/imap.md``."""
