"""The hypervisor driver contract.

A *driver* turns a :class:`GuestSpec` into a running virtual machine and
manages its lifecycle afterwards.  It is deliberately ignorant of HTTP, the
database, tenants, quotas and scheduling: the compute agent owns all of that and
talks to the driver through the small, synchronous API defined by
:class:`ComputeDriver` (the same role Nova's ``nova.virt.driver.ComputeDriver``
plays for ``nova-compute``).

Two implementations exist:

* :class:`hackboot.compute.qemu.QemuDriver` -- real guests, one detached QEMU
  process per instance (unprivileged, seccomp-sandboxed), controlled over QMP.
* :class:`hackboot.compute.fake_driver.FakeDriver` -- an in-memory simulation with
  the same observable behaviour, for unit tests of the agent and scheduler.

Both are checked by the same contract test-suite
(``tests/integration/driver_contract.py``).

Threading model
---------------
Every public method is *synchronous* and thread-safe; operations on the same
instance are serialised by the driver, operations on different instances may run
concurrently from different agent threads.  Lifecycle events are delivered
either to callbacks (:meth:`ComputeDriver.subscribe`, run on a dedicated
dispatcher thread, so a callback may call back into the driver) or to blocking
iterators (:meth:`ComputeDriver.events`).

Capabilities
------------
Not every hypervisor can do everything.  A driver declares what it can do in
:attr:`ComputeDriver.capabilities` (a frozen set of :class:`Capability`), and
callers test ``Capability.X in driver.capabilities`` instead of probing for
methods.  Every optional method of the contract exists on every driver; one
whose capability is not declared raises :class:`Unsupported` (a
:class:`DriverError`) with a message naming the capability.  The contract suite
checks both halves: what is declared works, what is not is refused clearly.

Instance identity and persistence
---------------------------------
Guests are keyed by ``instance_id`` (``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``, normally
a UUID).  Guests must outlive the agent process: after an agent restart, a fresh
driver object re-discovers them with :meth:`ComputeDriver.adopt` (never by
restarting them).  Whatever the driver needs for that is kept in a per-instance
*run dir*; the driver never needs a database.
"""

from __future__ import annotations

import abc
import enum
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

if TYPE_CHECKING:  # pragma: no cover
    from hackboot.compute.nic import NicBackend

log = logging.getLogger(__name__)

Accel = Literal["kvm", "tcg"]

INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# PCIe root ports of a q35 guest's root bus that devices can be hot-plugged into (its root bus
# itself is not hot-pluggable). The slots of pcie.0 bound the number.
MAX_HOTPLUG_PORTS = 24
PCI_ADDRESS_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


# --------------------------------------------------------------------------- errors


class DriverError(Exception):
    """Base class of every error raised by a driver."""


class Unsupported(DriverError):
    """The driver does not have the capability the operation or spec needs (see :class:`Capability`)."""

    def __init__(self, driver: str, capability: Capability, what: str = "") -> None:
        detail = f" ({what})" if what else ""
        super().__init__(f"{driver} does not support {capability.value}{detail}")
        self.capability = capability


class GuestNotFound(DriverError):
    """The instance is unknown to the driver (no run dir / never spawned or destroyed)."""


class GuestAlreadyRunning(DriverError):
    """spawn() was called for an instance whose hypervisor process is still alive."""


class GuestNotRunning(DriverError):
    """The operation needs a live guest but the hypervisor process is gone."""


class SpawnError(DriverError):
    """The hypervisor failed to start or failed a post-start check.

    ``detail`` carries the hypervisor's own error output when available.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(f"{message}: {detail.strip()}" if detail.strip() else message)
        self.detail = detail


# --------------------------------------------------------------------------- value types


class Capability(enum.StrEnum):
    """What a driver can do beyond the core lifecycle (spawn, adopt, state, pause, shutdown, ...).

    ``PAUSED_START``     ``GuestSpec.start_paused``: spawn leaves the vCPUs stopped.
    ``GPU_PASSTHROUGH``  ``GuestSpec.gpu_pci_addresses``: host PCI functions given to the guest.
    ``BLOCK_GRAPH``      monitor access (:meth:`ComputeDriver.qmp` / :meth:`ComputeDriver.monitor`):
                         QMP commands on the guest's hypervisor, block nodes and block jobs included.
                         ``blockdev-add`` file nodes name host paths; the driver opens them.
    ``HOTPLUG_DISK``     disks can be added to a live guest through the monitor (``blockdev-add`` then
                         ``device_add`` on one of the spec's hot-plug ports, :func:`hotplug_port_id`).
                         Implies ``BLOCK_GRAPH``.
    ``HOTPLUG_NIC``      :meth:`ComputeDriver.attach_nic` / :meth:`ComputeDriver.detach_nic`.
    ``LIVE_SNAPSHOT``    :meth:`ComputeDriver.snapshot_disk`: copy a running guest's root disk.
    """

    PAUSED_START = "paused-start"
    GPU_PASSTHROUGH = "gpu-passthrough"
    BLOCK_GRAPH = "block-graph"
    HOTPLUG_DISK = "hotplug-disk"
    HOTPLUG_NIC = "hotplug-nic"
    LIVE_SNAPSHOT = "live-snapshot"


# A guest's monitor as a plain function: ``execute(command, arguments) -> the command's return value``.
Execute = Callable[[str, dict[str, Any] | None], Any]


def hotplug_port_id(index: int) -> str:
    """The device id of the ``index``-th hot-plug port of a guest (``GuestSpec.hotplug_ports``).

    A ``device_add`` with ``"bus": hotplug_port_id(i)`` plugs a device into it. (The prefix is
    historical: volumes were the first to be hot-plugged, and running guests keep their names.)
    """
    return f"hbvp{index}"


class GuestState(enum.StrEnum):
    """Power state of a guest as seen by the driver.

    ``RUNNING``  the hypervisor process is alive and vCPUs run.
    ``PAUSED``   the process is alive but vCPUs are stopped (user pause, or
                 ``prelaunch``/``io-error``/migration states).
    ``SHUTOFF``  no process, and the last exit was deliberate: the guest powered
                 off, or the driver shut it down / killed it on request.  Also
                 returned while a powered-off guest's process is being reaped.
    ``CRASHED``  no process and no record of a deliberate exit (QEMU was killed
                 by someone else, crashed, or the host rebooted), or the guest
                 kernel panicked (process kept paused for inspection).
    ``MISSING``  the driver knows nothing about this instance.
    """

    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    MISSING = "missing"


class EventKind(enum.StrEnum):
    """Lifecycle events.

    All but the last two are QEMU's QMP event names, passed through unchanged
    (``data`` holds the QMP event's ``data`` member, e.g. ``{"guest": true,
    "reason": "guest-shutdown"}`` for ``SHUTDOWN``).

    ``DISCONNECTED`` is synthetic: the monitor connection was lost while the
    process still seems alive (the driver will try to reconnect).

    ``EXITED`` is synthetic and always the last event of a guest's life: the
    hypervisor process is gone.  ``data`` is ``{"clean": bool, "reason": str,
    "pid": int}``; ``clean`` is False when nobody asked for the exit (kill -9,
    hypervisor crash), which the agent should treat as a crash.  It is emitted
    exactly once per process lifetime that the driver was watching, so an agent
    can hang its cleanup on it (as Incus does with its QMP monitor).
    """

    RESUME = "RESUME"
    STOP = "STOP"
    SHUTDOWN = "SHUTDOWN"
    POWERDOWN = "POWERDOWN"
    RESET = "RESET"
    GUEST_PANICKED = "GUEST_PANICKED"
    SUSPEND = "SUSPEND"
    WAKEUP = "WAKEUP"
    DISCONNECTED = "DISCONNECTED"
    EXITED = "EXITED"


@dataclass(frozen=True)
class GuestEvent:
    instance_id: str
    kind: EventKind
    timestamp: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class GuestSpec:
    """Everything needed to start one guest.

    The caller prepares all files: ``disk_path`` (normally a qcow2 overlay on top
    of the image), the optional NoCloud ``seed_iso`` (volume label ``cidata``) and,
    for direct kernel boot, ``kernel``/``initrd``.  The driver never deletes them.

    Fields:
      instance_id   stable id, also the run-dir name (see ``INSTANCE_ID_RE``).
                    If it is a UUID it becomes the guest's SMBIOS UUID, otherwise
                    a UUIDv5 derived from it is used.
      name          human name, shown in ``-name guest=``.
      vcpus, memory_mb
      disk_path     root disk; ``None`` only for diskless (kernel+initramfs) guests.
      disk_format   ``qcow2`` (default) or ``raw``.
      disk_cache    ``auto`` (driver checks that O_DIRECT works on the disk's file
                    system and then uses ``cache=none,aio=native``, else
                    ``cache=writeback,aio=threads``), ``none`` or ``writeback``.
      kernel, initrd, cmdline
                    direct kernel boot when ``kernel`` is set, else BIOS boot from
                    ``disk_path``.
      seed_iso      NoCloud seed, attached as a read-only virtio disk.
      nics          NIC backends (see :mod:`hackboot.compute.nic`), in order.
      gpu_pci_addresses
                    host PCI functions passed through with VFIO
                    (``"0000:3b:00.0"``); binding them to ``vfio-pci`` is the
                    caller's job.
      accel         ``kvm`` or ``tcg`` -- use :func:`hackboot.compute.accel.probe_accelerator`.
      machine       ``q35`` (default) or ``pc``.
      start_paused  leave the vCPUs stopped after spawn (state ``PAUSED``).
      hotplug_ports number of empty PCIe root ports (``q35`` only) that devices can be
                    hot-plugged into later: disks through the monitor, NICs with
                    :meth:`ComputeDriver.attach_nic`.  Named :func:`hotplug_port_id`.
                    Callers add the ports they need (``spec.hotplug_ports += n``);
                    fixed users (volumes) take them from index 0 up, NICs from the top
                    down, so both share them until the guest is full.
      tcg_tb_size_mb
                    TCG translation-cache size; QEMU's default (1 GiB) is far too
                    big for small guests (128 MiB by default, None = QEMU default).
                    Ignored with KVM.
      extra_args    appended verbatim to the QEMU command line (trusted callers
                    and tests only).
    """

    instance_id: str
    name: str
    vcpus: int
    memory_mb: int
    disk_path: Path | None = None
    disk_format: str = "qcow2"
    disk_cache: Literal["auto", "none", "writeback"] = "auto"
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    seed_iso: Path | None = None
    nics: list[NicBackend] = field(default_factory=list)
    gpu_pci_addresses: list[str] = field(default_factory=list)
    accel: Accel = "tcg"
    machine: Literal["q35", "pc"] = "q35"
    start_paused: bool = False
    hotplug_ports: int = 0
    tcg_tb_size_mb: int | None = 128
    extra_args: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ``ValueError`` when the spec cannot describe a valid guest."""
        if not INSTANCE_ID_RE.match(self.instance_id or ""):
            raise ValueError(f"invalid instance_id {self.instance_id!r}")
        if not self.name or "\n" in self.name or "\0" in self.name:
            raise ValueError("name must be a non-empty single line")
        if not isinstance(self.vcpus, int) or not 1 <= self.vcpus <= 512:
            raise ValueError(f"vcpus must be within 1..512, got {self.vcpus!r}")
        if not isinstance(self.memory_mb, int) or self.memory_mb < 32:
            raise ValueError(f"memory_mb must be >= 32, got {self.memory_mb!r}")
        if self.accel not in ("kvm", "tcg"):
            raise ValueError(f"accel must be 'kvm' or 'tcg', got {self.accel!r}")
        if self.machine not in ("q35", "pc"):
            raise ValueError(f"machine must be 'q35' or 'pc', got {self.machine!r}")
        if self.disk_format not in ("qcow2", "raw"):
            raise ValueError(f"disk_format must be 'qcow2' or 'raw', got {self.disk_format!r}")
        if self.disk_cache not in ("auto", "none", "writeback"):
            raise ValueError(f"invalid disk_cache {self.disk_cache!r}")
        if self.kernel is None and (self.initrd is not None or self.cmdline is not None):
            raise ValueError("initrd/cmdline need a kernel")
        if self.kernel is None and self.disk_path is None:
            raise ValueError("a guest needs a disk_path or a kernel to boot from")
        for addr in self.gpu_pci_addresses:
            if not PCI_ADDRESS_RE.match(addr):
                raise ValueError(f"invalid PCI address {addr!r} (expected e.g. 0000:3b:00.0)")
        if len({a.lower() for a in self.gpu_pci_addresses}) != len(self.gpu_pci_addresses):
            raise ValueError("duplicate GPU PCI address")
        if self.tcg_tb_size_mb is not None and self.tcg_tb_size_mb < 1:
            raise ValueError("tcg_tb_size_mb must be positive")
        if (isinstance(self.hotplug_ports, bool) or not isinstance(self.hotplug_ports, int)
                or not 0 <= self.hotplug_ports <= MAX_HOTPLUG_PORTS):
            raise ValueError(f"hotplug_ports must be within 0..{MAX_HOTPLUG_PORTS}, got {self.hotplug_ports!r}")
        if self.hotplug_ports and self.machine != "q35":
            raise ValueError("hotplug_ports needs machine q35 (PCIe root ports)")

    @property
    def smbios_uuid(self) -> str:
        try:
            return str(uuid.UUID(self.instance_id))
        except ValueError:
            return str(uuid.uuid5(uuid.NAMESPACE_URL, f"hackboot:instance:{self.instance_id}"))

    def to_dict(self) -> dict[str, Any]:
        def p(v: Path | None) -> str | None:
            return None if v is None else str(v)

        return {
            "instance_id": self.instance_id,
            "name": self.name,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "disk_path": p(self.disk_path),
            "disk_format": self.disk_format,
            "disk_cache": self.disk_cache,
            "kernel": p(self.kernel),
            "initrd": p(self.initrd),
            "cmdline": self.cmdline,
            "seed_iso": p(self.seed_iso),
            "nics": [n.to_dict() for n in self.nics],
            "gpu_pci_addresses": list(self.gpu_pci_addresses),
            "accel": self.accel,
            "machine": self.machine,
            "start_paused": self.start_paused,
            "hotplug_ports": self.hotplug_ports,
            "tcg_tb_size_mb": self.tcg_tb_size_mb,
            "extra_args": list(self.extra_args),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuestSpec:
        from hackboot.compute.nic import nic_from_dict

        def p(v: str | None) -> Path | None:
            return None if v is None else Path(v)

        return cls(
            instance_id=d["instance_id"],
            name=d["name"],
            vcpus=d["vcpus"],
            memory_mb=d["memory_mb"],
            disk_path=p(d.get("disk_path")),
            disk_format=d.get("disk_format", "qcow2"),
            disk_cache=d.get("disk_cache", "auto"),
            kernel=p(d.get("kernel")),
            initrd=p(d.get("initrd")),
            cmdline=d.get("cmdline"),
            seed_iso=p(d.get("seed_iso")),
            nics=[nic_from_dict(n) for n in d.get("nics", [])],
            gpu_pci_addresses=list(d.get("gpu_pci_addresses", [])),
            accel=d.get("accel", "tcg"),
            machine=d.get("machine", "q35"),
            start_paused=d.get("start_paused", False),
            hotplug_ports=d.get("hotplug_ports", 0),  # specs written before the field had none
            tcg_tb_size_mb=d.get("tcg_tb_size_mb", 128),
            extra_args=list(d.get("extra_args", [])),
        )


@dataclass(frozen=True)
class GuestHandle:
    """What spawn()/adopt() return: enough to find the guest again.

    ``pid`` is the hypervisor process id (a fake number for FakeDriver);
    ``run_dir`` is the per-instance directory (None for FakeDriver);
    ``adopted`` is True when the guest was re-discovered rather than started.
    """

    instance_id: str
    pid: int | None
    run_dir: Path | None
    accel: str | None = None
    adopted: bool = False


# --------------------------------------------------------------------------- events plumbing

EventCallback = Callable[[GuestEvent], None]


class Subscription:
    """Handle returned by :meth:`ComputeDriver.subscribe`; ``close()`` unsubscribes."""

    def __init__(self, hub: EventHub, token: object) -> None:
        self._hub = hub
        self._token = token

    def close(self) -> None:
        self._hub._remove(self._token)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventStream:
    """A blocking, thread-safe iterator over events (optionally of one instance).

    Events are buffered from the moment the stream is created, so the usual
    pattern is race-free::

        with driver.events(iid) as ev:
            driver.reboot(iid, hard=True)
            ev.wait_for(EventKind.RESET, timeout=10)
    """

    def __init__(self, hub: EventHub, instance_id: str | None) -> None:
        self._hub = hub
        self.instance_id = instance_id
        self._q: queue.Queue[GuestEvent | None] = queue.Queue()
        self._closed = False
        self.history: list[GuestEvent] = []

    def _put(self, ev: GuestEvent) -> None:
        if self.instance_id is None or ev.instance_id == self.instance_id:
            self._q.put(ev)

    def get(self, timeout: float | None = None) -> GuestEvent:
        """Next event; raises ``TimeoutError`` after ``timeout`` seconds, ``StopIteration`` when closed."""
        try:
            ev = self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no event within {timeout}s") from None
        if ev is None:
            raise StopIteration
        self.history.append(ev)
        return ev

    def wait_for(
        self,
        kinds: EventKind | str | Iterable[EventKind | str],
        timeout: float,
        predicate: Callable[[GuestEvent], bool] | None = None,
    ) -> GuestEvent:
        """Consume events until one of ``kinds`` (matching ``predicate``) arrives.

        Raises ``TimeoutError`` (listing the events seen) when none arrives in time.
        """
        wanted = {EventKind(kinds)} if isinstance(kinds, str) else {EventKind(k) for k in kinds}
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"none of {sorted(wanted)} within {timeout}s; saw {seen}")
            try:
                ev = self.get(timeout=left)
            except TimeoutError:
                raise TimeoutError(f"none of {sorted(wanted)} within {timeout}s; saw {seen}") from None
            seen.append(ev.kind.value)
            if ev.kind in wanted and (predicate is None or predicate(ev)):
                return ev

    def drain(self) -> list[GuestEvent]:
        """Return (and consume) the events buffered right now, without blocking."""
        out: list[GuestEvent] = []
        while True:
            try:
                ev = self._q.get_nowait()
            except queue.Empty:
                return out
            if ev is None:
                self._q.put(None)
                return out
            self.history.append(ev)
            out.append(ev)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub._remove(self)
            self._q.put(None)

    def __iter__(self) -> Iterator[GuestEvent]:
        return self

    def __next__(self) -> GuestEvent:
        return self.get()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """Fan-out of GuestEvents to streams (direct) and callbacks (dispatcher thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: list[EventStream] = []
        self._callbacks: dict[object, tuple[str | None, EventCallback]] = {}
        self._pending: queue.Queue[tuple[EventCallback, GuestEvent] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def stream(self, instance_id: str | None) -> EventStream:
        s = EventStream(self, instance_id)
        with self._lock:
            self._streams.append(s)
        return s

    def subscribe(self, callback: EventCallback, instance_id: str | None) -> Subscription:
        token = object()
        with self._lock:
            self._callbacks[token] = (instance_id, callback)
            if self._thread is None:
                self._thread = threading.Thread(target=self._dispatch, name="hackboot-driver-events", daemon=True)
                self._thread.start()
        return Subscription(self, token)

    def _remove(self, token: object) -> None:
        with self._lock:
            if isinstance(token, EventStream):
                if token in self._streams:
                    self._streams.remove(token)
            else:
                self._callbacks.pop(token, None)

    def emit(self, ev: GuestEvent) -> None:
        log.debug("event %s %s %s", ev.instance_id, ev.kind, ev.data)
        with self._lock:
            streams = list(self._streams)
            callbacks = [cb for iid, cb in self._callbacks.values() if iid in (None, ev.instance_id)]
        for s in streams:
            s._put(ev)
        for cb in callbacks:
            self._pending.put((cb, ev))

    def _dispatch(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            cb, ev = item
            try:
                cb(ev)
            except Exception:  # a broken subscriber must not kill event delivery
                log.exception("event callback %r failed for %s", cb, ev)

    def close(self) -> None:
        with self._lock:
            streams = list(self._streams)
            thread, self._thread = self._thread, None
        for s in streams:
            s.close()
        if thread is not None:
            self._pending.put(None)
            if thread is not threading.current_thread():
                thread.join(timeout=5)


# --------------------------------------------------------------------------- the contract


class ComputeDriver(abc.ABC):
    """Abstract hypervisor driver.  See the module docstring for the model.

    Concrete drivers implement the abstract methods; event plumbing
    (:meth:`subscribe`, :meth:`events`, :meth:`_emit`) is provided here.

    State machine, as observed through :meth:`state`::

        MISSING --spawn--> RUNNING <--pause/resume--> PAUSED
        RUNNING/PAUSED --shutdown / guest poweroff--> SHUTOFF --spawn--> RUNNING
        RUNNING/PAUSED --process dies unexpectedly--> CRASHED --spawn--> RUNNING
        any --destroy--> MISSING
    """

    #: What this driver can do beyond the core lifecycle; see :class:`Capability`.
    capabilities: frozenset[Capability] = frozenset()

    def __init__(self) -> None:
        self._hub = EventHub()

    def require(self, capability: Capability, what: str = "") -> None:
        """Raise :class:`Unsupported` unless ``capability`` is declared."""
        if capability not in self.capabilities:
            raise Unsupported(type(self).__name__, capability, what)

    def check_spec(self, spec: GuestSpec) -> None:
        """Validate ``spec`` (``ValueError``) and refuse what it asks beyond the declared capabilities.

        Every :meth:`spawn` starts with this, so an unsupported request fails before anything
        is started.
        """
        spec.validate()
        if spec.start_paused:
            self.require(Capability.PAUSED_START, "start_paused")
        if spec.gpu_pci_addresses:
            self.require(Capability.GPU_PASSTHROUGH, "gpu_pci_addresses")

    # ----------------------------------------------------------------- lifecycle

    @abc.abstractmethod
    def spawn(self, spec: GuestSpec) -> GuestHandle:
        """Create and start a guest; return once its vCPUs run.

        The guest must be independent of the calling process: it keeps running
        when the agent (and this driver object) goes away, and a later driver
        can :meth:`adopt` it.  The guest is first created with its vCPUs stopped,
        checked (hypervisor state, accelerator actually in use), and only then
        started -- unless ``spec.start_paused``, in which case it stays PAUSED.

        May be called again for an instance that is SHUTOFF or CRASHED (a
        "power on"): stale runtime files are replaced, the console log is kept.

        :raises ValueError: invalid spec.
        :raises GuestAlreadyRunning: the instance's hypervisor process is alive.
        :raises SpawnError: the hypervisor failed to start or a check failed;
            nothing is left running in that case.
        """

    @abc.abstractmethod
    def adopt(self, instance_id: str) -> GuestHandle | None:
        """Re-attach to a guest started earlier, possibly by another process.

        Used after an agent restart.  Never starts, restarts or resets anything:
        returns ``None`` when there is no live guest for ``instance_id`` (the
        instance may still be SHUTOFF/CRASHED, see :meth:`state`).  Idempotent:
        adopting an already-attached guest returns its handle.  After adopt,
        events of that guest are delivered to subscribers of this driver.

        Whatever happened while no driver was watching produces no events: a
        restarted agent should reconcile every instance it expects with
        :meth:`state` (a guest that powered itself off meanwhile is reaped by
        adopt/state and reported SHUTOFF; one whose hypervisor died is CRASHED).
        Guests spawned-but-not-yet-resumed when the previous agent died are
        adopted as PAUSED; the agent decides whether to resume or destroy them.
        """

    @abc.abstractmethod
    def state(self, instance_id: str) -> GuestState:
        """Current :class:`GuestState`; never raises for unknown ids (MISSING).

        May attach to (adopt) a live guest that this driver is not watching yet.
        """

    @abc.abstractmethod
    def pause(self, instance_id: str) -> None:
        """Stop the vCPUs (state PAUSED, event STOP).  :raises GuestNotRunning:"""

    @abc.abstractmethod
    def resume(self, instance_id: str) -> None:
        """Restart the vCPUs of a PAUSED guest (event RESUME).  :raises GuestNotRunning:"""

    @abc.abstractmethod
    def shutdown(self, instance_id: str, timeout: float = 60.0) -> GuestState:
        """Power the guest off and wait until its hypervisor process is gone.

        Escalation: ACPI power button (the guest OS shuts down cleanly) for up to
        ``timeout`` seconds; then the hypervisor is told to quit (like pulling the
        plug); then, if it still lives, it is killed.  ``timeout=0`` skips the
        ACPI step.  A paused guest cannot react to ACPI and is quit at once.

        Idempotent: on a guest that is not running it just returns the state.
        Returns the final state: SHUTOFF normally (the exit was requested).
        The run dir (console log, ...) is kept; use :meth:`destroy` to remove it.
        """

    @abc.abstractmethod
    def reboot(self, instance_id: str, hard: bool = False, timeout: float = 60.0) -> None:
        """Reboot without changing the hypervisor process.

        ``hard=True``: immediate platform reset (event RESET), like the reset
        button.  ``hard=False``: the guest OS is asked to shut down via the ACPI
        power button; once it has powered off, the platform is reset and started
        again (events POWERDOWN, SHUTDOWN, RESET, RESUME).  A guest that ignores
        ACPI for ``timeout`` seconds, or that is not running, gets a hard reset
        instead (Nova's libvirt driver falls back the same way).
        The guest is RUNNING afterwards.  :raises GuestNotRunning:
        """

    @abc.abstractmethod
    def destroy(self, instance_id: str) -> None:
        """Kill the guest if alive and forget it (remove the run dir).

        Idempotent and safe in every state, including when the hypervisor process
        already died or the instance is unknown.  Caller-owned files (disks, seed
        ISO, kernel) are left alone; NIC backends get their ``release`` hook.
        """

    @abc.abstractmethod
    def console_log(self, instance_id: str, tail_bytes: int = 64 * 1024) -> bytes:
        """The last ``tail_bytes`` bytes of the guest's serial console output.

        Works for stopped guests as long as the instance was not destroyed.
        The log is size-capped by the driver, so very old output is dropped.
        :raises GuestNotFound: unknown instance.
        """

    @abc.abstractmethod
    def list_instances(self) -> list[str]:
        """Ids of all instances the driver has state for (any state but MISSING)."""

    # ----------------------------------------------------------------- optional (capabilities)

    def qmp(self, instance_id: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on the guest's hypervisor and return its ``return`` value.

        Needs :attr:`Capability.BLOCK_GRAPH`.  Files named by ``blockdev-add`` file nodes are
        opened by the driver (the hypervisor has no access to host paths).
        :raises Unsupported: no monitor access.
        :raises GuestNotFound: unknown instance.  :raises GuestNotRunning: no live hypervisor.
        :raises DriverError: the command failed (the hypervisor's message is in the text).
        """
        self.require(Capability.BLOCK_GRAPH, f"QMP {command}")
        raise NotImplementedError  # pragma: no cover - a driver declaring BLOCK_GRAPH overrides this

    def monitor(self, instance_id: str) -> Execute:
        """The guest's monitor as a function ``execute(command, arguments)`` (see :meth:`qmp`).

        Checks the capability at once, so a caller learns before doing anything else.
        """
        self.require(Capability.BLOCK_GRAPH, "monitor access")
        check_instance_id(instance_id)

        def execute(command: str, arguments: dict[str, Any] | None = None) -> Any:
            return self.qmp(instance_id, command, arguments)

        return execute

    def attach_nic(self, instance_id: str, nic: NicBackend) -> str:
        """Hot-plug ``nic`` into a live guest, on a free hot-plug port; return the NIC's id.

        The id names the NIC in :meth:`nics` and :meth:`detach_nic` (the spec's own NICs are
        ``nic0``, ``nic1``, ...).  The highest free port is taken (see ``GuestSpec.hotplug_ports``).
        ``nic.prepare`` runs before the device is added; ``nic.release`` when it is unplugged or
        the instance destroyed.  A hot-plugged NIC lives as long as the hypervisor process: a
        later spawn starts with ``spec.nics`` only (the caller plugs the others again).
        Needs :attr:`Capability.HOTPLUG_NIC`.
        :raises Unsupported: no NIC hot-plug, or a backend that cannot be hot-plugged.
        :raises GuestNotFound:  :raises GuestNotRunning:
        :raises DriverError: no free hot-plug port, or the hypervisor refused the NIC.
        """
        self.require(Capability.HOTPLUG_NIC)
        raise NotImplementedError  # pragma: no cover - a driver declaring HOTPLUG_NIC overrides this

    def detach_nic(self, instance_id: str, nic_id: str, timeout: float = 30.0) -> None:
        """Unplug a hot-plugged NIC and wait until the guest has let it go, then release its backend.

        Idempotent: a NIC that is not (or no longer) plugged returns at once.  The spec's own NICs
        are part of the machine and cannot be unplugged.  Needs :attr:`Capability.HOTPLUG_NIC`.
        :raises Unsupported:  :raises GuestNotRunning:
        :raises DriverError: a spec NIC, or the guest did not release the device within ``timeout``
            seconds (its OS must handle PCI hot-unplug; the request stays pending, retry later).
        """
        self.require(Capability.HOTPLUG_NIC)
        raise NotImplementedError  # pragma: no cover

    def nics(self, instance_id: str) -> dict[str, NicBackend]:
        """The NICs of a live guest by id, as the hypervisor has them now (spec and hot-plugged ones).

        Needs :attr:`Capability.HOTPLUG_NIC`.  :raises GuestNotFound:  :raises GuestNotRunning:
        """
        self.require(Capability.HOTPLUG_NIC)
        raise NotImplementedError  # pragma: no cover

    def pass_fd(self, instance_id: str, name: str, fd: int) -> None:
        """Hand the live guest's hypervisor a copy of descriptor ``fd``, known to it as ``name``.

        How a NIC backend opened by another service (a tap in a network namespace) reaches a guest
        being hot-plugged: the backend's arguments then name the fd (``fd=<name>``). The caller
        keeps and closes its own ``fd``. Needs :attr:`Capability.HOTPLUG_NIC`.
        :raises Unsupported:  :raises GuestNotFound:  :raises GuestNotRunning:
        :raises DriverError: the hypervisor refused it.
        """
        self.require(Capability.HOTPLUG_NIC, "passing a descriptor")
        raise NotImplementedError  # pragma: no cover - a driver declaring HOTPLUG_NIC overrides this

    def snapshot_disk(self, instance_id: str, dest: Path, timeout: float = 3600.0) -> None:
        """Copy the root disk of a live guest, as the guest sees it, into a new standalone qcow2 ``dest``.

        Crash-consistent (like pulling the plug): the guest keeps running.  ``dest`` is created
        (or truncated) by the driver; on failure it may be left behind for the caller to remove.
        Needs :attr:`Capability.LIVE_SNAPSHOT`.
        :raises Unsupported:  :raises GuestNotRunning:  :raises DriverError: the copy failed.
        """
        self.require(Capability.LIVE_SNAPSHOT)
        raise NotImplementedError  # pragma: no cover - a driver declaring LIVE_SNAPSHOT overrides this

    def close(self) -> None:
        """Release driver resources (monitor connections, threads).

        Guests are NOT affected: they keep running and can be adopted by another
        driver.  The driver must not be used afterwards.
        """
        self._hub.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- events

    def subscribe(self, callback: EventCallback, instance_id: str | None = None) -> Subscription:
        """Call ``callback(event)`` for every event (of ``instance_id``, or all).

        Callbacks run sequentially on one dispatcher thread owned by the driver,
        never on the caller's thread nor on the driver's I/O thread; they may call
        driver methods.  Exceptions are logged and ignored.
        """
        return self._hub.subscribe(callback, instance_id)

    def events(self, instance_id: str | None = None) -> EventStream:
        """A blocking iterator of events (of ``instance_id``, or all); close it when done."""
        return self._hub.stream(instance_id)

    def _emit(self, instance_id: str, kind: EventKind, data: dict[str, Any] | None = None) -> None:
        self._hub.emit(GuestEvent(instance_id=instance_id, kind=kind, data=dict(data or {})))


def check_instance_id(instance_id: str) -> str:
    if not isinstance(instance_id, str) or not INSTANCE_ID_RE.match(instance_id):
        raise ValueError(f"invalid instance_id {instance_id!r}")
    return instance_id
