"""The ``debian-12`` image: debootstrap'd Debian bookworm with cloud-init, booted directly.

Packages come from the apt mirror the host is configured with (no hardcoded host). The root
filesystem has no bootloader: the kernel and initrd are taken out of the chroot's /boot and
QEMU boots them directly. cloud-init only looks for the NoCloud seed hackboot attaches.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hackboot.core.config import get_settings

from ._common import (
    GiB,
    ImageBuildError,
    base_manifest,
    data_file,
    log,
    make_ext4_qcow2,
    ordered_manifest,
    publish,
    require_tools,
    run,
    write_file,
)

NAME = "debian-12"
SUITE = "bookworm"
FS_SIZE = 2 * GiB
# quiet + systemd.show_status=0: printing every unit on a slow (emulated) serial port costs
# real time; cloud-init still writes its own progress and the host keys to the console.
CMDLINE = "root=/dev/vda ro console=ttyS0 quiet systemd.show_status=0"

PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "systemd-resolved",
    "iproute2",
    "netbase",
    "linux-image-cloud-amd64",
    "cloud-init",
    # cloud-init pulls python3-cryptography, whose postinst stalls without the cffi backend.
    "python3-cffi-backend",
    "openssh-server",
    "sudo",
    "ca-certificates",
    "less",
    "nano",
    "iputils-ping",
)
# Periodic jobs that fire right after a first boot (Persistent timers) and would compete with
# cloud-init for the emulated CPU. Disabled, not masked: users can turn them back on.
DISABLED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
)


@dataclass(frozen=True)
class Mirror:
    uri: str
    security_uri: str | None
    keyring: str | None


# --- apt mirror discovery ------------------------------------------------------------------------


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current = {}
            continue
        if line[0].isspace() and current:  # continuation line
            last = next(reversed(current))
            current[last] += " " + line.strip()
            continue
        key, _, value = line.partition(":")
        current[key.strip().lower()] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _apt_sources() -> list[tuple[str, list[str], str | None]]:
    """(uri, suites, signed-by) of every enabled ``deb`` source on this host."""
    sources: list[tuple[str, list[str], str | None]] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in _deb822_stanzas(Path(path).read_text()):
            if "deb" not in stanza.get("types", "").split() or stanza.get("enabled", "yes") == "no":
                continue
            for uri in stanza.get("uris", "").split():
                sources.append((uri, stanza.get("suites", "").split(), stanza.get("signed-by")))
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if not os.path.exists(path):
            continue
        for line in Path(path).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            options = re.search(r"\[([^]]*)\]", line)
            signed_by = None
            if options:
                match = re.search(r"signed-by=(\S+)", options.group(1))
                signed_by = match.group(1) if match else None
                line = line.replace(options.group(0), " ")
            fields = line.split()
            if len(fields) >= 3 and fields[0] == "deb":
                sources.append((fields[1], [fields[2]], signed_by))
    return sources


def find_mirror() -> Mirror:
    """The Debian mirror this host uses (the ``debian_mirror`` setting, ``HACKBOOT_DEBIAN_MIRROR``, overrides it).

    Prefers a source that serves the bookworm suite itself, else any non-security Debian source.
    """
    sources = _apt_sources()
    security = next((uri for uri, suites, _ in sources if f"{SUITE}-security" in suites), None)
    override = get_settings().debian_mirror
    if override:
        return Mirror(override, security, None)
    for uri, suites, signed_by in sources:
        if SUITE in suites:
            keyring = signed_by if signed_by and os.path.isfile(signed_by) else None
            return Mirror(uri, security, keyring)
    for uri, suites, _ in sources:
        if not any(s.endswith("-security") for s in suites) and "security" not in uri:
            return Mirror(uri, security, None)
    raise ImageBuildError("no Debian mirror in /etc/apt/sources.list(.d); set HACKBOOT_DEBIAN_MIRROR (debian_mirror)")


# --- build steps -----------------------------------------------------------------------------


def debootstrap(root: Path, mirror: Mirror) -> None:
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "--components=main"]
    if mirror.keyring:
        cmd.append(f"--keyring={mirror.keyring}")
    cmd += [SUITE, str(root), mirror.uri]
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C.UTF-8",
        "HOME": "/root",
    }
    log.info("%s: debootstrap %s from %s", NAME, SUITE, mirror.uri)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        detail = proc.stdout + proc.stderr
        inner = root / "debootstrap/debootstrap.log"
        if inner.exists():
            detail += "\n--- debootstrap.log ---\n" + inner.read_text(errors="replace")
        raise ImageBuildError("debootstrap failed:\n" + "\n".join(detail.strip().splitlines()[-30:]))
    # debootstrap only warns when a package fails to configure (e.g. an unresolvable virtual
    # dependency) and still exits 0: check the package database ourselves.
    broken = []
    status = (root / "var/lib/dpkg/status").read_text()
    for block in status.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Status): (.*)$", block, re.MULTILINE))
        if fields.get("Status") and fields["Status"] != "install ok installed":
            broken.append(f"{fields.get('Package')} ({fields['Status']})")
    if broken:
        raise ImageBuildError(f"debootstrap left packages unconfigured: {', '.join(broken)}")


def configure(root: Path, mirror: Mirror) -> None:
    """Turn the fresh chroot into a cloud image. Edits files only: no chroot, no mounts."""
    etc = root / "etc"

    # apt: the same mirror, plus security updates when the host has them.
    (etc / "apt/sources.list").unlink(missing_ok=True)
    sources = f"Types: deb\nURIs: {mirror.uri}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"
    sources += "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    if mirror.security_uri:
        sources += (
            f"\nTypes: deb\nURIs: {mirror.security_uri}\nSuites: {SUITE}-security\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
    write_file(etc / "apt/sources.list.d/debian.sources", sources)

    # Identity that must differ per instance, and host files debootstrap copied in.
    write_file(etc / "hostname", "debian\n")
    write_file(etc / "hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    write_file(etc / "machine-id", "")  # empty: systemd generates one at first boot
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    (root / "var/lib/systemd/random-seed").unlink(missing_ok=True)
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()
    resolv = etc / "resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")

    write_file(etc / "fstab", "/dev/vda\t/\text4\terrors=remount-ro\t0\t1\n")
    write_file(etc / "default/locale", "LANG=C.UTF-8\n")

    # cloud-init: NoCloud only, fast host keys.
    write_file(etc / "cloud/cloud.cfg.d/90_dpkg.cfg", data_file("debian-datasources.cfg"))
    write_file(etc / "cloud/cloud.cfg.d/99_hackboot.cfg", data_file("debian-cloud.cfg"))
    write_file(etc / "ssh/sshd_config.d/10-hackboot.conf", data_file("debian-sshd.conf"))
    write_file(etc / "systemd/system/ssh.service.d/hackboot-hostkeys.conf", data_file("debian-ssh-hostkeys.conf"))

    # Network: systemd-networkd + resolved (cloud-init renders for networkd when ifupdown is absent).
    write_file(etc / "systemd/network/99-hackboot-dhcp.network", data_file("debian-dhcp.network"))
    write_file(
        etc / "systemd/system/systemd-networkd-wait-online.service.d/hackboot.conf",
        data_file("debian-wait-online.conf"),
    )
    run(
        ["systemctl", f"--root={root}", "enable", "systemd-networkd.service", "systemd-resolved.service"],
        what="systemctl enable",
    )
    run(["systemctl", f"--root={root}", "disable", *DISABLED_UNITS], what="systemctl disable")

    strip_docs(root)

    # Leave no build-time state behind (and save ~100 MB): apt caches, logs.
    for pattern in (
        "var/cache/apt/*.bin",
        "var/cache/apt/archives/*.deb",
        "var/lib/apt/lists/*_*",
        "var/log/*.log",
        "var/log/apt/*",
        "var/cache/debconf/*-old",
        "tmp/*",
    ):
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def strip_docs(root: Path) -> None:
    """Apply the dpkg path-exclude rules of debian-dpkg-nodoc.cfg to what is already installed."""
    rules = data_file("debian-dpkg-nodoc.cfg")
    write_file(root / "etc/dpkg/dpkg.cfg.d/01-hackboot-nodoc", rules)
    excludes, includes = [], []
    for line in rules.splitlines():
        kind, _, pattern = line.partition(" ")
        if kind == "path-exclude":
            excludes.append(pattern)
        elif kind == "path-include":
            includes.append(pattern)
    for pattern in excludes:
        for path in root.glob(pattern.lstrip("/")):
            rel = "/" + str(path.relative_to(root))
            if any(fnmatch.fnmatch(rel, inc) for inc in includes):
                continue
            if path.is_dir() and not path.is_symlink():
                # Keep the included files (copyright) that live below an excluded directory.
                for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    sub_rel = "/" + str(sub.relative_to(root))
                    if sub.is_dir() and not sub.is_symlink():
                        if not any(sub.iterdir()):
                            sub.rmdir()
                    elif not any(fnmatch.fnmatch(sub_rel, inc) for inc in includes):
                        sub.unlink()
                if not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink()


def kernel_files(root: Path) -> tuple[Path, Path, str]:
    """(vmlinuz, initrd, release) from the chroot's /boot; checks virtio_blk is in the initrd."""
    kernels = sorted((root / "boot").glob("vmlinuz-*-cloud-amd64"))
    if len(kernels) != 1:
        raise ImageBuildError(f"expected one cloud kernel in {root}/boot, found {kernels}")
    vmlinuz = kernels[0]
    release = vmlinuz.name.removeprefix("vmlinuz-")
    initrd = root / "boot" / f"initrd.img-{release}"
    if not initrd.is_file():
        raise ImageBuildError(f"{initrd} is missing (update-initramfs did not run?)")
    # Without virtio_blk in the initramfs the kernel never sees /dev/vda: fail the build, not the boot.
    listing = run(["lsinitramfs", initrd], what="lsinitramfs")
    if not re.search(r"/virtio_blk\.ko", listing):
        raise ImageBuildError(f"{initrd} does not contain virtio_blk.ko")
    return vmlinuz, initrd, release


def build(out_dir: Path, work: Path) -> Path:
    require_tools("debootstrap", "mkfs.ext4", "qemu-img", "systemctl", "lsinitramfs")
    mirror = find_mirror()
    root = work / "root"
    debootstrap(root, mirror)
    configure(root, mirror)
    vmlinuz, initrd_src, release = kernel_files(root)

    disk, kernel, initrd = work / f"{NAME}.qcow2", work / f"{NAME}.vmlinuz", work / f"{NAME}.initrd"
    shutil.copyfile(vmlinuz, kernel)
    shutil.copyfile(initrd_src, initrd)
    log.info("%s: creating the root filesystem image", NAME)
    make_ext4_qcow2(root, disk, size=FS_SIZE, label="hackboot-root", compress=True)

    manifest: dict[str, Any] = base_manifest(NAME, disk, FS_SIZE)
    manifest.update(
        os="debian",
        version="12",
        kernel=kernel.name,
        initrd=initrd.name,
        cmdline=CMDLINE,
        kernel_release=release,
        default_user="debian",
        min_ram_mb=512,
        mirror=mirror.uri,
    )
    return publish(
        {disk: out_dir / disk.name, kernel: out_dir / kernel.name, initrd: out_dir / initrd.name},
        ordered_manifest(manifest),
        out_dir,
        NAME,
    )
