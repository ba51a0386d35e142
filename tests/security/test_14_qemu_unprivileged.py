"""Finding 14: a guest's QEMU runs as root with a partial sandbox.

A tenant boots a real guest through the cloud; its QEMU must run as the unprivileged guest
account (no root uid/gid anywhere, no capabilities), under the full seccomp sandbox with
no_new_privs, started by us rather than -daemonize. It must reach its disks only through the
file descriptors it was given: the disk files stay private (0600, root's, in directories the
account cannot enter), so an escaped QEMU cannot open them, nor another guest's, by path; the
shared base image is open read-only. A volume hot-plugged later is handed over the same way.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from hackboot.core.config import get_settings
from tests.integration.compute.conftest import builtin_images, vm_cloud, wait_for  # noqa: F401  (fixtures)
from tests.security.conftest import make_tenant, unique
from tests.support import Cloud

pytestmark = pytest.mark.qemu

PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"  # the venv may sit in /root
FULL_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
TRY_OPEN = "import os, sys\ntry:\n    os.open(sys.argv[1], os.O_RDONLY)\n    print('opened')\nexcept OSError as e:\n" \
           "    print(e.errno)\n"


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def open_files(pid: int) -> dict[str, int]:
    """Path -> how the process holds it: 1 read-only fd(s) only, 3 a read-write one too."""
    return {path: max((flags & os.O_ACCMODE) + 1 for flags in fl) for path, fl in open_fds(pid).items()}


def open_fds(pid: int) -> dict[str, list[int]]:
    """Path -> the open flags of each fd of the process on that file."""
    out: dict[str, list[int]] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError, ValueError):
            continue
        if target.startswith("/"):
            out.setdefault(target, []).append(flags)
    return out


def as_guest_account(path: Path) -> str:
    """Try to open `path` with the guest account's credentials (what an escaped QEMU could do)."""
    account = pwd.getpwnam(get_settings().unprivileged_user)
    proc = subprocess.run([PYTHON, "-c", TRY_OPEN, str(path)], capture_output=True, text=True,
                          user=account.pw_uid, group=account.pw_gid, extra_groups=[], cwd="/", timeout=30)
    return proc.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege separation needs the cloud to run as root")
def test_guest_qemu_is_unprivileged_sandboxed_and_holds_its_disks_by_fd(vm_cloud: Cloud) -> None:  # noqa: F811
    tenant = make_tenant(vm_cloud, "member")
    c = tenant.client
    inst = c.instances.create(unique("vm"), flavor="VPS-NANO", image="tiny")  # type: ignore[attr-defined]
    inst = c.instances.wait(inst["id"], ("ACTIVE", "ERROR"), timeout=180)  # type: ignore[attr-defined]
    assert inst["status"] == "ACTIVE", inst
    try:
        agent = vm_cloud.state_dir / "agent"
        run_dir = agent / "instances" / inst["id"]
        pid = int((run_dir / "qemu.pid").read_text())
        account = pwd.getpwnam(get_settings().unprivileged_user)
        assert account.pw_uid != 0

        st = status_fields(pid)
        assert st["Uid"].split() == [str(account.pw_uid)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(account.pw_gid)] * 4, st["Gid"]
        assert "0" not in st["Groups"].split(), st["Groups"]
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
        assert st["Seccomp"] == "2", "QEMU is not in seccomp filter mode"
        assert st["NoNewPrivs"] == "1"
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        assert b"-daemonize" not in argv
        assert argv[argv.index(b"-sandbox") + 1].decode() == FULL_SANDBOX

        # its disks: held open, private, root's, unreachable by path for the account
        disk = agent / "disks" / inst["id"] / "disk.qcow2"
        seed = agent / "disks" / inst["id"] / "seed.iso"
        held = open_files(pid)
        assert held.get(str(disk)) == 3 and held.get(str(seed)) == 1, held
        bases = [p for p in held if p not in (str(disk), str(seed)) and p.endswith(".qcow2")]
        assert len(bases) == 1, held
        image = Path(bases[0])
        assert held[str(image)] == 1, "the shared base image must be open read-only"
        for path in (disk, seed, run_dir / "console.log", run_dir / "qmp.sock"):
            mode = path.stat().st_mode
            assert stat.S_IMODE(mode) & 0o077 == 0, f"{path} is {oct(stat.S_IMODE(mode))}"
            assert path.stat().st_uid == 0, f"{path} belongs to uid {path.stat().st_uid}"
            assert as_guest_account(path) == "13", f"the guest account can open {path}"  # EACCES

        # a volume hot-plugged into the booted guest reaches QEMU as an fd as well
        wait_for(lambda: {"console": c.instances.console(inst["id"])},  # type: ignore[attr-defined]
                 lambda x: "login:" in x["console"] or "hackboot-tiny" in x["console"], timeout=180)
        vol = c.volumes.create(unique("vol"), size_gb=1)  # type: ignore[attr-defined]
        assert c.volumes.wait(vol["id"], ("available", "error"), timeout=120)["status"] == "available"  # type: ignore[attr-defined]
        c.volumes.attach(vol["id"], inst["id"])  # type: ignore[attr-defined]
        v = c.volumes.wait(vol["id"], ("in-use", "error"), timeout=120)  # type: ignore[attr-defined]
        assert v["status"] == "in-use" and v["attachments"][0]["state"] == "attached", v
        vol_files = [p for p in open_files(pid) if f"/volumes/{vol['id']}/" in p]
        assert vol_files, "the attached volume is not open in the guest's QEMU"
        for p in vol_files:
            assert Path(p).stat().st_uid == 0 and stat.S_IMODE(Path(p).stat().st_mode) & 0o077 == 0
            assert as_guest_account(Path(p)) == "13"
        c.volumes.detach(vol["id"], inst["id"])  # type: ignore[attr-defined]
        assert c.volumes.wait(vol["id"], ("available", "error"), timeout=120)["status"] == "available"  # type: ignore[attr-defined]
        deadline = time.monotonic() + 15  # a leak stays; give QEMU a moment to close what it released
        while (left := {p: [oct(f) for f in fl] for p, fl in open_fds(pid).items()
                        if f"/volumes/{vol['id']}/" in p}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"detached volume still open: {left}"
        c.volumes.delete(vol["id"])  # type: ignore[attr-defined]
    finally:
        c.instances.delete(inst["id"])  # type: ignore[attr-defined]
        c.instances.wait_deleted(inst["id"])  # type: ignore[attr-defined]

