"""The host agent: registers this machine as a hypervisor host and reconciles its instances.

How it talks to the control plane: **directly to the database, through `compute.service`**.
The database holds the desired state (written by the API) and the agent's reconciler
(:class:`InstanceReconciler` on :mod:`hackboot.core.reconcile`'s shared loop) polls it (every
``poll_interval`` seconds, and at once when the API signals a change: in process, through a
datagram on this machine, through PostgreSQL NOTIFY elsewhere); it writes back what it observes.
So a second agent – another process, another state
dir, another name – joins as a second host just by pointing at the same database
(``hackboot agent --database-url … --state-dir … --name … --zone …``). There is no agent API to
secure or keep in sync; the price is that agents need database credentials, which is what
Nova's compute nodes have too (through its conductor) and fine for one operator's fleet.

What a reconcile does, per instance assigned to this host (idempotent, safe to re-run after any
crash):

* build: copy-on-write qcow2 overlay on the image, sized to the flavor (written to a temp name,
  renamed when complete; created, like every other disk operation, by an unprivileged sandboxed
  QEMU: :mod:`hackboot.compute.offline`), NoCloud seed ISO, a free SSH port on
  127.0.0.1, then ``driver.spawn``; ACTIVE only once the driver sees the guest running;
* stop / start / reboot / resize (stop, grow the disk, start) / snapshot / delete (process,
  sockets, disks, seed, ports, then the allocation and quota) – each finished with a
  compare-and-swap on the instance's ``action_seq``;
* no task: compare the driver's view with the desired state (a guest that died or powered
  itself off becomes SHUTOFF with the reason). QEMU's events (SHUTDOWN, EXITED) trigger this at
  once; a periodic check every ``check_interval`` seconds is the backstop.

On start the agent re-adopts running QEMUs (never restarting them) and destroys guests whose
instance was deleted while it was away.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt

from hackboot.compute import lifecycle, offline, service
from hackboot.compute.models import ACTIVE, BUILDING, ERROR, SHUTOFF
from hackboot.compute.qemu import backing_chain
from hackboot.compute.service import Work
from hackboot.core import reconcile
from hackboot.core.config import AccelMode, AgentDriver, get_settings
from hackboot.core.reconcile import Reconciler

log = logging.getLogger("hackboot.agent")
GiB = 1024**3
AGENT_VERSION = "1"


def _setting(name: str) -> Any:
    """Default of an agent option: the `agent_<name>` setting (HACKBOOT_AGENT_<NAME>), read when options are built."""
    return Field(default_factory=lambda: getattr(get_settings(), f"agent_{name}"))


class AgentSettings(BaseModel):
    """One agent's options: the `agent_*` settings, overridden by explicit values (`hackboot agent` flags,
    tests' agents). It reads no environment itself; the types check explicit values like the settings do."""

    model_config = ConfigDict(extra="forbid")

    name: str = _setting("name")  # default: this machine's hostname
    zone: str = _setting("zone")  # default: the cloud's default zone
    state_dir: Path | None = _setting("state_dir")  # default: <state_dir>/agent
    driver: AgentDriver = _setting("driver")
    accel: AccelMode = _setting("accel")  # default: the accel setting (else auto)
    vcpus: PositiveInt | None = _setting("vcpus")  # declared capacity instead of the measured one
    memory_mb: PositiveInt | None = _setting("memory_mb")
    disk_gb: PositiveInt | None = _setting("disk_gb")
    reserved_vcpus: NonNegativeInt = _setting("reserved_vcpus")
    reserved_memory_mb: NonNegativeInt = _setting("reserved_memory_mb")
    reserved_disk_gb: NonNegativeInt = _setting("reserved_disk_gb")
    cpu_allocation_ratio: PositiveFloat = _setting("cpu_allocation_ratio")
    ram_allocation_ratio: PositiveFloat = _setting("ram_allocation_ratio")
    disk_allocation_ratio: PositiveFloat = _setting("disk_allocation_ratio")
    gpus: str = _setting("gpus")
    poll_interval: PositiveFloat = _setting("poll_interval")
    heartbeat_interval: PositiveFloat = _setting("heartbeat_interval")
    check_interval: PositiveFloat = _setting("check_interval")
    shutdown_timeout: PositiveFloat = _setting("shutdown_timeout")
    workers: PositiveInt = _setting("workers")
    extensions: str = _setting("extensions")  # modules whose attach(agent) is called


def parse_gpus(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        model, _, addrs = part.partition("=")
        out[f"GPU:{model.strip()}"] = [a.strip() for a in addrs.split(",") if a.strip()]
    return out


def measure_host(state_dir: Path) -> dict[str, int]:
    """vCPUs, memory and free disk of this machine (before any reserve)."""
    mem_mb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_mb = int(line.split()[1]) // 1024
                break
    except OSError:
        pass
    return {"VCPU": os.cpu_count() or 1, "MEMORY_MB": mem_mb,
            "DISK_GB": shutil.disk_usage(state_dir).free // GiB}


def mac_for(instance_id: str) -> str:
    digest = hashlib.sha256(instance_id.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


class BuildError(Exception):
    """A step of building/starting a guest failed; the message is shown to the user."""


def _offline(fn: Any, what: str, *args: Any) -> None:
    """Run an operation of :mod:`hackboot.compute.offline`, as a BuildError for the user on failure."""
    try:
        fn(*args)
    except (offline.BlockJobError, OSError) as exc:
        raise BuildError(f"{what}: {exc}") from None


class RetryLater(Exception):
    """Work that failed in a way worth retrying (a delete): the reconciler backs off and tries again."""


@dataclass
class SpawnHook:
    """Called around every ``driver.spawn``: ``prepare(spec) -> spec`` before, ``after(driver, spec)`` after."""

    prepare: Callable[[Any], Any] | None = None
    after: Callable[[Any, Any], None] | None = None


class InstanceReconciler(Reconciler):
    """The instances of one host: pending ones (a task, or not built) → :meth:`Agent.reconcile`."""

    kind = "instance"
    id_prefix = "i-"

    def __init__(self, agent: Agent) -> None:
        cfg = agent.cfg
        super().__init__(stop=agent.stopping, workers=cfg.workers, poll_interval=cfg.poll_interval,
                         resync_interval=cfg.check_interval, base_backoff=5.0, max_backoff=60.0,
                         name=f"agent {agent.name}")
        self.agent = agent

    def list_ids(self) -> Iterable[str]:
        return service.pending(self.agent.host_id) if self.agent.host_id else []

    def reconcile(self, object_id: str) -> None:
        self.agent.reconcile(object_id)

    def report_failure(self, object_id: str, reason: str, failures: int) -> None:
        """A task retried with backoff (a delete) keeps failing: the user sees why on the instance."""
        super().report_failure(object_id, reason, failures)
        service.note_retrying(object_id, f"Retrying after {failures} failed attempts: {reason}")

    def resync(self) -> None:
        self.agent.check_all()


class Agent:
    def __init__(self, cfg: AgentSettings, driver: Any = None, stop_event: threading.Event | None = None) -> None:
        from hackboot.core.config import get_settings

        settings = get_settings()
        self.cfg = cfg
        self.name = cfg.name or socket.gethostname()
        self.zone = cfg.zone or settings.zone
        self.state_dir = Path(cfg.state_dir or settings.state_dir / "agent").absolute()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.disks_dir = self.state_dir / "disks"
        self.disks_dir.mkdir(exist_ok=True, mode=0o700)
        self._driver = driver
        self.host_id: str | None = None
        self.accel = "tcg"
        self.accel_reason = ""
        self._stop = stop_event or threading.Event()
        self._threads: list[threading.Thread] = []
        self._subscription: Any = None
        self._spawn_hooks: list[SpawnHook] = []
        self._start_hooks: list[Callable[[Agent], object]] = []
        self._vpc_nics = False
        self.reconciler = InstanceReconciler(self)
        self.ready = threading.Event()
        self._load_extensions()

    # ------------------------------------------------------------------------------ hooks (for other services)

    @property
    def stopping(self) -> threading.Event:
        """Set when the agent stops: other services' reconcilers on this host stop with it."""
        return self._stop

    def register_spawn_hook(self, prepare: Callable[[Any], Any] | None = None,
                            after: Callable[[Any, Any], None] | None = None) -> None:
        """Run `prepare(spec) -> spec` before every guest spawn and `after(driver, spec)` right after it."""
        self._spawn_hooks.append(SpawnHook(prepare, after))

    def enable_vpc_nics(self) -> None:
        """An extension plugs the instances' VPC interfaces into their guests: seeds then carry a cloud-init
        network config for them (see :meth:`network_config`)."""
        self._vpc_nics = True

    def register_start_hook(self, hook: Callable[[Agent], object]) -> None:
        """Run `hook(agent)` once the host is registered and its guests adopted (start a reconciler here)."""
        self._start_hooks.append(hook)

    def _load_extensions(self) -> None:
        for module in filter(None, (m.strip() for m in self.cfg.extensions.split(","))):
            try:
                importlib.import_module(module).attach(self)
            except Exception:
                log.exception("agent %s: cannot load the extension %s", self.name, module)

    # ------------------------------------------------------------------------------ setup

    @property
    def driver(self) -> Any:
        if self._driver is None:
            if self.cfg.driver == "fake":
                from hackboot.compute.fake_driver import FakeDriver

                self._driver = FakeDriver()
            else:
                from hackboot.compute.qemu import QemuDriver

                self._driver = QemuDriver(self.state_dir)
        return self._driver

    def probe(self) -> None:
        if self.cfg.driver == "fake":
            self.accel, self.accel_reason = "tcg", "fake driver"
            return
        try:
            from hackboot.compute.accel import probe_accelerator

            info = probe_accelerator(self.state_dir, force=self.cfg.accel or None)
            self.accel, self.accel_reason = info.accel, info.reason
        except Exception as exc:
            self.accel, self.accel_reason = "tcg", f"accelerator probe failed: {exc}"
        log.info("agent %s: accelerator %s (%s)", self.name, self.accel, self.accel_reason)

    def facts(self) -> dict[str, Any]:
        qemu_version = ""
        try:
            out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=10)
            qemu_version = out.stdout.splitlines()[0] if out.stdout else ""
        except (OSError, subprocess.TimeoutExpired):
            pass
        return {"accel": self.accel, "accel_reason": self.accel_reason, "state_dir": str(self.state_dir),
                "hostname": socket.gethostname(), "kernel": platform.release(), "qemu": qemu_version,
                "driver": self.cfg.driver, "agent_version": AGENT_VERSION, "agent_pid": os.getpid()}

    def register(self) -> str:
        measured = measure_host(self.state_dir)
        capacity = {"VCPU": self.cfg.vcpus or measured["VCPU"],
                    "MEMORY_MB": self.cfg.memory_mb or measured["MEMORY_MB"],
                    "DISK_GB": self.cfg.disk_gb or measured["DISK_GB"]}
        reserved = {"VCPU": self.cfg.reserved_vcpus, "MEMORY_MB": self.cfg.reserved_memory_mb,
                    "DISK_GB": self.cfg.reserved_disk_gb}
        reserved = {rc: min(v, capacity[rc]) for rc, v in reserved.items()}
        ratios = {"VCPU": self.cfg.cpu_allocation_ratio, "MEMORY_MB": self.cfg.ram_allocation_ratio,
                  "DISK_GB": self.cfg.disk_allocation_ratio}
        devices = parse_gpus(self.cfg.gpus)
        for rc, addrs in devices.items():
            capacity[rc] = len(addrs)
            ratios[rc] = 1.0
        facts = self.facts() | {"measured": measured}
        self.host_id = service.register_host(self.name, self.zone, capacity=capacity, reserved=reserved,
                                             ratios=ratios, devices=devices, facts=facts)
        self._facts = facts
        log.info("agent %s registered as %s in %s: %s", self.name, self.host_id, self.zone, capacity)
        return self.host_id

    def start(self) -> None:
        """Probe, register, adopt, then run the loops in daemon threads (returns at once)."""
        t = threading.Thread(target=self._boot, name="hb-agent-boot", daemon=True)
        t.start()
        self._threads.append(t)

    def _boot(self) -> None:
        # before registering: no change is missed once the host exists
        reconcile.notifier.listen_socket(self.name, self._stop)
        self.probe()
        delay = 1.0
        while not self._stop.is_set():
            try:
                self.register()
                break
            except Exception as exc:
                log.warning("agent %s: registration failed (%s); retrying in %.0fs", self.name, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
        if self._stop.is_set():
            return
        self.reconciler.scope = self.host_id
        self._subscription = self.driver.subscribe(self._on_event)
        self.adopt_all()
        for hook in self._start_hooks:
            try:
                hook(self)
            except Exception:
                log.exception("agent %s: a start hook failed", self.name)
        self.reconciler.start()
        t = threading.Thread(target=self._heartbeat_loop, name="hb-agent-heartbeat", daemon=True)
        t.start()
        self._threads.append(t)
        self.ready.set()

    def run_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        self.reconciler.stop(wait=True)
        if self._subscription is not None:
            self._subscription.close()
        if self._driver is not None:
            self._driver.close()  # guests keep running; a later agent adopts them

    # ------------------------------------------------------------------------------ loops

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.cfg.heartbeat_interval):
            try:
                assert self.host_id is not None
                service.heartbeat(self.host_id)
            except Exception:
                log.exception("agent %s: heartbeat failed", self.name)

    def _on_event(self, event: Any) -> None:
        kind = str(getattr(event.kind, "value", event.kind))
        if kind in ("EXITED", "SHUTDOWN", "GUEST_PANICKED", "DISCONNECTED"):
            log.info("agent %s: %s %s %s", self.name, event.instance_id, kind, event.data)
            self.reconciler.submit(event.instance_id, self._sync_one, event.instance_id)

    # ------------------------------------------------------------------------------ dispatch

    def reconcile(self, instance_id: str) -> None:
        """One pending instance (called by the reconciler, never twice at once for one instance)."""
        assert self.host_id is not None
        for w in service.assigned(self.host_id, ids=[instance_id]):
            if w.task_state is None and w.status != BUILDING:
                continue
            self._handle(w)

    def reconcile_once(self) -> None:
        """One pass of the reconciler over every pending instance (tests, tools)."""
        self.reconciler.run_once()

    def check_all(self) -> None:
        """Backstop: observed vs desired for every idle instance, and orphans."""
        assert self.host_id is not None
        works = service.assigned(self.host_id, full=False)
        assigned_ids = {w.id for w in works}
        for w in works:
            if w.task_state is None:
                self.reconciler.submit(w.id, self.sync, w)
        self.cleanup_orphans(assigned_ids)

    def adopt_all(self) -> None:
        assert self.host_id is not None
        works = service.assigned(self.host_id, full=False)
        for w in works:
            try:
                handle = self.driver.adopt(w.id)
                if handle is not None:
                    log.info("agent %s: re-adopted %s (pid %s)", self.name, w.id, handle.pid)
            except Exception as exc:
                log.warning("agent %s: cannot adopt %s: %s", self.name, w.id, exc)
        self.cleanup_orphans({w.id for w in works})

    def cleanup_orphans(self, assigned_ids: set[str]) -> None:
        local = set(self.driver.list_instances())
        local |= {p.name for p in self.disks_dir.iterdir() if p.is_dir()}
        candidates = sorted(local - assigned_ids)
        if not candidates:
            return
        known = service.known_instance_ids(candidates)
        for iid in candidates:
            status, host_id = known.get(iid, ("MISSING", None))
            if status == "DELETED" or status == "MISSING" or host_id != self.host_id:
                if self.reconciler.is_busy(iid):
                    continue
                log.info("agent %s: removing orphan guest %s (%s)", self.name, iid, status)
                self._destroy_local(iid)

    # ------------------------------------------------------------------------------ handlers

    def handle(self, w: Work) -> None:
        """Do the task of `w` (a failed delete is left for the reconciler to retry)."""
        with contextlib.suppress(RetryLater):
            self._handle(w)

    def _handle(self, w: Work) -> None:
        task = w.task_state
        try:
            if task == lifecycle.DELETING:
                self.delete(w)
            elif task == lifecycle.SPAWNING or (task is None and w.status == BUILDING):
                self.build(w)
            elif task == lifecycle.POWERING_OFF:
                self.power_off(w)
            elif task == lifecycle.POWERING_ON:
                self.power_on(w)
            elif task in (lifecycle.REBOOTING_SOFT, lifecycle.REBOOTING_HARD):
                self.reboot(w)
            elif task == lifecycle.RESIZE:
                self.resize(w)
            elif task == lifecycle.SNAPSHOTTING:
                self.snapshot(w)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, BuildError) else f"{type(exc).__name__}: {exc}"
            log.warning("agent %s: %s of %s failed: %s", self.name, task, w.id, reason)
            if task == lifecycle.DELETING:  # retried with backoff; the instance stays DELETING
                raise RetryLater(reason) from None
            power = self._state(w.id)
            service.finish_task(w.id, w.action_seq, status=ERROR, power_state=power, reason=reason,
                                ssh_port=self._port_if_running(w, power))

    # paths -----------------------------------------------------------------------------------------

    def disk_dir(self, iid: str) -> Path:
        return self.disks_dir / iid

    def disk_path(self, iid: str) -> Path:
        return self.disk_dir(iid) / "disk.qcow2"

    def seed_path(self, iid: str) -> Path:
        return self.disk_dir(iid) / "seed.iso"

    # steps -------------------------------------------------------------------------------------------

    def ensure_disk(self, w: Work) -> Path:
        """The instance's copy-on-write overlay on its image, sized to the flavor (idempotent)."""
        disk = self.disk_path(w.id)
        if disk.exists():
            return disk
        if w.image is None:
            raise BuildError(f"Image unavailable: {w.image_error}")
        if not w.image.disk_path.is_file():
            raise BuildError(f"Image file of {w.image.name} is missing on host {self.name}: {w.image.disk_path}")
        try:
            self.disk_dir(w.id).mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise BuildError(f"Cannot create the instance directory on host {self.name}: {exc}") from None
        size = max(w.disk_gb * GiB, int(w.image.virtual_size or 0))
        tmp = disk.with_name(".disk.qcow2.tmp")
        tmp.unlink(missing_ok=True)
        try:
            # the image is checked and the overlay written by an unprivileged helper, never parsed as root
            _offline(offline.create_overlay, f"Cannot create the instance disk on host {self.name}",
                     tmp, w.image.disk_path.resolve(), w.image.disk_format, size)
            os.replace(tmp, disk)
        finally:
            tmp.unlink(missing_ok=True)
        return disk

    def write_seed(self, w: Work) -> Path:
        from hackboot.compute import cloudinit

        try:
            return cloudinit.build_seed_iso(self.seed_path(w.id), instance_id=w.id, hostname=w.name,
                                            ssh_public_keys=w.public_keys, user_data=w.user_data,
                                            network_config=self.network_config(w))
        except (OSError, RuntimeError, ValueError) as exc:
            raise BuildError(f"Cannot write the cloud-init seed on host {self.name}: {exc}") from None

    def network_config(self, w: Work) -> str | None:
        """cloud-init network config (v2) when the instance has VPC interfaces: each by its MAC with DHCP, the
        primary one's router as the default route; the management NIC (user-mode, SSH forward only) with
        DHCP but neither its routes nor its DNS. Images without cloud-init (tiny) order NICs instead."""
        import yaml

        if not self._vpc_nics:  # no extension plugs VPC NICs here: the guest has its user-mode NIC only
            return None
        nics = service.guest_interfaces(w.id)
        if not nics:
            return None
        ethernets: dict[str, Any] = {}
        for i, nic in enumerate(nics):
            ethernets[f"vpc{i}"] = {"match": {"macaddress": nic["mac"]}, "dhcp4": True,
                                    **({} if i == 0 else {"dhcp4-overrides": {"use-routes": False}})}
        ethernets["mgmt"] = {"match": {"macaddress": mac_for(w.id)}, "dhcp4": True,
                             "dhcp4-overrides": {"use-routes": False, "use-dns": False}}
        return str(yaml.safe_dump({"version": 2, "ethernets": ethernets}, sort_keys=False))

    def guest_spec(self, w: Work, port: int) -> Any:
        from hackboot.compute.driver import GuestSpec
        from hackboot.compute.nic import UserNetNic

        image = w.image
        return GuestSpec(
            instance_id=w.id, name=w.name, vcpus=w.vcpus, memory_mb=w.memory_mb, disk_path=self.disk_path(w.id),
            disk_format="qcow2", kernel=image.kernel if image else None,
            initrd=image.initrd if image and image.kernel else None,
            cmdline=image.cmdline if image and image.kernel else None, seed_iso=self.seed_path(w.id),
            nics=[UserNetNic(ssh_host_port=port, mac=mac_for(w.id))], gpu_pci_addresses=list(w.gpu_pci_addresses),
            accel=self.accel)  # type: ignore[arg-type]

    def _running_port(self, w: Work) -> int | None:
        """The SSH port of a guest that is already running (adopted after a crash)."""
        spec_file = self.state_dir / "instances" / w.id / "spec.json"
        try:
            spec = json.loads(spec_file.read_text())
            for nic in spec.get("nics", []):
                if nic.get("ssh_host_port"):
                    return int(nic["ssh_host_port"])
        except (OSError, ValueError):
            pass
        return w.ssh_port

    def _port_if_running(self, w: Work, power: str) -> int | None:
        return self._running_port(w) if power in ("running", "paused") else None

    def _state(self, iid: str) -> str:
        try:
            return str(self.driver.state(iid).value)
        except Exception:
            return "missing"

    def spawn(self, w: Work) -> int | None:
        """Start the guest with a fresh SSH port on 127.0.0.1; returns the port."""
        from hackboot.compute.driver import GuestAlreadyRunning, SpawnError
        from hackboot.compute.nic import find_free_port

        if w.image is None:
            raise BuildError(f"Image unavailable: {w.image_error}")
        last: Exception | None = None
        for _attempt in range(3):
            port = find_free_port()
            try:
                spec = self.guest_spec(w, port)
                for hook in self._spawn_hooks:  # e.g. volumes: hot-plug ports, attached volumes
                    if hook.prepare is not None:
                        spec = hook.prepare(spec)
                self.driver.spawn(spec)
                for hook in self._spawn_hooks:
                    if hook.after is not None:
                        hook.after(self.driver, spec)
                return port
            except GuestAlreadyRunning:
                self.driver.adopt(w.id)
                return self._running_port(w)
            except SpawnError as exc:
                last = exc
                if "hostfwd" in str(exc) or "host forwarding" in str(exc) or "Address already in use" in str(exc):
                    continue  # someone took the port between our check and QEMU's bind
                raise BuildError(f"QEMU failed to start on host {self.name}: {exc}") from None
        raise BuildError(f"QEMU failed to start on host {self.name}: {last}")

    def _await_running(self, iid: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        state = self._state(iid)
        while state != "running" and time.monotonic() < deadline:
            if state in ("shutoff", "crashed", "missing"):
                break
            time.sleep(0.1)
            state = self._state(iid)
        return state

    def _activate(self, w: Work, port: int | None, marks: dict[str, float], event: str | None = None) -> None:
        state = self._await_running(w.id)
        marks["running"] = time.time()
        if state == "running":
            service.finish_task(w.id, w.action_seq, status=ACTIVE, power_state=state, desired_power="on",
                                ssh_port=port, accel=self.accel, timings=marks, launched=True, event=event)
        else:
            service.finish_task(w.id, w.action_seq, status=ERROR, power_state=state, ssh_port=None,
                                reason=f"The guest did not keep running after start (driver sees {state})",
                                timings=marks)

    def build(self, w: Work) -> None:
        marks = {"picked": time.time()}
        self.ensure_disk(w)
        marks["disk_ready"] = time.time()
        self.write_seed(w)
        marks["seed_ready"] = time.time()
        port = self.spawn(w)
        marks["qemu_started"] = time.time()
        self._activate(w, port, marks)

    def power_off(self, w: Work) -> None:
        state = self._state(w.id)
        if state in ("running", "paused"):
            self.driver.shutdown(w.id, timeout=self.cfg.shutdown_timeout)
            state = self._state(w.id)
        if state in ("running", "paused"):
            raise BuildError(f"The guest is still {state} after the shutdown request")
        service.finish_task(w.id, w.action_seq, status=SHUTOFF, power_state=state, desired_power="off",
                            ssh_port=None)

    def power_on(self, w: Work) -> None:
        marks = {"picked": time.time()}
        if self._state(w.id) in ("running", "paused"):
            self._activate(w, self._running_port(w), marks)
            return
        if not self.disk_path(w.id).exists():
            raise BuildError(f"The instance disk is missing on host {self.name}: {self.disk_path(w.id)}")
        self.write_seed(w)
        port = self.spawn(w)
        marks["qemu_started"] = time.time()
        self._activate(w, port, marks)

    def reboot(self, w: Work) -> None:
        hard = w.task_state == lifecycle.REBOOTING_HARD
        state = self._state(w.id)
        if state in ("running", "paused"):
            self.driver.reboot(w.id, hard=hard, timeout=self.cfg.shutdown_timeout)
            self._activate(w, self._running_port(w), {"rebooted": time.time()})
        else:
            self.power_on(w)

    def resize(self, w: Work) -> None:
        if self._state(w.id) in ("running", "paused"):
            self.driver.shutdown(w.id, timeout=self.cfg.shutdown_timeout)
        disk = self.ensure_disk(w)
        _offline(offline.grow, f"Cannot grow the instance disk on host {self.name}", disk, w.disk_gb * GiB)
        if w.previous_status == SHUTOFF:
            service.finish_task(w.id, w.action_seq, status=SHUTOFF, power_state=self._state(w.id),
                                desired_power="off", ssh_port=None, event="instance.resized")
            return
        self.write_seed(w)
        port = self.spawn(w)
        self._activate(w, port, {"resized": time.time()}, event="instance.resized")

    def snapshot(self, w: Work) -> None:
        """Flatten the instance's disk into a new image (the images service validates and stores it).

        A running guest is snapshotted live by a driver with the ``live-snapshot`` capability
        (:meth:`ComputeDriver.snapshot_disk`: the overlay and its backing image as the guest sees
        them; crash-consistent, like pulling the plug, as there is no guest agent to freeze file
        systems). Nothing else may touch a running guest's disk, so if the live path is not
        available the guest is stopped, its disk flattened by an unprivileged block helper
        (:mod:`hackboot.compute.offline`) and started again (a cold snapshot).
        """
        from hackboot.compute import imagesource
        from hackboot.compute.driver import Capability

        image_id = w.snapshot_image_id
        running = self._state(w.id) in ("running", "paused")
        out = self.disk_dir(w.id) / f".snapshot-{image_id}.qcow2"
        out.unlink(missing_ok=True)
        restart = False
        try:
            if running:
                try:
                    if Capability.LIVE_SNAPSHOT not in self.driver.capabilities:
                        raise BuildError("the hypervisor driver cannot copy a running guest's disk")
                    self.driver.snapshot_disk(w.id, out)
                except Exception as exc:
                    log.warning("agent %s: live snapshot of %s failed (%s); taking it cold", self.name, w.id, exc)
                    out.unlink(missing_ok=True)
                    self.driver.shutdown(w.id, timeout=self.cfg.shutdown_timeout)
                    restart = True
            if not running or restart:
                disk = self.disk_path(w.id)
                try:
                    chain = backing_chain(disk, "qcow2")
                except ValueError as exc:
                    raise BuildError(f"Cannot save the snapshot on host {self.name}: {exc}") from None
                _offline(offline.flatten, f"Cannot save the snapshot on host {self.name}", chain, out, 3600)
            if image_id:
                imagesource.finish_snapshot(image_id, out)
        except Exception as exc:
            if image_id:
                imagesource.fail_snapshot(image_id, str(exc))
            if not restart:
                raise
        finally:
            out.unlink(missing_ok=True)
        if restart:
            port = self.spawn(w)
            self._activate(w, port, {}, event="instance.snapshotted")
        else:
            power = self._state(w.id)
            service.finish_snapshot_task(w.id, w.action_seq, status=ACTIVE if running else SHUTOFF, power_state=power,
                                         ssh_port=self._port_if_running(w, power) if running else None)

    def _destroy_local(self, iid: str) -> None:
        self.driver.destroy(iid)
        shutil.rmtree(self.disk_dir(iid), ignore_errors=True)

    def delete(self, w: Work) -> None:
        self._destroy_local(w.id)
        if self.disk_dir(w.id).exists():
            raise BuildError(f"Could not remove {self.disk_dir(w.id)}")
        service.finish_delete(w.id, w.action_seq)

    # observed state (no task) ---------------------------------------------------------------------------

    def _sync_one(self, iid: str) -> None:
        assert self.host_id is not None
        for w in service.assigned(self.host_id, ids=[iid], full=False):
            if w.task_state is None:
                self.sync(w)

    def sync(self, w: Work) -> None:
        state = self._state(w.id)
        if w.status == ACTIVE:
            if state == "running":
                if w.power_state != state:
                    service.observed(w.id, w.action_seq, power_state=state)
            elif state == "paused" and w.desired_power == "on":
                try:
                    self.driver.resume(w.id)
                except Exception as exc:
                    log.warning("agent %s: cannot resume %s: %s", self.name, w.id, exc)
            elif state in ("shutoff", "crashed", "missing"):
                reason = {"shutoff": "The guest powered itself off",
                          "crashed": "The QEMU process of the guest exited unexpectedly (killed or crashed)",
                          "missing": f"The guest is gone from host {self.name}"}[state]
                service.observed(w.id, w.action_seq, power_state=state, status=SHUTOFF, reason=reason,
                                 desired_power="off", ssh_port=None)
        elif w.status in (SHUTOFF, ERROR):
            if state in ("running", "paused") and w.desired_power == "off" and w.status == SHUTOFF:
                self.driver.shutdown(w.id, timeout=self.cfg.shutdown_timeout)
                state = self._state(w.id)
            if state != w.power_state:
                service.observed(w.id, w.action_seq, power_state=state)


# ---------------------------------------------------------------------------------------------- entry points

_local: Agent | None = None


def start_local_agent(workers: Any) -> Agent:
    """The agent `hackboot serve` runs in-process on a one-machine cloud (HACKBOOT_AGENT_* options)."""
    global _local
    cfg = AgentSettings()
    agent = Agent(cfg, stop_event=workers.stopping if workers is not None else None)
    agent.start()
    _local = agent
    return agent


def local_agent() -> Agent | None:
    return _local
