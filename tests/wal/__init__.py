"""Tests of the log (wal/)."""
