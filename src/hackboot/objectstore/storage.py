"""Blob storage backends: where object bytes live, by generated id (never by key).

The contract (`BlobBackend`) is small on purpose so a Ceph RADOS backend (one RADOS object per
blob, or striped with libradosstriper) can replace the local filesystem:

- `writer()` → a `BlobWriter`: `write(bytes)` any number of times, then `commit()` makes the blob
  durable under its id and returns it, or `abort()` throws it away. Nothing is visible under the
  id before `commit()` returns.
- `read(blob_id, offset, length)` → bytes (bounded by the caller's chunk size).
- `path(blob_id)` → a local path for zero-copy `sendfile`, or None when the backend has none.
- `delete(blob_id)`, `list()` → (id, mtime) of every stored blob (for orphan sweeps).
- `cleanup_temp()` → removes the leftovers of writes that never committed (crash), at start.

LocalBackend layout under `state_dir/objects/`:
  tmp/<random>            data being received (deleted on start: never acknowledged)
  blobs/<xy>/<blob_id>    committed blobs, xy = last two characters of the id (1,024 folders)
A write is: temp file, write, fsync(file), rename into blobs/xy, fsync(blobs/xy). Directory
fsyncs are coalesced between concurrent writers (group commit): one fsync covers every rename
made before it started.
"""

from __future__ import annotations

import abc
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from hackboot.core.ids import new_id


class BlobWriter(abc.ABC):
    size: int = 0

    @abc.abstractmethod
    def write(self, data: bytes | memoryview) -> None: ...

    @abc.abstractmethod
    def commit(self) -> str:
        """Make the data durable and return the blob id (call from a worker thread: it fsyncs)."""

    @abc.abstractmethod
    def abort(self) -> None: ...


class BlobBackend(abc.ABC):
    @abc.abstractmethod
    def writer(self) -> BlobWriter: ...

    @abc.abstractmethod
    def read(self, blob_id: str, offset: int, length: int) -> bytes: ...

    def path(self, blob_id: str) -> str | None:
        return None

    @abc.abstractmethod
    def delete(self, blob_id: str) -> None: ...

    @abc.abstractmethod
    def list(self) -> Iterator[tuple[str, float]]: ...

    @abc.abstractmethod
    def cleanup_temp(self, older_than_s: float = 0) -> int: ...


class _DirSync:
    """fsync a directory, coalescing concurrent requests: one fsync serves all renames before it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, list[int]] = {}  # dir → [requested generation, synced generation]
        self._dir_locks: dict[str, threading.Lock] = {}

    def renamed(self, directory: str) -> int:
        with self._lock:
            st = self._state.setdefault(directory, [0, 0])
            st[0] += 1
            self._dir_locks.setdefault(directory, threading.Lock())
            return st[0]

    def sync(self, directory: str, generation: int) -> None:
        lock = self._dir_locks[directory]
        with lock:
            with self._lock:
                st = self._state[directory]
                if st[1] >= generation:
                    return
                target = st[0]
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._lock:
                st[1] = max(st[1], target)


class _LocalWriter(BlobWriter):
    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.blob_id = new_id("b")
        self.tmp = str(backend.tmp / f"{self.blob_id}.part")
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.size = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.size += n

    def commit(self) -> str:
        os.fsync(self.fd)
        os.close(self.fd)
        self.closed = True
        final_dir = self.backend.dir_for(self.blob_id)
        os.rename(self.tmp, os.path.join(final_dir, self.blob_id))
        self.backend.dirsync.sync(final_dir, self.backend.dirsync.renamed(final_dir))
        return self.blob_id

    def abort(self) -> None:
        if not self.closed:
            os.close(self.fd)
            self.closed = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class LocalBackend(BlobBackend):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.blobs = root / "blobs"
        self.dirsync = _DirSync()
        self._made: set[str] = set()
        self._mk_lock = threading.Lock()
        for d in (root, self.tmp, self.blobs):
            d.mkdir(parents=True, exist_ok=True)

    def dir_for(self, blob_id: str) -> str:
        d = str(self.blobs / blob_id[-2:])
        if d not in self._made:
            with self._mk_lock:
                if not os.path.isdir(d):
                    os.mkdir(d, 0o700)
                    fd = os.open(self.blobs, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                self._made.add(d)
        return d

    def writer(self) -> BlobWriter:
        return _LocalWriter(self)

    def path(self, blob_id: str) -> str:
        if "/" in blob_id or blob_id.startswith("."):
            raise ValueError("bad blob id")
        return str(self.blobs / blob_id[-2:] / blob_id)

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        fd = os.open(self.path(blob_id), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def delete(self, blob_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(blob_id))

    def list(self) -> Iterator[tuple[str, float]]:
        for sub in os.scandir(self.blobs):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                try:
                    yield entry.name, entry.stat().st_mtime
                except FileNotFoundError:
                    continue

    def cleanup_temp(self, older_than_s: float = 0) -> int:
        removed = 0
        now = time.time()
        for entry in os.scandir(self.tmp):
            try:
                if older_than_s and now - entry.stat().st_mtime < older_than_s:
                    continue
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue
        return removed
