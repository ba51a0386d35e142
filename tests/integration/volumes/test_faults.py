"""The control plane (API + in-process agent) killed mid-attach and mid-snapshot: after a restart the
reconciler finishes the half-done work; nothing is stuck, duplicated or lost. The guest keeps running."""

from __future__ import annotations

import time
from typing import Any

import pytest

from hackboot.sdk import Client
from tests.integration.volumes.conftest import disk_of, gssh, unique, wait_local_host
from tests.support import Cloud

pytestmark = pytest.mark.qemu


def crash_during(cloud: Cloud, point: str, action: Any) -> None:
    """Restart the cloud with a crash armed at `point`, run `action`, wait for the crash, restart clean."""
    cloud.stop()
    cloud.env["HACKBOOT_VOLUME_CRASH_AT"] = point
    try:
        cloud.start()
        action()
        assert cloud.proc is not None
        cloud.proc.wait(60)  # killed by the armed fault
        assert cloud.proc.returncode == -9, cloud.proc.returncode
    finally:
        cloud.env.pop("HACKBOOT_VOLUME_CRASH_AT", None)
    cloud.start()
    wait_local_host(cloud.client(), cloud.extra_env["local_host"])


def test_killed_mid_attach_then_mid_snapshot(vc: Client, vol_cloud: Cloud, guest: dict[str, Any],
                                             vkey: dict[str, Any]) -> None:
    v = vc.volumes.wait(vc.volumes.create(unique("crash"), 1, encrypted=True)["id"])  # type: ignore[attr-defined]
    crash_during(vol_cloud, "attach:after-device-add",
                 lambda: vc.volumes.attach(v["id"], guest["id"]))  # type: ignore[attr-defined]
    v = vc.volumes.wait(v["id"], ("in-use",), timeout=60)  # type: ignore[attr-defined]
    assert v["status"] == "in-use" and v["status_reason"] == "", v
    assert v["attachments"][0]["state"] == "attached" and v["attachments"][0]["io_limits"]["iops"] == 10_000
    dev = disk_of(guest, vkey, v["id"])
    assert dev is not None
    serials = gssh(guest, vkey, "cat /sys/block/vd*/serial 2>/dev/null; echo").count(v["id"][:20])
    assert serials == 1  # plugged once, not twice

    gssh(guest, vkey, f"echo before > /tmp/b; dd if=/tmp/b of=/dev/{dev} bs=4k conv=sync oflag=direct 2>/dev/null")
    snap: dict[str, Any] = {}
    crash_during(vol_cloud, "snapshot:after-blockdev-add",
                 lambda: snap.update(vc.volume_snapshots.create(v["id"], "mid")))  # type: ignore[attr-defined]
    s = vc.volume_snapshots.wait(v["id"], snap["id"], timeout=60)  # type: ignore[attr-defined]
    assert s["status"] == "available", s
    v = vc.volumes.wait(v["id"], ("in-use",))  # type: ignore[attr-defined]
    assert v["status"] == "in-use" and v["task_state"] is None and v["status_reason"] == "", v
    gssh(guest, vkey, f"echo after > /tmp/a; dd if=/tmp/a of=/dev/{dev} bs=4k conv=sync oflag=direct 2>/dev/null")
    clone = vc.volumes.wait(vc.volumes.create(unique("fromcrash"), snapshot=s["id"])["id"])  # type: ignore[attr-defined]
    vc.volumes.attach(clone["id"], guest["id"])  # type: ignore[attr-defined]
    vc.volumes.wait(clone["id"], ("in-use",))  # type: ignore[attr-defined]
    cdev = disk_of(guest, vkey, clone["id"])
    read = "dd if=/dev/{} bs=4k count=1 iflag=direct 2>/dev/null | head -n1"
    assert gssh(guest, vkey, read.format(cdev)).strip() == "before"
    assert gssh(guest, vkey, read.format(dev)).strip() == "after"
    for vid in (clone["id"], v["id"]):
        vc.volumes.detach(vid)  # type: ignore[attr-defined]
        assert vc.volumes.wait(vid, ("available",))["status"] == "available"  # type: ignore[attr-defined]
    vc.volumes.delete(clone["id"])  # type: ignore[attr-defined]
    vc.volumes.wait_deleted(clone["id"])  # type: ignore[attr-defined]
    vc.volume_snapshots.delete(v["id"], "mid")  # type: ignore[attr-defined]
    vc.volume_snapshots.wait(v["id"], s["id"])  # type: ignore[attr-defined]
    vc.volumes.delete(v["id"])  # type: ignore[attr-defined]
    assert vc.volumes.wait_deleted(v["id"])["status"] == "deleted"  # type: ignore[attr-defined]
    time.sleep(0)
