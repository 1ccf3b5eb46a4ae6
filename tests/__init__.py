"""The test suite: one folder per package, end-to-end tests apart.

``wal/``, ``store/``, ``node/``, ``replication/``, ``reconcile/``, ``lmtp/``,
``imap/``, ``cluster/``, ``tools/`` test the package of that name in-process;
``e2e/`` holds the tests that start real ``walctl`` processes or real
external clients (Postfix, Dovecot, mbsync, offlineimap); ``support/`` the
helpers they share. The files at this level check the tree as a whole: the
import layers, the documentation, the spec vectors, one definition of each
thing. docs/testing.md says how to run them.
"""
