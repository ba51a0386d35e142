"""The blob backend contract, run against the local filesystem backend."""

from __future__ import annotations

import os
from pathlib import Path

from hackboot.objectstore.storage import LocalBackend


def test_write_commit_read_delete(tmp_path: Path) -> None:
    be = LocalBackend(tmp_path / "objects")
    w = be.writer()
    w.write(b"hello ")
    w.write(memoryview(b"world"))
    blob = w.commit()
    assert be.read(blob, 0, 100) == b"hello world"
    assert be.read(blob, 6, 3) == b"wor"
    assert [b for b, _ in be.list()] == [blob]
    assert not list((tmp_path / "objects" / "tmp").iterdir())
    be.delete(blob)
    be.delete(blob)  # idempotent
    assert list(be.list()) == []


def test_abort_and_temp_cleanup(tmp_path: Path) -> None:
    be = LocalBackend(tmp_path / "objects")
    w = be.writer()
    w.write(b"partial")
    w.abort()
    assert list(be.list()) == [] and not list(be.tmp.iterdir())
    leftover = be.writer()  # a write interrupted by a crash leaves only a temp file
    leftover.write(b"x" * 10)
    os.close(leftover.fd)  # type: ignore[attr-defined]
    assert be.cleanup_temp() == 1
    assert list(be.list()) == []


def test_ids_are_not_paths(tmp_path: Path) -> None:
    be = LocalBackend(tmp_path / "objects")
    import pytest

    with pytest.raises(ValueError):
        be.path("../etc/passwd")
