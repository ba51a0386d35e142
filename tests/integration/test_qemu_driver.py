"""Integration tests of the hypervisor drivers.

* ``TestDriverContract`` runs the shared contract (driver_contract.py) against
  FakeDriver and QemuDriver.
* The ``qemu``-marked tests below boot real TCG guests (host kernel + a busybox
  initramfs built by the fixture).  One guest is booted per module and reused;
  tests that must kill or power off a guest get a cheap one of their own.

Timings are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import driver_contract
from driver_contract import READY, qemu_test_assets, wait_console, wait_until

from hackboot.compute.accel import boot_probe, probe_accelerator
from hackboot.compute.driver import EventKind, GuestSpec, GuestState, SpawnError
from hackboot.compute.fake_driver import FakeDriver, FakeHost
from hackboot.compute.nic import UserNetNic, find_free_port
from hackboot.compute.qemu import QemuDriver, RunPaths, probe_direct_io, proc_argv
from hackboot.core.config import reset_settings_cache

SRC = Path(__file__).resolve().parents[2] / "src"

# `make test` runs pytest -n 2 --dist loadgroup: keep this module on one worker, so the
# shared booted guest is booted once and its tests run in file order.
pytestmark = pytest.mark.xdist_group("qemu-driver")


class TestDriverContract(driver_contract.DriverContract):
    pass


# --------------------------------------------------------------------------- FakeDriver extras


def test_fake_guest_poweroff_and_panic():
    d = FakeDriver()
    spec = GuestSpec(str(uuid.uuid4()), "f", 1, 128, disk_path=Path("/x.qcow2"))
    d.spawn(spec)
    with d.events(spec.instance_id) as ev:
        d.simulate_guest_panic(spec.instance_id)
        ev.wait_for(EventKind.GUEST_PANICKED, 1)
        assert d.state(spec.instance_id) is GuestState.CRASHED
        d.reboot(spec.instance_id, hard=True)
        assert d.state(spec.instance_id) is GuestState.RUNNING
        d.simulate_guest_poweroff(spec.instance_id)
        assert ev.wait_for(EventKind.EXITED, 1).data["clean"] is True
    assert d.state(spec.instance_id) is GuestState.SHUTOFF


def test_fake_events_only_reach_attached_drivers():
    host = FakeHost()
    d1, d2 = FakeDriver(host), FakeDriver(host)
    spec = GuestSpec("i-1", "f", 1, 128, disk_path=Path("/x.qcow2"))
    d1.spawn(spec)
    with d2.events() as ev2:
        d1.pause("i-1")
        assert ev2.drain() == []  # d2 has not adopted it
        d2.adopt("i-1")
        d1.resume("i-1")
        assert [e.kind for e in ev2.drain()] == [EventKind.RESUME]
    host.fail_next_spawn = "boom"
    d1.destroy("i-1")
    with pytest.raises(SpawnError, match="boom"):
        d1.spawn(spec)


# --------------------------------------------------------------------------- QEMU fixtures


@dataclass
class MainGuest:
    state_dir: Path
    driver: QemuDriver
    spec: GuestSpec
    pid: int
    ssh_port: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def iid(self) -> str:
        return self.spec.instance_id

    def ready_count(self) -> int:
        return self.driver.console_log(self.iid, 4 << 20).count(READY)


def _make_seed_iso(path: Path) -> Path | None:
    if shutil.which("genisoimage") is None:
        return None
    src = path.parent / "seed-src"
    src.mkdir(exist_ok=True)
    (src / "meta-data").write_text("instance-id: test\nlocal-hostname: test\n")
    (src / "user-data").write_text("#cloud-config\n")
    subprocess.run(
        ["genisoimage", "-quiet", "-output", str(path), "-volid", "cidata", "-joliet", "-rock", str(src)],
        check=True,
    )
    return path


@pytest.fixture(scope="module")
def qemu_state_dir():
    d = Path(tempfile.mkdtemp(prefix="hbi-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def main_guest(qemu_state_dir):
    assets = qemu_test_assets()
    disk = qemu_state_dir / "main.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    port = find_free_port()
    spec = GuestSpec(
        instance_id=str(uuid.uuid4()),
        name="main,guest",  # comma: exercises option escaping
        vcpus=1,
        memory_mb=192,
        disk_path=disk,
        kernel=assets.kernel,
        initrd=assets.initrd,
        cmdline="console=ttyS0 panic=-1 hb.netwatch",  # the guest reports its network interfaces
        seed_iso=_make_seed_iso(qemu_state_dir / "seed.iso"),
        nics=[UserNetNic(ssh_host_port=port)],
        hotplug_ports=2,
        accel="tcg",
    )
    driver = QemuDriver(qemu_state_dir)
    t0 = time.monotonic()
    handle = driver.spawn(spec)
    spawn_s = time.monotonic() - t0
    boot_s = wait_console(driver, spec.instance_id, READY, 1, timeout=120)
    g = MainGuest(qemu_state_dir, driver, spec, handle.pid, port, {"spawn_to_running_s": spawn_s})
    g.timings["spawn_to_console_marker_s"] = spawn_s + boot_s
    print(f"\n[timing] spawn->running {spawn_s:.3f}s, spawn->marker {spawn_s + boot_s:.2f}s (TCG)")
    yield g
    g.driver.destroy(g.iid)
    g.driver.close()


# --------------------------------------------------------------------------- main guest tests


def _listeners(port: int) -> list[tuple[str, str]]:
    """The (table, address) of the sockets listening on TCP ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            addr, lport = cols[1].rsplit(":", 1)
            if int(lport, 16) == port and cols[3] == "0A":  # LISTEN
                found.append((table, addr))
    return found


@pytest.mark.qemu
class TestBootedGuest:
    """Tests sharing one booted guest; they run in file order, shutdown is last."""

    def test_running_and_run_dir(self, main_guest: MainGuest):
        g = main_guest
        assert g.driver.qmp(g.iid, "query-status")["status"] == "running"
        assert g.driver.state(g.iid) is GuestState.RUNNING
        paths = RunPaths.for_instance(g.state_dir, g.iid)
        for f in ("qemu.pid", "qmp.sock", "console.log", "cmdline.json", "spec.json"):
            assert (paths.run_dir / f).exists(), f
        assert int(paths.pidfile.read_text()) == g.pid
        argv = json.loads(paths.cmdline_json.read_text())
        assert proc_argv(g.pid) == argv
        assert "-daemonize" not in argv and "-S" in argv
        # detached: its own session (a process group of its own, no controlling terminal)
        stat = Path(f"/proc/{g.pid}/stat").read_text().rsplit(")", 1)[1].split()
        sid = int(stat[3])
        assert sid == g.pid and sid != os.getsid(0)
        assert g.driver.qmp(g.iid, "query-name")["name"] == "main,guest"
        assert g.driver.qmp(g.iid, "query-uuid")["UUID"] == g.iid

    def test_console_has_kernel_output(self, main_guest: MainGuest):
        log = main_guest.driver.console_log(main_guest.iid, 1 << 20)
        assert b"Linux version" in log
        assert READY in log

    def test_disks_attached(self, main_guest: MainGuest):
        g = main_guest
        blocks = {b["inserted"]["node-name"]: b for b in g.driver.qmp(g.iid, "query-block") if b.get("inserted")}
        disk = blocks["disk0"]["inserted"]
        assert disk["drv"] == "qcow2" and not disk["ro"]
        assert disk["cache"]["direct"] is probe_direct_io(g.spec.disk_path)
        if g.spec.seed_iso is not None:
            assert blocks["seed0"]["inserted"]["ro"] is True

    def test_ssh_forward_binds_loopback_only(self, main_guest: MainGuest):
        assert _listeners(main_guest.ssh_port) == [("/proc/net/tcp", "0100007F")]  # 127.0.0.1 only

    def test_nic_hotplug_seen_by_the_guest(self, main_guest: MainGuest):
        g = main_guest

        def interfaces() -> list[str]:
            lines = [ln for ln in g.driver.console_log(g.iid, 4 << 20).decode(errors="replace").splitlines()
                     if ln.startswith("HB-NET ")]
            return lines[-1].split()[1:] if lines else []

        wait_until(lambda: "eth0" in interfaces(), 60, what="the boot NIC in the guest")
        port = find_free_port()
        nic = UserNetNic(ssh_host_port=port, mac="52:54:00:00:00:42")
        nic_id = g.driver.attach_nic(g.iid, nic)
        assert g.driver.nics(g.iid)[nic_id] == nic
        wait_until(lambda: "eth1" in interfaces(), 60, what="the hot-plugged NIC in the guest")
        assert _listeners(port) == [("/proc/net/tcp", "0100007F")]  # its forward: 127.0.0.1 only
        devices = {p["name"] for p in g.driver.qmp(g.iid, "qom-list", {"path": "/machine/peripheral"})}
        assert nic_id in devices
        g.driver.detach_nic(g.iid, nic_id, timeout=60)
        wait_until(lambda: interfaces() == ["eth0", "lo"], 60, what="the unplugged NIC gone from the guest")
        assert nic_id not in g.driver.nics(g.iid)
        assert _listeners(port) == []  # the backend went with it
        assert not RunPaths.for_instance(g.state_dir, g.iid).hotplug_nics_json.exists()

    def test_pause_resume_events(self, main_guest: MainGuest):
        g = main_guest
        with g.driver.events(g.iid) as ev:
            g.driver.pause(g.iid)
            ev.wait_for(EventKind.STOP, 10)
            assert g.driver.state(g.iid) is GuestState.PAUSED
            g.driver.resume(g.iid)
            ev.wait_for(EventKind.RESUME, 10)
        assert g.driver.state(g.iid) is GuestState.RUNNING

    def test_hard_reboot(self, main_guest: MainGuest):
        g = main_guest
        n = g.ready_count()
        with g.driver.events(g.iid) as ev:
            t0 = time.monotonic()
            g.driver.reboot(g.iid, hard=True)
            reset = ev.wait_for(EventKind.RESET, 10)
        assert reset.data == {"guest": False, "reason": "host-qmp-system-reset"}
        assert g.driver.pid(g.iid) == g.pid
        wait_console(g.driver, g.iid, READY, n + 1, timeout=120)
        print(f"\n[timing] hard reboot -> marker {time.monotonic() - t0:.2f}s")

    def test_soft_reboot_via_acpi(self, main_guest: MainGuest):
        g = main_guest
        wait_console(g.driver, g.iid, READY, g.ready_count(), timeout=120)
        n = g.ready_count()
        acpi = g.driver.console_log(g.iid, 4 << 20).count(b"HB-ACPI-POWEROFF")
        with g.driver.events(g.iid) as ev:
            t0 = time.monotonic()
            g.driver.reboot(g.iid, hard=False, timeout=60)
            soft_s = time.monotonic() - t0
            ev.wait_for(EventKind.RESET, 10)
            kinds = [e.kind for e in ev.history]
        assert kinds[:3] == [EventKind.POWERDOWN, EventKind.SHUTDOWN, EventKind.STOP], kinds
        assert ev.history[1].data == {"guest": True, "reason": "guest-shutdown"}
        assert g.driver.console_log(g.iid, 4 << 20).count(b"HB-ACPI-POWEROFF") == acpi + 1
        assert g.driver.pid(g.iid) == g.pid
        assert g.driver.state(g.iid) is GuestState.RUNNING
        # the soft reboot must not have been mistaken for a power-off
        assert not RunPaths.for_instance(g.state_dir, g.iid).shutoff_json.exists()
        wait_console(g.driver, g.iid, READY, n + 1, timeout=120)
        print(f"\n[timing] soft reboot (ACPI poweroff + reset) {soft_s:.2f}s")

    def test_adopt_after_dropping_driver(self, main_guest: MainGuest):
        g = main_guest
        g.driver.close()  # the agent goes away; QEMU must not notice
        assert Path(f"/proc/{g.pid}").exists()
        g.driver = QemuDriver(g.state_dir)
        t0 = time.monotonic()
        handle = g.driver.adopt(g.iid)
        print(f"\n[timing] adopt {time.monotonic() - t0:.3f}s")
        assert handle is not None and handle.adopted and handle.pid == g.pid
        assert handle.accel == "tcg"
        assert g.driver.state(g.iid) is GuestState.RUNNING
        n = g.ready_count()
        with g.driver.events(g.iid) as ev:  # the new driver controls it and gets its events
            g.driver.reboot(g.iid, hard=True)
            ev.wait_for(EventKind.RESET, 10)
        wait_console(g.driver, g.iid, READY, n + 1, timeout=120)

    def test_shutdown_via_acpi(self, main_guest: MainGuest):
        g = main_guest
        with g.driver.events(g.iid) as ev:
            t0 = time.monotonic()
            state = g.driver.shutdown(g.iid, timeout=60)
            took = time.monotonic() - t0
            exited = ev.wait_for(EventKind.EXITED, 10)
            kinds = [e.kind for e in ev.history]
        print(f"\n[timing] ACPI shutdown {took:.2f}s")
        assert state is GuestState.SHUTOFF
        assert exited.data["clean"] is True
        assert EventKind.SHUTDOWN in kinds
        assert not Path(f"/proc/{g.pid}/cmdline").exists() or not Path(f"/proc/{g.pid}/cmdline").read_bytes()
        assert g.driver.state(g.iid) is GuestState.SHUTOFF
        assert b"Linux version" in g.driver.console_log(g.iid, 1 << 20)


# --------------------------------------------------------------------------- independent guests


def _spec(state_dir: Path, cmdline: str = "console=ttyS0 panic=-1", **kw) -> GuestSpec:
    assets = qemu_test_assets()
    return GuestSpec(
        instance_id=kw.pop("instance_id", str(uuid.uuid4())),
        name="t",
        vcpus=1,
        memory_mb=128,
        kernel=assets.kernel,
        initrd=assets.initrd,
        cmdline=cmdline,
        accel="tcg",
        **kw,
    )


@pytest.mark.qemu
def test_kill9_reported_via_qmp_disconnect(qemu_state_dir):
    with QemuDriver(qemu_state_dir) as d:
        spec = _spec(qemu_state_dir)
        h = d.spawn(spec)
        with d.events(spec.instance_id) as ev:
            t0 = time.monotonic()
            os.kill(h.pid, signal.SIGKILL)
            exited = ev.wait_for(EventKind.EXITED, 5)
            took = time.monotonic() - t0
        print(f"\n[timing] kill -9 -> EXITED event {took * 1000:.0f}ms")
        assert exited.data == {"clean": False, "reason": "unexpected-exit", "pid": h.pid}
        assert d.state(spec.instance_id) is GuestState.CRASHED
        d.destroy(spec.instance_id)  # process already dead
        d.destroy(spec.instance_id)  # and again
        assert d.state(spec.instance_id) is GuestState.MISSING
        assert not RunPaths.for_instance(qemu_state_dir, spec.instance_id).run_dir.exists()


AGENT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from hackboot.compute.driver import GuestSpec
    from hackboot.compute.qemu import QemuDriver
    d = QemuDriver(Path(sys.argv[1]))
    h = d.spawn(GuestSpec.from_dict(json.loads(sys.argv[2])))
    print(h.pid, flush=True)
    os._exit(0)  # the agent dies abruptly: no close(), no cleanup
    """
)


@pytest.mark.qemu
def test_guest_survives_agent_death_and_is_adopted(qemu_state_dir):
    spec = _spec(qemu_state_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(
        [sys.executable, "-c", AGENT_SCRIPT, str(qemu_state_dir), json.dumps(spec.to_dict())],
        check=True, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    pid = int(out.stdout.split()[-1])
    assert Path(f"/proc/{pid}").exists()
    with QemuDriver(qemu_state_dir) as d:
        handle = d.adopt(spec.instance_id)
        assert handle is not None and handle.pid == pid and handle.adopted
        assert d.state(spec.instance_id) is GuestState.RUNNING
        d.destroy(spec.instance_id)
        assert not Path(f"/proc/{pid}/cmdline").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.mark.qemu
def test_guest_poweroff_while_no_agent_is_watching(qemu_state_dir):
    spec = _spec(qemu_state_dir, cmdline="console=ttyS0 panic=-1 hb.poweroff")
    d = QemuDriver(qemu_state_dir)
    h = d.spawn(spec)
    d.close()  # nobody watches when the guest powers itself off
    paths = RunPaths.for_instance(qemu_state_dir, spec.instance_id)
    wait_until(lambda: b"reboot: Power down" in paths.console_log.read_bytes(), 120, what="guest poweroff")
    time.sleep(0.2)
    assert proc_argv(h.pid) is not None  # QEMU waits (status shutdown) for an agent
    with QemuDriver(qemu_state_dir) as d2:
        assert d2.state(spec.instance_id) is GuestState.SHUTOFF  # adopt reaps it
        wait_until(lambda: proc_argv(h.pid) is None, 10, what="QEMU reaped")
        assert json.loads(paths.shutoff_json.read_text())["reason"] == "guest-shutdown"
        d2.destroy(spec.instance_id)


@pytest.mark.qemu
def test_guest_initiated_poweroff_is_shutoff(qemu_state_dir):
    with QemuDriver(qemu_state_dir) as d:
        spec = _spec(qemu_state_dir, cmdline="console=ttyS0 panic=-1 hb.poweroff")
        with d.events(spec.instance_id) as ev:
            d.spawn(spec)
            shutdown = ev.wait_for(EventKind.SHUTDOWN, 120)
            exited = ev.wait_for(EventKind.EXITED, 10)
        assert shutdown.data == {"guest": True, "reason": "guest-shutdown"}
        assert exited.data["clean"] is True
        assert d.state(spec.instance_id) is GuestState.SHUTOFF
        d.destroy(spec.instance_id)


@pytest.mark.qemu
def test_unresponsive_guest_shutdown_falls_back_to_quit(qemu_state_dir):
    with QemuDriver(qemu_state_dir) as d:
        spec = _spec(qemu_state_dir, cmdline="console=ttyS0 panic=-1 hb.noacpi")
        d.spawn(spec)
        with d.events(spec.instance_id) as ev:
            t0 = time.monotonic()
            assert d.shutdown(spec.instance_id, timeout=2) is GuestState.SHUTOFF
            took = time.monotonic() - t0
            kinds = [e.kind for e in ev.drain()]
        assert 2 <= took < 10
        assert EventKind.POWERDOWN in kinds and kinds[-1] is EventKind.EXITED
        d.destroy(spec.instance_id)


@pytest.mark.qemu
def test_console_log_is_capped(qemu_state_dir):
    cap = 64 * 1024
    with QemuDriver(qemu_state_dir, console_log_max_bytes=cap, housekeeping_interval=0.5) as d:
        spec = _spec(qemu_state_dir, cmdline="console=ttyS0 panic=-1 quiet hb.spam=3000")  # ~300 KB
        d.spawn(spec)
        wait_console(d, spec.instance_id, b"HB-SPAM-DONE", timeout=180)
        log = d.console_log(spec.instance_id, 1 << 30)
        size = RunPaths.for_instance(qemu_state_dir, spec.instance_id).console_log.stat().st_size
        assert size <= cap
        assert b"HB-SPAM 2999 " in log and b"HB-SPAM 0 " not in log
        d.destroy(spec.instance_id)


def _mbr_disk(path: Path) -> Path:
    """A BIOS-bootable disk whose boot sector prints HB-BIOS-BOOT on COM1 and halts."""
    code = bytes.fromhex(
        "BE127C"  # mov si, msg (0x7c12)
        "BAF803"  # mov dx, 0x3f8
        "AC"  # next: lodsb
        "84C0"  # test al, al
        "7403"  # jz halt
        "EE"  # out dx, al
        "EBF8"  # jmp next
        "FA"  # halt: cli
        "F4"  # hlt
        "EBFC"  # jmp halt
    )
    raw = path.with_suffix(".raw")
    raw.write_bytes(((code + b"HB-BIOS-BOOT\r\n\0").ljust(510, b"\0") + b"\x55\xaa").ljust(1 << 20, b"\0"))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


@pytest.mark.qemu
def test_bios_boot_from_disk(qemu_state_dir):
    disk = _mbr_disk(qemu_state_dir / f"mbr-{uuid.uuid4().hex[:8]}.qcow2")
    spec = GuestSpec(str(uuid.uuid4()), "bios", 1, 64, disk_path=disk, accel="tcg")
    with QemuDriver(qemu_state_dir) as d:
        d.spawn(spec)
        took = wait_console(d, spec.instance_id, b"HB-BIOS-BOOT", timeout=60)
        print(f"\n[timing] BIOS disk boot -> boot-sector marker {took:.2f}s")
        argv = json.loads(RunPaths.for_instance(qemu_state_dir, spec.instance_id).cmdline_json.read_text())
        assert "-kernel" not in argv
        d.destroy(spec.instance_id)


@pytest.mark.qemu
def test_spawn_failure_reports_qemu_error(qemu_state_dir):
    with QemuDriver(qemu_state_dir) as d:
        spec = _spec(qemu_state_dir)
        spec.kernel = qemu_state_dir / "no-such-kernel"
        with pytest.raises(SpawnError, match="no-such-kernel"):
            d.spawn(spec)
        assert d.pid(spec.instance_id) is None
        assert d.state(spec.instance_id) is GuestState.SHUTOFF
        d.destroy(spec.instance_id)


@pytest.mark.qemu
def test_adopt_refuses_foreign_process(qemu_state_dir):
    with QemuDriver(qemu_state_dir) as d:
        iid = "foreign-1"
        paths = RunPaths.for_instance(qemu_state_dir, iid)
        paths.run_dir.mkdir(parents=True)
        paths.cmdline_json.write_text(json.dumps(["qemu-system-x86_64", "-name", "x"]))
        paths.pidfile.write_text(f"{os.getpid()}\n")  # a live pid that is not our QEMU
        assert d.adopt(iid) is None
        assert d.state(iid) is GuestState.CRASHED
        d.destroy(iid)  # must not signal the foreign pid (that would be us)
        assert d.state(iid) is GuestState.MISSING


# --------------------------------------------------------------------------- accelerator


@pytest.mark.qemu
def test_boot_probe_marker_under_tcg(tmp_path):
    ok, reason, seconds = boot_probe(tmp_path, "tcg", first_output_timeout=30)
    print(f"\n[timing] TCG probe guest boot->marker {seconds:.2f}s")
    assert ok, reason


@pytest.mark.qemu
def test_probe_accelerator_is_cached(tmp_path, monkeypatch, request):
    monkeypatch.delenv("HACKBOOT_ACCEL", raising=False)
    reset_settings_cache()  # the accel setting is read through the cached Settings
    request.addfinalizer(reset_settings_cache)
    t0 = time.monotonic()
    info = probe_accelerator(tmp_path, timeout=4)
    took = time.monotonic() - t0
    print(f"\n[timing] KVM probe -> {info.accel} in {took:.2f}s: {info.reason}")
    assert info.accel in ("kvm", "tcg") and info.source == "probe" and info.reason
    t0 = time.monotonic()
    again = probe_accelerator(tmp_path)
    assert time.monotonic() - t0 < 0.5
    assert again.source == "cache" and again.accel == info.accel
    assert probe_accelerator(tmp_path, force="tcg").accel == "tcg"
