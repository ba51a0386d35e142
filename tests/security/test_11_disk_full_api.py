"""Finding 11 (API side): a full disk does not wedge the service.

The state directory lives on a small real filesystem (a tmpfs mounted for the test); a tenant
fills it up. Then writes get a clean 507 problem (no 500, no reset connection), reads keep
working, the tenant can still delete to free space, and once space is back the cloud takes
writes again by itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.security.conftest import make_tenant
from tests.support import Cloud, make_cloud

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mountpoint = tmp_path_factory.mktemp("smalldisk")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "hb-test-small", str(mountpoint)],
                   check=True)
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.fixture(scope="module")
def full_cloud(small_disk: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    c = make_cloud(small_disk / "state", HACKBOOT_RUN_LOCAL_AGENT="false",
                   HACKBOOT_MIN_FREE_BYTES=str(4 * MiB), HACKBOOT_DISK_RESERVE_BYTES=str(4 * MiB))
    c.log_path = tmp_path_factory.mktemp("smalldisk-log") / "server.log"  # the log must not need the disk
    c.start()
    yield c
    c.stop()


def fill(directory: Path) -> Path:
    """Write a file until the filesystem refuses more (ENOSPC)."""
    filler = directory / f"filler-{uuid.uuid4().hex[:6]}"
    block = b"\xa5" * MiB
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        with contextlib.suppress(OSError):
            while os.write(fd, b"\xa5" * 4096):
                pass
    finally:
        os.close(fd)
    return filler


def test_full_disk_gives_507_keeps_deletes_working_and_recovers(full_cloud: Cloud, small_disk: Path) -> None:
    tenant = make_tenant(full_cloud, "member")
    assert (full_cloud.state_dir / "disk-reserve").exists()
    headers = {"Authorization": f"Bearer {tenant.token}"}
    with httpx.Client(base_url=full_cloud.url, headers=headers, timeout=30) as http:
        keep = [http.post("/v1/keypairs", json={"name": f"k{i}-{uuid.uuid4().hex[:6]}"}).json()["name"]
                for i in range(3)]
        filler = fill(small_disk)
        try:
            time.sleep(1.2)  # the free-space check is cached for a second
            for _ in range(3):  # the same keep-alive connection keeps answering: nothing reset it
                resp = http.post("/v1/keypairs", json={"name": f"new-{uuid.uuid4().hex[:6]}"})
                assert resp.status_code == 507, resp.text
                assert resp.headers["content-type"] == "application/problem+json"
                assert resp.json()["code"] == "insufficient_storage"
            listed = http.get("/v1/keypairs")
            assert listed.status_code == 200 and {k["name"] for k in listed.json()["items"]} == set(keep)
            # The tenant frees space: deletes still commit on the full disk.
            for name in keep:
                resp = http.delete(f"/v1/keypairs/{name}")
                assert resp.status_code == 204, resp.text
            assert http.get("/v1/keypairs").json()["items"] == []
        finally:
            filler.unlink()
        # Space is back: writes are taken again, with no operator involved, and the reserve returns.
        time.sleep(1.2)
        deadline = time.monotonic() + 10
        while True:
            resp = http.post("/v1/keypairs", json={"name": f"after-{uuid.uuid4().hex[:6]}"})
            if resp.status_code == 201 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert resp.status_code == 201, resp.text
        deadline = time.monotonic() + 10
        while not (full_cloud.state_dir / "disk-reserve").exists() and time.monotonic() < deadline:
            http.post("/v1/keypairs", json={"name": f"more-{uuid.uuid4().hex[:6]}"})
            time.sleep(0.3)
        assert (full_cloud.state_dir / "disk-reserve").exists()
    assert full_cloud.proc is not None and full_cloud.proc.poll() is None
    assert "Traceback" not in full_cloud.log()
