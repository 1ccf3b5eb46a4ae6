"""REP-4: what a Proof proves, sans I/O.

Each side proves it knows the shared secret with an HMAC-SHA256 over a
transcript of the domain, the prover's role and both fresh nonces, so a proof
cannot be replayed in another connection or reflected back to its sender.
The secret file itself is :mod:`.secret`.
"""

from __future__ import annotations

import hmac
from hashlib import sha256

from .messages import _AUTH_DOMAIN, Role


def auth_transcript(prover: Role, replica_nonce: bytes, master_nonce: bytes) -> bytes:
    """REP-4: the bytes a Proof's HMAC covers: domain, prover's role, both nonces."""
    return _AUTH_DOMAIN + prover.value.encode() + b"\x00" + replica_nonce + master_nonce


def _mac(secret: bytes, prover: Role, replica_nonce: bytes, master_nonce: bytes) -> bytes:
    return hmac.new(secret, auth_transcript(prover, replica_nonce, master_nonce), sha256).digest()

