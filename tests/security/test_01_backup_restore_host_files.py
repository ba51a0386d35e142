"""Finding 1: a restore must not read host files through a backup object the tenant swapped.

A tenant backs up a volume to its own bucket, replaces the backup's object with a qcow2 whose external
*data file* names a host file (here the cloud's own ``master.key``), then restores it. The restore must
refuse (the object no longer matches the SHA-256 recorded at backup time) and leave no volume file
behind; the host file's bytes must never reach a volume.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.security.conftest import Tenant, make_tenant, unique
from tests.support import Cloud


def s3_client(cloud: Cloud, tenant: Tenant) -> Any:
    issued = tenant.client.post("/v1/s3/credentials", {"name": unique("k")})
    return boto3.client("s3", endpoint_url=cloud.s3_url, aws_access_key_id=issued["access_key"],
                        aws_secret_access_key=issued["secret_key"], region_name="PAR1",
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


def crafted_qcow2(workdir: Path, host_file: Path, size: int) -> bytes:
    """A qcow2 whose raw external data file is `host_file` (qemu-img writes it naming a decoy of the same
    length, so the real host file is never touched; the name is then swapped in the header), padded to
    `size` bytes so that only the checksum can tell it from the original."""
    target = str(host_file)
    decoy_dir = Path(tempfile.mkdtemp(prefix="f1-"))  # short, so that a name of the target's length fits
    try:
        pad = len(target) - len(str(decoy_dir)) - 1
        assert pad > 0, "host path too short for the decoy"
        decoy = decoy_dir / ("d" * pad)
        assert len(str(decoy)) == len(target)
        image = workdir / "crafted.qcow2"
        opts = f"data_file={decoy},data_file_raw=on,cluster_size=4096"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(image), "1M"], check=True,
                       capture_output=True)
    finally:
        shutil.rmtree(decoy_dir, ignore_errors=True)
    raw = image.read_bytes()
    assert raw.count(str(decoy).encode()) == 1
    assert len(raw) <= size
    return raw.replace(str(decoy).encode(), target.encode()) + bytes(size - len(raw))


def wait_volume(tenant: Tenant, volume_id: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        v = tenant.client.volumes.get(volume_id)  # type: ignore[attr-defined]
        if v["status"] in ("available", "error") and not v.get("task_state"):
            return v  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, v
        time.sleep(0.3)


@pytest.fixture
def tenant(cloud: Cloud) -> Tenant:
    return make_tenant(cloud, "member")


def test_restore_of_a_swapped_object_with_a_host_data_file_is_refused(cloud: Cloud, tenant: Tenant,
                                                                       tmp_path: Path) -> None:
    host_file = cloud.state_dir / "master.key"
    assert host_file.is_file()
    c = tenant.client
    v = wait_volume(tenant, c.volumes.create(unique("data"), 1)["id"])  # type: ignore[attr-defined]
    assert v["status"] == "available", v
    b = c.volume_backups.wait(c.volume_backups.create(v["id"])["id"], timeout=180)  # type: ignore[attr-defined]
    assert b["status"] == "available", b
    assert all(len(o["sha256"]) == 64 for o in b["objects"])

    # the tenant swaps the backup's object in its own bucket for the crafted image
    s3 = s3_client(cloud, tenant)
    for obj in b["objects"]:
        s3.put_object(Bucket=b["bucket"], Key=obj["key"], Body=crafted_qcow2(tmp_path, host_file, obj["bytes"]))

    r = c.volume_backups.restore(b["id"], unique("stolen"))  # type: ignore[attr-defined]
    r = wait_volume(tenant, r["id"])
    assert r["status"] == "error", f"the restore used a tampered object: {r}"
    assert "changed in its bucket" in r["status_reason"] and "SHA-256" in r["status_reason"], r["status_reason"]
    # no half-made volume: the restored volume has no file on the host
    leftovers = [p for d in cloud.state_dir.rglob(r["id"]) if d.is_dir() for p in d.iterdir()]
    assert leftovers == []
    # nothing the restore downloaded is left in its scratch space either
    assert [p for p in cloud.state_dir.rglob(".scratch/*") if r["id"] in p.name] == []


@pytest.mark.parametrize("encrypted", [False, True])
def test_untouched_backups_still_restore(tenant: Tenant, encrypted: bool) -> None:
    """The same checks pass an honest chain (full + incremental, plain and LUKS layers)."""
    c = tenant.client
    v = wait_volume(tenant, c.volumes.create(unique("data"), 1, encrypted=encrypted)["id"])  # type: ignore[attr-defined]
    full = c.volume_backups.wait(c.volume_backups.create(v["id"])["id"], timeout=180)  # type: ignore[attr-defined]
    inc = c.volume_backups.wait(c.volume_backups.create(v["id"])["id"], timeout=180)  # type: ignore[attr-defined]
    assert (full["status"], inc["status"], inc["kind"]) == ("available", "available", "incremental"), (full, inc)
    r = wait_volume(tenant, c.volume_backups.restore(inc["id"], unique("back"))["id"])  # type: ignore[attr-defined]
    assert r["status"] == "available" and r["encrypted"] == encrypted, r
