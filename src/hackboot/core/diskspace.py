"""Free space on the state directory's filesystem: refuse writes early, keep deletes working.

A full disk must not wedge the cloud: writes are refused with 507 *before* anything is written
(`is_low`), and a reserve file of `disk_reserve_bytes` is kept in state_dir. When the disk is
low, a request that frees space (a DELETE) calls `use_reserve()`: the reserve is unlinked so
SQLite has room for its WAL and the delete commits. `maintain_reserve()` re-creates it once
space is back, so the cloud recovers without an operator.

Every API/S3 process calls these; the checks cost one statvfs per second per path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from pathlib import Path

from hackboot.core.config import get_settings

RESERVE_NAME = "disk-reserve"
CACHE_S = 1.0
_cache: dict[str, tuple[float, int]] = {}
_lock = threading.Lock()


def _state_dir(path: Path | None) -> Path:
    return path if path is not None else get_settings().state_dir


def free_bytes(path: Path | None = None, *, fresh: bool = False) -> int:
    """Bytes an unprivileged writer may still use on `path`'s filesystem (cached ~1 s)."""
    key = str(_state_dir(path))
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and not fresh and hit[0] > now:
        return hit[1]
    st = os.statvfs(key)
    free = st.f_bavail * st.f_frsize
    _cache[key] = (now + CACHE_S, free)
    return free


def is_low(path: Path | None = None, extra: int = 0) -> bool:
    """True when writing `extra` more bytes would leave less than `min_free_bytes` free."""
    return free_bytes(path) - extra < get_settings().min_free_bytes


def reserve_path(path: Path | None = None) -> Path:
    return _state_dir(path) / RESERVE_NAME


def use_reserve(path: Path | None = None) -> bool:
    """Give the reserve back to the filesystem (deletes need a little room). True if it was there."""
    try:
        os.unlink(reserve_path(path))
    except FileNotFoundError:
        return False
    _cache.pop(str(_state_dir(path)), None)
    return True


def maintain_reserve(path: Path | None = None) -> None:
    """Create the reserve file when it is missing and the disk has room for it and then some."""
    size = get_settings().disk_reserve_bytes
    target = reserve_path(path)
    if size <= 0 or target.exists():
        return
    if free_bytes(path) < size + get_settings().min_free_bytes:
        return
    with _lock:
        tmp = target.with_name(f".{RESERVE_NAME}.{os.getpid()}.{threading.get_ident()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        try:
            os.posix_fallocate(fd, 0, size)  # real blocks, not a sparse file
            os.close(fd)
            os.rename(tmp, target)
        except OSError:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _cache.pop(str(_state_dir(path)), None)


def is_full_error(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from a file write, or SQLITE_FULL from the database (as SQLAlchemy wraps it)."""
    for err in (exc, getattr(exc, "orig", None), exc.__cause__):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if err is not None and type(err).__name__ == "OperationalError" and "disk is full" in str(err):
            return True
    return False
