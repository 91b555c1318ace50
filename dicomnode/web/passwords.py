"""Password hashes for ``web.users``: scrypt from the standard library.

Kept apart from ``auth.py`` so that ``dicomnode web-passwd`` works without the web extra.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from functools import lru_cache

#: scrypt cost: 16 MiB and ~50 ms per check on one core (RFC 7914's interactive figure).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    """Hash a password for ``web.users`` (``scrypt$N$r$p$salt$hash``, base64 parts).

    Parameters
    ----------
    password : str
        At least 8 characters.

    Returns
    -------
    str
    """
    if len(password) < 8:
        raise ValueError("Invalid 'password' value - at least 8 characters")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


@lru_cache(maxsize=256)
def _verify(stored: str, password_sha256: bytes, password: str) -> bool:
    # cached per (hash, password digest): a page view makes several requests, each
    # with the same credentials, and scrypt is meant to be slow
    try:
        scheme, *parts = stored.split("$")
        if scheme == "scrypt":
            n, r, p, salt, digest = parts
            got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                                 r=int(r), p=int(p), dklen=len(base64.b64decode(digest)))
        elif scheme == "pbkdf2_sha256":
            rounds, salt, digest = parts
            got = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt),
                                      int(rounds))
        else:
            return False
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches the hash ``stored`` (constant-time comparison)."""
    return _verify(stored, hashlib.sha256(password.encode()).digest(), password)
