"""Secrets at rest: hashing for things we only verify, AES-256-GCM for things we must read back.

API tokens are 256-bit random strings, so a plain SHA-256 is the right hash (as for
GitHub tokens): no salt or slow KDF is needed against brute force of random keys.
Passwords are human-chosen, so they get scrypt. Secrets we must recover (S3 secret
keys, volume keys, webhook signing secrets) are sealed with the master key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from functools import lru_cache
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hackboot.core.config import get_settings


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_secret(prefix: str = "", nbytes: int = 32) -> str:
    return prefix + secrets.token_urlsafe(nbytes)


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return f"scrypt$16384$8$1${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt_hex, digest_hex = stored.split("$")
        digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), n=int(n), r=int(r), p=int(p),
                                dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest.hex(), digest_hex)


@lru_cache
def master_key() -> bytes:
    """The 256-bit key that wraps every stored secret (config value, or a key file made once)."""
    settings = get_settings()
    if settings.master_key:
        key = base64.urlsafe_b64decode(settings.master_key + "==")
        if len(key) != 32:
            raise ValueError("HACKBOOT_MASTER_KEY must be 32 bytes, base64url-encoded")
        return key
    path = settings.state_dir / "master.key"
    if not path.exists():
        _create_key_file(path)
    return base64.urlsafe_b64decode(path.read_bytes().strip() + b"==")


def _create_key_file(path: Path) -> None:
    """Write a new key under a name no other process uses, then link it into place.

    link() fails when the key already exists, so several processes starting together on a
    fresh state directory never see a half-written key: the first link wins and the others
    read the winner's key.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(base64.urlsafe_b64encode(os.urandom(32)))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the key's name is durable before any secret is sealed with it
    finally:
        os.close(dir_fd)


def seal(plaintext: bytes, context: bytes = b"") -> str:
    """Encrypt with the master key; `context` (e.g. the row id) is bound as associated data."""
    nonce = os.urandom(12)
    ct = AESGCM(master_key()).encrypt(nonce, plaintext, context)
    return "v1:" + base64.urlsafe_b64encode(nonce + ct).decode()


def unseal(sealed: str, context: bytes = b"") -> bytes:
    if not sealed.startswith("v1:"):
        raise ValueError("unknown sealed format")
    raw = base64.urlsafe_b64decode(sealed[3:])
    return AESGCM(master_key()).decrypt(raw[:12], raw[12:], context)
