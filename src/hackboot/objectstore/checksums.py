"""Checksums S3 clients send and expect: MD5 (ETags, Content-MD5), CRC32, CRC32C, CRC64NVME, SHA1, SHA256.

CRC32C uses the `google-crc32c` package (C, hardware-accelerated) and CRC64NVME the `anycrc` package (C)
when they are installed, table-driven pure-Python implementations otherwise (correct, but ~100x slower).
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


def _crc64_extend_py(crc: int, data: bytes) -> int:
    """CRC-64/NVME (reflected poly 0x9A6C9329AC4BC9B5) in pure Python (~4 MB/s)."""
    global _CRC64_TABLE
    if not _CRC64_TABLE:
        table = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x9A6C9329AC4BC9B5 if c & 1 else c >> 1
            table.append(c)
        _CRC64_TABLE = table
    c = crc ^ 0xFFFFFFFFFFFFFFFF
    t = _CRC64_TABLE
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFFFFFFFFFF


try:  # C, GB/s: a tenant's CRC64NVME upload must not cost the server minutes of CPU under the GIL
    import anycrc as _anycrc  # type: ignore[import-untyped]  # (no type information shipped)

    # the normal (not reflected) form of the polynomial: anycrc reflects it itself
    _CRC64 = _anycrc.CRC(width=64, poly=0xAD93D23594C93659, init=0xFFFFFFFFFFFFFFFF, refin=True, refout=True,
                         xorout=0xFFFFFFFFFFFFFFFF)

    def _crc64_extend(crc: int, data: bytes) -> int:
        return int(_CRC64.calc(data, crc)) if data else crc
except ImportError:  # pragma: no cover - exercised only without the package
    _crc64_extend = _crc64_extend_py


class _CRC64NVME:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = _crc64_extend(self.value, data)

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


# --- multipart object checksums ------------------------------------------------------------------
# A multipart object's checksum is either COMPOSITE (a checksum of the parts' checksums, "…-N") or
# FULL_OBJECT (the CRC of the whole object, as if it had been sent in one piece). FULL_OBJECT exists
# for the CRCs only: their linearity lets the parts' CRCs be combined without reading the data again.

FULL_OBJECT_ALGORITHMS = ("CRC32", "CRC32C", "CRC64NVME")
COMPOSITE_ALGORITHMS = ("CRC32", "CRC32C", "SHA1", "SHA256")

# bit-reflected polynomial and width of each CRC (all three start from and end with all ones)
_CRC_POLY = {"CRC32": (0xEDB88320, 32), "CRC32C": (0x82F63B78, 32), "CRC64NVME": (0x9A6C9329AC4BC9B5, 64)}


def default_checksum_type(algorithm: str) -> str:
    return "FULL_OBJECT" if algorithm.upper() == "CRC64NVME" else "COMPOSITE"


def _mult_mod(a: int, b: int, poly: int, width: int) -> int:
    """a·b modulo the CRC polynomial, in the reflected representation (the top bit is x^0)."""
    product = 0
    bit = 1 << (width - 1)
    while bit:
        if a & bit:
            product ^= b
        bit >>= 1
        b = (b >> 1) ^ poly if b & 1 else b >> 1
    return product


def crc_combine(algorithm: str, crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC of A‖B from CRC(A), CRC(B) and len(B) in bytes: CRC(A)·x^(8·len(B)) + CRC(B) mod P.
    (The initial and final XORs with all ones cancel out.) O(log len(B)) multiplications."""
    poly, width = _CRC_POLY[algorithm.upper()]
    power = 1 << (width - 2)  # x^1
    for _ in range(3):  # x^8: one byte
        power = _mult_mod(power, power, poly, width)
    shift = 1 << (width - 1)  # x^0
    n = length_b
    while n:
        if n & 1:
            shift = _mult_mod(shift, power, poly, width)
        n >>= 1
        power = _mult_mod(power, power, poly, width)
    return _mult_mod(shift, crc_a, poly, width) ^ crc_b


def full_object(algorithm: str, parts: list[tuple[bytes, int]]) -> str:
    """FULL_OBJECT checksum (base64) of an object made of parts given as (binary CRC, size) in order."""
    width = _CRC_POLY[algorithm.upper()][1]
    crc = 0  # the CRC of nothing
    for digest, size in parts:
        crc = crc_combine(algorithm, crc, int.from_bytes(digest, "big"), size)
    return b64(crc.to_bytes(width // 8, "big"))


def multipart_etag(part_md5s: list[bytes]) -> str:
    return f'"{hashlib.md5(b"".join(part_md5s)).hexdigest()}-{len(part_md5s)}"'
