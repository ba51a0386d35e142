"""Real guests (QEMU, TCG here) of the `tiny` image through the SDK: boot, SSH, cloud-init, console,
power actions, QEMU killed, resize, snapshot, delete cleaning everything. One guest is shared."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hackboot.sdk import ApiError, Client
from tests.integration.compute.conftest import alive, ssh, unique, wait_for
from tests.support import Cloud

pytestmark = pytest.mark.qemu

USER_DATA = """#cloud-config
runcmd:
  - echo made-by-cloud-init > /root/marker
"""


def agent_dir(cloud: Cloud) -> Path:
    return cloud.state_dir / "agent"


def qemu_pid(cloud: Cloud, iid: str) -> int:
    return int((agent_dir(cloud) / "instances" / iid / "qemu.pid").read_text().strip())


@pytest.fixture(scope="module")
def guest(vm: Client, keypair: dict[str, Any]) -> Iterator[dict[str, Any]]:
    inst = vm.instances.create(unique("web"), flavor="VPS-NANO", image="tiny", keypair=keypair["name"],  # type: ignore[attr-defined]
                               user_data=USER_DATA)
    inst = vm.instances.wait(inst["id"], timeout=120)  # type: ignore[attr-defined]
    assert inst["status"] == "ACTIVE", inst
    yield inst
    vm.instances.delete(inst["id"])  # type: ignore[attr-defined]
    vm.instances.wait_deleted(inst["id"])  # type: ignore[attr-defined]


def test_boot_ssh_hostname_and_cloud_init(vm: Client, guest: dict[str, Any], keypair: dict[str, Any]) -> None:
    assert ssh(guest, keypair["path"], "hostname").strip() == guest["name"]
    assert ssh(guest, keypair["path"], "cat /root/marker").strip() == "made-by-cloud-init"
    assert guest["ssh_host"] == "127.0.0.1" and guest["power_state"] == "running"
    assert guest["accel"] in ("kvm", "tcg")
    t = guest["timings"]
    # the control plane's share of a boot: request -> QEMU started
    assert t["qemu_started"] - t["created"] < 5.0, t


def test_console_log(vm: Client, guest: dict[str, Any], keypair: dict[str, Any]) -> None:
    ssh(guest, keypair["path"], "true")
    text = vm.instances.console(guest["id"])  # type: ignore[attr-defined]
    assert ("hackboot: starting" in text and "Linux version" in text) or "hackboot-tiny" in text
    assert len(vm.instances.console(guest["id"], tail_bytes=100)) <= 100  # type: ignore[attr-defined]


def test_stop_start_reboot(vm: Client, guest: dict[str, Any], keypair: dict[str, Any]) -> None:
    iid = guest["id"]
    boot_id = ssh(guest, keypair["path"], "cat /proc/sys/kernel/random/boot_id").strip()
    vm.instances.stop(iid)  # type: ignore[attr-defined]
    inst = vm.instances.wait(iid, ("SHUTOFF",), timeout=60)  # type: ignore[attr-defined]
    assert inst["status"] == "SHUTOFF" and inst["ssh_port"] is None and inst["power_state"] == "shutoff"
    with pytest.raises(ApiError) as err:
        vm.instances.reboot(iid)  # type: ignore[attr-defined]
    assert err.value.status == 409 and "SHUTOFF" in err.value.detail
    vm.instances.start(iid)  # type: ignore[attr-defined]
    inst = vm.instances.wait(iid, timeout=60)  # type: ignore[attr-defined]
    assert inst["status"] == "ACTIVE"
    assert ssh(inst, keypair["path"], "hostname").strip() == guest["name"]
    boot2 = ssh(inst, keypair["path"], "cat /proc/sys/kernel/random/boot_id").strip()
    assert boot2 != boot_id

    pid = qemu_pid(vm_cloud_of(vm), iid)
    vm.instances.reboot(iid)  # type: ignore[attr-defined]  # soft: ACPI, the guest shuts down, platform reset
    inst = vm.instances.wait(iid, timeout=120)  # type: ignore[attr-defined]
    boot3 = ssh(inst, keypair["path"], "cat /proc/sys/kernel/random/boot_id").strip()
    assert boot3 != boot2 and qemu_pid(vm_cloud_of(vm), iid) == pid  # same QEMU process
    vm.instances.reboot(iid, hard=True)  # type: ignore[attr-defined]
    inst = vm.instances.wait(iid, timeout=60)  # type: ignore[attr-defined]
    assert ssh(inst, keypair["path"], "cat /proc/sys/kernel/random/boot_id").strip() != boot3
    guest.update(inst)


_clouds: dict[str, Cloud] = {}


def vm_cloud_of(client: Client) -> Cloud:
    return _clouds[client.url]


@pytest.fixture(scope="module", autouse=True)
def _remember(vm: Client, vm_cloud: Cloud) -> None:
    _clouds[vm.url] = vm_cloud


def test_killed_qemu_turns_shutoff_within_seconds(vm: Client, vm_cloud: Cloud, guest: dict[str, Any],
                                                  keypair: dict[str, Any]) -> None:
    iid = guest["id"]
    pid = qemu_pid(vm_cloud, iid)
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    inst = wait_for(lambda: vm.instances.get(iid), lambda i: i["status"] in ("SHUTOFF", "ERROR"), timeout=15)  # type: ignore[attr-defined]
    took = time.monotonic() - started
    assert inst["status"] == "SHUTOFF" and "exited unexpectedly" in inst["status_reason"], inst
    assert inst["power_state"] == "crashed" and inst["ssh_port"] is None
    assert took < 5.0, f"took {took:.1f}s"  # event-driven (the periodic check is the backstop)
    vm.instances.start(iid)  # type: ignore[attr-defined]
    inst = vm.instances.wait(iid, timeout=60)  # type: ignore[attr-defined]
    assert inst["status"] == "ACTIVE" and inst["status_reason"] == ""
    assert ssh(inst, keypair["path"], "hostname").strip() == guest["name"]
    guest.update(inst)


def test_resize_grows_cpus_memory_and_disk(vm: Client, guest: dict[str, Any], keypair: dict[str, Any]) -> None:
    iid = guest["id"]
    vm.instances.resize(iid, "VPS-STARTER")  # type: ignore[attr-defined]
    inst = vm.instances.wait(iid, ("ACTIVE",), timeout=120)  # type: ignore[attr-defined]
    assert (inst["status"], inst["flavor_id"], inst["vcpus"], inst["disk_gb"]) == ("ACTIVE", "VPS-STARTER", 2, 80)
    assert ssh(inst, keypair["path"], "grep -c ^processor /proc/cpuinfo").strip() == "2"
    sectors = int(ssh(inst, keypair["path"], "cat /sys/block/vda/size").strip())
    assert sectors * 512 == 80 * 1024**3
    mem_kb = int(ssh(inst, keypair["path"], "awk '/MemTotal/ {print $2}' /proc/meminfo").strip())
    assert mem_kb > 3 * 1024 * 1024
    guest.update(inst)


def test_snapshot_becomes_an_image(vm: Client, guest: dict[str, Any], keypair: dict[str, Any]) -> None:
    iid = guest["id"]
    ssh(guest, keypair["path"], "echo snap > /root/snap; sync")
    pid = qemu_pid(vm_cloud_of(vm), iid)
    image = vm.instances.snapshot(iid, unique("snap"))  # type: ignore[attr-defined]
    assert image["status"] == "saving"
    image = vm.images.wait(image["id"], timeout=120)  # type: ignore[attr-defined]
    assert image["status"] == "active", image
    inst = vm.instances.wait(iid, timeout=120)  # type: ignore[attr-defined]
    assert inst["status"] == "ACTIVE" and inst["task_state"] is None
    assert qemu_pid(vm_cloud_of(vm), iid) == pid  # live (QMP drive-backup): the guest kept running
    assert ssh(inst, keypair["path"], "cat /root/snap").strip() == "snap"
    guest.update(inst)
    # boot the snapshot: same files, new hostname
    # the snapshot needs a disk as large as its source (80 GB after the resize)
    clone = vm.instances.create(unique("clone"), flavor=inst["flavor_id"], image=image["id"], keypair=keypair["name"])  # type: ignore[attr-defined]
    clone = vm.instances.wait(clone["id"], timeout=120)  # type: ignore[attr-defined]
    try:
        assert clone["status"] == "ACTIVE", clone
        assert ssh(clone, keypair["path"], "hostname; cat /root/snap").split() == [clone["name"], "snap"]
    finally:
        vm.instances.delete(clone["id"])  # type: ignore[attr-defined]
        vm.instances.wait_deleted(clone["id"])  # type: ignore[attr-defined]
    vm.images.delete(image["id"])  # type: ignore[attr-defined]


def test_delete_cleans_process_disks_port_allocation_and_quota(vm: Client, vm_cloud: Cloud,
                                                               keypair: dict[str, Any]) -> None:
    local = vm_cloud.extra_env["local_host"]
    before = {i["resource_class"]: i["used"] for i in vm.get(f"/v1/hosts/{local}")["inventories"]}
    quota_before = {q["resource"]: q["used"] for q in vm.projects.quotas(vm_cloud.project_id)}  # type: ignore[attr-defined]
    inst = vm.instances.create(unique("gone"), flavor="VPS-NANO", image="tiny", keypair=keypair["name"])  # type: ignore[attr-defined]
    inst = vm.instances.wait(inst["id"], timeout=120)  # type: ignore[attr-defined]
    ssh(inst, keypair["path"], "true")
    pid, port = qemu_pid(vm_cloud, inst["id"]), inst["ssh_port"]
    os.kill(pid, signal.SIGKILL)  # delete must work even when the process already died
    vm.instances.delete(inst["id"])  # type: ignore[attr-defined]
    assert vm.instances.wait_deleted(inst["id"])["status"] == "DELETED"  # type: ignore[attr-defined]
    assert not alive(pid)
    assert not (agent_dir(vm_cloud) / "instances" / inst["id"]).exists()  # run dir, QMP socket, pidfile
    assert not (agent_dir(vm_cloud) / "disks" / inst["id"]).exists()  # overlay and seed
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the forwarded port is free again
    after = {i["resource_class"]: i["used"] for i in vm.get(f"/v1/hosts/{local}")["inventories"]}
    assert after == before
    quota_after = {q["resource"]: q["used"] for q in vm.projects.quotas(vm_cloud.project_id)}  # type: ignore[attr-defined]
    assert quota_after == quota_before
