"""Volume fixtures: one cloud whose local agent runs real TCG guests of the `tiny` image, a shared guest
with SSH, and helpers to look inside the guest (which /dev/vdX has a volume's serial)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hackboot.sdk import Client
from tests.integration.compute.conftest import (  # noqa: F401 - fixtures re-used
    _kill_pidfile,
    builtin_images,
    short_tmpdir,
    ssh,
    unique,
    wait_local_host,
)
from tests.support import Cloud, make_cloud, session_keypair


@pytest.fixture(scope="session")
def vol_cloud(builtin_images: Any) -> Iterator[Cloud]:  # noqa: F811
    state = short_tmpdir("hbvol-")
    (state / "images").mkdir()
    (state / "images" / "builtin").symlink_to(builtin_images)
    local = unique("vhost")
    c = make_cloud(state, HACKBOOT_AGENT_NAME=local, HACKBOOT_AGENT_CPU_ALLOCATION_RATIO="8",
                   HACKBOOT_AGENT_DISK_ALLOCATION_RATIO="10", HACKBOOT_ACCEL="tcg", HACKBOOT_LOG_LEVEL="info",
                   HACKBOOT_VOLUME_TEST_TIERS="1", HACKBOOT_VOLUME_SCHEDULER_INTERVAL_S="1",
                   HACKBOOT_VOLUME_DETACH_TIMEOUT_S="8")
    c.start()
    c.extra_env["local_host"] = local
    wait_local_host(c.client(), local)
    yield c
    c.stop()
    for pidfile in (state / "agent" / "instances").glob("*/qemu.pid"):
        _kill_pidfile(pidfile)
    if not os.environ.get("HACKBOOT_KEEP_TEST_STATE"):
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def vc(vol_cloud: Cloud) -> Client:
    return vol_cloud.client()


vkey = session_keypair("vkey", "vc", "vol_cloud")


@pytest.fixture(scope="session")
def guest(vc: Client, vkey: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One running tiny guest shared by the volume tests."""
    inst = vc.instances.create(unique("vmvol"), flavor="VPS-NANO", image="tiny", keypair=vkey["name"])  # type: ignore[attr-defined]
    inst = vc.instances.wait(inst["id"], timeout=180)  # type: ignore[attr-defined]
    assert inst["status"] == "ACTIVE", inst
    ssh(inst, vkey["path"], "true", timeout=120)
    yield inst
    vc.instances.delete(inst["id"])  # type: ignore[attr-defined]


def gssh(inst: dict[str, Any], key: dict[str, Any], command: str, timeout: float = 60.0) -> str:
    return ssh(inst, key["path"], command, timeout=timeout)


def disk_of(inst: dict[str, Any], key: dict[str, Any], volume_id: str, timeout: float = 30.0) -> str | None:
    """The guest's block device (vdX) whose serial is the volume id (virtio serials hold 20 bytes)."""
    serial = volume_id[:20]
    deadline = time.monotonic() + timeout
    while True:
        out = gssh(inst, key, "for d in /sys/block/vd*; do echo $(basename $d) $(cat $d/serial 2>/dev/null); done")
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == serial:
                return parts[0]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.3)


def disk_gone(inst: dict[str, Any], key: dict[str, Any], volume_id: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if disk_of(inst, key, volume_id, timeout=0) is None:
            return True
        time.sleep(0.3)
    return False
