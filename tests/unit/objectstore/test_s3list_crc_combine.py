"""Combining part CRCs into the CRC of the whole object (FULL_OBJECT multipart checksums) gives exactly
the CRC of the concatenated data, for every CRC S3 offers, at part boundaries of every kind."""

from __future__ import annotations

import base64
import os
import random
import zlib

import pytest

from hackboot.objectstore import checksums

# independent bit-at-a-time reference implementations (no tables, no shared code with checksums.py)
_REF = {"CRC32": (0xEDB88320, 32), "CRC32C": (0x82F63B78, 32), "CRC64NVME": (0x9A6C9329AC4BC9B5, 64)}


def ref_crc(algorithm: str, data: bytes) -> int:
    poly, width = _REF[algorithm]
    mask = (1 << width) - 1
    crc = mask
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
    return crc ^ mask


def crc(algorithm: str, data: bytes) -> int:
    h = checksums.new(algorithm)
    h.update(data)
    return int.from_bytes(h.digest(), "big")


@pytest.mark.parametrize(("algorithm", "check"), [("CRC32", 0xCBF43926), ("CRC32C", 0xE3069283),
                                                  ("CRC64NVME", 0xAE8B14860A799888)])
def test_reference_and_implementation_agree_on_the_standard_check_value(algorithm: str, check: int) -> None:
    assert ref_crc(algorithm, b"123456789") == check
    assert crc(algorithm, b"123456789") == check


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "CRC64NVME"])
@pytest.mark.parametrize(("len_a", "len_b"), [(0, 0), (0, 7), (7, 0), (1, 1), (5, 300), (1000, 1), (4096, 4099)])
def test_combine_equals_crc_of_concatenation(algorithm: str, len_a: int, len_b: int) -> None:
    rng = random.Random(len_a * 7919 + len_b)
    a, b = rng.randbytes(len_a), rng.randbytes(len_b)
    combined = checksums.crc_combine(algorithm, crc(algorithm, a), crc(algorithm, b), len(b))
    assert combined == ref_crc(algorithm, a + b)


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "CRC64NVME"])
def test_full_object_of_many_parts(algorithm: str) -> None:
    parts = [os.urandom(n) for n in (3000, 1, 0, 4500, 17)]
    digests = []
    for p in parts:
        h = checksums.new(algorithm)
        h.update(p)
        digests.append((h.digest(), len(p)))
    expected = ref_crc(algorithm, b"".join(parts)).to_bytes(_REF[algorithm][1] // 8, "big")
    assert checksums.full_object(algorithm, digests) == base64.b64encode(expected).decode()


def test_combine_of_large_lengths_matches_zlib() -> None:
    """Long zero runs: zlib's CRC32 of A + 1 MiB of zeros, against a combine that never sees the zeros."""
    a = b"hello"
    zeros = bytes(1 << 20)
    combined = checksums.crc_combine("CRC32", zlib.crc32(a), zlib.crc32(zeros), len(zeros))
    assert combined == zlib.crc32(a + zeros)


def test_default_checksum_types() -> None:
    assert checksums.default_checksum_type("CRC64NVME") == "FULL_OBJECT"
    assert checksums.default_checksum_type("crc32") == "COMPOSITE"
    assert checksums.default_checksum_type("SHA256") == "COMPOSITE"


def test_crc64nvme_fast_and_pure_python_paths_agree_when_fed_in_pieces() -> None:
    data = random.Random(7).randbytes(70_000)
    h = checksums.new("CRC64NVME")
    for i in range(0, len(data), 9_999):
        h.update(data[i:i + 9_999])
    h.update(b"")
    expected = ref_crc("CRC64NVME", data)
    assert int.from_bytes(h.digest(), "big") == expected
    assert checksums._crc64_extend_py(checksums._crc64_extend_py(0, data[:5]), data[5:]) == expected
