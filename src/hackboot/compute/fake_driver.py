"""In-memory :class:`ComputeDriver` for unit tests of the agent and scheduler.

It follows the same contract as :class:`hackboot.compute.qemu.QemuDriver`
(checked by ``tests/integration/driver_contract.py``) without running anything.

"Processes" live in a :class:`FakeHost`, which plays the role of the real host:
several ``FakeDriver`` objects built on the same host see the same guests, so an
agent restart is simulated by closing one driver and creating another one on the
same host, then calling ``adopt()``.

It declares the capabilities it can simulate (:data:`FAKE_CAPABILITIES`); a test
can ask for fewer (``FakeDriver(capabilities=...)``) to play a less able
hypervisor, so callers' fallbacks and the contract's refusals are exercised too.

Test hooks (not part of the contract): :meth:`FakeDriver.simulate_crash`
(``kill -9`` of the hypervisor), :meth:`FakeDriver.simulate_guest_poweroff`
(the guest OS powers itself off), :meth:`FakeDriver.write_console`,
:meth:`FakeDriver.set_acpi_responsive` and ``FakeHost.fail_next_spawn``.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

from hackboot.compute.driver import (
    INSTANCE_ID_RE,
    Capability,
    ComputeDriver,
    DriverError,
    EventKind,
    GuestAlreadyRunning,
    GuestHandle,
    GuestNotFound,
    GuestNotRunning,
    GuestSpec,
    GuestState,
    SpawnError,
    Unsupported,
    check_instance_id,
)
from hackboot.compute.nic import NicBackend

# What the simulation covers: no monitor (so no block graph, disk hot-plug or live disk copy).
FAKE_CAPABILITIES = frozenset({Capability.PAUSED_START, Capability.GPU_PASSTHROUGH, Capability.HOTPLUG_NIC})


@dataclass
class FakeGuest:
    spec: GuestSpec
    pid: int | None = None
    alive: bool = False
    running: bool = False  # vCPUs running (alive only)
    panicked: bool = False
    clean_exit: bool = True  # meaningful when not alive
    acpi_responsive: bool = True
    console: bytearray = field(default_factory=bytearray)
    boots: int = 0
    hot_nics: dict[str, tuple[int, NicBackend]] = field(default_factory=dict)  # id -> (port, backend)
    passed_fds: set[str] = field(default_factory=set)  # names given by pass_fd


class FakeHost:
    """The simulated hypervisor host shared by FakeDriver instances."""

    def __init__(self, console_log_max_bytes: int = 1024 * 1024) -> None:
        self.lock = threading.RLock()
        self.guests: dict[str, FakeGuest] = {}
        self.console_log_max_bytes = console_log_max_bytes
        self.fail_next_spawn: str | None = None  # error text for the next spawn()
        self._pids = itertools.count(10_000)
        self._drivers: weakref.WeakSet[FakeDriver] = weakref.WeakSet()

    def next_pid(self) -> int:
        return next(self._pids)


class FakeDriver(ComputeDriver):
    def __init__(self, host: FakeHost | None = None, capabilities: Iterable[Capability] | None = None) -> None:
        super().__init__()
        caps = FAKE_CAPABILITIES if capabilities is None else frozenset(capabilities)
        if not caps <= FAKE_CAPABILITIES:
            raise ValueError(f"FakeDriver cannot simulate {sorted(caps - FAKE_CAPABILITIES)}")
        self.capabilities = caps
        self.host = host or FakeHost()
        self._watched: set[str] = set()  # guests whose events this driver delivers
        self._closed = False
        self.host._drivers.add(self)

    # ----------------------------------------------------------------- helpers

    def _guest(self, instance_id: str) -> FakeGuest:
        g = self.host.guests.get(instance_id)
        if g is None:
            raise GuestNotFound(instance_id)
        return g

    def _live(self, instance_id: str) -> FakeGuest:
        g = self._guest(instance_id)
        if not g.alive:
            raise GuestNotRunning(f"{instance_id} is not running")
        self._watched.add(instance_id)
        return g

    def _event(self, instance_id: str, kind: EventKind, **data: object) -> None:
        # Like QMP: only a driver attached to the guest hears its events.
        for d in list(self.host._drivers):
            if not d._closed and instance_id in d._watched:
                d._emit(instance_id, kind, data)

    def _log(self, g: FakeGuest, text: str | bytes) -> None:
        g.console += text.encode() if isinstance(text, str) else text
        cap = self.host.console_log_max_bytes
        if len(g.console) > cap:
            del g.console[: len(g.console) - cap // 2]

    def _boot(self, g: FakeGuest) -> None:
        g.boots += 1
        self._log(g, f"[fake] Linux version fake ({g.spec.name}) boot #{g.boots}\r\n")

    def _exit(self, g: FakeGuest, clean: bool, reason: str) -> None:
        iid = g.spec.instance_id
        pid = g.pid
        g.alive = g.running = g.panicked = False
        g.clean_exit = clean
        self._event(iid, EventKind.EXITED, clean=clean, reason=reason, pid=pid)
        for d in list(self.host._drivers):
            d._watched.discard(iid)

    def _handle(self, g: FakeGuest, adopted: bool) -> GuestHandle:
        return GuestHandle(g.spec.instance_id, g.pid, None, g.spec.accel, adopted)

    # ----------------------------------------------------------------- contract

    def spawn(self, spec: GuestSpec) -> GuestHandle:
        self.check_spec(spec)
        iid = spec.instance_id
        with self.host.lock:
            g = self.host.guests.get(iid)
            if g is not None and g.alive:
                raise GuestAlreadyRunning(iid)
            if self.host.fail_next_spawn is not None:
                msg, self.host.fail_next_spawn = self.host.fail_next_spawn, None
                raise SpawnError("fake hypervisor failed to start", msg)
            old = g
            g = FakeGuest(spec=spec)
            if old is not None:  # power-on of a SHUTOFF/CRASHED guest keeps its console
                g.console, g.acpi_responsive = old.console, old.acpi_responsive
                self._release_hot_nics(old)  # they were plugged into the process that is gone
            self.host.guests[iid] = g
            for nic in spec.nics:
                nic.prepare(iid)
            g.pid = self.host.next_pid()
            g.alive = True
            self._watched.add(iid)
            self._log(g, f"\r\n--- hackboot: starting {spec.name} ({iid}) ---\r\n")
            if not spec.start_paused:
                g.running = True
                self._event(iid, EventKind.RESUME)
                self._boot(g)
            return self._handle(g, adopted=False)

    def adopt(self, instance_id: str) -> GuestHandle | None:
        check_instance_id(instance_id)
        with self.host.lock:
            g = self.host.guests.get(instance_id)
            if g is None or not g.alive:
                return None
            self._watched.add(instance_id)
            return self._handle(g, adopted=True)

    def state(self, instance_id: str) -> GuestState:
        if not isinstance(instance_id, str) or not INSTANCE_ID_RE.match(instance_id):
            return GuestState.MISSING
        with self.host.lock:
            g = self.host.guests.get(instance_id)
            if g is None:
                return GuestState.MISSING
            if not g.alive:
                return GuestState.SHUTOFF if g.clean_exit else GuestState.CRASHED
            self._watched.add(instance_id)
            if g.panicked:
                return GuestState.CRASHED
            return GuestState.RUNNING if g.running else GuestState.PAUSED

    def pause(self, instance_id: str) -> None:
        with self.host.lock:
            g = self._live(instance_id)
            if g.running:
                g.running = False
                self._event(instance_id, EventKind.STOP)

    def resume(self, instance_id: str) -> None:
        with self.host.lock:
            g = self._live(instance_id)
            if g.panicked:
                raise GuestNotRunning(f"{instance_id} is guest-panicked; reboot(hard=True) it instead")
            if not g.running:
                g.running = True
                self._event(instance_id, EventKind.RESUME)
                if g.boots == 0:
                    self._boot(g)

    def shutdown(self, instance_id: str, timeout: float = 60.0) -> GuestState:
        check_instance_id(instance_id)
        with self.host.lock:
            g = self.host.guests.get(instance_id)
            if g is None or not g.alive:
                return self.state(instance_id)
            self._watched.add(instance_id)
            if g.running and timeout > 0 and g.acpi_responsive:
                self._event(instance_id, EventKind.POWERDOWN)
                self._log(g, "[fake] ACPI power button: powering off\r\n")
                self._event(instance_id, EventKind.SHUTDOWN, guest=True, reason="guest-shutdown")
                self._exit(g, clean=True, reason="guest-shutdown")
            else:
                if g.running and timeout > 0:
                    self._event(instance_id, EventKind.POWERDOWN)
                self._event(instance_id, EventKind.SHUTDOWN, guest=False, reason="host-qmp-quit")
                self._exit(g, clean=True, reason="shutdown")
            return self.state(instance_id)

    def reboot(self, instance_id: str, hard: bool = False, timeout: float = 60.0) -> None:
        with self.host.lock:
            g = self._live(instance_id)
            if not hard and g.running and not g.panicked:
                self._event(instance_id, EventKind.POWERDOWN)
                if g.acpi_responsive:
                    self._event(instance_id, EventKind.SHUTDOWN, guest=True, reason="guest-shutdown")
                    self._event(instance_id, EventKind.STOP)
            self._event(instance_id, EventKind.RESET, guest=False, reason="host-qmp-system-reset")
            g.panicked = False
            if not g.running:
                g.running = True
            self._event(instance_id, EventKind.RESUME)
            self._boot(g)

    def destroy(self, instance_id: str) -> None:
        check_instance_id(instance_id)
        with self.host.lock:
            g = self.host.guests.get(instance_id)
            if g is None:
                return
            if g.alive:
                self._watched.add(instance_id)
                self._event(instance_id, EventKind.SHUTDOWN, guest=False, reason="host-qmp-quit")
                self._exit(g, clean=True, reason="destroyed")
            for nic in g.spec.nics:
                nic.release(instance_id)
            self._release_hot_nics(g)
            del self.host.guests[instance_id]

    def console_log(self, instance_id: str, tail_bytes: int = 64 * 1024) -> bytes:
        with self.host.lock:
            g = self._guest(instance_id)
            return bytes(g.console[-tail_bytes:]) if tail_bytes > 0 else b""

    def list_instances(self) -> list[str]:
        with self.host.lock:
            return sorted(self.host.guests)

    def _release_hot_nics(self, g: FakeGuest) -> None:
        for _port, nic in g.hot_nics.values():
            nic.release(g.spec.instance_id)
        g.hot_nics.clear()

    def pass_fd(self, instance_id: str, name: str, fd: int) -> None:
        self.require(Capability.HOTPLUG_NIC, "passing a descriptor")
        try:
            os.fstat(fd)  # a real hypervisor would get EBADF from the socket
        except OSError as exc:
            raise DriverError(f"{instance_id}: cannot pass fd {fd}: {exc.strerror}") from None
        with self.host.lock:
            self._live(instance_id).passed_fds.add(name)

    def attach_nic(self, instance_id: str, nic: NicBackend) -> str:
        self.require(Capability.HOTPLUG_NIC)
        try:
            nic.netdev_options(), nic.device_options()
        except NotImplementedError as exc:
            raise Unsupported(type(self).__name__, Capability.HOTPLUG_NIC, str(exc)) from None
        with self.host.lock:
            g = self._live(instance_id)
            taken = {port for port, _ in g.hot_nics.values()}
            free = [i for i in reversed(range(g.spec.hotplug_ports)) if i not in taken]
            if not free:
                raise DriverError(f"{instance_id}: no free hot-plug port for a NIC "
                                  f"(the guest has {g.spec.hotplug_ports})")
            nic.prepare(instance_id)
            nic_id = f"hbnic{free[0]}"
            g.hot_nics[nic_id] = (free[0], nic)
            return nic_id

    def detach_nic(self, instance_id: str, nic_id: str, timeout: float = 30.0) -> None:
        self.require(Capability.HOTPLUG_NIC)
        with self.host.lock:
            g = self._live(instance_id)
            if nic_id in {f"nic{i}" for i in range(len(g.spec.nics))}:
                raise DriverError(f"{instance_id}: {nic_id} is one of the guest's own NICs; it cannot be unplugged")
            found = g.hot_nics.pop(nic_id, None)
            if found is not None:
                found[1].release(instance_id)

    def nics(self, instance_id: str) -> dict[str, NicBackend]:
        self.require(Capability.HOTPLUG_NIC)
        with self.host.lock:
            g = self._live(instance_id)
            out: dict[str, NicBackend] = {f"nic{i}": n for i, n in enumerate(g.spec.nics)}
            return out | {nic_id: nic for nic_id, (_, nic) in sorted(g.hot_nics.items())}

    def close(self) -> None:
        self._closed = True
        self._watched.clear()
        super().close()

    # ----------------------------------------------------------------- test hooks

    def pid(self, instance_id: str) -> int | None:
        with self.host.lock:
            g = self.host.guests.get(instance_id)
            return g.pid if g is not None and g.alive else None

    def simulate_crash(self, instance_id: str) -> None:
        """The hypervisor process dies unexpectedly (kill -9, segfault, OOM killer)."""
        with self.host.lock:
            g = self._live(instance_id)
            self._exit(g, clean=False, reason="unexpected-exit")

    def simulate_guest_poweroff(self, instance_id: str) -> None:
        """The guest OS powers itself off (``poweroff`` inside the guest)."""
        with self.host.lock:
            g = self._live(instance_id)
            self._event(instance_id, EventKind.SHUTDOWN, guest=True, reason="guest-shutdown")
            self._event(instance_id, EventKind.STOP)
            self._exit(g, clean=True, reason="guest-shutdown")

    def simulate_guest_panic(self, instance_id: str) -> None:
        """The guest kernel panics (QEMU keeps the process, paused: state CRASHED)."""
        with self.host.lock:
            g = self._live(instance_id)
            g.panicked = True
            g.running = False
            self._event(instance_id, EventKind.GUEST_PANICKED, action="pause")

    def write_console(self, instance_id: str, data: bytes) -> None:
        with self.host.lock:
            g = self._guest(instance_id)
            self._log(g, bytes(data))

    def set_acpi_responsive(self, instance_id: str, responsive: bool) -> None:
        """Whether the guest OS reacts to the ACPI power button (shutdown/soft reboot)."""
        with self.host.lock:
            self._guest(instance_id).acpi_responsive = responsive
