"""Shared helpers of the block storage benchmarks: a private cloud with the tiny image, on 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hackboot.volumes.storage import qcow2_backing  # noqa: E402
from tests.integration.compute.conftest import IMAGE_CACHE, _kill_pidfile, short_tmpdir, ssh, unique, wait_local_host  # noqa: E402
from tests.support import Cloud, make_cloud  # noqa: E402


def start_cloud(prefix: str) -> Cloud:
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "hackboot.images.builder", "tiny", "--out", str(IMAGE_CACHE)],
                   check=True, capture_output=True, cwd=REPO)
    state = short_tmpdir(prefix)
    (state / "images").mkdir()
    (state / "images" / "builtin").symlink_to(IMAGE_CACHE)
    local = unique("bench")
    c = make_cloud(state, HACKBOOT_AGENT_NAME=local, HACKBOOT_AGENT_CPU_ALLOCATION_RATIO="8",
                   HACKBOOT_AGENT_DISK_ALLOCATION_RATIO="10", HACKBOOT_ACCEL="tcg", HACKBOOT_VOLUME_TEST_TIERS="1")
    c.start()
    c.extra_env["local_host"] = local
    wait_local_host(c.client(), local)
    return c


def stop_cloud(c: Cloud) -> None:
    c.stop()
    for pidfile in (c.state_dir / "agent" / "instances").glob("*/qemu.pid"):
        _kill_pidfile(pidfile)
    shutil.rmtree(c.state_dir, ignore_errors=True)


def boot_guest(c: Cloud) -> tuple[dict[str, Any], str]:
    client = c.client()
    kp = client.keypairs.create(unique("bkey"))  # type: ignore[attr-defined]
    key = c.state_dir / "bench-key"
    key.write_text(kp["private_key"])
    key.chmod(0o600)
    inst = client.instances.create(unique("bvm"), flavor="VPS-NANO", image="tiny", keypair=kp["name"])  # type: ignore[attr-defined]
    inst = client.instances.wait(inst["id"], timeout=180)  # type: ignore[attr-defined]
    ssh(inst, str(key), "true", timeout=120)
    return inst, str(key)


def active_file(c: Cloud, volume_id: str) -> Path:
    """The volume's active file: the one of its qcow2 files that nothing backs onto."""
    d = c.state_dir / "agent" / "volumes" / volume_id
    files = list(d.glob("*.qcow2"))
    backed = {(d / b).resolve() for f in files if (b := qcow2_backing(f))}
    top = [f for f in files if f.resolve() not in backed]
    assert len(top) == 1, top
    return top[0]


def fill(path: Path, offset: int, length: int, pattern: int = 0x5A) -> None:
    """Write data into a detached, unencrypted volume file (qemu-io), to give it a size."""
    step = 256 * 1024 * 1024
    for off in range(offset, offset + length, step):
        n = min(step, offset + length - off)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {off} {n}", str(path)], check=True,
                       capture_output=True)


def timed(fn: Any) -> tuple[float, Any]:
    t = time.monotonic()
    out = fn()
    return time.monotonic() - t, out
