"""Unit tests of the QEMU command line and the driver's pure helpers (no QEMU needed)."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from hackboot.compute import accel as accel_mod
from hackboot.compute import qemu as qemu_mod
from hackboot.compute.accel import CpioEntry, newc_archive, probe_accelerator
from hackboot.compute.driver import GuestSpec, GuestState
from hackboot.compute.nic import UserNetNic, find_free_port, nic_from_dict
from hackboot.compute.qemu import (
    RunPaths,
    build_argv,
    is_our_qemu,
    probe_direct_io,
    qemu_opt,
    state_from_qmp_status,
    trim_console_log,
)
from hackboot.core.config import reset_settings_cache

IID = "6f1f0a52-6a4e-4c1e-9d0e-3f1b8f0c2a11"
PATHS = RunPaths(Path("/var/lib/hackboot/instances") / IID)


def spec(**kw) -> GuestSpec:
    base = {
        "instance_id": IID,
        "name": "vm1",
        "vcpus": 2,
        "memory_mb": 256,
        "disk_path": Path("/var/lib/hackboot/disks/vm1.qcow2"),
    }
    base.update(kw)
    return GuestSpec(**base)


def argv(s: GuestSpec | None = None, **kw) -> list[str]:
    return build_argv(s or spec(), PATHS, **kw)


def opt(av: list[str], flag: str) -> list[str]:
    """All values following ``flag``."""
    return [av[i + 1] for i, a in enumerate(av[:-1]) if a == flag]


# --------------------------------------------------------------------------- accelerator / cpu


def test_tcg_uses_cpu_max_and_bounded_translation_cache():
    av = argv(spec(accel="tcg"))
    assert opt(av, "-accel") == ["tcg,tb-size=128"]
    assert opt(av, "-cpu") == ["max"]
    assert "host" not in opt(av, "-cpu")
    assert opt(argv(spec(accel="tcg", tcg_tb_size_mb=None)), "-accel") == ["tcg"]


def test_kvm_uses_cpu_host():
    av = argv(spec(accel="kvm"))
    assert opt(av, "-accel") == ["kvm"]
    assert opt(av, "-cpu") == ["host"]


def test_size_and_machine():
    av = argv(spec(vcpus=4, memory_mb=2048, machine="pc"))
    assert opt(av, "-smp") == ["4"]
    assert opt(av, "-m") == ["2048M"]
    assert opt(av, "-machine") == ["pc"]
    assert opt(argv(), "-machine") == ["q35"]


# --------------------------------------------------------------------------- process model


def test_spawned_paused_with_qmp_on_an_inherited_socket():
    av = argv()
    assert av[0] == "qemu-system-x86_64"
    # we spawn QEMU detached ourselves: -daemonize (fork + setsid) is incompatible with the sandbox
    assert "-daemonize" not in av and "-pidfile" not in av and "-qmp" not in av
    assert "-S" in av
    assert "socket,id=qmp,fd=3,server=on,wait=off" in opt(av, "-chardev")
    assert opt(av, "-mon") == ["chardev=qmp,mode=control"]
    # QEMU gets fds, never run-dir paths (they only appear as the labels of its fd sets)
    assert not any(str(PATHS.run_dir) in a for a in av if not a.startswith("fd="))
    assert "shutdown=pause" in opt(av, "-action")
    real = argv(fds={"qmp": 40, "console": 41, "disk0:rw": 42, "disk0:ro": 43})
    assert "socket,id=qmp,fd=40,server=on,wait=off" in opt(real, "-chardev")
    assert opt(real, "-add-fd")[1:] == [f"fd=42,set=2,opaque=hackboot:{spec().disk_path}",
                                        f"fd=43,set=2,opaque=hackboot:{spec().disk_path}"]
    assert build_argv(spec(), PATHS, qemu_binary="/opt/q/bin/qemu")[0] == "/opt/q/bin/qemu"


def test_headless_and_no_defaults():
    av = argv()
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in av
    assert opt(av, "-display") == ["none"]
    assert opt(av, "-vga") == ["none"]
    assert "-nographic" not in av


def test_serial_console_goes_to_log_file():
    av = argv()
    assert opt(av, "-add-fd")[0] == f"fd=4,set=1,opaque=hackboot:{PATHS.console_log}"
    assert "file,id=serial0,path=/dev/fdset/1,append=on" in opt(av, "-chardev")
    assert opt(av, "-serial") == ["chardev:serial0"]


def test_name_and_uuid_markers():
    av = argv(spec(name="web,1"))
    assert opt(av, "-name") == ["guest=web,,1,debug-threads=on"]  # comma escaped
    assert opt(av, "-uuid") == [IID]
    other = spec(instance_id="i-42")
    u = opt(argv(other), "-uuid")[0]
    assert uuid.UUID(u).version == 5 and u == other.smbios_uuid
    assert opt(argv(spec(instance_id="i-42")), "-uuid") == [u]  # stable


def test_full_sandbox_which_can_be_disabled():
    assert opt(argv(), "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert "-sandbox" not in argv(sandbox=False)


def test_socket_path_too_long_is_rejected():
    long_paths = RunPaths(Path("/" + "x" * 100) / "instances" / IID)
    with pytest.raises(ValueError, match="too long"):
        build_argv(spec(), long_paths)


# --------------------------------------------------------------------------- boot & disks


def test_disk_boot_without_kernel():
    av = argv()
    assert "-kernel" not in av and "-append" not in av
    devices = opt(av, "-device")
    assert "virtio-blk-pci,drive=disk0,id=virtio-disk0,bootindex=1" in devices


def test_direct_kernel_boot():
    s = spec(kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd"), cmdline="root=/dev/vda1 console=ttyS0")
    av = argv(s)
    # private copies in the run dir, reached through inherited fds (QEMU cannot enter the run dir)
    assert opt(av, "-kernel") == ["/proc/self/fd/7"]
    assert opt(av, "-initrd") == ["/proc/self/fd/8"]
    reqs = {r.key: r.path for r in qemu_mod.fd_requests(s, PATHS, qemu_mod.disk_layers(s))}
    assert reqs["kernel"] == PATHS.kernel_copy and reqs["initrd"] == PATHS.initrd_copy
    assert opt(av, "-append") == ["root=/dev/vda1 console=ttyS0"]


def test_diskless_kernel_guest():
    av = argv(spec(disk_path=None, kernel=Path("/k")))
    assert not any("id=disk0" in d for d in opt(av, "-drive"))


@pytest.mark.parametrize(
    ("cache", "direct_io", "expected"),
    [
        ("auto", True, "cache=none,aio=native"),
        ("auto", False, "cache=writeback,aio=threads"),
        ("none", False, "cache=none,aio=native"),
        ("writeback", True, "cache=writeback,aio=threads"),
    ],
)
def test_disk_cache_modes(cache, direct_io, expected):
    (node,) = [json.loads(b) for b in opt(argv(spec(disk_cache=cache), direct_io=direct_io), "-blockdev")]
    direct, aio = expected == "cache=none,aio=native", expected.split("aio=")[1]
    assert node["node-name"] == "disk0" and node["driver"] == "qcow2" and node["read-only"] is False
    assert node["cache"]["direct"] is direct and node["file"]["cache"]["direct"] is direct
    assert node["file"] == {"driver": "file", "filename": "/dev/fdset/2", "aio": aio, "cache": node["cache"]}
    assert node["discard"] == "unmap" and node["backing"] is None
    assert "-drive" not in argv()


def test_disk_path_with_comma_is_escaped():
    av = argv(spec(disk_path=Path("/d/a,b.qcow2")))
    assert "fd=5,set=2,opaque=hackboot:/d/a,,b.qcow2" in opt(av, "-add-fd")
    assert qemu_opt("a,b,,c") == "a,,b,,,,c"


def test_backing_chain_is_explicit_and_read_only():
    chain = [(Path("/d/top.qcow2"), "qcow2"), (Path("/img/base.qcow2"), "qcow2"), (Path("/img/raw.img"), "raw")]
    av = argv(spec(disk_path=Path("/d/top.qcow2")), chain=chain)
    nodes = [json.loads(b) for b in opt(av, "-blockdev")]
    assert [n["node-name"] for n in nodes] == ["disk0-b2", "disk0-b1", "disk0"]  # bottom first
    assert nodes[2]["backing"] == "disk0-b1" and nodes[1]["backing"] == "disk0-b2" and "backing" not in nodes[0]
    assert nodes[0]["driver"] == "raw" and nodes[0]["read-only"] and nodes[1]["read-only"]
    # only the top gets a read-write fd: a base image shared by other guests is never writable
    fdsets = opt(av, "-add-fd")
    assert [f for f in fdsets if "/img/" in f] == ["fd=7,set=3,opaque=hackboot:/img/base.qcow2",
                                                   "fd=8,set=4,opaque=hackboot:/img/raw.img"]
    reqs = qemu_mod.fd_requests(spec(), PATHS, qemu_mod.disk_layers(spec(), chain))
    assert [(r.key, r.flags) for r in reqs if "disk0" in r.key] == [
        ("disk0:rw", os.O_RDWR), ("disk0:ro", os.O_RDONLY), ("disk0-b1:ro", os.O_RDONLY), ("disk0-b2:ro", os.O_RDONLY)]


def test_backing_chain_read_from_qcow2_headers(tmp_path):
    import subprocess

    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 65536)
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    for path, backing, fmt in ((mid, base, "raw"), (top, Path("mid.qcow2"), "qcow2")):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", fmt, "-u", str(path),
                        "64K"], check=True)
    assert qemu_mod.backing_chain(top, "qcow2") == [(top, "qcow2"), (mid, "qcow2"), (base, "raw")]
    assert qemu_mod.backing_chain(base, "raw") == [(base, "raw")]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "nbd:127.0.0.1:1", "-F", "raw", "-u",
                    str(tmp_path / "nbd.qcow2"), "64K"], check=True)
    with pytest.raises(ValueError, match="not a local file"):
        qemu_mod.backing_chain(tmp_path / "nbd.qcow2", "qcow2")


def test_seed_iso_is_readonly_virtio_disk():
    av = argv(spec(seed_iso=Path("/seeds/vm1.iso")))
    seed = [json.loads(b) for b in opt(av, "-blockdev") if '"seed0"' in b]
    assert seed == [{"driver": "raw", "node-name": "seed0", "read-only": True,
                     "file": {"driver": "file", "filename": "/dev/fdset/3", "read-only": True}}]
    assert "fd=7,set=3,opaque=hackboot:/seeds/vm1.iso" in opt(av, "-add-fd")
    assert "virtio-blk-pci,drive=seed0,id=virtio-seed0" in opt(av, "-device")


# --------------------------------------------------------------------------- GPUs


def test_vfio_gpus_on_q35_get_root_ports():
    av = argv(spec(gpu_pci_addresses=["0000:3B:00.0", "0000:af:00.0"], accel="kvm"))
    devices = opt(av, "-device")
    assert "pcie-root-port,id=rp-gpu0,chassis=1,bus=pcie.0" in devices
    assert "vfio-pci,host=0000:3b:00.0,id=gpu0,bus=rp-gpu0" in devices
    assert "pcie-root-port,id=rp-gpu1,chassis=2,bus=pcie.0" in devices
    assert "vfio-pci,host=0000:af:00.0,id=gpu1,bus=rp-gpu1" in devices


def test_vfio_gpus_on_pc():
    devices = opt(argv(spec(machine="pc", gpu_pci_addresses=["0000:3b:00.0"])), "-device")
    assert "vfio-pci,host=0000:3b:00.0,id=gpu0" in devices
    assert not any(d.startswith("pcie-root-port") for d in devices)


def test_guests_are_started_as_the_unprivileged_account():
    from hackboot.core.privsep import Account

    acct = Account("hackboot-guest", 64000, 64001)
    prefix, switch = qemu_mod.guest_launch(acct, spec(accel="tcg"))
    assert prefix == [] and switch == {"user": 64000, "group": 64001, "extra_groups": []}
    if os.path.exists("/dev/kvm"):
        _, switch = qemu_mod.guest_launch(acct, spec(accel="kvm"))
        assert switch["extra_groups"] == [os.stat("/dev/kvm").st_gid]
    # VFIO: root raises the locked-memory limit, then setpriv drops to the account and execs QEMU
    prefix, switch = qemu_mod.guest_launch(acct, spec(memory_mb=2048, gpu_pci_addresses=["0000:3b:00.0"]))
    assert switch == {}
    assert os.path.basename(prefix[0]) == "prlimit" and prefix[1] == f"--memlock={3072 << 20}:{3072 << 20}"
    assert os.path.basename(prefix[3]) == "setpriv"
    assert prefix[4:] == ["--reuid=64000", "--regid=64001", "--clear-groups", "--"]
    me = Account("me", os.geteuid(), os.getegid())
    assert qemu_mod.guest_launch(me, spec()) == ([], {})


def test_no_gpus_no_vfio():
    assert not any("vfio" in a for a in argv())


@pytest.mark.parametrize("bad", ["3b:00.0", "0000:3b:00", "0000:3b:00.8", "0000:zz:00.0", "0000:3b:00.0,x=1"])
def test_invalid_pci_address_rejected(bad):
    with pytest.raises(ValueError):
        argv(spec(gpu_pci_addresses=[bad]))


def test_duplicate_gpu_rejected():
    with pytest.raises(ValueError):
        argv(spec(gpu_pci_addresses=["0000:3b:00.0", "0000:3B:00.0"]))


# --------------------------------------------------------------------------- NICs


def test_user_nic_forwards_ssh_on_loopback_only():
    av = argv(spec(nics=[UserNetNic(ssh_host_port=2222)]))
    (netdev,) = opt(av, "-netdev")
    assert netdev == "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"
    assert "virtio-net-pci,netdev=net0,id=nic0" in opt(av, "-device")


def test_every_hostfwd_is_bound_to_loopback():
    nic = UserNetNic(ssh_host_port=2222, extra_forwards=((8080, 80), (8443, 443)), restrict=False)
    (netdev,) = opt(argv(spec(nics=[nic])), "-netdev")
    fwds = [p for p in netdev.split(",") if p.startswith("hostfwd=")]
    assert fwds == [
        "hostfwd=tcp:127.0.0.1:2222-:22",
        "hostfwd=tcp:127.0.0.1:8080-:80",
        "hostfwd=tcp:127.0.0.1:8443-:443",
    ]
    assert "restrict=off" in netdev


def test_multiple_nics_get_distinct_ids_and_mac():
    nics = [UserNetNic(2222, mac="52:54:00:aa:bb:01"), UserNetNic(2223)]
    av = argv(spec(nics=nics))
    assert [n.split(",")[1] for n in opt(av, "-netdev")] == ["id=net0", "id=net1"]
    assert "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:aa:bb:01" in opt(av, "-device")
    assert "virtio-net-pci,netdev=net1,id=nic1" in opt(av, "-device")


@pytest.mark.parametrize(
    "kw",
    [
        {"ssh_host_port": 0},
        {"ssh_host_port": 70000},
        {"ssh_host_port": 22, "mac": "52:54:00:AA:BB:01"},
        {"ssh_host_port": 22, "extra_forwards": ((22, 80),)},
        {"ssh_host_port": 22, "model": "virtio,x=1"},
    ],
)
def test_invalid_user_nic(kw):
    with pytest.raises(ValueError):
        UserNetNic(**kw)


def test_nic_roundtrip():
    nic = UserNetNic(2222, mac="52:54:00:aa:bb:01", extra_forwards=((8080, 80),))
    assert nic_from_dict(json.loads(json.dumps(nic.to_dict()))) == nic
    with pytest.raises(ValueError):
        nic_from_dict({"kind": "bogus"})


def test_find_free_port_is_bindable_on_loopback():
    port = find_free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# --------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    "kw",
    [
        {"instance_id": "../etc"},
        {"instance_id": ""},
        {"instance_id": "a/b"},
        {"vcpus": 0},
        {"memory_mb": 8},
        {"accel": "xen"},
        {"machine": "virt"},
        {"disk_format": "vmdk"},
        {"disk_cache": "unsafe"},
        {"name": ""},
        {"name": "a\nb"},
        {"initrd": Path("/i")},
        {"disk_path": None},
    ],
)
def test_invalid_spec(kw):
    with pytest.raises(ValueError):
        argv(spec(**kw))


def test_extra_args_come_last():
    assert argv(spec(extra_args=["-device", "virtio-balloon-pci"]))[-2:] == ["-device", "virtio-balloon-pci"]


def test_spec_roundtrip():
    s = spec(
        kernel=Path("/k"),
        initrd=Path("/i"),
        cmdline="console=ttyS0",
        seed_iso=Path("/s.iso"),
        nics=[UserNetNic(2222)],
        gpu_pci_addresses=["0000:3b:00.0"],
        accel="kvm",
        start_paused=True,
    )
    again = GuestSpec.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s
    assert build_argv(again, PATHS) == build_argv(s, PATHS)


# --------------------------------------------------------------------------- state mapping


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("running", GuestState.RUNNING),
        ("paused", GuestState.PAUSED),
        ("prelaunch", GuestState.PAUSED),
        ("io-error", GuestState.PAUSED),
        ("shutdown", GuestState.SHUTOFF),
        ("guest-panicked", GuestState.CRASHED),
        ("internal-error", GuestState.CRASHED),
        ("something-new", GuestState.PAUSED),
    ],
)
def test_state_from_qmp_status(status, state):
    assert state_from_qmp_status(status) is state


# --------------------------------------------------------------------------- host helpers


def test_trim_console_log_keeps_tail_and_appends_continue(tmp_path):
    log = tmp_path / "console.log"
    writer = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # like QEMU's chardev
    try:
        for i in range(5000):
            os.write(writer, f"line {i:05d} {'x' * 40}\n".encode())
        assert not trim_console_log(log, 10 * 1024 * 1024)
        assert trim_console_log(log, 64 * 1024)
        assert log.stat().st_size <= 64 * 1024
        os.write(writer, b"after trim\n")
        data = log.read_bytes()
        assert data.endswith(b"line 04999 " + b"x" * 40 + b"\nafter trim\n")
        assert b"line 00000" not in data
    finally:
        os.close(writer)
    assert not trim_console_log(tmp_path / "missing.log", 10)


def test_trim_console_log_fallback_without_collapse_range(tmp_path, monkeypatch):
    monkeypatch.setattr(qemu_mod, "_fallocate", None)
    log = tmp_path / "console.log"
    log.write_bytes(b"a" * 100_000 + b"TAIL")
    assert trim_console_log(log, 10_000)
    data = log.read_bytes()
    assert len(data) == 5_000 and data.endswith(b"TAIL")


def test_probe_direct_io(tmp_path):
    f = tmp_path / "disk.raw"
    f.write_bytes(b"\0" * 8192)
    try:
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        os.close(fd)
        supported = True
    except OSError:
        supported = False
    assert probe_direct_io(f) is supported


def test_probe_direct_io_false_when_o_direct_refused(tmp_path, monkeypatch):
    f = tmp_path / "disk.raw"
    f.write_bytes(b"\0" * 8192)
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")  # what tmpfs answered before Linux 6.6
        return real_open(path, flags, *a)

    monkeypatch.setattr(qemu_mod.os, "open", no_direct)
    assert probe_direct_io(f) is False


def test_probe_direct_io_follows_qcow2_backing_chain(tmp_path, monkeypatch):
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"\0" * 4096)
    name = b"base.qcow2"
    header = b"QFI\xfb" + (3).to_bytes(4, "big") + (512).to_bytes(8, "big") + len(name).to_bytes(4, "big")
    overlay = tmp_path / "overlay.qcow2"
    overlay.write_bytes(header.ljust(512, b"\0") + name + b"\0" * 3000)
    assert qemu_mod._qcow2_backing_file(overlay) == base
    seen = []
    monkeypatch.setattr(qemu_mod, "_direct_read_ok", lambda p: seen.append(p.name) or p != base)
    assert probe_direct_io(overlay) is False
    assert seen == ["overlay.qcow2", "base.qcow2"]


def test_is_our_qemu_requires_exact_argv(tmp_path):
    paths = RunPaths(tmp_path)
    me = qemu_mod.proc_argv(os.getpid())
    assert me
    paths.cmdline_json.write_text(json.dumps(["qemu-system-x86_64", "-name", "x"]))
    assert not is_our_qemu(os.getpid(), paths)
    paths.cmdline_json.write_text(json.dumps(me))
    assert is_our_qemu(os.getpid(), paths)
    assert not is_our_qemu(2**22 + 12345, paths)


# --------------------------------------------------------------------------- accel helpers


def test_newc_archive_layout():
    data = newc_archive([CpioEntry("init", 0o100755, b"#!/bin/sh\n"), CpioEntry("dev/console", 0o020600, rdev=(5, 1))])
    entries = []
    off = 0
    while True:
        hdr = data[off : off + 110]
        assert hdr[:6] == b"070701"
        f = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[off + 110 : off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        body = data[off : off + filesize]
        off = (off + filesize + 3) & ~3
        entries.append((name, f[1], body, (f[9], f[10])))
        if name == "TRAILER!!!":
            break
    assert entries[0] == ("init", 0o100755, b"#!/bin/sh\n", (0, 0))
    assert entries[1] == ("dev/console", 0o020600, b"", (5, 1))
    assert off == len(data)


@pytest.fixture(autouse=True)
def _fresh_settings():
    """The accel setting is read through the cached Settings: each test sees the environment it sets."""
    reset_settings_cache()
    yield
    reset_settings_cache()  # after monkeypatch's undo (this fixture was set up first)


def test_accel_forced_by_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HACKBOOT_ACCEL", "tcg")
    monkeypatch.setattr(accel_mod, "boot_probe", lambda *a, **k: pytest.fail("must not probe"))
    info = probe_accelerator(tmp_path)
    assert (info.accel, info.source) == ("tcg", "forced")
    assert "HACKBOOT_ACCEL" in info.reason
    assert probe_accelerator(tmp_path, force="kvm").accel == "kvm"
    assert not (tmp_path / "accel.json").exists()
    monkeypatch.setenv("HACKBOOT_ACCEL", "xen")
    reset_settings_cache()
    with pytest.raises(ValueError, match="accelerator must be kvm, tcg, auto or empty"):
        probe_accelerator(tmp_path)


def test_accel_probe_result_cached_per_host(tmp_path, monkeypatch):
    monkeypatch.delenv("HACKBOOT_ACCEL", raising=False)
    calls = []
    monkeypatch.setattr(accel_mod, "kvm_device_usable", lambda: (True, "ok"))

    def fake_probe(*a, **k):
        calls.append(1)
        return False, "silent", 5.0

    monkeypatch.setattr(accel_mod, "boot_probe", fake_probe)
    first = probe_accelerator(tmp_path)
    assert (first.accel, first.source) == ("tcg", "probe") and "silent" in first.reason
    second = probe_accelerator(tmp_path)
    assert (second.accel, second.source) == ("tcg", "cache") and len(calls) == 1
    probe_accelerator(tmp_path, reprobe=True)
    assert len(calls) == 2
    cached = json.loads((tmp_path / "accel.json").read_text())
    cached["fingerprint"] = "another host"
    (tmp_path / "accel.json").write_text(json.dumps(cached))
    probe_accelerator(tmp_path)
    assert len(calls) == 3


def test_accel_without_kvm_device_is_tcg(tmp_path, monkeypatch):
    monkeypatch.delenv("HACKBOOT_ACCEL", raising=False)
    monkeypatch.setattr(accel_mod, "kvm_device_usable", lambda: (False, "/dev/kvm not usable: No such file"))
    monkeypatch.setattr(accel_mod, "boot_probe", lambda *a, **k: pytest.fail("must not probe"))
    t0 = time.monotonic()
    info = probe_accelerator(tmp_path)
    assert info.accel == "tcg" and "/dev/kvm" in info.reason
    assert time.monotonic() - t0 < 1


def test_accel_kvm_when_probe_guest_boots(tmp_path, monkeypatch):
    monkeypatch.delenv("HACKBOOT_ACCEL", raising=False)
    monkeypatch.setattr(accel_mod, "kvm_device_usable", lambda: (True, "ok"))
    monkeypatch.setattr(accel_mod, "boot_probe", lambda *a, **k: (True, "kvm guest booted in 0.4s", 0.4))
    info = probe_accelerator(tmp_path)
    assert info.accel == "kvm" and info.cpu_model == "host"
