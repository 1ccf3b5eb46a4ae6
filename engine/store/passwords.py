"""Password hashes of users (MS-21): argon2id for new passwords, imported Dovecot schemes verified by scheme.

A user record (``UserPasswordSet``) carries a hash, never a password. What a
hash string may be:

=====================  ====================================================  =========================
form                   scheme                                                verified with
=====================  ====================================================  =========================
``$argon2id$...``      argon2id (PHC string), what this node writes          argon2-cffi
``{ARGON2ID}$argon2id$...``  Dovecot's prefix on the same PHC string         argon2-cffi
``{BLF-CRYPT}$2y$...`` bcrypt (Dovecot BLF-CRYPT; ``$2a$``/``$2b$``/``$2y$``)  bcrypt
``{SHA512-CRYPT}$6$...``  SHA-512 crypt (Drepper), Dovecot SHA512-CRYPT       libpass (passlib fork)
=====================  ====================================================  =========================

Any other form is refused when it is imported (:func:`check_hash` raises
BadPasswordHashError), so a stored hash is always one this node can verify.
A bcrypt or SHA512-CRYPT hash :func:`needs_upgrade`: after a successful login
on a master the node replaces it by an argon2id hash of the same password.

Hashing and verifying cost tens of milliseconds of CPU by design: callers on
an event loop run them in a worker thread (AsyncNode does).
"""

from __future__ import annotations

import argon2
import argon2.exceptions
import bcrypt

from .errors import BadPasswordHashError

__all__ = ["hash_password", "verify_password", "check_hash", "needs_upgrade", "scheme_of", "SCHEMES"]

SCHEMES = ("ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT")
# argon2-cffi's defaults follow RFC 9106's second recommended option (t=3, m=64 MiB, p=4).
_HASHER = argon2.PasswordHasher()
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")


def hash_password(password: str) -> str:
    """An argon2id PHC string for ``password`` (a fresh random salt each call)."""
    if not isinstance(password, str) or not password:
        raise BadPasswordHashError("a password must be a non-empty string")
    return _HASHER.hash(password)


def scheme_of(stored: str) -> tuple[str, str]:
    """``(scheme, the hash without Dovecot's {SCHEME} prefix)``; raises BadPasswordHashError."""
    if not isinstance(stored, str) or not stored:
        raise BadPasswordHashError("a password hash must be a non-empty string")
    if stored.startswith("{"):
        end = stored.find("}")
        if end < 0:
            raise BadPasswordHashError("a {SCHEME} prefix without its closing brace")
        scheme, rest = stored[1:end].upper(), stored[end + 1:]
        if scheme not in SCHEMES:
            raise BadPasswordHashError(f"password scheme {{{scheme}}} is not supported (supported: "
                                       f"{', '.join('{' + s + '}' for s in SCHEMES)}); have the user set a "
                                       f"new password instead")
        return scheme, rest
    if stored.startswith("$argon2id$"):
        return "ARGON2ID", stored
    raise BadPasswordHashError("a password hash is an argon2id PHC string or a Dovecot {SCHEME}hash")


def check_hash(stored: str) -> str:
    """``stored`` if it is a hash of a supported scheme in a well-formed shape, else BadPasswordHashError."""
    scheme, rest = scheme_of(stored)
    ok = {
        "ARGON2ID": rest.startswith("$argon2id$") and rest.count("$") >= 5,
        "BLF-CRYPT": rest.startswith(_BCRYPT_PREFIXES) and len(rest) == 60,
        "SHA512-CRYPT": rest.startswith("$6$") and rest.count("$") in (3, 4),
    }[scheme]
    if not ok:
        raise BadPasswordHashError(f"this is not a well-formed {scheme} hash")
    return stored


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches ``stored`` (any supported scheme). Never raises for a wrong
    password or a damaged hash: both are False."""
    try:
        scheme, rest = scheme_of(stored)
    except BadPasswordHashError:
        return False
    try:
        if scheme == "ARGON2ID":
            return _HASHER.verify(rest, password)
        if scheme == "BLF-CRYPT":
            if not rest.startswith(_BCRYPT_PREFIXES):
                return False
            # the bcrypt library reads $2b$; $2a$/$2y$ (Dovecot, PHP) hash the same way for UTF-8 input
            return bcrypt.checkpw(password.encode("utf-8"), ("$2b$" + rest[4:]).encode("ascii"))
        return _sha512_crypt_matches(rest, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError, ValueError, TypeError):
        return False


def needs_upgrade(stored: str) -> bool:
    """Whether a verified ``stored`` should be replaced by an argon2id hash (a legacy scheme, or
    argon2id with weaker parameters than this node writes)."""
    try:
        scheme, rest = scheme_of(stored)
    except BadPasswordHashError:
        return False
    if scheme != "ARGON2ID":
        return True
    try:
        return _HASHER.check_needs_rehash(rest)
    except (argon2.exceptions.InvalidHashError, ValueError):
        return False


def _sha512_crypt_matches(rest: str, password: str) -> bool:
    # libpass (the maintained fork of passlib) checks the hash's shape and compares in constant time
    from passlib.hash import sha512_crypt

    if not rest.startswith("$6$"):
        return False
    return bool(sha512_crypt.verify(password, rest))
