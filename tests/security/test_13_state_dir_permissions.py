"""Finding 13: tenant data under the state directory is not readable by other local users.

A cloud whose state directory starts 0755 (as `mkdir` under a usual umask leaves it) runs a
tenant's image upload, key pair and instance; then nothing below it may be readable or writable
by group or other (directories may stay traversable: the guest account reaches its own files).
Restarting over files loosened by an older version tightens them again.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.conftest import make_tenant, unique
from tests.support import Cloud, make_cloud

IMAGES = Path(os.environ.get("HACKBOOT_TEST_IMAGE_DIR", os.environ.get("HACKBOOT_IMAGE_CACHE",
                                                                        "/var/tmp/hackboot-image-cache")))


def _guest_gid() -> int | None:
    try:
        return grp.getgrnam("hackboot-guest").gr_gid
    except KeyError:
        return None


def _public_builtin_inodes() -> set[tuple[int, int]]:
    """The built-in images are public (every tenant may read them) and hard-linked from IMAGES."""
    return {(st.st_dev, st.st_ino) for st in (p.stat() for p in IMAGES.iterdir() if p.is_file())}


def leaks(root: Path) -> list[str]:
    """Entries whose mode lets group or other read or write them (a group shared with guests aside).

    For a socket only the write bit matters (it is what connect() checks).
    """
    shared = _guest_gid()
    public = _public_builtin_inodes()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode) or (st.st_dev, st.st_ino) in public:
                continue
            forbidden = 0o006 if st.st_gid == shared else 0o066
            if stat.S_ISSOCK(st.st_mode):
                forbidden &= 0o022
            if st.st_mode & forbidden:
                found.append(f"{oct(stat.S_IMODE(st.st_mode))} {path.relative_to(root)}")
    st = root.stat()
    if st.st_mode & 0o066:
        found.append(f"{oct(stat.S_IMODE(st.st_mode))} (the state directory)")
    return found


@pytest.fixture(scope="module")
def perm_cloud() -> Iterator[Cloud]:
    state = Path(tempfile.mkdtemp(prefix="hb13-", dir="/tmp"))  # short: QMP socket paths
    state.chmod(0o755)
    (state / "images").mkdir(mode=0o755)
    (state / "images" / "builtin").symlink_to(IMAGES)
    c = make_cloud(state, HACKBOOT_AGENT_CPU_ALLOCATION_RATIO="8", HACKBOOT_AGENT_DISK_ALLOCATION_RATIO="10")
    c.start()
    yield c
    c.stop()
    for pidfile in (state / "agent" / "instances").glob("*/qemu.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            if "qemu" in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, 9)
        except (OSError, ValueError):
            pass
    shutil.rmtree(state, ignore_errors=True)


def test_state_files_private_after_tenant_activity(perm_cloud: Cloud) -> None:
    tenant = make_tenant(perm_cloud, "member")
    c = tenant.client
    c.keypairs.create(unique("key"))  # type: ignore[attr-defined]
    c.images.create_from_file(unique("img"), IMAGES / "tiny.qcow2")  # type: ignore[attr-defined]
    inst = c.instances.create(unique("vm"), flavor="VPS-NANO", image="tiny")  # type: ignore[attr-defined]
    inst = c.instances.wait(inst["id"], ("ACTIVE", "ERROR"), timeout=180)  # type: ignore[attr-defined]
    assert inst["status"] == "ACTIVE", (inst.get("status_reason"), inst.get("fault"), inst)
    disks = list((perm_cloud.state_dir / "agent").rglob("*.qcow2"))
    assert disks, "the instance disk was not found under the state directory"
    assert (perm_cloud.state_dir / "hackboot.db-wal").exists()
    found = leaks(perm_cloud.state_dir)
    assert found == [], "\n".join(found)
    c.instances.delete(inst["id"])  # type: ignore[attr-defined]
    c.instances.wait_deleted(inst["id"])  # type: ignore[attr-defined]


def test_loose_files_from_an_older_version_are_tightened_at_start(perm_cloud: Cloud) -> None:
    perm_cloud.stop()
    root = perm_cloud.state_dir
    for dirpath, dirnames, filenames in os.walk(root):  # what an older version left behind
        for name in dirnames:
            if not (Path(dirpath) / name).is_symlink():
                os.chmod(Path(dirpath) / name, 0o755)
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                os.chmod(path, 0o644)
    root.chmod(0o755)
    (root / ".permissions").unlink(missing_ok=True)  # older versions never tightened anything
    assert leaks(root)
    perm_cloud.start()
    found = leaks(root)
    assert found == [], "\n".join(found)
