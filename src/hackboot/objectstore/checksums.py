"""Checksums S3 clients send and expect: MD5 (ETags, Content-MD5), CRC32, CRC32C, SHA1, SHA256.

CRC32C uses the `google-crc32c` package (C, hardware-accelerated) when it is installed and a
table-driven pure-Python implementation otherwise (correct, but ~100x slower).
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from typing import Protocol

ALGORITHMS = ("CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME")


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


class _CRC32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


def _make_table(poly: int) -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C_TABLE = _make_table(0x82F63B78)
_CRC64_TABLE: list[int] = []

try:
    import google_crc32c as _gcrc

    def _crc32c_extend(crc: int, data: bytes) -> int:
        return int(_gcrc.extend(crc, bytes(data)))
except ImportError:  # pragma: no cover - exercised only without the package
    def _crc32c_extend(crc: int, data: bytes) -> int:
        c = crc ^ 0xFFFFFFFF
        t = _CRC32C_TABLE
        for b in data:
            c = t[(c ^ b) & 0xFF] ^ (c >> 8)
        return c ^ 0xFFFFFFFF


class _CRC32C:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = _crc32c_extend(self.value, data)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


class _CRC64NVME:
    """CRC-64/NVME (reflected poly 0x9A6C9329AC4BC9B5), pure Python: small objects only in practice."""

    def __init__(self) -> None:
        global _CRC64_TABLE
        if not _CRC64_TABLE:
            table = []
            for i in range(256):
                c = i
                for _ in range(8):
                    c = (c >> 1) ^ 0x9A6C9329AC4BC9B5 if c & 1 else c >> 1
                table.append(c)
            _CRC64_TABLE = table
        self.value = 0

    def update(self, data: bytes) -> None:
        c = self.value ^ 0xFFFFFFFFFFFFFFFF
        t = _CRC64_TABLE
        for b in data:
            c = t[(c ^ b) & 0xFF] ^ (c >> 8)
        self.value = c ^ 0xFFFFFFFFFFFFFFFF

    def digest(self) -> bytes:
        return self.value.to_bytes(8, "big")


def new(algorithm: str) -> Hasher:
    algorithm = algorithm.upper()
    if algorithm == "CRC32":
        return _CRC32()
    if algorithm == "CRC32C":
        return _CRC32C()
    if algorithm == "SHA1":
        return hashlib.sha1()
    if algorithm == "SHA256":
        return hashlib.sha256()
    if algorithm == "CRC64NVME":
        return _CRC64NVME()
    raise ValueError(algorithm)


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def composite(algorithm: str, part_digests: list[bytes]) -> str:
    """Multipart checksum: checksum of the parts' binary checksums, suffixed with -N."""
    h = new(algorithm)
    for d in part_digests:
        h.update(d)
    return f"{b64(h.digest())}-{len(part_digests)}"


def multipart_etag(part_md5s: list[bytes]) -> str:
    return f'"{hashlib.md5(b"".join(part_md5s)).hexdigest()}-{len(part_md5s)}"'
