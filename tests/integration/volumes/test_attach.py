"""Hot attach/detach in a running guest, encryption at rest, online resize, tier throttling."""

from __future__ import annotations

import time
from typing import Any

import pytest

from hackboot.sdk import ApiError, Client
from tests.integration.volumes.conftest import disk_gone, disk_of, gssh, unique
from tests.support import Cloud

pytestmark = pytest.mark.qemu
MARK = "HACKBOOT-PLAINTEXT-MARKER-7f3a91"


def test_encrypted_volume_hot_attach_detach_and_no_plaintext_on_disk(vc: Client, vol_cloud: Cloud,
                                                                     guest: dict[str, Any],
                                                                     vkey: dict[str, Any]) -> None:
    v = vc.volumes.create(unique("enc"), 1, tier="ssd-standard", encrypted=True)  # type: ignore[attr-defined]
    assert v["status"] == "creating" and v["encrypted"]
    v = vc.volumes.wait(v["id"])  # type: ignore[attr-defined]
    assert v["status"] == "available", v
    vc.volumes.attach(v["id"], guest["name"])  # type: ignore[attr-defined]
    v = vc.volumes.wait(v["id"], ("in-use",))  # type: ignore[attr-defined]
    assert v["status"] == "in-use", v
    att = v["attachments"][0]
    assert att["state"] == "attached" and att["instance_id"] == guest["id"]
    assert att["io_limits"]["iops"] == 10_000 and att["io_limits"]["iops_max"] == 15_000  # query-block
    dev = disk_of(guest, vkey, v["id"])
    assert dev is not None, "the guest does not see the volume"
    gssh(guest, vkey, f"for i in $(seq 64); do echo {MARK}; done > /tmp/m; "
                      f"dd if=/tmp/m of=/dev/{dev} bs=64k conv=sync oflag=direct 2>/dev/null; sync")
    assert MARK in gssh(guest, vkey, f"dd if=/dev/{dev} bs=4k count=1 iflag=direct 2>/dev/null")
    raw = (vol_cloud.state_dir / "agent" / "volumes" / v["id"] / "base.qcow2").read_bytes()
    assert MARK.encode() not in raw and b"LUKS" in raw  # ciphertext only, LUKS header inside the qcow2
    # the key never appears in QEMU's command line record nor in the logs
    assert "hbsec" not in vol_cloud.log() or "data" not in vol_cloud.log()
    with pytest.raises(ApiError) as err:
        vc.volumes.delete(v["id"])  # type: ignore[attr-defined]
    assert err.value.status == 409 and err.value.code == "in_use"
    vc.volumes.detach(v["id"])  # type: ignore[attr-defined]
    v = vc.volumes.wait(v["id"], ("available",))  # type: ignore[attr-defined]
    assert v["status"] == "available" and v["attachments"] == [], v
    assert disk_gone(guest, vkey, v["id"])
    vc.volumes.delete(v["id"])  # type: ignore[attr-defined]
    assert vc.volumes.wait_deleted(v["id"])["status"] == "deleted"  # type: ignore[attr-defined]
    assert not (vol_cloud.state_dir / "agent" / "volumes" / v["id"]).exists()


def test_online_resize_seen_by_guest_and_shrink_refused(vc: Client, guest: dict[str, Any],
                                                        vkey: dict[str, Any]) -> None:
    v = vc.volumes.wait(vc.volumes.create(unique("grow"), 1)["id"])  # type: ignore[attr-defined]
    vc.volumes.attach(v["id"], guest["id"])  # type: ignore[attr-defined]
    vc.volumes.wait(v["id"], ("in-use",))  # type: ignore[attr-defined]
    dev = disk_of(guest, vkey, v["id"])
    assert int(gssh(guest, vkey, f"cat /sys/block/{dev}/size")) * 512 == 1024**3
    vc.volumes.resize(v["id"], 3)  # type: ignore[attr-defined]
    v = vc.volumes.wait(v["id"], ("in-use",))  # type: ignore[attr-defined]
    assert v["applied_size_gb"] == 3 and v["status_reason"] == "", v
    deadline = time.monotonic() + 20
    while int(gssh(guest, vkey, f"cat /sys/block/{dev}/size")) * 512 != 3 * 1024**3:
        assert time.monotonic() < deadline, "the guest did not see the new size"
        time.sleep(0.3)
    with pytest.raises(ApiError) as err:
        vc.volumes.resize(v["id"], 2)  # type: ignore[attr-defined]
    assert err.value.status == 409 and err.value.code == "shrink_not_supported"
    vc.volumes.detach(v["id"])  # type: ignore[attr-defined]
    vc.volumes.wait(v["id"], ("available",))  # type: ignore[attr-defined]
    vc.volumes.resize(v["id"], 4)  # type: ignore[attr-defined]  # offline, through qemu-storage-daemon
    assert vc.volumes.wait(v["id"])["applied_size_gb"] == 4  # type: ignore[attr-defined]
    vc.volumes.delete(v["id"])  # type: ignore[attr-defined]


def _iops(guest: dict[str, Any], vkey: dict[str, Any], dev: str, count: int) -> float:
    """Direct 4 KiB reads per second, measured after a first pass that empties the burst bucket."""
    out = gssh(guest, vkey, f"dd if=/dev/{dev} of=/dev/null bs=4k count={count} iflag=direct 2>/dev/null; "
                            f"s=$(cat /proc/uptime); dd if=/dev/{dev} of=/dev/null bs=4k count={count} "
                            f"iflag=direct 2>/dev/null; e=$(cat /proc/uptime); echo $s $e")
    s, _, e, _ = out.split()
    return count / (float(e) - float(s))


def test_tier_throttling_enforced_and_changed_live(vc: Client, guest: dict[str, Any], vkey: dict[str, Any]) -> None:
    v = vc.volumes.wait(vc.volumes.create(unique("slow"), 1, tier="test-200iops")["id"])  # type: ignore[attr-defined]
    vc.volumes.attach(v["id"], guest["id"])  # type: ignore[attr-defined]
    v = vc.volumes.wait(v["id"], ("in-use",))  # type: ignore[attr-defined]
    assert v["attachments"][0]["io_limits"]["iops"] == 200
    dev = disk_of(guest, vkey, v["id"])
    iops = _iops(guest, vkey, dev, 500)
    assert 200 * 0.85 <= iops <= 200 * 1.15, iops  # the cap is real
    v = vc.volumes.update(v["id"], tier="hdd-standard")  # type: ignore[attr-defined]
    v = vc.volumes.wait(v["id"], ("in-use",))  # type: ignore[attr-defined]
    assert v["applied_tier"] == "hdd-standard" and v["attachments"][0]["io_limits"]["iops"] == 1000
    faster = _iops(guest, vkey, dev, 500)
    assert faster > iops * 1.5, (iops, faster)
    vc.volumes.detach(v["id"])  # type: ignore[attr-defined]
    vc.volumes.wait(v["id"], ("available",))  # type: ignore[attr-defined]
    vc.volumes.delete(v["id"])  # type: ignore[attr-defined]


def test_rules(vc: Client, guest: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as err:
        vc.volumes.create(unique("huge"), 16000)  # type: ignore[attr-defined]
    assert err.value.status == 403 and err.value.code == "quota_exceeded", err.value
    with pytest.raises(ApiError) as err:  # the pool (host disk x allocation ratio) is smaller than this
        vc.volumes.create(unique("huge"), 1990)  # type: ignore[attr-defined]
    assert err.value.status == 409 and err.value.code == "no_capacity", err.value
    assert not [x for x in vc.volumes.list() if x["name"].startswith("huge")]  # type: ignore[attr-defined]
    with pytest.raises(ApiError) as err:
        vc.volumes.create(unique("zero"), 0)  # type: ignore[attr-defined]
    assert err.value.status == 422
    with pytest.raises(ApiError) as err:
        vc.volumes.create(unique("tier"), 1, tier="gold")  # type: ignore[attr-defined]
    assert err.value.status == 422
    a = vc.volumes.wait(vc.volumes.create(unique("solo"), 1)["id"])  # type: ignore[attr-defined]
    other = vc.instances.create(unique("other"), flavor="VPS-NANO", image="tiny")  # type: ignore[attr-defined]
    other = vc.instances.wait(other["id"], timeout=180)  # type: ignore[attr-defined]
    vc.volumes.attach(a["id"], guest["id"])  # type: ignore[attr-defined]
    vc.volumes.wait(a["id"], ("in-use",))  # type: ignore[attr-defined]
    with pytest.raises(ApiError) as err:
        vc.volumes.attach(a["id"], other["id"])  # type: ignore[attr-defined]
    assert err.value.status == 409 and "shareable" in err.value.detail
    sh = vc.volumes.wait(vc.volumes.create(unique("shared"), 1, shareable=True)["id"])  # type: ignore[attr-defined]
    vc.volumes.attach(sh["id"], guest["id"])  # type: ignore[attr-defined]
    vc.volumes.wait(sh["id"], ("in-use",))  # type: ignore[attr-defined]
    vc.volumes.attach(sh["id"], other["id"])  # type: ignore[attr-defined]
    sh = vc.volumes.wait(sh["id"], ("in-use",))  # type: ignore[attr-defined]
    assert sorted(x["mode"] for x in sh["attachments"]) == ["ro", "rw"], sh
    assert all(x["state"] == "attached" for x in sh["attachments"]), sh
    vc.instances.delete(other["id"])  # type: ignore[attr-defined]
    vc.instances.wait_deleted(other["id"])  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30  # the deleted instance's attachment is released by the agent
    while len(vc.volumes.get(sh["id"])["attachments"]) != 1:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    for vol in (a, sh):
        vc.volumes.detach(vol["id"])  # type: ignore[attr-defined]
        vc.volumes.wait(vol["id"], ("available",))  # type: ignore[attr-defined]
        vc.volumes.delete(vol["id"])  # type: ignore[attr-defined]
