"""Snapshots (instant, online), clones sharing blocks, revert, snapshot deletion with chain
consolidation, backups to the project's S3 bucket (full, incremental), restore, scheduled policy."""

from __future__ import annotations

import time
from typing import Any

import pytest

from hackboot.sdk import ApiError, Client
from hackboot.volumes.storage import qcow2_backing
from tests.integration.volumes.conftest import disk_gone, disk_of, gssh, unique
from tests.support import Cloud

pytestmark = pytest.mark.qemu


def write(guest: dict[str, Any], key: dict[str, Any], dev: str, text: str, block: int = 0) -> None:
    gssh(guest, key, f"echo {text} > /tmp/w; dd if=/tmp/w of=/dev/{dev} bs=4k seek={block} conv=sync,notrunc "
                     f"oflag=direct 2>/dev/null; sync")


def read(guest: dict[str, Any], key: dict[str, Any], dev: str, block: int = 0) -> str:
    return gssh(guest, key, f"dd if=/dev/{dev} bs=4k skip={block} count=1 iflag=direct 2>/dev/null | head -n1").strip()


def attach(vc: Client, guest: dict[str, Any], key: dict[str, Any], vid: str) -> str:
    vc.volumes.attach(vid, guest["id"])  # type: ignore[attr-defined]
    v = vc.volumes.wait(vid, ("in-use",))  # type: ignore[attr-defined]
    assert v["status"] == "in-use", v
    dev = disk_of(guest, key, vid)
    assert dev is not None
    return dev


def detach(vc: Client, guest: dict[str, Any], key: dict[str, Any], vid: str) -> None:
    vc.volumes.detach(vid)  # type: ignore[attr-defined]
    v = vc.volumes.wait(vid, ("available",))  # type: ignore[attr-defined]
    assert v["status"] == "available", v
    assert disk_gone(guest, key, vid)


def test_snapshots_clones_revert_and_consolidation(vc: Client, vol_cloud: Cloud, guest: dict[str, Any],
                                                  vkey: dict[str, Any]) -> None:
    pool = vol_cloud.state_dir / "agent" / "volumes"
    v = vc.volumes.wait(vc.volumes.create(unique("snapme"), 2, encrypted=True)["id"])  # type: ignore[attr-defined]
    dev = attach(vc, guest, vkey, v["id"])
    write(guest, vkey, dev, "first")
    # Online (guest running). Its constant cost is measured by bench/volumes.py, not timed here:
    # a wall-clock bound in a test only measures how loaded the machine is.
    s1 = vc.volume_snapshots.create(v["id"], "s1")  # type: ignore[attr-defined]
    s1 = vc.volume_snapshots.wait(v["id"], s1["id"])  # type: ignore[attr-defined]
    assert s1["status"] == "available", s1
    write(guest, vkey, dev, "second")
    s2 = vc.volume_snapshots.wait(v["id"], vc.volume_snapshots.create(v["id"], "s2")["id"])  # type: ignore[attr-defined]
    write(guest, vkey, dev, "third")
    assert [s["name"] for s in vc.volume_snapshots.list(v["id"])] == ["s1", "s2"]  # type: ignore[attr-defined]

    # a clone of s1 shares its blocks: an overlay on the snapshot's frozen file
    clone = vc.volumes.wait(vc.volumes.create(unique("clone"), snapshot=s1["id"])["id"])  # type: ignore[attr-defined]
    assert clone["status"] == "available" and clone["encrypted"] and clone["size_gb"] == 2, clone
    backing = qcow2_backing(pool / clone["id"] / "base.qcow2")
    assert backing is not None and v["id"] in backing
    assert clone["allocated_bytes"] < 4 * 1024 * 1024  # nothing copied (the LUKS header is 2 MiB)
    cdev = attach(vc, guest, vkey, clone["id"])
    assert read(guest, vkey, cdev) == "first"
    with pytest.raises(ApiError) as err:
        vc.volume_snapshots.delete(v["id"], "s1")  # type: ignore[attr-defined]
    assert err.value.status == 409 and err.value.code == "has_dependents"
    with pytest.raises(ApiError) as err:
        vc.volumes.delete(v["id"])  # type: ignore[attr-defined]
    assert err.value.status == 409

    # deleting s2 (in the running chain) streams its data up: the chain shrinks, data intact
    files_before = len(list((pool / v["id"]).glob("*.qcow2")))
    vc.volume_snapshots.delete(v["id"], "s2")  # type: ignore[attr-defined]
    assert vc.volume_snapshots.wait(v["id"], s2["id"])["status"] == "deleted"  # type: ignore[attr-defined]
    v = vc.volumes.wait(v["id"], ("in-use",))  # type: ignore[attr-defined]
    assert v["status_reason"] == "", v
    assert len(list((pool / v["id"]).glob("*.qcow2"))) == files_before - 1
    assert read(guest, vkey, dev) == "third"

    # revert needs a detached volume
    with pytest.raises(ApiError) as err:
        vc.volumes.revert(v["id"], "s1")  # type: ignore[attr-defined]
    assert err.value.status == 409
    detach(vc, guest, vkey, v["id"])
    vc.volumes.revert(v["id"], "s1")  # type: ignore[attr-defined]
    v = vc.volumes.wait(v["id"])  # type: ignore[attr-defined]
    assert v["status"] == "available" and v["status_reason"] == "", v
    dev = attach(vc, guest, vkey, v["id"])
    assert read(guest, vkey, dev) == "first"
    for vid in (clone["id"], v["id"]):
        detach(vc, guest, vkey, vid)
    vc.volumes.delete(clone["id"])  # type: ignore[attr-defined]
    vc.volumes.wait_deleted(clone["id"])  # type: ignore[attr-defined]
    vc.volume_snapshots.delete(v["id"], "s1")  # type: ignore[attr-defined]  # offline: qemu-storage-daemon
    assert vc.volume_snapshots.wait(v["id"], s1["id"])["status"] == "deleted"  # type: ignore[attr-defined]
    v = vc.volumes.wait(v["id"])  # type: ignore[attr-defined]
    assert v["status"] == "available" and v["status_reason"] == "", v
    assert len(list((pool / v["id"]).glob("*.qcow2"))) == 1  # one file left: nothing leaks
    dev = attach(vc, guest, vkey, v["id"])
    assert read(guest, vkey, dev) == "first"
    detach(vc, guest, vkey, v["id"])
    vc.volumes.delete(v["id"])  # type: ignore[attr-defined]


def test_backup_incremental_restore_identical(vc: Client, vol_cloud: Cloud, guest: dict[str, Any],
                                             vkey: dict[str, Any]) -> None:
    v = vc.volumes.wait(vc.volumes.create(unique("data"), 1, encrypted=True)["id"])  # type: ignore[attr-defined]
    dev = attach(vc, guest, vkey, v["id"])
    gssh(guest, vkey, f"dd if=/dev/urandom of=/dev/{dev} bs=1M count=16 oflag=direct 2>/dev/null; sync")
    sum1 = gssh(guest, vkey, f"dd if=/dev/{dev} bs=1M count=32 iflag=direct 2>/dev/null | sha256sum").split()[0]
    full = vc.volume_backups.wait(vc.volume_backups.create(v["id"], bucket="vbackups")["id"])  # type: ignore[attr-defined]
    assert full["status"] == "available" and full["kind"] == "full", full
    assert full["size_bytes"] >= 16 * 1024 * 1024 and full["rpo_seconds"] is not None
    # change ~1 % of the volume (10 MiB of 1 GiB); the incremental carries only that
    gssh(guest, vkey, f"dd if=/dev/urandom of=/dev/{dev} bs=1M count=10 seek=100 oflag=direct 2>/dev/null; sync")
    sum2 = gssh(guest, vkey, f"dd if=/dev/{dev} bs=1M count=128 iflag=direct 2>/dev/null | sha256sum").split()[0]
    inc = vc.volume_backups.wait(vc.volume_backups.create(v["id"], bucket="vbackups")["id"])  # type: ignore[attr-defined]
    assert inc["kind"] == "incremental" and inc["parent_id"] == full["id"], inc
    assert 10 * 1024 * 1024 <= inc["size_bytes"] < 14 * 1024 * 1024, inc["size_bytes"]
    # the objects are in the project's bucket, as ciphertext
    import boto3

    cred = vc.post("/v1/s3/credentials", {"name": "check"})
    s3 = boto3.client("s3", endpoint_url=vol_cloud.s3_url, aws_access_key_id=cred["access_key"],
                      aws_secret_access_key=cred["secret_key"], region_name="PAR1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="vbackups")["Contents"]]
    assert any(full["id"] in k for k in keys) and any(inc["id"] in k for k in keys)
    # restore the incremental (its chain: full + incremental) into a new volume
    r = vc.volume_backups.restore(inc["id"], unique("data3"))  # type: ignore[attr-defined]
    r = vc.volumes.wait(r["id"], timeout=300)  # type: ignore[attr-defined]
    assert r["status"] == "available" and r["encrypted"], r
    rdev = attach(vc, guest, vkey, r["id"])
    digest = gssh(guest, vkey, f"dd if=/dev/{rdev} bs=1M count=128 iflag=direct 2>/dev/null | sha256sum")
    assert digest.split()[0] == sum2
    r1 = vc.volumes.wait(vc.volume_backups.restore(full["id"], unique("data1"))["id"])  # type: ignore[attr-defined]
    r1dev = attach(vc, guest, vkey, r1["id"])
    digest = gssh(guest, vkey, f"dd if=/dev/{r1dev} bs=1M count=32 iflag=direct 2>/dev/null | sha256sum")
    assert digest.split()[0] == sum1
    with pytest.raises(ApiError) as err:
        vc.volume_backups.delete(full["id"])  # type: ignore[attr-defined]
    assert err.value.status == 409 and err.value.code == "has_dependents"
    for vid in (r["id"], r1["id"], v["id"]):
        detach(vc, guest, vkey, vid)
        vc.volumes.delete(vid)  # type: ignore[attr-defined]


def test_backup_policy_runs_and_records_rpo(vc: Client, vol_cloud: Cloud) -> None:
    v = vc.volumes.wait(vc.volumes.create(unique("sched"), 1)["id"])  # type: ignore[attr-defined]
    pol = vc.backup_policies.create(unique("daily"), every="6h", keep_local="7d", keep_remote="30d",  # type: ignore[attr-defined]
                                    bucket="policybackups", volumes=[v["id"]])
    assert pol["every_s"] == 6 * 3600 and pol["keep_local_s"] == 7 * 86400 and pol["keep_remote_s"] == 30 * 86400
    deadline = time.monotonic() + 60
    while True:
        done = [b for b in vc.volume_backups.list(volume=v["id"]) if b["status"] == "available"]  # type: ignore[attr-defined]
        if done:
            break
        assert time.monotonic() < deadline, "the scheduler did not back the volume up"
        time.sleep(1)
    b = done[0]
    assert b["policy_id"] == pol["id"] and b["rpo_seconds"] is not None and b["bucket"] == "policybackups"
    assert b["expires_at"] is not None
    points = vc.volume_snapshots.list(v["id"], kind="backup")  # type: ignore[attr-defined]
    assert len(points) == 1 and points[0]["expires_at"] is not None
    time.sleep(3)  # not due again for 6 h
    assert len(vc.volume_backups.list(volume=v["id"])) == 1  # type: ignore[attr-defined]
    vc.backup_policies.delete(pol["id"])  # type: ignore[attr-defined]
    vc.volumes.delete(v["id"])  # type: ignore[attr-defined]
