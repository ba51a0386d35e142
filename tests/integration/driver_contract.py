"""Contract tests for :class:`hackboot.compute.driver.ComputeDriver` implementations.

Written once, run against every driver (as Nova does for its virt drivers):
subclass :class:`DriverContract` in a ``test_*.py`` module and the ``harness``
fixture parametrises each test over FakeDriver, a FakeDriver that declares no
optional capability (so every refusal path runs), and QemuDriver (marked
``qemu`` and skipped when QEMU, a kernel or busybox is missing).

Capabilities are checked both ways: a test of an optional feature runs against
the drivers that declare it and checks that it works, and against those that
do not and checks that they refuse it with :class:`Unsupported`.

A :class:`DriverHarness` hides what differs between drivers: how to build a
bootable spec, how to simulate an agent restart and how to kill the hypervisor
process behind the driver's back.

Also exported for the QEMU integration tests: :func:`qemu_test_assets`, which
builds the test guest (host kernel + busybox initramfs generated here).  Its
``/init`` understands a few kernel parameters:

* ``hb.poweroff``   power off right after boot
* ``hb.spam=N``     print N lines of 100 bytes to the console, then ``HB-SPAM-DONE``
* ``hb.noacpi``     don't start acpid (guest ignores the ACPI power button)
* ``hb.netwatch``   load virtio-net and print ``HB-NET <interfaces>`` whenever the
                    set of /sys/class/net changes (a hot-plugged NIC shows there)

and prints ``HB-GUEST-READY`` once acpid listens for the power button.
"""

from __future__ import annotations

import abc
import atexit
import functools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from hackboot.compute.accel import build_busybox_initramfs, find_busybox, find_probe_kernel
from hackboot.compute.driver import (
    INSTANCE_ID_RE,
    Capability,
    ComputeDriver,
    DriverError,
    EventKind,
    GuestAlreadyRunning,
    GuestEvent,
    GuestNotFound,
    GuestSpec,
    GuestState,
    Unsupported,
    hotplug_port_id,
)
from hackboot.compute.fake_driver import FakeDriver, FakeHost
from hackboot.compute.nic import NicBackend, UserNetNic, find_free_port

READY = b"HB-GUEST-READY"

TEST_GUEST_INIT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
cmdline=$(cat /proc/cmdline)
insmod /lib/modules/evdev.ko
insmod /lib/modules/button.ko
case " $cmdline " in
*" hb.noacpi "*) ;;
*)
  mkdir -p /etc/acpi/PWRF
  printf '#!/bin/sh\necho HB-ACPI-POWEROFF\npoweroff -f\n' > /etc/acpi/PWRF/00000080
  chmod +x /etc/acpi/PWRF/00000080
  acpid -d -c /etc/acpi &
  apid=$!
  want=$(ls /dev/input | grep -c event)
  i=0
  while [ $i -lt 200 ]; do
    have=$(ls -l /proc/$apid/fd 2>/dev/null | grep -c /dev/input/event)
    [ "$have" -ge "$want" ] && break
    sleep 0.05
    i=$((i+1))
  done
  ;;
esac
case " $cmdline " in
*" hb.netwatch "*)
  for m in failover net_failover virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_net
  do
    insmod /lib/modules/$m.ko 2>/dev/null
  done
  (
    prev=
    while :; do
      cur=$(ls /sys/class/net | tr '\n' ' ')
      [ "$cur" != "$prev" ] && echo "HB-NET $cur"
      prev=$cur
      sleep 0.2
    done
  ) &
  ;;
esac
echo HB-GUEST-READY
for arg in $cmdline; do
  case "$arg" in
  hb.poweroff) echo HB-POWEROFF; poweroff -f ;;
  hb.spam=*)
    n=${arg#hb.spam=}
    i=0
    while [ $i -lt $n ]; do
      echo "HB-SPAM $i xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
      i=$((i+1))
    done
    echo HB-SPAM-DONE
    ;;
  esac
done
while :; do sleep 60; done
"""


@dataclass(frozen=True)
class QemuTestAssets:
    kernel: Path
    initrd: Path
    work_dir: Path


def qemu_missing_reason() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed"
    if shutil.which("qemu-img") is None:
        return "qemu-img not installed"
    if find_probe_kernel() is None:
        return "no kernel in /boot"
    if find_busybox() is None:
        return "busybox-static not installed"
    return None


@functools.lru_cache(maxsize=1)
def qemu_test_assets() -> QemuTestAssets:
    """Build (once per process) the test guest: host kernel + busybox initramfs."""
    reason = qemu_missing_reason()
    if reason:
        pytest.skip(reason)
    kernel = find_probe_kernel()
    assert kernel is not None
    work = Path(tempfile.mkdtemp(prefix="hbt-assets-", dir="/tmp"))
    atexit.register(shutil.rmtree, work, True)
    release = kernel.name.removeprefix("vmlinuz-")
    mods = Path("/lib/modules") / release / "kernel"
    extra = {}
    virtio = ("virtio", "virtio_ring", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci")
    for rel in ("drivers/input/evdev.ko", "drivers/acpi/button.ko", "net/core/failover.ko",
                "drivers/net/net_failover.ko", "drivers/net/virtio_net.ko",
                *(f"drivers/virtio/{m}.ko" for m in virtio)):
        if (mods / rel).exists():  # built-in on some kernels: then insmod just fails
            extra[f"lib/modules/{Path(rel).name}"] = mods / rel
    initrd = build_busybox_initramfs(work / "guest-initramfs.cpio", TEST_GUEST_INIT, extra_files=extra)
    return QemuTestAssets(kernel=kernel, initrd=initrd, work_dir=work)


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


def wait_console(driver: ComputeDriver, iid: str, marker: bytes, count: int = 1, timeout: float = 60.0) -> float:
    """Wait until ``marker`` appears ``count`` times in the console; return seconds waited."""
    t0 = time.monotonic()
    wait_until(
        lambda: driver.console_log(iid, 4 * 1024 * 1024).count(marker) >= count,
        timeout,
        what=f"{marker!r} x{count} on {iid}'s console",
    )
    return time.monotonic() - t0


# --------------------------------------------------------------------------- harnesses


class DriverHarness(abc.ABC):
    name: str
    driver: ComputeDriver

    def __init__(self) -> None:
        self.created: set[str] = set()

    @abc.abstractmethod
    def spec(self, instance_id: str | None = None, **overrides) -> GuestSpec:
        """A small bootable spec (call once per instance: may create disk files)."""

    @abc.abstractmethod
    def restart_driver(self) -> ComputeDriver:
        """Simulate an agent restart: close the driver, return a new one on the same host."""

    @abc.abstractmethod
    def kill_hypervisor(self, instance_id: str) -> None:
        """kill -9 the hypervisor process behind the driver's back."""

    @abc.abstractmethod
    def pid(self, instance_id: str) -> int | None:
        """The live hypervisor pid, or None."""

    def gpu_addresses(self) -> list[str] | None:
        """PCI addresses a spawn may pass through here, or None when the host has none to give."""
        return None

    def wait_booted(self, instance_id: str) -> None:  # noqa: B027 - nothing to wait for by default
        """Wait until the guest OS is up (it handles hot-plug events from then on)."""

    def has(self, capability: Capability) -> bool:
        return capability in self.driver.capabilities

    def new_id(self) -> str:
        iid = str(uuid.uuid4())
        self.created.add(iid)
        return iid

    def close(self) -> None:
        for iid in sorted(self.created):
            if not INSTANCE_ID_RE.match(iid):
                continue  # invalid ids used by validation tests never got created
            try:
                self.driver.destroy(iid)
            except Exception as e:  # best-effort cleanup
                print(f"cleanup of {iid} failed: {e!r}")
        self.driver.close()


class FakeHarness(DriverHarness):
    name = "fake"

    def __init__(self, capabilities: frozenset[Capability] | None = None) -> None:
        super().__init__()
        self.host = FakeHost()
        self.capabilities = capabilities
        self.driver = FakeDriver(self.host, capabilities)
        self.scratch = Path(tempfile.mkdtemp(prefix="hbf-", dir="/tmp"))

    def gpu_addresses(self) -> list[str] | None:
        return ["0000:3b:00.0"]  # simulated: nothing touches the host

    def spec(self, instance_id: str | None = None, **overrides) -> GuestSpec:
        iid = instance_id or self.new_id()
        self.created.add(iid)
        kw = {
            "instance_id": iid,
            "name": f"t-{iid[:8]}",
            "vcpus": 1,
            "memory_mb": 128,
            "disk_path": Path("/nonexistent.qcow2"),
        }
        kw.update(overrides)
        return GuestSpec(**kw)

    def restart_driver(self) -> ComputeDriver:
        self.driver.close()
        self.driver = FakeDriver(self.host, self.capabilities)
        return self.driver

    def kill_hypervisor(self, instance_id: str) -> None:
        assert isinstance(self.driver, FakeDriver)
        self.driver.simulate_crash(instance_id)

    def pid(self, instance_id: str) -> int | None:
        assert isinstance(self.driver, FakeDriver)
        return self.driver.pid(instance_id)

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.scratch, ignore_errors=True)


class QemuHarness(DriverHarness):
    name = "qemu"

    def __init__(self) -> None:
        super().__init__()
        from hackboot.compute.qemu import QemuDriver

        self._cls = QemuDriver
        self.assets = qemu_test_assets()
        # short path: the QMP socket path must fit in sun_path
        self.state_dir = Path(tempfile.mkdtemp(prefix="hbq-", dir="/tmp"))
        self.scratch = self.state_dir
        self.driver = QemuDriver(self.state_dir)

    def spec(self, instance_id: str | None = None, **overrides) -> GuestSpec:
        iid = instance_id or self.new_id()
        self.created.add(iid)
        disk = self.state_dir / f"disk-{uuid.uuid4().hex[:12]}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
        kw = {
            "instance_id": iid,
            "name": f"t-{iid[:8]}",
            "vcpus": 1,
            "memory_mb": 128,
            "disk_path": disk,
            "kernel": self.assets.kernel,
            "initrd": self.assets.initrd,
            "cmdline": "console=ttyS0 panic=-1",
            "accel": "tcg",
        }
        kw.update(overrides)
        return GuestSpec(**kw)

    def restart_driver(self) -> ComputeDriver:
        self.driver.close()
        self.driver = self._cls(self.state_dir)
        return self.driver

    def kill_hypervisor(self, instance_id: str) -> None:
        pid = self.pid(instance_id)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # a QEMU this test started

    def pid(self, instance_id: str) -> int | None:
        return self.driver.pid(instance_id)  # type: ignore[attr-defined]

    def wait_booted(self, instance_id: str) -> None:
        wait_console(self.driver, instance_id, READY, timeout=120)

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.state_dir, ignore_errors=True)


# --------------------------------------------------------------------------- the tests


class DriverContract:
    """Behaviour every ComputeDriver must have.  Subclass in a test module."""

    EVENT_TIMEOUT = 20.0

    @pytest.fixture(params=["fake", "fake-limited", pytest.param("qemu", marks=pytest.mark.qemu)])
    def harness(self, request):
        if request.param == "fake":
            h: DriverHarness = FakeHarness()
        elif request.param == "fake-limited":
            h = FakeHarness(capabilities=frozenset())
        else:
            h = QemuHarness()
        try:
            yield h
        finally:
            h.close()

    @staticmethod
    def needs(harness: DriverHarness, capability: Capability) -> None:
        if not harness.has(capability):
            pytest.skip(f"{harness.name} does not declare {capability.value}")

    # ----------------------------------------------------------------- spawn

    def test_spawn_reports_running(self, harness: DriverHarness):
        d = harness.driver
        spec = harness.spec()
        with d.events(spec.instance_id) as ev:
            handle = d.spawn(spec)
            ev.wait_for(EventKind.RESUME, self.EVENT_TIMEOUT)
        assert handle.instance_id == spec.instance_id
        assert handle.pid is not None and handle.pid == harness.pid(spec.instance_id)
        assert not handle.adopted
        assert d.state(spec.instance_id) is GuestState.RUNNING
        assert spec.instance_id in d.list_instances()

    def test_spawn_twice_is_refused(self, harness: DriverHarness):
        d = harness.driver
        spec = harness.spec()
        d.spawn(spec)
        with pytest.raises(GuestAlreadyRunning):
            d.spawn(spec)
        assert d.state(spec.instance_id) is GuestState.RUNNING

    def test_invalid_specs_are_rejected(self, harness: DriverHarness):
        d = harness.driver
        for bad in (
            {"instance_id": "../etc"},
            {"vcpus": 0},
            {"memory_mb": 1},
            {"gpu_pci_addresses": ["3b:00.0"]},
            {"accel": "hvf"},
        ):
            with pytest.raises(ValueError):
                d.spawn(harness.spec(**{"instance_id": harness.new_id(), **bad}))

    def test_unknown_instance(self, harness: DriverHarness):
        d = harness.driver
        iid = str(uuid.uuid4())
        assert d.state(iid) is GuestState.MISSING
        assert d.state("not a valid id/") is GuestState.MISSING
        assert d.adopt(iid) is None
        d.destroy(iid)  # no-op
        with pytest.raises(GuestNotFound):
            d.console_log(iid)
        with pytest.raises(DriverError):
            d.pause(iid)
        with pytest.raises(DriverError):
            d.reboot(iid, hard=True)
        assert d.shutdown(iid, timeout=0) is GuestState.MISSING
        assert iid not in d.list_instances()

    def test_start_paused_then_resume(self, harness: DriverHarness):
        self.needs(harness, Capability.PAUSED_START)
        d = harness.driver
        spec = harness.spec(start_paused=True)
        d.spawn(spec)
        assert d.state(spec.instance_id) is GuestState.PAUSED
        with d.events(spec.instance_id) as ev:
            d.resume(spec.instance_id)
            ev.wait_for(EventKind.RESUME, self.EVENT_TIMEOUT)
        assert d.state(spec.instance_id) is GuestState.RUNNING

    # ----------------------------------------------------------------- lifecycle ops

    def test_pause_resume(self, harness: DriverHarness):
        d = harness.driver
        spec = harness.spec()
        d.spawn(spec)
        iid = spec.instance_id
        with d.events(iid) as ev:
            d.pause(iid)
            ev.wait_for(EventKind.STOP, self.EVENT_TIMEOUT)
            assert d.state(iid) is GuestState.PAUSED
            d.pause(iid)  # idempotent
            d.resume(iid)
            ev.wait_for(EventKind.RESUME, self.EVENT_TIMEOUT)
        assert d.state(iid) is GuestState.RUNNING

    def test_hard_reboot_emits_reset_and_keeps_process(self, harness: DriverHarness):
        d = harness.driver
        spec = harness.spec()
        d.spawn(spec)
        iid = spec.instance_id
        pid = harness.pid(iid)
        with d.events(iid) as ev:
            d.reboot(iid, hard=True)
            reset = ev.wait_for(EventKind.RESET, self.EVENT_TIMEOUT)
        assert reset.data.get("guest") is False
        assert harness.pid(iid) == pid
        assert d.state(iid) is GuestState.RUNNING

    def test_soft_reboot_ends_running(self, harness: DriverHarness):
        d = harness.driver
        spec = harness.spec()
        d.spawn(spec)
        iid = spec.instance_id
        pid = harness.pid(iid)
        with d.events(iid) as ev:
            d.reboot(iid, hard=False, timeout=2)  # ACPI or, if ignored, hard-reset fallback
            ev.wait_for(EventKind.RESET, self.EVENT_TIMEOUT)
        assert harness.pid(iid) == pid
        assert d.state(iid) is GuestState.RUNNING

    def test_hard_reboot_of_paused_guest_runs_it(self, harness: DriverHarness):
        self.needs(harness, Capability.PAUSED_START)
        d = harness.driver
        spec = harness.spec(start_paused=True)
        d.spawn(spec)
        d.reboot(spec.instance_id, hard=True)
        assert d.state(spec.instance_id) is GuestState.RUNNING

    def test_shutdown_then_respawn(self, harness: DriverHarness):
        d = harness.driver
        spec = harness.spec()
        iid = spec.instance_id
        first = d.spawn(spec)
        with d.events(iid) as ev:
            assert d.shutdown(iid, timeout=2) is GuestState.SHUTOFF
            exited = ev.wait_for(EventKind.EXITED, self.EVENT_TIMEOUT)
        assert exited.data["clean"] is True
        assert harness.pid(iid) is None
        assert d.state(iid) is GuestState.SHUTOFF
        assert d.shutdown(iid, timeout=2) is GuestState.SHUTOFF  # idempotent
        assert d.adopt(iid) is None
        assert iid in d.list_instances()
        assert b"hackboot: starting" in d.console_log(iid)  # kept after shutdown
        with pytest.raises(DriverError):
            d.pause(iid)
        second = d.spawn(spec)  # power on again
        assert second.pid != first.pid
        assert d.state(iid) is GuestState.RUNNING
        assert d.console_log(iid, 1 << 20).count(b"hackboot: starting") == 2

    def test_paused_guest_shutdown_is_immediate(self, harness: DriverHarness):
        self.needs(harness, Capability.PAUSED_START)
        d = harness.driver
        spec = harness.spec(start_paused=True)
        d.spawn(spec)
        t0 = time.monotonic()
        assert d.shutdown(spec.instance_id, timeout=30) is GuestState.SHUTOFF
        assert time.monotonic() - t0 < 15  # no 30s wait for ACPI on a paused guest

    def test_destroy_running_guest(self, harness: DriverHarness):
        d = harness.driver
        spec = harness.spec()
        iid = spec.instance_id
        d.spawn(spec)
        with d.events(iid) as ev:
            d.destroy(iid)
            exited = ev.wait_for(EventKind.EXITED, self.EVENT_TIMEOUT)
        assert exited.data["reason"] == "destroyed"
        assert d.state(iid) is GuestState.MISSING
        assert iid not in d.list_instances()
        assert harness.pid(iid) is None
        d.destroy(iid)

    # ----------------------------------------------------------------- failures & restarts

    def test_hypervisor_crash_is_reported(self, harness: DriverHarness):
        d = harness.driver
        spec = harness.spec()
        iid = spec.instance_id
        d.spawn(spec)
        with d.events(iid) as ev:
            harness.kill_hypervisor(iid)
            exited = ev.wait_for(EventKind.EXITED, self.EVENT_TIMEOUT)
        assert exited.data["clean"] is False
        assert d.state(iid) is GuestState.CRASHED
        assert d.adopt(iid) is None
        d.destroy(iid)
        d.destroy(iid)
        assert d.state(iid) is GuestState.MISSING

    def test_crashed_guest_can_be_respawned(self, harness: DriverHarness):
        d = harness.driver
        spec = harness.spec()
        iid = spec.instance_id
        d.spawn(spec)
        with d.events(iid) as ev:
            harness.kill_hypervisor(iid)
            ev.wait_for(EventKind.EXITED, self.EVENT_TIMEOUT)
        d.spawn(spec)
        assert d.state(iid) is GuestState.RUNNING

    def test_adopt_after_driver_restart(self, harness: DriverHarness):
        spec = harness.spec()
        iid = spec.instance_id
        harness.driver.spawn(spec)
        pid = harness.pid(iid)
        d = harness.restart_driver()
        handle = d.adopt(iid)
        assert handle is not None and handle.adopted
        assert handle.pid == pid
        assert d.adopt(iid) == handle  # idempotent
        assert d.state(iid) is GuestState.RUNNING
        with d.events(iid) as ev:  # the new driver receives the guest's events
            d.pause(iid)
            ev.wait_for(EventKind.STOP, self.EVENT_TIMEOUT)
            harness.kill_hypervisor(iid)
            assert ev.wait_for(EventKind.EXITED, self.EVENT_TIMEOUT).data["clean"] is False

    def test_state_attaches_to_unwatched_guest(self, harness: DriverHarness):
        spec = harness.spec()
        iid = spec.instance_id
        harness.driver.spawn(spec)
        d = harness.restart_driver()
        assert d.state(iid) is GuestState.RUNNING  # no explicit adopt needed
        with d.events(iid) as ev:
            d.shutdown(iid, timeout=0)
            ev.wait_for(EventKind.EXITED, self.EVENT_TIMEOUT)
        assert d.state(iid) is GuestState.SHUTOFF

    # ----------------------------------------------------------------- console & events

    def test_console_log_tail(self, harness: DriverHarness):
        d = harness.driver
        spec = harness.spec()
        d.spawn(spec)
        full = d.console_log(spec.instance_id)
        assert b"hackboot: starting" in full
        assert len(d.console_log(spec.instance_id, tail_bytes=10)) <= 10
        assert d.console_log(spec.instance_id, tail_bytes=0) == b""

    def test_callbacks_run_on_dispatcher_thread_and_may_reenter(self, harness: DriverHarness):
        d = harness.driver
        spec = harness.spec()
        iid = spec.instance_id
        d.spawn(spec)
        got: list[tuple[GuestEvent, GuestState, str]] = []
        done = threading.Event()

        def cb(ev: GuestEvent) -> None:
            got.append((ev, d.state(iid), threading.current_thread().name))  # re-entrant call
            if ev.kind is EventKind.STOP:
                done.set()

        sub = d.subscribe(cb, instance_id=iid)
        try:
            d.pause(iid)
            assert done.wait(self.EVENT_TIMEOUT)
        finally:
            sub.close()
        ev, state, thread = got[-1]
        assert ev.kind is EventKind.STOP and ev.instance_id == iid
        assert state is GuestState.PAUSED
        assert thread != threading.current_thread().name

    # ----------------------------------------------------------------- capabilities

    def test_capabilities_are_declared(self, harness: DriverHarness):
        caps = harness.driver.capabilities
        assert isinstance(caps, frozenset) and all(isinstance(c, Capability) for c in caps)
        if Capability.HOTPLUG_DISK in caps:
            assert Capability.BLOCK_GRAPH in caps  # disks are hot-plugged through the monitor
        assert harness.restart_driver().capabilities == caps  # a property of the driver, not of a moment

    def test_paused_start_is_refused_without_the_capability(self, harness: DriverHarness):
        if harness.has(Capability.PAUSED_START):
            pytest.skip("declared: test_start_paused_then_resume covers it")
        spec = harness.spec(start_paused=True)
        with pytest.raises(Unsupported, match=Capability.PAUSED_START.value):
            harness.driver.spawn(spec)
        assert harness.driver.state(spec.instance_id) is GuestState.MISSING  # nothing was started

    def test_gpu_passthrough(self, harness: DriverHarness):
        d = harness.driver
        if not harness.has(Capability.GPU_PASSTHROUGH):
            spec = harness.spec(gpu_pci_addresses=["0000:3b:00.0"])
            with pytest.raises(Unsupported, match=Capability.GPU_PASSTHROUGH.value):
                d.spawn(spec)
            assert d.state(spec.instance_id) is GuestState.MISSING
            return
        addresses = harness.gpu_addresses()
        if not addresses:
            pytest.skip("no GPU bound to vfio-pci on this host")
        spec = harness.spec(gpu_pci_addresses=addresses)
        d.spawn(spec)
        assert d.state(spec.instance_id) is GuestState.RUNNING

    def test_monitor_access(self, harness: DriverHarness):
        d = harness.driver
        spec = harness.spec()
        iid = spec.instance_id
        d.spawn(spec)
        if not harness.has(Capability.BLOCK_GRAPH):
            with pytest.raises(Unsupported, match=Capability.BLOCK_GRAPH.value):
                d.qmp(iid, "query-block")
            with pytest.raises(Unsupported, match=Capability.BLOCK_GRAPH.value):
                d.monitor(iid)
            return
        execute = d.monitor(iid)
        assert execute("query-status", None)["status"] == "running"
        blocks = {b["device"] or b["qdev"]: b for b in d.qmp(iid, "query-block")}
        root = [b for b in blocks.values() if (b.get("inserted") or {}).get("node-name") == "disk0"]
        assert root and root[0]["inserted"]["image"]["virtual-size"] == 64 * 1024**2, blocks
        with pytest.raises(DriverError) as err:
            d.qmp(iid, "no-such-command")
        assert not isinstance(err.value, Unsupported)
        with pytest.raises(GuestNotFound):
            d.qmp(str(uuid.uuid4()), "query-status")

    def test_live_disk_snapshot(self, harness: DriverHarness):
        d = harness.driver
        spec = harness.spec()
        iid = spec.instance_id
        d.spawn(spec)
        dest = harness.scratch / f"copy-{uuid.uuid4().hex[:8]}.qcow2"
        if not harness.has(Capability.LIVE_SNAPSHOT):
            with pytest.raises(Unsupported, match=Capability.LIVE_SNAPSHOT.value):
                d.snapshot_disk(iid, dest)
            return
        d.snapshot_disk(iid, dest, timeout=300)
        info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(dest)], check=True,
                              capture_output=True, text=True).stdout
        meta = json.loads(info)
        assert meta["format"] == "qcow2" and meta["virtual-size"] == 64 * 1024**2
        assert "backing-filename" not in meta  # standalone
        assert d.state(iid) is GuestState.RUNNING  # the guest kept running
        nodes = {n["node-name"] for n in d.qmp(iid, "query-named-block-nodes", {"flat": True})}
        assert not any(n.startswith("snap-") for n in nodes)  # its temporary nodes are gone

    def test_hotplug_disk(self, harness: DriverHarness):
        if not harness.has(Capability.HOTPLUG_DISK):
            pytest.skip(f"{harness.name} does not declare {Capability.HOTPLUG_DISK.value}")
        d = harness.driver
        spec = harness.spec(hotplug_ports=1)
        iid = spec.instance_id
        d.spawn(spec)
        extra = harness.scratch / f"extra-{uuid.uuid4().hex[:8]}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(extra), "16M"], check=True)
        # a host path: the driver opens it for the hypervisor
        d.qmp(iid, "blockdev-add", {"driver": "qcow2", "node-name": "hbtest",
                                    "file": {"driver": "file", "filename": str(extra)}})
        d.qmp(iid, "device_add", {"driver": "virtio-blk-pci", "drive": "hbtest", "id": "hbtestdisk",
                                  "bus": hotplug_port_id(0)})
        blocks = {b["qdev"]: b for b in d.qmp(iid, "query-block")}
        plugged = blocks["/machine/peripheral/hbtestdisk/virtio-backend"]["inserted"]
        assert plugged["node-name"] == "hbtest" and plugged["image"]["virtual-size"] == 16 * 1024**2
        with pytest.raises(DriverError):  # the port is taken now
            d.qmp(iid, "device_add", {"driver": "virtio-blk-pci", "drive": "hbtest", "id": "hbtestdisk2",
                                      "bus": hotplug_port_id(0)})

    @staticmethod
    def _nic() -> NicBackend:
        return UserNetNic(ssh_host_port=find_free_port())

    def test_nic_hotplug(self, harness: DriverHarness):
        d = harness.driver
        if not harness.has(Capability.HOTPLUG_NIC):
            spec = harness.spec(hotplug_ports=1)
            d.spawn(spec)
            for call in (lambda: d.attach_nic(spec.instance_id, self._nic()),
                         lambda: d.detach_nic(spec.instance_id, "hbnic0"), lambda: d.nics(spec.instance_id),
                         lambda: d.pass_fd(spec.instance_id, "tap-x", 0)):
                with pytest.raises(Unsupported, match=Capability.HOTPLUG_NIC.value):
                    call()
            return
        boot_nic = self._nic()
        spec = harness.spec(hotplug_ports=2, nics=[boot_nic])
        iid = spec.instance_id
        d.spawn(spec)
        harness.wait_booted(iid)  # the guest OS takes part in unplugs
        assert d.nics(iid) == {"nic0": boot_nic}
        first, second = self._nic(), self._nic()
        a = d.attach_nic(iid, first)
        b = d.attach_nic(iid, second)
        assert a != b and d.nics(iid) == {"nic0": boot_nic, a: first, b: second}
        with open(os.devnull, "rb") as passed:  # how another service's backend (a tap) reaches the guest
            d.pass_fd(iid, "hb-contract-fd", passed.fileno())
        with pytest.raises(DriverError) as err:  # both ports are taken
            d.attach_nic(iid, self._nic())
        assert not isinstance(err.value, Unsupported) and "port" in str(err.value)
        with pytest.raises(DriverError):  # the spec's NICs are part of the machine
            d.detach_nic(iid, "nic0")
        d.detach_nic(iid, a, timeout=60)
        assert d.nics(iid) == {"nic0": boot_nic, b: second}
        d.detach_nic(iid, a)  # idempotent
        again = d.attach_nic(iid, first)  # the freed port takes a NIC again
        assert set(d.nics(iid)) == {"nic0", b, again}
        d.shutdown(iid, timeout=0)
        with pytest.raises(DriverError):
            d.attach_nic(iid, self._nic())
        d.spawn(spec)  # a new process starts with the spec's NICs only
        assert d.nics(iid) == {"nic0": boot_nic}

    def test_hotplug_nic_needs_a_pluggable_backend(self, harness: DriverHarness):
        self.needs(harness, Capability.HOTPLUG_NIC)

        class Fixed(UserNetNic):
            def netdev_options(self) -> dict:
                return NicBackend.netdev_options(self)

        spec = harness.spec(hotplug_ports=1)
        harness.driver.spawn(spec)
        with pytest.raises(Unsupported, match="cannot be hot-plugged"):
            harness.driver.attach_nic(spec.instance_id, Fixed(ssh_host_port=find_free_port()))
        assert harness.driver.nics(spec.instance_id) == {}
