"""The ``tiny`` image: busybox + dropbear + the Debian cloud kernel, booted directly.

Everything comes from Debian packages installed on the host (busybox-static, dropbear-bin,
linux-image-cloud-amd64, e2fsprogs), so building needs no network and takes seconds. The guest
side is a handful of shell scripts shipped next to this module (``tiny-*``).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

from ._common import (
    ImageBuildError,
    MiB,
    base_manifest,
    data_file,
    dpkg_version,
    make_ext4_qcow2,
    ordered_manifest,
    publish,
    require_tools,
    run,
    upstream_version,
    write_file,
)

NAME = "tiny"
ROOTFS_SIZE = 256 * MiB
CMDLINE = "root=/dev/vda ro console=ttyS0 quiet"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"

#: Loaded by the initrd (dependencies resolved at build time): enough to find the root disk, the NIC and the
#: NoCloud ISO. (ext4 is built into the cloud kernel; listed in case a future one makes it a module.)
INITRD_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_rng", "ext4", "isofs")
#: Also installed in the root filesystem for ``modprobe``: other common QEMU devices. Not loaded
#: at boot (probing e.g. the IDE controller costs seconds under emulation); rcS loads button/evdev.
EXTRA_MODULES = (
    "virtio_scsi",
    "sd_mod",
    "sr_mod",
    "virtio_balloon",
    "virtio_console",
    "virtio_input",
    "button",
    "evdev",
    "ata_piix",
)
#: Dynamically linked programs copied from the host together with the libraries they need.
HOST_PROGRAMS = {
    "dropbear-bin": ("/usr/sbin/dropbear", "/usr/bin/dropbearkey"),
    "e2fsprogs": ("/sbin/e2fsck", "/sbin/resize2fs"),  # fsck + online grow of the root disk
}


# --- host inputs ---------------------------------------------------------------------------------


def cloud_kernel() -> tuple[str, str, str]:
    """(kernel release, package, version) of the kernel linux-image-cloud-amd64 points to."""
    dpkg_version(KERNEL_META_PACKAGE)
    depends = run(["dpkg-query", "-W", "-f", "${Depends}", KERNEL_META_PACKAGE])
    match = re.search(r"linux-image-(\S+-cloud-amd64)", depends)
    if not match:
        raise ImageBuildError(f"cannot tell which kernel {KERNEL_META_PACKAGE} depends on: {depends!r}")
    release = match.group(1)
    package = f"linux-image-{release}"
    version = dpkg_version(package)
    vmlinuz = Path(f"/boot/vmlinuz-{release}")
    if not vmlinuz.is_file() or not Path(f"/lib/modules/{release}/modules.dep").is_file():
        raise ImageBuildError(f"{package} is installed but {vmlinuz} or its modules are missing")
    return release, package, version


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


def resolve_modules(moddir: Path, names: tuple[str, ...]) -> list[str]:
    """Module files (relative to ``moddir``) for ``names`` plus dependencies, dependencies first.

    Built-in modules are skipped; an unknown name is an error (a kernel change we must notice).
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    builtin = {_module_name(p) for p in (moddir / "modules.builtin").read_text().split()}

    ordered: list[str] = []

    def visit(path: str) -> None:
        if path in ordered:
            return
        # modules.dep lists every transitive dependency; visiting them first gives a valid order.
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        ordered.append(path)

    for name in names:
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin:
            raise ImageBuildError(f"kernel module {name!r} is neither built in nor in {moddir}")
    return ordered


def shared_libraries(programs: list[str]) -> set[str]:
    """Absolute paths (as the dynamic loader looks them up) of the libraries ``programs`` need."""
    libs: set[str] = set()
    for program in programs:
        for line in run(["ldd", program]).splitlines():
            # "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux... (0x...)"
            match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if match:
                libs.add(match.group(1))
    return libs


# --- filesystem trees ----------------------------------------------------------------------------


def _copy(src: str | Path, dst: Path, mode: int | None = None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(os.path.realpath(src), dst)  # follow symlinks: copy the real library
    shutil.copymode(os.path.realpath(src), dst)
    if mode is not None:
        dst.chmod(mode)


def _install_busybox(root: Path, bindir: str = "usr/bin") -> None:
    """Copy the static busybox and create a symlink for each applet it was built with."""
    busybox = Path("/bin/busybox")
    _copy(busybox, root / bindir / "busybox", 0o755)
    for applet in run([busybox, "--list-full"]).split():
        if "/" not in applet:  # "linuxrc": irrelevant
            continue
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"/{bindir}/busybox")


def _merged_usr_skeleton(root: Path) -> None:
    # Same layout as Debian 12 (/bin -> usr/bin ...), so ldd's /lib/... paths land correctly.
    for sub in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        (root / link).symlink_to(f"usr/{link}")


def build_rootfs(root: Path, release: str, modules: list[str], busybox_version: str) -> None:
    moddir = Path(f"/lib/modules/{release}")
    _merged_usr_skeleton(root)
    for sub in (
        "dev",
        "proc",
        "sys",
        "run",
        "mnt",
        "home",
        "etc/dropbear",
        "var/lib/hackboot",
        "var/log",
        "usr/share/udhcpc",
        "usr/lib/hackboot",
        "etc/init.d",
        "etc/acpi/PWRF",
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "root/.ssh").mkdir(parents=True, mode=0o700)
    (root / "root").chmod(0o700)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)

    _install_busybox(root)

    programs = [p for progs in HOST_PROGRAMS.values() for p in progs]
    for program in programs:
        _copy(program, root / program.lstrip("/"), 0o755)
    for lib in shared_libraries(programs):
        _copy(lib, root / lib.lstrip("/"))

    # Kernel modules, plus the metadata busybox modprobe needs (modules.dep from depmod).
    target = root / "lib/modules" / release
    for rel in modules:
        _copy(moddir / rel, target / rel)
    for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (moddir / meta).exists():
            _copy(moddir / meta, target / meta)
    run(["depmod", "-b", root, release], what="depmod")

    etc = root / "etc"
    write_file(
        etc / "passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n",
    )
    write_file(etc / "group", "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    # "*" never matches a password, yet (unlike "!") dropbear does not treat it as locked, so key
    # logins work.
    write_file(etc / "shadow", "root:*:0:0:99999:7:::\nnobody:*:0:0:99999:7:::\n", 0o600)
    write_file(etc / "shells", "/bin/sh\n/bin/ash\n")
    write_file(etc / "hostname", "tiny\n")
    write_file(etc / "hosts", "127.0.0.1\tlocalhost\n127.0.1.1\ttiny\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    write_file(etc / "fstab", "/dev/root\t/\text4\tdefaults\t0\t1\n")
    write_file(etc / "profile", 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1="\\u@\\h:\\w\\$ "\n')
    write_file(
        etc / "os-release",
        f'PRETTY_NAME="Hackboot Tiny (busybox {busybox_version}, kernel {release})"\n'
        'NAME="Hackboot Tiny"\nID=hackboot-tiny\n'
        f'VERSION_ID="{busybox_version}"\n',
    )
    (etc / "mtab").symlink_to("/proc/mounts")
    write_file(etc / "inittab", data_file("tiny-inittab"))
    write_file(etc / "init.d/rcS", data_file("tiny-rcS.sh"), 0o755)
    write_file(etc / "init.d/rcK", data_file("tiny-rcK.sh"), 0o755)
    # busybox acpid runs /etc/acpi/<event>/<code> for the ACPI power button ("PWRF/00000080").
    write_file(etc / "acpi/PWRF/00000080", data_file("tiny-acpi-power.sh"), 0o755)
    write_file(root / "usr/share/udhcpc/default.script", data_file("tiny-udhcpc.sh"), 0o755)
    write_file(root / "usr/lib/hackboot/cloudconfig.awk", data_file("tiny-cloudconfig.awk"))


def build_initrd(out: Path, work: Path, release: str, modules: list[str]) -> None:
    """A gzip'd newc cpio: static busybox, the virtio modules and ``tiny-initrd-init.sh``."""
    root = work / "initrd"
    moddir = Path(f"/lib/modules/{release}")
    for sub in ("bin", "dev", "etc", "lib/modules", "newroot", "proc", "sys"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    _copy("/bin/busybox", root / "bin/busybox", 0o755)
    for applet in ("sh", "mount", "insmod", "findfs", "usleep", "switch_root", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    # The kernel opens /dev/console for /init's stdio before anything is mounted.
    os.mknod(root / "dev/console", stat.S_IFCHR | 0o600, os.makedev(5, 1))
    names = []
    for rel in modules:
        name = os.path.basename(rel)
        _copy(moddir / rel, root / "lib/modules" / name)
        names.append(name)
    write_file(root / "etc/modules.order", "\n".join(names) + "\n")
    write_file(root / "init", data_file("tiny-initrd-init.sh"), 0o755)

    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    proc = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"],
        input=("\n".join(paths) + "\n").encode(),
        capture_output=True,
        cwd=root,
        check=False,
    )
    if proc.returncode != 0:
        raise ImageBuildError(f"cpio failed: {proc.stderr.decode(errors='replace').strip()}")
    with gzip.GzipFile(out, "wb", compresslevel=9, mtime=0) as gz:
        gz.write(proc.stdout)


def build(out_dir: Path, work: Path) -> Path:
    require_tools("mkfs.ext4", "qemu-img", "cpio", "depmod", "ldd")
    busybox_pkg = dpkg_version("busybox-static")
    versions: dict[str, str] = {"busybox-static": busybox_pkg}
    for package in HOST_PROGRAMS:
        versions[package] = dpkg_version(package)
    release, kernel_pkg, kernel_version = cloud_kernel()
    versions[kernel_pkg] = kernel_version
    moddir = Path(f"/lib/modules/{release}")

    initrd_modules = resolve_modules(moddir, INITRD_MODULES)
    rootfs_modules = resolve_modules(moddir, INITRD_MODULES + EXTRA_MODULES)
    busybox_version = upstream_version(busybox_pkg)

    rootfs = work / "rootfs"
    rootfs.mkdir()
    build_rootfs(rootfs, release, rootfs_modules, busybox_version)

    disk, kernel, initrd = work / f"{NAME}.qcow2", work / f"{NAME}.vmlinuz", work / f"{NAME}.initrd"
    make_ext4_qcow2(rootfs, disk, size=ROOTFS_SIZE, label="hackboot-root", extra_mkfs_args=["-m", "1"])
    build_initrd(initrd, work, release, initrd_modules)
    shutil.copyfile(f"/boot/vmlinuz-{release}", kernel)

    manifest: dict[str, Any] = base_manifest(NAME, disk, ROOTFS_SIZE)
    manifest.update(
        os="busybox",
        version=busybox_version,
        kernel=kernel.name,
        initrd=initrd.name,
        cmdline=CMDLINE,
        kernel_release=release,
        default_user="root",
        min_ram_mb=128,
        packages=versions,
    )
    return publish(
        {disk: out_dir / disk.name, kernel: out_dir / kernel.name, initrd: out_dir / initrd.name},
        ordered_manifest(manifest),
        out_dir,
        NAME,
    )
