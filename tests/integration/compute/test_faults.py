"""Faults with real guests: the control plane killed mid-create, a full disk, a second agent that
joins then goes silent, a corrupted image file, a flavor larger than any host."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hackboot.sdk import ApiError, Client
from tests.integration.compute.conftest import (
    HOST_DOWN_AFTER_S,
    ExtraAgent,
    alive,
    short_tmpdir,
    ssh,
    unique,
    wait_for,
    wait_local_host,
)
from tests.support import Cloud

pytestmark = pytest.mark.qemu


def settled(inst: dict[str, Any]) -> bool:
    return inst["status"] in ("ACTIVE", "ERROR") and inst["task_state"] is None


def test_control_plane_killed_during_create(vm: Client, vm_cloud: Cloud, keypair: dict[str, Any]) -> None:
    survivor = vm.instances.create(unique("survivor"), flavor="VPS-NANO", image="tiny", keypair=keypair["name"])  # type: ignore[attr-defined]
    survivor = vm.instances.wait(survivor["id"], timeout=120)  # type: ignore[attr-defined]
    ssh(survivor, keypair["path"], "true")
    pid_file = vm_cloud.state_dir / "agent" / "instances" / survivor["id"] / "qemu.pid"
    pid = int(pid_file.read_text())
    victims = []
    for delay in (0.0, 0.4):
        inst = vm.instances.create(unique("victim"), flavor="VPS-NANO", image="tiny", keypair=keypair["name"])  # type: ignore[attr-defined]
        time.sleep(delay)
        vm_cloud.kill()  # API, workers and the in-process agent die at once (SIGKILL)
        vm_cloud.start()
        wait_local_host(vm, vm_cloud.extra_env["local_host"])
        final = wait_for(lambda i=inst: vm.instances.get(i["id"]), settled, timeout=120)  # type: ignore[attr-defined]
        victims.append(final)
        if final["status"] == "ACTIVE":
            assert ssh(final, keypair["path"], "hostname").strip() == final["name"]
        else:
            assert final["status_reason"], final  # a clean ERROR says why
    # the running guest was re-adopted, never restarted
    assert int(pid_file.read_text()) == pid and alive(pid)
    again = vm.instances.get(survivor["id"])  # type: ignore[attr-defined]
    assert again["status"] == "ACTIVE" and again["ssh_port"] == survivor["ssh_port"]
    assert ssh(again, keypair["path"], "hostname").strip() == survivor["name"]
    for inst in [survivor, *victims]:
        vm.instances.delete(inst["id"])  # type: ignore[attr-defined]
    for inst in [survivor, *victims]:
        assert vm.instances.wait_deleted(inst["id"])["status"] == "DELETED"  # type: ignore[attr-defined]


def test_full_disk_during_create_is_an_error_with_the_reason(vm: Client, vm_cloud: Cloud) -> None:
    mount = short_tmpdir("hbfull-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)], check=True)
    name = unique("full")
    # Thin provisioning: the host declares 100 GB, the real file system is 4 MB.
    agent = ExtraAgent(vm_cloud, name, "PAR1-b", mount / "agent", "--disk-gb", "100")
    try:
        agent.start()
        filler = mount / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until ENOSPC
        inst = vm.instances.create(unique("nospace"), flavor="VPS-NANO", image="tiny", zone="PAR1-b")  # type: ignore[attr-defined]
        assert inst["host_name"] == name
        inst = wait_for(lambda: vm.instances.get(inst["id"]), settled, timeout=60)  # type: ignore[attr-defined]
        assert inst["status"] == "ERROR"
        assert "No space left on device" in inst["status_reason"], inst["status_reason"]
        assert name in inst["status_reason"]
        filler.unlink()
        vm.instances.delete(inst["id"])  # type: ignore[attr-defined]
        assert vm.instances.wait_deleted(inst["id"])["status"] == "DELETED"  # type: ignore[attr-defined]
        assert not (mount / "agent" / "disks" / inst["id"]).exists()
    finally:
        agent.stop()
        subprocess.run(["umount", str(mount)], check=False)
        os.rmdir(mount)
        with contextlib.suppress(ApiError):
            vm.delete(f"/v1/hosts/{name}")


def test_second_agent_joins_goes_silent_and_comes_back(vm: Client, vm_cloud: Cloud, keypair: dict[str, Any]) -> None:
    state = short_tmpdir("hb2-")
    name = unique("host2")
    agent = ExtraAgent(vm_cloud, name, "PAR1-c", state / "a")
    try:
        agent.start()
        host = vm.get(f"/v1/hosts/{name}")
        assert host["facts"]["accel"] == "tcg" and host["facts"]["state_dir"] == str(state / "a")
        inst = vm.instances.create(unique("far"), flavor="VPS-NANO", image="tiny", keypair=keypair["name"],  # type: ignore[attr-defined]
                                   zone="PAR1-c")
        inst = vm.instances.wait(inst["id"], timeout=120)  # type: ignore[attr-defined]
        assert inst["status"] == "ACTIVE" and inst["host_name"] == name
        assert ssh(inst, keypair["path"], "hostname").strip() == inst["name"]
        assert "hackboot: starting" in vm.instances.console(inst["id"])  # type: ignore[attr-defined]
        pid = int((state / "a" / "instances" / inst["id"] / "qemu.pid").read_text())

        agent.kill()  # no more heartbeats; the guest keeps running
        down = wait_for(lambda: vm.instances.get(inst["id"]),  # type: ignore[attr-defined]
                        lambda i: "is down" in i["status_reason"], timeout=HOST_DOWN_AFTER_S + 20)
        assert name in down["status_reason"] and "no heartbeat" in down["status_reason"]
        assert vm.get(f"/v1/hosts/{name}")["status"] == "down"
        assert ssh(inst, keypair["path"], "hostname").strip() == inst["name"]

        agent.start()  # same name and state dir: re-registers, re-adopts
        back = wait_for(lambda: vm.instances.get(inst["id"]), lambda i: i["status_reason"] == "", timeout=30)  # type: ignore[attr-defined]
        assert back["status"] == "ACTIVE"
        assert int((state / "a" / "instances" / inst["id"] / "qemu.pid").read_text()) == pid
        vm.instances.delete(inst["id"])  # type: ignore[attr-defined]
        assert vm.instances.wait_deleted(inst["id"])["status"] == "DELETED"  # type: ignore[attr-defined]
        assert not alive(pid)
    finally:
        agent.stop()
        with contextlib.suppress(ApiError):
            vm.delete(f"/v1/hosts/{name}")


def test_corrupted_image_file_fails_the_boot_cleanly(vm: Client, vm_cloud: Cloud, tmp_path: Path) -> None:
    disk = tmp_path / "ok.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    image = vm.images.create_from_file(unique("rotten"), disk)  # type: ignore[attr-defined]
    image = vm.images.wait(image["id"])  # type: ignore[attr-defined]
    assert image["status"] == "active"
    stored = [p for p in (vm_cloud.state_dir / "images").glob(f"{image['id']}*") if p.is_file()]
    assert stored
    with open(stored[0], "r+b") as f:  # bit rot after the upload was validated
        f.write(b"\0" * 4096)
    inst = vm.instances.create(unique("rot"), flavor="VPS-NANO", image=image["id"])  # type: ignore[attr-defined]
    inst = wait_for(lambda: vm.instances.get(inst["id"]), settled, timeout=60)  # type: ignore[attr-defined]
    assert inst["status"] == "ERROR" and "Cannot create the instance disk" in inst["status_reason"], inst
    vm.instances.delete(inst["id"])  # type: ignore[attr-defined]
    assert vm.instances.wait_deleted(inst["id"])["status"] == "DELETED"  # type: ignore[attr-defined]


def test_flavor_larger_than_the_host(vm: Client) -> None:
    with pytest.raises(ApiError) as err:
        vm.instances.create(unique("huge"), flavor="VPS-ENTERPRISE+", image="tiny")  # type: ignore[attr-defined]
    assert err.value.status == 409 and err.value.code == "flavor_too_large"
    assert "MEMORY_MB 65536 > largest host's" in err.value.detail
