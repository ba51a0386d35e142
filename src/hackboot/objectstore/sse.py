"""Server-side encryption at rest: AES-256-GCM in 64 KiB chunks with a data key per object.

- SSE-S3 (`x-amz-server-side-encryption: AES256`, or a bucket default): a random data key per
  object (per upload for multipart), stored wrapped by the cloud master key (`crypto.seal`).
- SSE-C: the data key is wrapped with the customer's key, which we never store (only its MD5,
  as S3 does, to tell the client which key it used). Without the key the data is unreadable.

Each plaintext chunk of 64 KiB becomes 64 KiB + 16 bytes of tag. The nonce is the segment number
(the part number of a multipart object, 0 otherwise) and the chunk index: unique under one data
key. The associated data marks the last chunk, so truncation is detected; a range read decrypts
only the chunks it covers.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hackboot.core.crypto import seal, unseal
from hackboot.objectstore.s3errors import S3Error

CHUNK = 64 * 1024
TAG = 16
_CTX = b"hackboot-s3-sse"


def cipher_size(plain: int) -> int:
    chunks = max(1, -(-plain // CHUNK))
    return plain + TAG * chunks


def _nonce(segment: int, index: int) -> bytes:
    return segment.to_bytes(4, "big") + index.to_bytes(8, "big")


def new_sse_s3() -> tuple[dict[str, str], bytes]:
    key = os.urandom(32)
    return {"mode": "AES256", "key": seal(key, _CTX)}, key


def customer_key(headers: dict[str, str], prefix: str = "x-amz-server-side-encryption-customer-") -> \
        tuple[bytes, str] | None:
    alg = headers.get(prefix + "algorithm")
    raw = headers.get(prefix + "key")
    md5 = headers.get(prefix + "key-md5")
    if alg is None and raw is None and md5 is None:
        return None
    if alg != "AES256":
        raise S3Error("InvalidEncryptionAlgorithmError", "The encryption request you specified is not valid. "
                                                         "The valid value is AES256.")
    try:
        key = base64.b64decode(raw or "", validate=True)
    except ValueError:
        raise S3Error("InvalidArgument", "The secret key was invalid for the specified algorithm.") from None
    if len(key) != 32:
        raise S3Error("InvalidArgument", "The secret key was invalid for the specified algorithm.")
    actual = base64.b64encode(hashlib.md5(key).digest()).decode()
    if md5 is not None and md5 != actual:
        raise S3Error("InvalidArgument", "The calculated MD5 hash of the key did not match the hash that was "
                                         "provided.")
    return key, actual


def new_sse_c(ckey: bytes, key_md5: str) -> tuple[dict[str, str], bytes]:
    key = os.urandom(32)
    nonce = os.urandom(12)
    wrapped = base64.b64encode(nonce + AESGCM(ckey).encrypt(nonce, key, _CTX)).decode()
    return {"mode": "SSE-C", "key": wrapped, "key_md5": key_md5}, key


def data_key(sse: dict[str, str], ckey: tuple[bytes, str] | None) -> bytes:
    if sse["mode"] == "AES256":
        return unseal(sse["key"], _CTX)
    if ckey is None:
        raise S3Error("InvalidRequest", "The object was stored using a form of Server Side Encryption. The "
                                        "correct parameters must be provided to retrieve the object.")
    if ckey[1] != sse["key_md5"]:
        raise S3Error("AccessDenied", "The provided SSE-C key does not match the key the object was stored with")
    raw = base64.b64decode(sse["key"])
    try:
        return AESGCM(ckey[0]).decrypt(raw[:12], raw[12:], _CTX)
    except InvalidTag:
        raise S3Error("AccessDenied", "The provided SSE-C key does not match") from None


class Encryptor:
    """Push plaintext, get ciphertext for each complete chunk; `finish()` seals the last one."""

    def __init__(self, key: bytes, segment: int) -> None:
        self.aes = AESGCM(key)
        self.segment = segment
        self.index = 0
        self.buf = bytearray()

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = []
        while len(self.buf) > CHUNK:  # keep at least one byte back: the last chunk is flagged
            out.append(self.aes.encrypt(_nonce(self.segment, self.index), bytes(self.buf[:CHUNK]), b"0"))
            del self.buf[:CHUNK]
            self.index += 1
        return b"".join(out)

    def finish(self) -> bytes:
        ct = self.aes.encrypt(_nonce(self.segment, self.index), bytes(self.buf), b"1")
        self.buf.clear()
        return ct


def decrypt_range(read: Callable[[int, int], bytes], key: bytes, segment: int, plain_size: int,
                  start: int, end: int) -> Iterator[bytes]:
    """Yield plaintext bytes [start, end) of a segment whose ciphertext `read(offset, n)` returns."""
    aes = AESGCM(key)
    last = max(0, -(-plain_size // CHUNK) - 1)
    first_chunk = start // CHUNK
    idx = first_chunk
    while idx <= last:
        chunk_start = idx * CHUNK
        if chunk_start >= end and not (plain_size == 0 and idx == 0):
            break
        plain_len = min(CHUNK, plain_size - chunk_start)
        ct = read(idx * (CHUNK + TAG), plain_len + TAG)
        try:
            pt = aes.decrypt(_nonce(segment, idx), ct, b"1" if idx == last else b"0")
        except InvalidTag:
            raise S3Error("InternalError", "Stored data failed its integrity check") from None
        lo = max(start - chunk_start, 0)
        hi = min(end - chunk_start, len(pt))
        if hi > lo:
            yield pt[lo:hi]
        idx += 1
