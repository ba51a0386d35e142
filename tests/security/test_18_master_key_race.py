"""Finding 18: processes starting together on a fresh state directory all get the same master key.

Three real processes create the key in each of many fresh state directories at the same instant
(a barrier per directory): none may fail, and all must read the one key that ends up on disk.
"""

from __future__ import annotations

import base64
import multiprocessing
import os
import stat
import traceback
from pathlib import Path
from typing import Any

PROCESSES = 3
DIRS = 40


def _create_keys(dirs: list[str], barrier: Any, results: Any) -> None:
    from hackboot.core import crypto
    from hackboot.core.config import reset_settings_cache

    for d in dirs:
        os.environ["HACKBOOT_STATE_DIR"] = d
        os.environ.pop("HACKBOOT_MASTER_KEY", None)
        reset_settings_cache()
        crypto.master_key.cache_clear()
        barrier.wait(timeout=60)
        try:
            results.put((d, os.getpid(), base64.b64encode(crypto.master_key()).decode()))
        except Exception:
            results.put((d, os.getpid(), "ERROR " + traceback.format_exc(limit=2)))


def test_concurrent_master_key_creation(tmp_path: Path) -> None:
    dirs = [str(tmp_path / f"state{i}") for i in range(DIRS)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [ctx.Process(target=_create_keys, args=(dirs, barrier, results)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in range(PROCESSES * DIRS)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    errors = [r for r in got if r[2].startswith("ERROR")]
    assert not errors, f"{len(errors)} of {len(got)} key reads failed, e.g. {errors[0]}"
    for d in dirs:
        keys = {k for dd, _, k in got if dd == d}
        path = Path(d) / "master.key"
        on_disk = base64.b64encode(base64.urlsafe_b64decode(path.read_bytes().strip() + b"==")).decode()
        assert keys == {on_disk}, d  # every process uses the key that was kept
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in Path(d).iterdir() if p.name != "master.key"] == [], "temporary files left"
