"""Build the built-in guest images and boot them under QEMU (TCG) with a NoCloud seed.

Images are cached across sessions in $HACKBOOT_TEST_IMAGE_DIR (default
/var/tmp/hackboot-test-images): the builder skips up-to-date images, so only the first run pays
for the debian-12 debootstrap. Guests always boot from a throwaway qcow2 overlay, never from the
cached base image.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hackboot.compute.cloudinit import build_seed_iso
from hackboot.images.builder import build_image

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="building guest images needs root"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-system-x86_64", "qemu-img", "ssh", "ssh-keygen")),
        reason="needs qemu-system-x86_64, qemu-img and an OpenSSH client",
    ),
]

SSH_OPTS = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "ConnectTimeout=5",
    "-o",
    "LogLevel=ERROR",
]


@pytest.fixture(scope="session")
def image_dir() -> Path:
    path = Path(os.environ.get("HACKBOOT_TEST_IMAGE_DIR", "/var/tmp/hackboot-test-images"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_manifest(image_dir: Path) -> dict:
    started = time.monotonic()
    path = build_image("tiny", image_dir)
    print(f"\n[tiny image ready in {time.monotonic() - started:.1f} s]")
    return json.loads(path.read_text()) | {"dir": str(image_dir)}


@pytest.fixture(scope="session")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Guest:
    """One QEMU process booted from an overlay of a built image; killed by PID on close()."""

    def __init__(self, manifest: dict, workdir: Path, seed: Path, *, memory_mb: int, disk_size: str | None = None):
        image_dir = Path(manifest["dir"])
        self.workdir = workdir
        self.port = free_port()
        self.serial_log = workdir / "serial.log"
        self.monitor = workdir / "monitor.sock"
        overlay = workdir / "disk.qcow2"
        base = (image_dir / manifest["disk"]).resolve()
        create = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)]
        subprocess.run(create + ([disk_size] if disk_size else []), check=True)
        # fmt: off
        self.cmd = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mb), "-nographic",
            "-kernel", str(image_dir / manifest["kernel"]),
            "-initrd", str(image_dir / manifest["initrd"]),
            "-append", manifest["cmdline"],
            "-drive", f"file={overlay},if=virtio",
            "-drive", f"file={seed},if=virtio,readonly=on,format=raw",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device", "virtio-net-pci,netdev=n0",
            "-serial", f"file:{self.serial_log}",
            "-monitor", f"unix:{self.monitor},server,nowait",  # for system_powerdown
        ]
        # fmt: on
        self.stderr = (workdir / "qemu.stderr").open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr)

    def ssh(self, key: Path, user: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-i", str(key), *SSH_OPTS, "-p", str(self.port), f"{user}@127.0.0.1", command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ssh_banner(self, timeout: float = 1.0) -> bool:
        """True once sshd answers. Cheap probe: until the guest has an IP, QEMU's user-mode
        network accepts the connection and then stays silent, which would stall a real ssh."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                return s.recv(4) == b"SSH-"
        except OSError:
            return False

    def wait_for_ssh(self, key: Path, user: str, timeout: float) -> float:
        """Seconds from QEMU start until ``ssh user@guest hostname`` first succeeds."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU exited with {self.proc.returncode}:\n{self.console()}")
            try:
                if self.ssh_banner() and self.ssh(key, user, "hostname", timeout=15).returncode == 0:
                    return time.monotonic() - self.started
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.1)
        pytest.fail(f"no SSH after {timeout} s; serial console:\n{self.console()}")

    def wait_for_output(self, key: Path, user: str, command: str, timeout: float) -> str:
        """Poll ``command`` until it succeeds (runcmd runs after SSH is up, as with cloud-init)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.ssh(key, user, command)
            if result.returncode == 0:
                return result.stdout
            if time.monotonic() > deadline:
                pytest.fail(f"{command!r} kept failing: {result.stderr}\n{self.console()}")
            time.sleep(0.5)

    def console(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")[-6000:]
        except OSError:
            return "<no serial log>"

    def monitor_command(self, command: str) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.monitor))
            s.sendall(command.encode() + b"\n")
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, 9)
                self.proc.wait()
        self.stderr.close()


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for guest in started:
        guest.close()


def _seed(tmp_path: Path, key: Path, hostname: str, user_data: str | None) -> Path:
    return build_seed_iso(
        tmp_path / "seed.iso",
        instance_id=f"i-{hostname}",
        hostname=hostname,
        ssh_public_keys=[key.with_suffix(".pub").read_text()],
        user_data=user_data,
    )


# --- tiny ----------------------------------------------------------------------------------------


def test_tiny_manifest(tiny_manifest: dict) -> None:
    for field in (
        "name",
        "os",
        "version",
        "kernel",
        "initrd",
        "cmdline",
        "disk_format",
        "min_disk_gb",
        "sha256",
        "builder_version",
    ):
        assert field in tiny_manifest, field
    assert tiny_manifest["disk_format"] == "qcow2"
    assert "root=/dev/vda" in tiny_manifest["cmdline"] and "console=ttyS0" in tiny_manifest["cmdline"]
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(Path(tiny_manifest["dir"]) / tiny_manifest["disk"])],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == tiny_manifest["virtual_size"]


def test_tiny_boots_with_cloud_config(tiny_manifest: dict, ssh_key: Path, tmp_path: Path, guests: list[Guest]) -> None:
    other_key = tmp_path / "alice"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
    user_data = (
        "#cloud-config\n"
        "runcmd:\n"
        "  - echo runcmd-ok > /root/runcmd.txt\n"
        "  - [sh, -c, \"echo 'list form' > /root/runcmd-list.txt\"]\n"
        "users:\n"
        "  - default\n"
        "  - name: alice\n"
        "    ssh_authorized_keys:\n"
        f"      - {other_key.with_suffix('.pub').read_text().strip()}\n"
    )
    seed = _seed(tmp_path, ssh_key, "tiny-vm-1", user_data)
    # A 1 GiB instance disk for a 256 MiB image: the guest must grow its filesystem.
    guest = Guest(tiny_manifest, tmp_path, seed, memory_mb=256, disk_size="1G")
    guests.append(guest)

    boot_seconds = guest.wait_for_ssh(ssh_key, "root", timeout=120)
    print(f"\n[tiny: SSH reachable {boot_seconds:.1f} s after QEMU start]")

    assert guest.ssh(ssh_key, "root", "hostname").stdout.strip() == "tiny-vm-1"
    assert guest.wait_for_output(ssh_key, "root", "cat /root/runcmd.txt", 30).strip() == "runcmd-ok"
    assert guest.wait_for_output(ssh_key, "root", "cat /root/runcmd-list.txt", 30).strip() == "list form"
    alice = guest.ssh(other_key, "alice", "id -un")
    assert alice.returncode == 0 and alice.stdout.strip() == "alice", alice.stderr
    # df -k: total 1K-blocks of / must reflect the 1 GiB disk, not the 256 MiB image.
    size_kib = int(guest.ssh(ssh_key, "root", "df -k / | awk 'NR==2 {print $2}'").stdout)
    assert size_kib > 900 * 1024
    assert "hackboot-tiny: " in guest.console() and "ssh ready" in guest.console()


def test_tiny_runs_user_data_script_and_powers_off(
    tiny_manifest: dict, ssh_key: Path, tmp_path: Path, guests: list[Guest]
) -> None:
    # Script user-data: the keys travel in meta-data "public-keys" instead of the user-data.
    seed = _seed(tmp_path, ssh_key, "tiny-vm-2", '#!/bin/sh\necho "script ran as $(id -un)" > /root/script.txt\n')
    guest = Guest(tiny_manifest, tmp_path, seed, memory_mb=256)
    guests.append(guest)
    guest.wait_for_ssh(ssh_key, "root", timeout=120)
    assert guest.ssh(ssh_key, "root", "hostname").stdout.strip() == "tiny-vm-2"
    assert guest.wait_for_output(ssh_key, "root", "cat /root/script.txt", 30).strip() == "script ran as root"

    # ACPI power button (what a graceful "stop" sends) must shut the guest down cleanly.
    guest.monitor_command("system_powerdown")
    try:
        guest.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"guest ignored the ACPI power button:\n{guest.console()}")
    assert "powering off" in guest.console()


# --- debian-12 (slow: debootstrap ~1.5 min on first run, boot ~45 s under TCG) ------------------------


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_debian_12_builds_and_boots(image_dir: Path, ssh_key: Path, tmp_path: Path, guests: list[Guest]) -> None:
    started = time.monotonic()
    manifest = json.loads(build_image("debian-12", image_dir).read_text()) | {"dir": str(image_dir)}
    print(f"\n[debian-12 image ready in {time.monotonic() - started:.1f} s]")
    assert manifest["os"] == "debian" and manifest["version"] == "12"
    user = manifest["default_user"]

    seed = _seed(tmp_path, ssh_key, "deb-vm-1", "#cloud-config\nruncmd:\n  - echo runcmd-ok > /var/tmp/runcmd.txt\n")
    guest = Guest(manifest, tmp_path, seed, memory_mb=manifest["min_ram_mb"], disk_size="3G")
    guests.append(guest)

    boot_seconds = guest.wait_for_ssh(ssh_key, user, timeout=400)
    print(f"[debian-12: SSH reachable {boot_seconds:.1f} s after QEMU start]")
    assert guest.ssh(ssh_key, user, "hostname").stdout.strip() == "deb-vm-1"
    assert guest.wait_for_output(ssh_key, user, "cat /var/tmp/runcmd.txt", 240).strip() == "runcmd-ok"
    status = guest.ssh(ssh_key, user, "cloud-init status --wait", timeout=240)
    assert "status: done" in status.stdout, status.stdout + status.stderr
    # cloud-init's resizefs grew the 2 GiB filesystem to the 3 GiB instance disk.
    size_kib = int(guest.ssh(ssh_key, user, "df -k / | awk 'NR==2 {print $2}'").stdout)
    assert size_kib > int(2.5 * 1024 * 1024)
    assert guest.ssh(ssh_key, user, "sudo -n true").returncode == 0
