"""Tests of the LMTP front (engine/lmtp/) and the runner that serves it."""
