"""Tests of the IMAP front (engine/imap/)."""
