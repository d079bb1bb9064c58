"""SHA-256 and HMAC-MD5 from Python's builtin hash modules, not through hashlib and hmac.

hashlib and hmac load OpenSSL's libcrypto, about 3.5 MB of every idle worker program, which
needs a digest only for a name or a handshake; the builtin modules give the same bytes.
A Python built without them (FIPS builds) falls back to hashlib.
"""

from __future__ import annotations

try:
    from _md5 import md5  # type: ignore[import-not-found]
    from _sha256 import sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - only on a Python without its own hashes
    from hashlib import md5, sha256

from _operator import _compare_digest as compare_digest

__all__ = ["compare_digest", "hmac_md5", "sha256_hex"]

BLOCK = 64  # bytes: MD5's block size


def sha256_hex(data: bytes) -> str:
    """``hashlib.sha256(data).hexdigest()``."""
    return str(sha256(data).hexdigest())


def hmac_md5(key: bytes, message: bytes) -> bytes:
    """RFC 2104 HMAC-MD5: ``hmac.new(key, message, "md5").digest()``."""
    if len(key) > BLOCK:
        key = md5(key).digest()
    key = key.ljust(BLOCK, b"\0")
    inner = md5(bytes(b ^ 0x36 for b in key) + message).digest()
    return bytes(md5(bytes(b ^ 0x5C for b in key) + inner).digest())
