"""QEMU driver: one daemonized ``qemu-system-x86_64`` per guest, driven over QMP.

Process model
-------------
``spawn`` runs QEMU with ``-daemonize``: the launcher we exec returns only once
QEMU has initialised (sockets and pidfile exist), and the real QEMU process is
re-parented away from the agent in its own session.  Killing or restarting the
agent therefore never touches guests; a new driver finds them again with
:meth:`QemuDriver.adopt` from the instance's *run dir*::

    <state_dir>/instances/<instance_id>/
        qemu.pid       written by QEMU (-pidfile)
        qmp.sock       QMP monitor (-qmp unix:...,server=on,wait=off)
        console.log    serial console (chardev file, append=on), size-capped
        cmdline.json   the exact argv; adopt() requires /proc/PID/cmdline to match
        spec.json      the GuestSpec (to release NIC backends after a restart)
        qemu-stderr.log  QEMU's own error output while it starts
        shutoff.json   present when the last exit was deliberate (SHUTOFF vs CRASHED)

Guests are created with ``-S`` (vCPUs stopped), checked over QMP
(``query-status`` is ``prelaunch``, ``query-kvm`` matches the requested
accelerator) and only then started with ``cont``.

``-action shutdown=pause`` keeps QEMU alive after the guest powers itself off.
A watching driver immediately writes ``shutoff.json`` and sends ``quit``; if no
agent is running at that moment, the powered-off QEMU waits (status
``shutdown``) until the next adopt() reaps it.  That is what lets the driver
tell a clean power-off (SHUTOFF) from a killed or crashed QEMU (CRASHED) even
across agent restarts, and what makes soft reboot possible without a new
process (power off via ACPI, then ``system_reset`` + ``cont``).

Sync facade
-----------
``qemu.qmp`` is asyncio-only, while callers are plain threads.  Each driver owns
one private event loop running in a daemon thread; public methods submit
coroutines to it with ``run_coroutine_threadsafe`` and block on the result.  A
per-call ``asyncio.run`` would not work: QEMU's QMP socket serves a single client
at a time and only pushes events to a connected client, so each guest needs one
*persistent* connection to notice SHUTDOWN/RESET and, crucially, to learn within
milliseconds that QEMU died (the socket hits EOF).  A single loop thread keeps
all of those connections (hundreds are cheap) and the console-log housekeeping.
Events are handed to subscribers on a separate dispatcher thread, so callbacks
can call back into the driver without deadlocking the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import json
import logging
import mmap
import os
import select
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate

from hackboot.compute.driver import (
    INSTANCE_ID_RE,
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
    check_instance_id,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

QEMU_BINARY = "qemu-system-x86_64"
CONSOLE_LOG_MAX_BYTES = 1024 * 1024
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL
# spawn=deny would forbid -daemonize's fork; elevateprivileges=deny breaks -daemonize too.
SANDBOX_OPTS = "on,obsolete=deny,resourcecontrol=deny"

QMP_STATUS_TO_STATE: dict[str, GuestState] = {
    "running": GuestState.RUNNING,
    "colo": GuestState.RUNNING,
    "paused": GuestState.PAUSED,
    "prelaunch": GuestState.PAUSED,
    "debug": GuestState.PAUSED,
    "inmigrate": GuestState.PAUSED,
    "postmigrate": GuestState.PAUSED,
    "finish-migrate": GuestState.PAUSED,
    "restore-vm": GuestState.PAUSED,
    "save-vm": GuestState.PAUSED,
    "suspended": GuestState.PAUSED,
    "watchdog": GuestState.PAUSED,
    "io-error": GuestState.PAUSED,  # disk error: recoverable with resume once fixed
    "shutdown": GuestState.SHUTOFF,  # powered off, process about to be reaped
    "guest-panicked": GuestState.CRASHED,
    "internal-error": GuestState.CRASHED,
}


def state_from_qmp_status(status: str) -> GuestState:
    """Map QMP ``query-status``'s ``status`` to a :class:`GuestState`."""
    try:
        return QMP_STATUS_TO_STATE[status]
    except KeyError:
        log.warning("unknown QEMU run state %r, reporting paused", status)
        return GuestState.PAUSED


# --------------------------------------------------------------------------- paths & argv


@dataclass(frozen=True)
class RunPaths:
    """Locations inside one instance's run dir."""

    run_dir: Path

    @classmethod
    def for_instance(cls, state_dir: Path, instance_id: str) -> RunPaths:
        return cls(Path(state_dir) / "instances" / check_instance_id(instance_id))

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def cmdline_json(self) -> Path:
        return self.run_dir / "cmdline.json"

    @property
    def spec_json(self) -> Path:
        return self.run_dir / "spec.json"

    @property
    def stderr_log(self) -> Path:
        return self.run_dir / "qemu-stderr.log"

    @property
    def shutoff_json(self) -> Path:
        return self.run_dir / "shutoff.json"


def qemu_opt(value: str | Path) -> str:
    """Escape a value embedded in a QEMU ``key=value,...`` option string."""
    return str(value).replace(",", ",,")


def build_argv(
    spec: GuestSpec,
    paths: RunPaths,
    *,
    qemu_binary: str = QEMU_BINARY,
    direct_io: bool = False,
    sandbox: bool = True,
) -> list[str]:
    """The complete QEMU command line for ``spec`` (pure: no I/O).

    ``direct_io`` says whether O_DIRECT works for the disk (see
    :func:`probe_direct_io`); it only matters when ``spec.disk_cache`` is
    ``"auto"``.  Raises ``ValueError`` for an invalid spec or a run dir whose
    socket path would not fit in ``sun_path``.
    """
    spec.validate()
    sock = str(paths.qmp_socket)
    if len(sock.encode()) > UNIX_PATH_MAX:
        raise ValueError(f"QMP socket path too long ({len(sock)} > {UNIX_PATH_MAX}): {sock}")

    kvm = spec.accel == "kvm"
    tb_size = f",tb-size={spec.tcg_tb_size_mb}" if spec.tcg_tb_size_mb else ""
    accel = "kvm" if kvm else f"tcg{tb_size}"
    argv = [
        qemu_binary,
        "-name", f"guest={qemu_opt(spec.name)},debug-threads=on",
        "-uuid", spec.smbios_uuid,
        "-machine", spec.machine,
        "-accel", accel,
        "-cpu", "host" if kvm else "max",
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory_mb}M",
        "-nodefaults", "-no-user-config",
        "-display", "none", "-vga", "none",
        "-msg", "timestamp=on",
        "-daemonize",
        "-pidfile", str(paths.pidfile),
        "-qmp", f"unix:{qemu_opt(sock)},server=on,wait=off",
        "-S",
        # keep the process after guest poweroff (see module docstring); pause on
        # panic so the state is CRASHED and the console/memory can be inspected
        "-action", "shutdown=pause",
        "-action", "panic=pause",
        "-chardev", f"file,id=serial0,path={qemu_opt(paths.console_log)},append=on",
        "-serial", "chardev:serial0",
        "-device", "pvpanic",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0,id=rng-pci0",
    ]  # fmt: skip
    if sandbox:
        argv += ["-sandbox", SANDBOX_OPTS]

    if spec.disk_path is not None:
        cache = spec.disk_cache
        if cache == "auto":
            cache = "none" if direct_io else "writeback"
        aio = "native" if cache == "none" else "threads"
        argv += [
            "-drive",
            (f"file={qemu_opt(spec.disk_path)},if=none,id=disk0,format={spec.disk_format},"
            f"cache={cache},aio={aio},discard=unmap,detect-zeroes=unmap"),
            "-device", "virtio-blk-pci,drive=disk0,id=virtio-disk0,bootindex=1",
        ]  # fmt: skip
    if spec.seed_iso is not None:
        argv += [
            "-drive",
            f"file={qemu_opt(spec.seed_iso)},if=none,id=seed0,format=raw,readonly=on,media=disk",
            "-device", "virtio-blk-pci,drive=seed0,id=virtio-seed0",
        ]  # fmt: skip
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
        if spec.cmdline:
            argv += ["-append", spec.cmdline]

    for index, nic in enumerate(spec.nics):
        argv += nic.args(index)

    for index, addr in enumerate(spec.gpu_pci_addresses):
        addr = addr.lower()
        if spec.machine == "q35":
            # one PCIe root port per GPU: drivers expect a proper PCIe link
            port = f"rp-gpu{index}"
            argv += ["-device", f"pcie-root-port,id={port},chassis={index + 1},bus=pcie.0"]
            argv += ["-device", f"vfio-pci,host={addr},id=gpu{index},bus={port}"]
        else:
            argv += ["-device", f"vfio-pci,host={addr},id=gpu{index}"]

    argv += list(spec.extra_args)
    return argv


# --------------------------------------------------------------------------- host helpers


def _qcow2_backing_file(path: Path) -> Path | None:
    try:
        with open(path, "rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != b"QFI\xfb":
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not size or size > 4096:
                return None
            f.seek(offset)
            name = f.read(size).decode(errors="surrogateescape")
    except OSError:
        return None
    if ":" in name.split("/", 1)[0]:  # protocol (nbd:, json:) - not a local file
        return None
    backing = Path(name)
    return backing if backing.is_absolute() else path.parent / backing


def _direct_read_ok(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, 4096)  # page-aligned buffer, as O_DIRECT requires
        try:
            os.preadv(fd, [buf], 0)
        finally:
            buf.close()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def probe_direct_io(disk: Path, max_depth: int = 16) -> bool:
    """True when the disk and its local qcow2 backing chain can be read with O_DIRECT.

    ``cache=none`` (O_DIRECT) fails at QEMU start on file systems without
    O_DIRECT support (tmpfs, some FUSE/overlay setups), so we check first.
    """
    path: Path | None = Path(disk)
    depth = 0
    while path is not None and depth < max_depth:
        if not _direct_read_ok(path):
            return False
        path = _qcow2_backing_file(path)
        depth += 1
    return True


_FALLOC_FL_COLLAPSE_RANGE = 0x08
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _fallocate = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - non-glibc
    _fallocate = None


def trim_console_log(path: Path, max_bytes: int) -> bool:
    """Shrink ``path`` to about ``max_bytes // 2`` when it exceeds ``max_bytes``.

    QEMU keeps the file open with O_APPEND.  On ext4/xfs the head is cut with
    ``fallocate(FALLOC_FL_COLLAPSE_RANGE)``, which is atomic with respect to
    QEMU's appends (nothing is lost; the cut is block-aligned, so the first line
    may be partial).  Elsewhere the tail is copied, the file truncated and the
    tail appended back; output the guest writes during those few microseconds
    can be lost.  Returns True if the file was trimmed.
    """
    try:
        if os.stat(path).st_size <= max_bytes:
            return False
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        st = os.fstat(fd)
        keep = max(max_bytes // 2, 1)
        block = st.st_blksize or 4096
        cut = ((st.st_size - keep) // block) * block
        if _fallocate is not None and cut > 0 and _fallocate(fd, _FALLOC_FL_COLLAPSE_RANGE, 0, cut) == 0:
            return True
        size = os.fstat(fd).st_size
        tail = os.pread(fd, keep, max(size - keep, 0))
        os.ftruncate(fd, 0)
        os.write(fd, tail)
        return True
    finally:
        os.close(fd)


def read_tail(path: Path, tail_bytes: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(size - max(tail_bytes, 0), 0))
        return f.read()


def read_pidfile(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 1 else None


def proc_argv(pid: int) -> list[str] | None:
    """argv of a live process (None for zombies, kernel threads, missing pids)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return [a.decode(errors="surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")]


def is_our_qemu(pid: int, paths: RunPaths) -> bool:
    """Whether ``pid`` is the QEMU of this run dir (guards against pid reuse).

    The process argv must equal ``cmdline.json`` exactly; without that file we
    fall back to "a qemu-system binary whose arguments name our QMP socket".
    """
    argv = proc_argv(pid)
    if not argv:
        return False
    try:
        expected = json.loads(paths.cmdline_json.read_text())
    except (OSError, ValueError):
        expected = None
    if isinstance(expected, list):
        return argv == expected
    return "qemu-system" in os.path.basename(argv[0]) and any(str(paths.qmp_socket) in a for a in argv)


class _Proc:
    """A pidfd-pinned process: no signal can hit a recycled pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = os.pidfd_open(pid)

    def exited(self, timeout: float = 0.0) -> bool:
        if self.fd is None:
            return True
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return bool(p.poll(max(timeout, 0) * 1000))

    def signal(self, sig: int) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.fd, sig)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_our_qemu(paths: RunPaths) -> _Proc | None:
    """The live QEMU of this run dir, or None (no pidfile, dead, zombie, or not ours)."""
    pid = read_pidfile(paths.pidfile)
    if pid is None:
        return None
    try:
        proc = _Proc(pid)
    except (ProcessLookupError, OSError):
        return None
    # identity is checked *after* pinning the pid with the pidfd
    if proc.exited() or not is_our_qemu(pid, paths):
        proc.close()
        return None
    return proc


def _absolute_paths(spec: GuestSpec) -> GuestSpec:
    def a(p: Path | None) -> Path | None:
        return None if p is None else Path(p).absolute()

    return dataclasses.replace(
        spec,
        disk_path=a(spec.disk_path),
        kernel=a(spec.kernel),
        initrd=a(spec.initrd),
        seed_iso=a(spec.seed_iso),
    )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------- QMP monitor


class _Monitor:
    """One persistent QMP connection to one QEMU process.  Lives on the driver loop."""

    def __init__(self, driver: QemuDriver, instance_id: str, paths: RunPaths, proc: _Proc) -> None:
        self.driver = driver
        self.instance_id = instance_id
        self.paths = paths
        self.proc = proc
        self.pid = proc.pid
        self.qmp = QMPClient(f"hackboot-{instance_id}")
        self.rebooting = False
        self.exit_reason: str | None = None  # set when the driver itself asked for the exit
        self.saw_shutdown: str | None = None  # SHUTDOWN reason, outside soft reboots
        self.closing = False
        self.finished = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._bg: set[asyncio.Future[None]] = set()

    # ---- setup / teardown

    async def start(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.exited = asyncio.Event()  # EXITED handled, monitor forgotten
        self.proc_gone = asyncio.Event()  # pidfd fired
        self.guest_off = asyncio.Event()  # SHUTDOWN seen
        assert self.proc.fd is not None
        loop.add_reader(self.proc.fd, self._on_pidfd)
        try:
            await asyncio.wait_for(self.qmp.connect(str(self.paths.qmp_socket)), timeout)
        except BaseException:
            self._remove_reader()
            raise
        self._start_tasks()

    def _start_tasks(self) -> None:
        self._pump_task = asyncio.create_task(self._pump_events())
        self._watch_task = asyncio.create_task(self._watch_connection())
        self._tasks = [self._pump_task, self._watch_task]

    def _remove_reader(self) -> None:
        if self.proc.fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.proc.fd)

    async def detach(self) -> None:
        """Driver shutdown: drop the connection quietly, leave QEMU alone."""
        self.closing = True
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._remove_reader()
        self.proc.close()

    # ---- commands

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        if self.finished or self.qmp.runstate != Runstate.RUNNING:
            raise GuestNotRunning(f"{self.instance_id}: QEMU is not running")
        try:
            return await asyncio.wait_for(
                self.qmp.execute(cmd, args), timeout if timeout is not None else self.driver.qmp_timeout
            )
        except ExecuteError as e:
            raise DriverError(f"{self.instance_id}: QMP {cmd} failed: {e}") from e
        except (ExecInterruptedError, QMPError, EOFError, ConnectionError) as e:
            raise GuestNotRunning(f"{self.instance_id}: QMP connection lost during {cmd}") from e
        except TimeoutError as e:
            raise DriverError(f"{self.instance_id}: QMP {cmd} timed out") from e

    async def status(self) -> str:
        return str((await self.execute("query-status"))["status"])

    async def _wait(self, ev: asyncio.Event, timeout: float) -> bool:
        try:
            await asyncio.wait_for(ev.wait(), max(timeout, 0.001))
            return True
        except TimeoutError:
            return ev.is_set()

    async def _quit_quietly(self) -> None:
        with contextlib.suppress(DriverError):
            await self.execute("quit", timeout=5)

    async def shutdown(self, timeout: float) -> None:
        self.exit_reason = self.exit_reason or "shutdown"
        try:
            status = await self.status()
        except DriverError:
            status = None
        if status == "running" and timeout > 0:
            with contextlib.suppress(DriverError):
                await self.execute("system_powerdown")
            if await self._wait(self.exited, timeout):
                return
        await self.terminate(grace=10.0, use_quit=True)

    async def terminate(self, grace: float, use_quit: bool = True) -> None:
        """quit (or SIGTERM), then SIGKILL after ``grace`` seconds; returns once EXITED was handled."""
        if self.finished:
            return
        self.exit_reason = self.exit_reason or "terminated"
        if use_quit and grace > 0:
            await self._quit_quietly()
        elif grace > 0:
            self.proc.signal(signal.SIGTERM)
        if grace > 0 and await self._wait(self.exited, grace):
            return
        self.proc.signal(signal.SIGKILL)
        if await self._wait(self.exited, 10):
            return
        await self._finish()  # QEMU stuck in D state; report it gone anyway

    async def reboot(self, hard: bool, timeout: float) -> None:
        status = await self.status()
        if not hard and status == "running":
            self.rebooting = True
            self.guest_off.clear()
            try:
                await self.execute("system_powerdown")
                if not await self._wait(self.guest_off, timeout):
                    log.info("%s ignored ACPI power button for %.0fs, hard reset", self.instance_id, timeout)
                await self.execute("system_reset")
            finally:
                self.rebooting = False
        else:
            await self.execute("system_reset")
        if await self.status() != "running":
            await self.execute("cont")

    # ---- event side

    def _on_pidfd(self) -> None:
        self._remove_reader()
        self.proc_gone.set()
        # Belt and braces: the QMP socket's EOF normally reports the exit first.
        asyncio.get_running_loop().call_later(2.0, lambda: self._background(self._late_exit()))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)  # keep a reference until done (the loop holds only weak ones)
        task.add_done_callback(self._bg.discard)

    async def _late_exit(self) -> None:
        if not self.finished and not self.closing:
            log.warning("%s: QEMU exited but QMP did not notice; finishing", self.instance_id)
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            await self._finish()

    async def _pump_events(self) -> None:
        while True:
            msg = await self.qmp.events.get()
            self._handle(msg)
            # qemu.qmp's default listener also keeps every event in an unbounded
            # ``history``; a guest that runs for months must not grow it forever.
            with contextlib.suppress(AttributeError):
                self.qmp.events._history.clear()

    def _handle(self, msg: Any) -> None:
        name = msg.get("event")
        data = dict(msg.get("data") or {})
        try:
            kind = EventKind(name)
        except ValueError:
            log.debug("%s: ignoring QMP event %s", self.instance_id, name)
            return
        if kind is EventKind.SHUTDOWN:
            self.guest_off.set()
            if not self.rebooting:
                reason = str(data.get("reason", "shutdown"))
                self.saw_shutdown = reason
                self.driver._write_shutoff(self.paths, reason)
                if reason != "host-qmp-quit":
                    # the guest powered off (QEMU is paused, see -action): reap it
                    self.exit_reason = self.exit_reason or reason
                    self._background(self._quit_quietly())
        self.driver._emit(self.instance_id, kind, data)

    async def _watch_connection(self) -> None:
        while self.qmp.runstate == Runstate.RUNNING:
            await self.qmp.runstate_changed()
        with contextlib.suppress(Exception):  # EOFError when QEMU hung up
            await self.qmp.disconnect()
        self._pump_task.cancel()
        with contextlib.suppress(BaseException):
            await self._pump_task
        for msg in self.qmp.events.clear():  # events that raced with the EOF, in order
            self._handle(msg)
        if self.closing or self.finished:
            return
        if await self._wait(self.proc_gone, 2.0) or self.proc.exited():
            await self._finish()
            return
        # QEMU is alive but the monitor hung up on us: report it and try again.
        self.driver._emit(self.instance_id, EventKind.DISCONNECTED, {"pid": self.pid})
        for _ in range(5):
            await asyncio.sleep(0.5)
            if self.closing or self.finished or self.proc_gone.is_set():
                break
            self.qmp = QMPClient(f"hackboot-{self.instance_id}")
            try:
                await asyncio.wait_for(self.qmp.connect(str(self.paths.qmp_socket)), 5)
            except (TimeoutError, QMPError, OSError):
                continue
            self._start_tasks()
            return
        if self.proc_gone.is_set() or self.proc.exited():
            await self._finish()
        else:
            log.error("%s: lost QMP connection to live QEMU pid %s", self.instance_id, self.pid)
            self.driver._forget(self)
            self._remove_reader()
            self.proc.close()

    async def _finish(self) -> None:
        """QEMU is gone: record how, forget the monitor, emit EXITED (exactly once)."""
        if self.finished:
            return
        self.finished = True
        clean = self.saw_shutdown is not None or self.exit_reason is not None
        reason = self.exit_reason or self.saw_shutdown or "unexpected-exit"
        if clean:
            self.driver._write_shutoff(self.paths, reason)
        self._remove_reader()
        self.proc.close()
        self.driver._forget(self)
        self.driver._emit(self.instance_id, EventKind.EXITED, {"clean": clean, "reason": reason, "pid": self.pid})
        self.exited.set()


# --------------------------------------------------------------------------- the driver


class QemuDriver(ComputeDriver):
    """:class:`~hackboot.compute.driver.ComputeDriver` for QEMU (KVM or TCG).

    :param state_dir: root of the run dirs (``<state_dir>/instances/<id>/``).
        Keep it short: the QMP socket path must fit in 107 bytes.
    :param qemu_binary: QEMU system emulator (resolved on ``$PATH``).
    :param console_log_max_bytes: console logs are trimmed to half this size
        once they exceed it (checked every ``housekeeping_interval`` seconds and
        on every :meth:`console_log` call).
    :param qmp_timeout: per-command QMP timeout.
    :param spawn_timeout: how long QEMU may take to initialise and daemonize.
    :param sandbox: run QEMU under its seccomp ``-sandbox``.
    """

    def __init__(
        self,
        state_dir: Path,
        qemu_binary: str = QEMU_BINARY,
        *,
        console_log_max_bytes: int = CONSOLE_LOG_MAX_BYTES,
        qmp_timeout: float = 10.0,
        spawn_timeout: float = 60.0,
        housekeeping_interval: float = 2.0,
        sandbox: bool = True,
    ) -> None:
        super().__init__()
        self.state_dir = Path(state_dir).absolute()
        self.instances_dir = self.state_dir / "instances"
        self.instances_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.qemu_binary = shutil.which(qemu_binary) or qemu_binary
        self.console_log_max_bytes = console_log_max_bytes
        self.qmp_timeout = qmp_timeout
        self.spawn_timeout = spawn_timeout
        self.housekeeping_interval = housekeeping_interval
        self.sandbox = sandbox
        self._monitors: dict[str, _Monitor] = {}
        self._mon_lock = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._locks_lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hackboot-qemu-loop", daemon=True)
        self._thread.start()
        self._housekeeper = asyncio.run_coroutine_threadsafe(self._housekeeping(), self._loop)

    # ----------------------------------------------------------------- plumbing

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("QemuDriver's synchronous API must not be called from its event loop")
        if self._closed:
            coro.close()
            raise DriverError("driver is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise DriverError("driver operation timed out") from None

    def _lock(self, instance_id: str) -> threading.RLock:
        with self._locks_lock:
            return self._locks.setdefault(instance_id, threading.RLock())

    def paths(self, instance_id: str) -> RunPaths:
        return RunPaths.for_instance(self.state_dir, instance_id)

    def _monitor(self, instance_id: str) -> _Monitor | None:
        with self._mon_lock:
            mon = self._monitors.get(instance_id)
        return None if mon is None or mon.finished else mon

    def _forget(self, mon: _Monitor) -> None:
        with self._mon_lock:
            if self._monitors.get(mon.instance_id) is mon:
                del self._monitors[mon.instance_id]

    async def _attach(self, instance_id: str, paths: RunPaths, proc: _Proc) -> _Monitor:
        mon = _Monitor(self, instance_id, paths, proc)
        await mon.start(self.qmp_timeout)
        with self._mon_lock:
            self._monitors[instance_id] = mon
        return mon

    def _write_shutoff(self, paths: RunPaths, reason: str) -> None:
        if not paths.run_dir.is_dir():
            return
        with contextlib.suppress(OSError):
            _atomic_write(paths.shutoff_json, json.dumps({"reason": reason, "at": time.time()}))

    def _dead_state(self, paths: RunPaths) -> GuestState:
        if not paths.run_dir.is_dir():
            return GuestState.MISSING
        return GuestState.SHUTOFF if paths.shutoff_json.exists() else GuestState.CRASHED

    def _load_spec(self, paths: RunPaths) -> GuestSpec | None:
        try:
            return GuestSpec.from_dict(json.loads(paths.spec_json.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.housekeeping_interval)
            with self._mon_lock:
                mons = list(self._monitors.values())
            for mon in mons:
                try:
                    trim_console_log(mon.paths.console_log, self.console_log_max_bytes)
                except OSError as e:
                    log.warning("%s: cannot trim console log: %s", mon.instance_id, e)

    def _make_handle(self, mon: _Monitor, adopted: bool) -> GuestHandle:
        spec = self._load_spec(mon.paths)
        return GuestHandle(
            instance_id=mon.instance_id,
            pid=mon.pid,
            run_dir=mon.paths.run_dir,
            accel=spec.accel if spec else None,
            adopted=adopted,
        )

    def _monitor_or_adopt(self, instance_id: str) -> _Monitor | None:
        mon = self._monitor(instance_id)
        if mon is None and self.adopt(instance_id) is not None:
            mon = self._monitor(instance_id)
        return mon

    def _require_monitor(self, instance_id: str) -> _Monitor:
        mon = self._monitor_or_adopt(instance_id)
        if mon is None:
            if not self.paths(instance_id).run_dir.is_dir():
                raise GuestNotFound(instance_id)
            raise GuestNotRunning(f"{instance_id} is not running")
        return mon

    def resolve_direct_io(self, spec: GuestSpec) -> bool:
        if spec.disk_path is None or spec.disk_cache != "auto":
            return spec.disk_cache == "none"
        return probe_direct_io(spec.disk_path)

    def build_argv(self, spec: GuestSpec) -> list[str]:
        """The argv spawn() would use for ``spec`` (probes O_DIRECT when disk_cache is auto)."""
        spec = _absolute_paths(spec)
        return build_argv(
            spec,
            self.paths(spec.instance_id),
            qemu_binary=self.qemu_binary,
            direct_io=self.resolve_direct_io(spec),
            sandbox=self.sandbox,
        )

    # ----------------------------------------------------------------- contract

    def spawn(self, spec: GuestSpec) -> GuestHandle:
        spec.validate()
        spec = _absolute_paths(spec)  # QEMU is started in / (it must not pin our cwd)
        iid = spec.instance_id
        paths = self.paths(iid)
        with self._lock(iid):
            if self._monitor(iid) is not None:
                raise GuestAlreadyRunning(iid)
            stale = open_our_qemu(paths)
            if stale is not None:
                stale.close()
                raise GuestAlreadyRunning(f"{iid}: QEMU pid {stale.pid} is alive")
            argv = self.build_argv(spec)
            paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for f in (paths.pidfile, paths.qmp_socket, paths.shutoff_json, paths.stderr_log):
                f.unlink(missing_ok=True)
            _atomic_write(paths.cmdline_json, json.dumps(argv, indent=1))
            _atomic_write(paths.spec_json, json.dumps(spec.to_dict(), indent=1))
            for nic in spec.nics:
                nic.prepare(iid)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            with open(paths.console_log, "ab") as f:
                f.write(f"\r\n--- hackboot: starting {spec.name} ({iid}) at {stamp} ---\r\n".encode())

            rc: int | None
            with open(paths.stderr_log, "wb") as err:
                try:
                    rc = subprocess.run(
                        argv, check=False, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                        close_fds=True, cwd="/", timeout=self.spawn_timeout,
                    ).returncode  # fmt: skip
                except subprocess.TimeoutExpired:
                    rc = None
            if rc != 0:
                self._kill_leftover(paths)
                self._write_shutoff(paths, "spawn-failed")
                raise SpawnError(f"QEMU failed to start (exit status {rc})", self._stderr(paths))
            proc = open_our_qemu(paths)
            if proc is None:
                raise SpawnError("QEMU exited right after starting", self._stderr(paths))

            mon: _Monitor | None = None
            try:
                mon = self._call(self._attach(iid, paths, proc))
                status = self._call(mon.status())
                if status != "prelaunch":
                    raise SpawnError(f"unexpected QEMU state {status!r} after start")
                kvm = self._call(mon.execute("query-kvm"))
                if bool(kvm.get("enabled")) != (spec.accel == "kvm"):
                    raise SpawnError(f"requested accel {spec.accel} but query-kvm says {kvm}")
                if not spec.start_paused:
                    self._call(mon.execute("cont"))
            except BaseException as e:
                if mon is not None:
                    mon.exit_reason = "spawn-failed"
                    with contextlib.suppress(Exception):
                        self._call(mon.terminate(grace=0))
                else:
                    proc.signal(signal.SIGKILL)
                    proc.exited(10)
                    proc.close()
                self._write_shutoff(paths, "spawn-failed")
                if isinstance(e, SpawnError) or not isinstance(e, Exception):
                    raise
                raise SpawnError(f"QEMU started but failed checks: {e}", self._stderr(paths)) from e
            log.info("spawned %s as QEMU pid %s", iid, proc.pid)
            return self._make_handle(mon, adopted=False)

    def _stderr(self, paths: RunPaths) -> str:
        try:
            return paths.stderr_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _kill_leftover(self, paths: RunPaths) -> None:
        proc = open_our_qemu(paths)
        if proc is not None:
            proc.signal(signal.SIGKILL)
            proc.exited(10)
            proc.close()

    def adopt(self, instance_id: str) -> GuestHandle | None:
        check_instance_id(instance_id)
        with self._lock(instance_id):
            mon = self._monitor(instance_id)
            if mon is not None:
                return self._make_handle(mon, adopted=True)
            paths = self.paths(instance_id)
            if not paths.run_dir.is_dir():
                return None
            proc = open_our_qemu(paths)
            if proc is None:
                return None
            try:
                mon = self._call(self._attach(instance_id, paths, proc))
            except (TimeoutError, QMPError, OSError, concurrent.futures.TimeoutError) as e:
                proc.close()
                raise DriverError(
                    f"{instance_id}: QEMU pid {proc.pid} is alive but its QMP socket is unusable "
                    f"(another client connected?): {e}"
                ) from e
            try:
                status = self._call(mon.status())
            except GuestNotRunning:
                return None
            if status == "shutdown":
                # powered off while nobody was watching: record it and reap
                mon.saw_shutdown = mon.exit_reason = "guest-shutdown"
                self._write_shutoff(paths, "guest-shutdown")
                self._call(mon.terminate(grace=5))
                return None
            with contextlib.suppress(OSError):
                trim_console_log(paths.console_log, self.console_log_max_bytes)
            log.info("adopted %s (QEMU pid %s, %s)", instance_id, mon.pid, status)
            return self._make_handle(mon, adopted=True)

    def state(self, instance_id: str) -> GuestState:
        if not isinstance(instance_id, str) or not INSTANCE_ID_RE.match(instance_id):
            return GuestState.MISSING
        paths = self.paths(instance_id)
        mon = self._monitor(instance_id)
        if mon is None:
            if not paths.run_dir.is_dir():
                return GuestState.MISSING
            try:
                mon = self._monitor_or_adopt(instance_id)
            except DriverError as e:
                log.warning("%s", e)
                return GuestState.RUNNING  # alive, but we cannot ask it
            if mon is None:
                return self._dead_state(paths)
        try:
            return state_from_qmp_status(self._call(mon.status()))
        except GuestNotRunning:
            with contextlib.suppress(DriverError):
                self._call(mon._wait(mon.exited, 5.0))
            return self._dead_state(paths)

    def pause(self, instance_id: str) -> None:
        with self._lock(instance_id):
            mon = self._require_monitor(instance_id)
            self._call(mon.execute("stop"))

    def resume(self, instance_id: str) -> None:
        with self._lock(instance_id):
            mon = self._require_monitor(instance_id)
            status = self._call(mon.status())
            if status in ("shutdown", "guest-panicked", "internal-error"):
                raise GuestNotRunning(f"{instance_id} is {status}; reboot(hard=True) it instead")
            self._call(mon.execute("cont"))

    def shutdown(self, instance_id: str, timeout: float = 60.0) -> GuestState:
        check_instance_id(instance_id)
        with self._lock(instance_id):
            mon = self._monitor_or_adopt(instance_id)
            if mon is not None:
                self._call(mon.shutdown(timeout), timeout=timeout + 60)
            return self._dead_state(self.paths(instance_id)) if mon is None or mon.finished else self.state(instance_id)

    def reboot(self, instance_id: str, hard: bool = False, timeout: float = 60.0) -> None:
        with self._lock(instance_id):
            mon = self._require_monitor(instance_id)
            self._call(mon.reboot(hard, timeout), timeout=timeout + 60)

    def destroy(self, instance_id: str, grace: float = 3.0) -> None:
        """See :meth:`ComputeDriver.destroy`; ``grace`` = seconds between quit/SIGTERM and SIGKILL."""
        check_instance_id(instance_id)
        paths = self.paths(instance_id)
        with self._lock(instance_id):
            mon = self._monitor(instance_id)
            if mon is not None:
                mon.exit_reason = "destroyed"
                self._call(mon.terminate(grace), timeout=grace + 60)
            else:
                proc = open_our_qemu(paths)
                if proc is not None:
                    try:
                        proc.signal(signal.SIGTERM)
                        if not proc.exited(grace):
                            proc.signal(signal.SIGKILL)
                            if not proc.exited(10):
                                log.error("%s: QEMU pid %s survived SIGKILL", instance_id, proc.pid)
                    finally:
                        proc.close()
            spec = self._load_spec(paths)
            for nic in spec.nics if spec else []:
                try:
                    nic.release(instance_id)
                except Exception:
                    log.exception("%s: releasing NIC %r failed", instance_id, nic)
            for _ in range(3):
                shutil.rmtree(paths.run_dir, ignore_errors=True)
                if not paths.run_dir.exists():
                    break
                time.sleep(0.1)
        log.info("destroyed %s", instance_id)

    def console_log(self, instance_id: str, tail_bytes: int = 64 * 1024) -> bytes:
        paths = self.paths(instance_id)
        if not paths.run_dir.is_dir():
            raise GuestNotFound(instance_id)
        with contextlib.suppress(OSError):
            trim_console_log(paths.console_log, self.console_log_max_bytes)
        try:
            return read_tail(paths.console_log, tail_bytes)
        except FileNotFoundError:
            return b""

    def list_instances(self) -> list[str]:
        try:
            names = os.listdir(self.instances_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if INSTANCE_ID_RE.match(n) and (self.instances_dir / n).is_dir())

    # ----------------------------------------------------------------- extras

    def qmp(self, instance_id: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a raw QMP command (operator/debug escape hatch; also used by tests)."""
        mon = self._require_monitor(instance_id)
        return self._call(mon.execute(command, arguments))

    def pid(self, instance_id: str) -> int | None:
        """PID of the live QEMU of ``instance_id`` (None if not running)."""
        mon = self._monitor(instance_id)
        if mon is not None:
            return mon.pid
        proc = open_our_qemu(self.paths(instance_id))
        if proc is None:
            return None
        proc.close()
        return proc.pid

    def close(self) -> None:
        """Disconnect from all guests (they keep running) and stop the loop thread."""
        if self._closed:
            return

        async def _close_all() -> None:
            self._housekeeper.cancel()
            with self._mon_lock:
                mons = list(self._monitors.values())
                self._monitors.clear()
            for mon in mons:
                await mon.detach()
            # unblock callers still waiting on a coroutine (they get CancelledError)
            me = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not me]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(_close_all(), self._loop).result(15)
        except Exception:  # pragma: no cover - best effort
            log.exception("error while closing QMP connections")
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
        super().close()
