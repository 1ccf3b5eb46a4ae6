"""The shared replication secret: where it lives and how it is read.

Master and replicas authenticate each other with one shared secret (REP-4 in
specs/replication.md), kept in a file, by default ``NODE/replication.secret``.
The file holds at least 16 bytes; surrounding whitespace is ignored so that a
hand-written file works. Like ssh keys, a file that other users can read is
refused.
"""

from __future__ import annotations

import os
import secrets
import stat

from wal import OS_FILEOPS

from ..errors import SecretFileError
from .messages import MIN_SECRET_BYTES

__all__ = ["DEFAULT_SECRET_NAME", "load_secret", "create_secret"]

DEFAULT_SECRET_NAME = "replication.secret"
SECRET_FILE_MODE = 0o600  # load_secret refuses a file any other user can access


def load_secret(path: str | os.PathLike) -> bytes:
    """Read the replication secret from ``path``.

    Raises:
        SecretFileError: missing, unreadable, shorter than 16 bytes after
            stripping whitespace, or accessible to group/other users.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError as exc:
        raise SecretFileError(f"cannot read the replication secret {path}: {exc.strerror}; create it with create_secret()") from exc
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise SecretFileError(
            f"replication secret {path} is accessible to other users (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
        )
    secret = data.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretFileError(f"replication secret {path} holds {len(secret)} bytes; it needs at least {MIN_SECRET_BYTES}")
    return secret


def create_secret(path: str | os.PathLike) -> bytes:
    """Create ``path`` with a new random secret (64 hex characters, mode 0600).

    The file appears complete or not at all, readable only by its owner from
    its first byte (atomic replace, :meth:`wal.FileOps.write_file_atomic`).
    Raises SecretFileError if ``path`` already exists.
    """
    path = os.fspath(path)
    if os.path.exists(path):
        raise SecretFileError(f"{path} already exists; refusing to replace a secret other nodes may share")
    secret = secrets.token_hex(32).encode()
    OS_FILEOPS.write_file_atomic(os.path.abspath(path), secret + b"\n", mode=SECRET_FILE_MODE)
    return secret
