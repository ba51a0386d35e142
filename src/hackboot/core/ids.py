"""Prefixed, opaque, time-sortable identifiers (`i-…`, `vol-…`, `prj-…`).

48 bits of milliseconds then 80 random bits, in Crockford base32: ids sort by
creation time, so keyset pagination on the primary key lists oldest first.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def _b32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id(prefix: str) -> str:
    millis = int(time.time() * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    return f"{prefix}-{_b32(millis, 10)}{_b32(rand, 16)}"
