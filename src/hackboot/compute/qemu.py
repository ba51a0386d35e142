"""QEMU driver: one unprivileged, sandboxed ``qemu-system-x86_64`` per guest, driven over QMP.

Process model
-------------
``spawn`` starts QEMU itself (no ``-daemonize``, which needs fork/setsid and so
rules out a full seccomp sandbox) as a detached child in its own session,
running as the unprivileged guest account (:mod:`hackboot.core.privsep`) under
``-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny``.
Killing or restarting the agent never touches guests (the process is
re-parented to init); a new driver finds them again with
:meth:`QemuDriver.adopt` from the instance's *run dir*::

    <state_dir>/instances/<instance_id>/
        qemu.pid       written by the driver right after the spawn
        qmp.sock       QMP monitor: bound by the driver, QEMU gets the listening fd
        console.log    serial console (QEMU appends to an fd), size-capped
        kernel, initrd private copies for direct kernel boot (owned by the guest account)
        cmdline.json   the exact argv; adopt() requires /proc/PID/cmdline to match
        spec.json      the GuestSpec (to release NIC backends after a restart)
        hotplug-nics.json  the NICs hot-plugged into the running process (id -> port, backend)
        qemu-stderr.log  QEMU's stdout and stderr
        shutoff.json   present when the last exit was deliberate (SHUTOFF vs CRASHED)

File access
-----------
QEMU runs as one account shared by all guests, so it is given *file
descriptors*, never paths: disks, their backing chain, the seed ISO and the
console log as fd sets (``-add-fd`` + ``/dev/fdset/N``), the QMP socket as a
listening fd.  Run dirs, instance disks and images stay owned by root, mode
0600 in 0700 directories: an escaped QEMU can reach exactly the files of its own
guest (through the fds it holds), not another tenant's disk, and the base image
it reads is opened read-only for it.  Only the kernel/initrd copies are owned by
the account (QEMU's loader insists on a path: ``/proc/self/fd/N``).  Disks
hot-plugged later (``blockdev-add`` through :meth:`QemuDriver.qmp`) are opened by
the driver and sent over the QMP socket (SCM_RIGHTS + ``add-fd``) the same way.

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
import itertools
import json
import logging
import mmap
import os
import re
import select
import shutil
import signal
import socket
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
    hotplug_port_id,
)
from hackboot.compute.nic import NicBackend, nic_from_dict
from hackboot.core.privsep import Account, give_to, unprivileged_account
from hackboot.core.qmpchild import file_nodes, wait_job

log = logging.getLogger(__name__)

T = TypeVar("T")

QEMU_BINARY = "qemu-system-x86_64"
CONSOLE_LOG_MAX_BYTES = 1024 * 1024
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL
# The full sandbox: no fork/exec (so no -daemonize: we spawn QEMU detached ourselves), no set*id,
# no scheduler/affinity games, no obsolete syscalls.
SANDBOX_OPTS = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
FDSET_OPAQUE = "hackboot:"  # opaque (then the path) of the fd sets given to QEMU: shows which file it is
FDSET_OPAQUE_HOTPLUG = "hackboot:hotplug:"  # fd sets added over QMP, removed once no node uses them
QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
HOTPLUG_PORT_CHASSIS_BASE = 200  # chassis numbers of hot-plug ports (GPU ports use 1, 2, ...)

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
    def hotplug_nics_json(self) -> Path:
        return self.run_dir / "hotplug-nics.json"

    @property
    def stderr_log(self) -> Path:
        return self.run_dir / "qemu-stderr.log"

    @property
    def shutoff_json(self) -> Path:
        return self.run_dir / "shutoff.json"

    @property
    def kernel_copy(self) -> Path:
        return self.run_dir / "kernel"

    @property
    def initrd_copy(self) -> Path:
        return self.run_dir / "initrd"


def qemu_opt(value: str | Path) -> str:
    """Escape a value embedded in a QEMU ``key=value,...`` option string."""
    return str(value).replace(",", ",,")


@dataclass(frozen=True)
class DiskLayer:
    """One file of a disk's backing chain (top first), as QEMU gets it: node name, file, format."""

    node: str
    path: Path
    fmt: str


@dataclass(frozen=True)
class FdRequest:
    """A file the spawner opens (as root) and QEMU inherits; ``key`` names it in :func:`build_argv`."""

    key: str
    path: Path
    flags: int


def hotplug_port_args(count: int) -> list[str]:
    """``-device`` arguments for ``count`` empty PCIe root ports on q35's (not hot-pluggable) root bus."""
    args: list[str] = []
    for i in range(count):
        args += ["-device", f"pcie-root-port,id={hotplug_port_id(i)},chassis={HOTPLUG_PORT_CHASSIS_BASE + i},"
                            "bus=pcie.0"]
    return args


def disk_layers(spec: GuestSpec, chain: list[tuple[Path, str]] | None = None) -> list[DiskLayer]:
    """The root disk and its backing files as QEMU block nodes (``disk0``, ``disk0-b1``, ...).

    ``chain`` is :func:`backing_chain`'s answer (what spawn reads from the qcow2 headers); without
    it the disk is taken to have no backing file (pure command-line tests).
    """
    if spec.disk_path is None:
        return []
    files = chain if chain is not None else [(Path(spec.disk_path), spec.disk_format)]
    return [DiskLayer("disk0" if i == 0 else f"disk0-b{i}", path, fmt) for i, (path, fmt) in enumerate(files)]


def fd_requests(spec: GuestSpec, paths: RunPaths, layers: list[DiskLayer]) -> list[FdRequest]:
    """Every file descriptor QEMU inherits for ``spec``, in a fixed order.

    The top disk gets a read-write and a read-only fd (QEMU picks the one matching the open
    mode, e.g. when a block job reopens it); backing files and the seed only a read-only one,
    so even an escaped QEMU cannot write to a base image shared by other guests.
    """
    reqs = [FdRequest("console", paths.console_log, os.O_WRONLY | os.O_APPEND)]
    for i, layer in enumerate(layers):
        if i == 0:
            reqs.append(FdRequest(f"{layer.node}:rw", layer.path, os.O_RDWR))
        reqs.append(FdRequest(f"{layer.node}:ro", layer.path, os.O_RDONLY))
    if spec.seed_iso is not None:
        reqs.append(FdRequest("seed0:ro", Path(spec.seed_iso), os.O_RDONLY))
    if spec.kernel is not None:
        reqs.append(FdRequest("kernel", paths.kernel_copy, os.O_RDONLY))
        if spec.initrd is not None:
            reqs.append(FdRequest("initrd", paths.initrd_copy, os.O_RDONLY))
    return reqs


def build_argv(
    spec: GuestSpec,
    paths: RunPaths,
    *,
    qemu_binary: str = QEMU_BINARY,
    direct_io: bool = False,
    sandbox: bool = True,
    fds: dict[str, int] | None = None,
    chain: list[tuple[Path, str]] | None = None,
) -> list[str]:
    """The complete QEMU command line for ``spec`` (pure: no I/O).

    QEMU gets file descriptors, not paths (see the module docstring): ``fds`` maps the
    :func:`fd_requests` keys (and ``"qmp"``, the listening QMP socket) to the fd numbers it
    inherits; without it they are numbered 3, 4, ... in request order.  ``chain`` is the root
    disk's backing chain (:func:`backing_chain`).  ``direct_io`` says whether O_DIRECT works for
    the disk (see :func:`probe_direct_io`); it only matters when ``spec.disk_cache`` is
    ``"auto"``.  Raises ``ValueError`` for an invalid spec or a run dir whose socket path would
    not fit in ``sun_path``.
    """
    spec.validate()
    sock = str(paths.qmp_socket)
    if len(sock.encode()) > UNIX_PATH_MAX:
        raise ValueError(f"QMP socket path too long ({len(sock)} > {UNIX_PATH_MAX}): {sock}")
    layers = disk_layers(spec, chain)
    reqs = fd_requests(spec, paths, layers)
    if fds is None:
        fds = {"qmp": 3} | {r.key: 4 + i for i, r in enumerate(reqs)}

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
    ]  # fmt: skip
    if sandbox:
        argv += ["-sandbox", SANDBOX_OPTS]
    # fd sets: one per file, numbered in request order (a disk's rw and ro fds share a set)
    sets: dict[str, int] = {}
    for req in reqs:
        if req.key in ("kernel", "initrd"):
            continue
        name = req.key.split(":")[0]
        set_id = sets.setdefault(name, len(sets) + 1)
        argv += ["-add-fd", f"fd={fds[req.key]},set={set_id},opaque={qemu_opt(FDSET_OPAQUE + str(req.path))}"]
    argv += [
        "-chardev", f"socket,id=qmp,fd={fds['qmp']},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-S",
        # keep the process after guest poweroff (see module docstring); pause on
        # panic so the state is CRASHED and the console/memory can be inspected
        "-action", "shutdown=pause",
        "-action", "panic=pause",
        "-chardev", f"file,id=serial0,path=/dev/fdset/{sets['console']},append=on",
        "-serial", "chardev:serial0",
        "-device", "pvpanic",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0,id=rng-pci0",
    ]  # fmt: skip

    if layers:
        cache = spec.disk_cache
        if cache == "auto":
            cache = "none" if direct_io else "writeback"
        direct = cache == "none"
        cache_opts = {"direct": direct, "no-flush": False}
        # bottom first: each node names its backing explicitly, so QEMU never opens a
        # backing file by the name stored in an image header
        for i in reversed(range(len(layers))):
            layer = layers[i]
            top = i == 0
            node: dict[str, object] = {
                "driver": layer.fmt, "node-name": layer.node, "read-only": not top, "cache": cache_opts,
                "file": {"driver": "file", "filename": f"/dev/fdset/{sets[layer.node]}",
                         "aio": "native" if direct else "threads", "cache": cache_opts},
            }  # fmt: skip
            if top:
                node |= {"discard": "unmap", "detect-zeroes": "unmap"}
            if layer.fmt == "qcow2":
                node["backing"] = layers[i + 1].node if i + 1 < len(layers) else None
            argv += ["-blockdev", json.dumps(node, separators=(",", ":"))]
        argv += ["-device", "virtio-blk-pci,drive=disk0,id=virtio-disk0,bootindex=1"]
    if spec.seed_iso is not None:
        seed = {"driver": "raw", "node-name": "seed0", "read-only": True,
                "file": {"driver": "file", "filename": f"/dev/fdset/{sets['seed0']}", "read-only": True}}
        argv += [
            "-blockdev", json.dumps(seed, separators=(",", ":")),
            "-device", "virtio-blk-pci,drive=seed0,id=virtio-seed0",
        ]  # fmt: skip
    if spec.kernel is not None:
        # QEMU's kernel loader opens a path: a private copy it owns, reached through its fd
        argv += ["-kernel", f"/proc/self/fd/{fds['kernel']}"]
        if spec.initrd is not None:
            argv += ["-initrd", f"/proc/self/fd/{fds['initrd']}"]
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

    argv += hotplug_port_args(spec.hotplug_ports)
    argv += list(spec.extra_args)
    return argv


# --------------------------------------------------------------------------- host helpers


def _qcow2_backing_name(path: Path) -> tuple[str | None, str | None]:
    """The backing file name and backing format stored in a qcow2 header (None when absent)."""
    try:
        with open(path, "rb") as f:
            header = f.read(104)
            if len(header) < 72 or header[:4] != b"QFI\xfb":
                return None, None
            version = struct.unpack(">I", header[4:8])[0]
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not size or size > 4096:
                return None, None
            fmt = None
            header_len = struct.unpack(">I", header[100:104])[0] if version >= 3 and len(header) >= 104 else 72
            f.seek(header_len)
            for _ in range(64):  # header extensions: (type, length, data padded to 8 bytes), type 0 ends
                ext = f.read(8)
                if len(ext) < 8:
                    break
                kind, length = struct.unpack(">II", ext)
                if kind == 0 or length > 65536:
                    break
                data = f.read(length)
                f.seek((8 - length % 8) % 8, os.SEEK_CUR)
                if kind == QCOW2_EXT_BACKING_FORMAT:
                    fmt = data.decode(errors="replace")
            f.seek(offset)
            name = f.read(size).decode(errors="surrogateescape")
    except (OSError, struct.error):
        return None, None
    return name, fmt


def _qcow2_backing_file(path: Path) -> Path | None:
    name, _ = _qcow2_backing_name(path)
    if not name or ":" in name.split("/", 1)[0]:  # protocol (nbd:, json:) - not a local file
        return None
    backing = Path(name)
    return backing if backing.is_absolute() else path.parent / backing


def backing_chain(disk: Path, fmt: str, max_depth: int = 16) -> list[tuple[Path, str]]:
    """``disk`` and its backing files with their formats, top first (read from the qcow2 headers).

    QEMU gets each file as an fd and each node its backing explicitly, so the chain is resolved
    here: a backing format missing from the header is taken as ``raw`` (never probed), and a
    backing that is not a local qcow2/raw file is refused.
    """
    chain = [(Path(disk), fmt)]
    while chain[-1][1] == "qcow2":
        path = chain[-1][0]
        name, backing_fmt = _qcow2_backing_name(path)
        if not name:
            break
        if ":" in name.split("/", 1)[0]:
            raise ValueError(f"{path}: backing file {name!r} is not a local file")
        backing = Path(name) if os.path.isabs(name) else path.parent / name
        backing_fmt = backing_fmt or "raw"
        if backing_fmt not in ("qcow2", "raw"):
            raise ValueError(f"{path}: unsupported backing format {backing_fmt!r}")
        if len(chain) >= max_depth:
            raise ValueError(f"{disk}: backing chain deeper than {max_depth}")
        chain.append((backing, backing_fmt))
    return chain


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
_fallocate: Any
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
    fall back to "a qemu-system binary with this instance's ``-uuid``".
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
    uuid_arg = GuestSpec(paths.run_dir.name, "x", 1, 32).smbios_uuid
    return "qemu-system" in os.path.basename(argv[0]) and any(
        a == "-uuid" and b == uuid_arg for a, b in itertools.pairwise(argv))


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


def _exit_status(child: subprocess.Popen[bytes]) -> str:
    try:
        rc = child.wait(timeout=1)
    except subprocess.TimeoutExpired:
        return "no QMP answer"
    return f"exit status {rc}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def guest_launch(account: Account, spec: GuestSpec) -> tuple[list[str], dict[str, Any]]:
    """How to start QEMU as ``account``: an argv prefix and ``subprocess`` arguments.

    Supplementary groups are only those the guest needs: the group of ``/dev/kvm`` for KVM.
    With VFIO devices QEMU pins all guest RAM, so its locked-memory limit must cover it and
    only root may raise it: ``prlimit`` (as root) then ``setpriv`` (dropping to the account)
    exec QEMU in place, same pid. The VFIO group devices (``/dev/vfio/N``) themselves must be
    given to the account by the operator (e.g. a udev rule).
    """
    if account.is_current:
        return [], {}
    groups: list[int] = []
    if spec.accel == "kvm":
        with contextlib.suppress(OSError):
            groups.append(os.stat("/dev/kvm").st_gid)
    if not spec.gpu_pci_addresses:
        return [], {"user": account.uid, "group": account.gid, "extra_groups": groups}
    memlock = (spec.memory_mb + 1024) * 1024 * 1024
    drop = [f"--reuid={account.uid}", f"--regid={account.gid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]
    return [shutil.which("prlimit") or "prlimit", f"--memlock={memlock}:{memlock}", "--",
            shutil.which("setpriv") or "setpriv", *drop, "--"], {}


def _private_copy(src: Path, dst: Path, account: Account) -> None:
    """A copy of ``src`` that only ``account`` (and root) can read."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
    give_to(account, tmp)
    os.chmod(tmp, 0o400)
    tmp.replace(dst)


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
        self.fd_lock = asyncio.Lock()  # an fd sent over the socket must be taken by the very next add-fd
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

    async def add_fds(self, path: Path, flags: list[int], opaque: str) -> int:
        """Open ``path`` once per mode in ``flags`` and hand the fds to QEMU as one fd set."""
        async with self.fd_lock:
            fdset: int | None = None
            for flag in flags:
                try:
                    fd = os.open(path, flag | os.O_CLOEXEC)
                except OSError as e:
                    raise DriverError(f"{self.instance_id}: cannot open {path}: {e.strerror}") from e
                try:
                    if self.finished or self.qmp.runstate != Runstate.RUNNING:
                        raise GuestNotRunning(f"{self.instance_id}: QEMU is not running")
                    self.qmp.send_fd_scm(fd)
                    args: dict[str, Any] = {"opaque": opaque}
                    if fdset is not None:
                        args["fdset-id"] = fdset
                    fdset = int((await self.execute("add-fd", args))["fdset-id"])
                finally:
                    os.close(fd)
            assert fdset is not None
            return fdset

    async def blockdev_add(self, arguments: dict[str, Any]) -> Any:
        """``blockdev-add`` with every file opened by us and passed as an fd set (QEMU has no path access)."""
        args = json.loads(json.dumps(arguments))  # a private copy we can rewrite
        flags = [os.O_RDONLY] if args.get("read-only") else [os.O_RDWR, os.O_RDONLY]
        added: list[int] = []
        try:
            for node in file_nodes(args):
                path = Path(node["filename"])
                fdset = await self.add_fds(path, flags, f"{FDSET_OPAQUE_HOTPLUG}{path}")
                added.append(fdset)
                node["filename"] = f"/dev/fdset/{fdset}"
                # QEMU's image locks are OFD locks: they belong to the open file description,
                # which the fd kept in the set shares with the node's dup. A node reopened
                # read-only (an external snapshot) would leave its write lock behind on the
                # description until the set goes, and refuse a clone of that very file. The
                # agent serialises all work on a volume and routes it through this QEMU while
                # attached, so for hot-plugged files the locks are dropped rather than kept stale.
                node.setdefault("locking", "off")
            return await self.execute("blockdev-add", args)
        except BaseException:
            for fdset in added:
                with contextlib.suppress(Exception):
                    await self.execute("remove-fd", {"fdset-id": fdset})
            raise

    async def prune_fdsets(self) -> None:
        """Release the hot-plug fd sets no block node uses any more (after blockdev-del)."""
        nodes = json.dumps(await self.execute("query-named-block-nodes", {"flat": True}))
        used = {int(m) for m in re.findall(r"/dev/fdset/(\d+)", nodes)}
        for fdset in await self.execute("query-fdsets"):
            ours = any(str(fd.get("opaque", "")).startswith(FDSET_OPAQUE_HOTPLUG) for fd in fdset.get("fds", []))
            if ours and fdset["fdset-id"] not in used:
                await self.execute("remove-fd", {"fdset-id": fdset["fdset-id"]})

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
        self.driver._reap(self.pid, self.proc.fd)  # our child while this agent lives: no zombie
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
    :param spawn_timeout: how long QEMU may take to initialise (until QMP answers).
    :param sandbox: run QEMU under its seccomp ``-sandbox``.
    """

    # GPU_PASSTHROUGH: the driver builds VFIO devices; whether this host has GPUs bound to
    # vfio-pci is the placement's business (the host's declared inventory), not the driver's.
    capabilities = frozenset({
        Capability.PAUSED_START, Capability.GPU_PASSTHROUGH, Capability.BLOCK_GRAPH,
        Capability.HOTPLUG_DISK, Capability.HOTPLUG_NIC, Capability.LIVE_SNAPSHOT,
    })

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
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # QEMUs we started, until reaped
        self._children_lock = threading.Lock()
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

    def _reap(self, pid: int, pidfd: int | None = None) -> None:
        """Collect the exit status of an exited QEMU if it is a child of this process (no zombie)."""
        with self._children_lock:
            child = self._children.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
            return
        # started by an earlier driver of this process (adopted after close()): maybe still our
        # child. Waiting on the pidfd targets exactly that process, never a recycled pid.
        if pidfd is not None:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)

    async def _attach(self, instance_id: str, paths: RunPaths, proc: _Proc, timeout: float | None = None) -> _Monitor:
        mon = _Monitor(self, instance_id, paths, proc)
        await mon.start(timeout or self.qmp_timeout)
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

    def build_argv(self, spec: GuestSpec, fds: dict[str, int] | None = None) -> list[str]:
        """The argv spawn() would use for ``spec`` (reads the disk's backing chain, probes O_DIRECT)."""
        spec = _absolute_paths(spec)
        chain = backing_chain(spec.disk_path, spec.disk_format) if spec.disk_path is not None else None
        return build_argv(
            spec,
            self.paths(spec.instance_id),
            qemu_binary=self.qemu_binary,
            direct_io=self.resolve_direct_io(spec),
            sandbox=self.sandbox,
            fds=fds,
            chain=chain,
        )

    # ----------------------------------------------------------------- contract

    def spawn(self, spec: GuestSpec) -> GuestHandle:
        self.check_spec(spec)
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
            try:
                self.build_argv(spec)  # validates the spec, the socket path and the disk chain
            except ValueError as e:
                if spec.disk_path is not None and "backing" in str(e):
                    raise SpawnError(f"unusable disk: {e}") from None
                raise
            account = unprivileged_account()
            paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for stale_file in (paths.pidfile, paths.qmp_socket, paths.shutoff_json, paths.stderr_log,
                               paths.kernel_copy, paths.initrd_copy):
                stale_file.unlink(missing_ok=True)
            self._release_hotplug_nics(paths)  # plugged into the previous process, gone with it
            for nic in spec.nics:
                nic.prepare(iid)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            fd = os.open(paths.console_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "ab") as f:
                f.write(f"\r\n--- hackboot: starting {spec.name} ({iid}) at {stamp} ---\r\n".encode())

            opened: list[int] = []
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if spec.kernel is not None:
                    _private_copy(spec.kernel, paths.kernel_copy, account)
                    if spec.initrd is not None:
                        _private_copy(spec.initrd, paths.initrd_copy, account)
                # We bind the QMP socket and QEMU inherits the listening fd: the socket file stays
                # root's, in a run dir QEMU cannot enter.
                listener.bind(str(paths.qmp_socket))
                os.chmod(paths.qmp_socket, 0o600)
                listener.listen(8)
                fds = {"qmp": listener.fileno()}
                chain = backing_chain(spec.disk_path, spec.disk_format) if spec.disk_path is not None else None
                for req in fd_requests(spec, paths, disk_layers(spec, chain)):
                    fds[req.key] = os.open(req.path, req.flags | os.O_CLOEXEC)
                    opened.append(fds[req.key])
                argv = self.build_argv(spec, fds)
                _atomic_write(paths.cmdline_json, json.dumps(argv, indent=1))
                _atomic_write(paths.spec_json, json.dumps(spec.to_dict(), indent=1))
                err_fd = os.open(paths.stderr_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    # A child in its own session (no terminal signal reaches it); it is re-parented
                    # to init when the agent exits, and reaped by us while we live.
                    prefix, switch = guest_launch(account, spec)
                    child = subprocess.Popen(
                        [*prefix, *argv], stdin=subprocess.DEVNULL, stdout=err_fd, stderr=err_fd, close_fds=True,
                        pass_fds=tuple(fds.values()), cwd="/", start_new_session=True, **switch,
                    )  # fmt: skip
                finally:
                    os.close(err_fd)
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                self._write_shutoff(paths, "spawn-failed")
                raise SpawnError(f"cannot start QEMU: {e}") from e
            finally:
                listener.close()
                for fd in opened:
                    os.close(fd)
            with self._children_lock:
                self._children[child.pid] = child
            _atomic_write(paths.pidfile, f"{child.pid}\n")
            proc = _Proc(child.pid)

            mon: _Monitor | None = None
            try:
                try:
                    # QEMU answers on QMP once initialised; if it dies first the socket is refused.
                    mon = self._call(self._attach(iid, paths, proc, timeout=self.spawn_timeout))
                except (TimeoutError, QMPError, OSError, DriverError, concurrent.futures.TimeoutError) as e:
                    raise SpawnError(f"QEMU failed to start ({_exit_status(child)})", self._stderr(paths)) from e
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
                self._reap(child.pid)
                self._write_shutoff(paths, "spawn-failed")
                if isinstance(e, SpawnError) or not isinstance(e, Exception):
                    raise
                raise SpawnError(f"QEMU started but failed checks: {e}", self._stderr(paths)) from e
            log.info("spawned %s as QEMU pid %s (uid %s)", iid, proc.pid, account.uid)
            return self._make_handle(mon, adopted=False)

    def _stderr(self, paths: RunPaths) -> str:
        try:
            return paths.stderr_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

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
            self._release_hotplug_nics(paths)
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
        """See :meth:`ComputeDriver.qmp` (volumes hot-plug through it; operators debug with it).

        QEMU cannot open files itself: the ``{"driver": "file", "filename": ...}`` nodes of a
        ``blockdev-add`` are opened here and passed to it as fd sets (read-only when the node
        is), which a ``blockdev-del`` releases again.
        """
        mon = self._require_monitor(instance_id)
        if command == "blockdev-add" and arguments:
            return self._call(mon.blockdev_add(arguments))
        result = self._call(mon.execute(command, arguments))
        if command == "blockdev-del":
            with contextlib.suppress(DriverError):
                self._call(mon.prune_fdsets())
        return result

    # ----------------------------------------------------------------- NIC hot-plug

    def _load_hotplug_nics(self, paths: RunPaths) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(paths.hotplug_nics_json.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_hotplug_nics(self, paths: RunPaths, records: dict[str, dict[str, Any]]) -> None:
        if records:
            _atomic_write(paths.hotplug_nics_json, json.dumps(records, indent=1))
        else:
            paths.hotplug_nics_json.unlink(missing_ok=True)

    def _release_hotplug_nics(self, paths: RunPaths) -> None:
        """Release the backends of NICs hot-plugged into a process that is gone, and forget them."""
        for nic_id, record in self._load_hotplug_nics(paths).items():
            try:
                nic_from_dict(record["nic"]).release(paths.run_dir.name)
            except Exception:
                log.exception("%s: releasing hot-plugged NIC %s failed", paths.run_dir.name, nic_id)
        paths.hotplug_nics_json.unlink(missing_ok=True)

    def _peripherals(self, mon: _Monitor) -> set[str]:
        return {p["name"] for p in self._call(mon.execute("qom-list", {"path": "/machine/peripheral"}))}

    def _port_free(self, mon: _Monitor, index: int) -> bool:
        """Whether nothing is plugged into hot-plug port ``index`` (a volume, a NIC, anything)."""
        port = hotplug_port_id(index)
        try:
            props = self._call(mon.execute("qom-list", {"path": f"/machine/peripheral/{port}/{port}"}))
        except DriverError:
            return False  # no such port
        return not any(str(p.get("name", "")).startswith("child[") for p in props)

    def pass_fd(self, instance_id: str, name: str, fd: int) -> None:
        """See :meth:`ComputeDriver.pass_fd`: QMP ``getfd`` with the descriptor as SCM_RIGHTS data."""
        self.require(Capability.HOTPLUG_NIC, "passing a descriptor")
        mon = self._require_monitor(instance_id)

        async def getfd() -> None:
            async with mon.fd_lock:  # the fd sent over the socket belongs to the very next command
                mon.qmp.send_fd_scm(fd)
                await mon.execute("getfd", {"fdname": name})

        self._call(getfd())

    def attach_nic(self, instance_id: str, nic: NicBackend) -> str:
        """See :meth:`ComputeDriver.attach_nic`: ``netdev_add`` + ``device_add`` on the highest free port.

        The NIC is recorded in the run dir before it is added, so a driver that dies half-way
        still releases its backend (at the next spawn or at destroy).
        """
        self.require(Capability.HOTPLUG_NIC)
        try:
            netdev, device = nic.netdev_options(), nic.device_options()
        except NotImplementedError as exc:
            raise Unsupported(type(self).__name__, Capability.HOTPLUG_NIC, str(exc)) from None
        paths = self.paths(instance_id)
        with self._lock(instance_id):
            mon = self._require_monitor(instance_id)
            spec = self._load_spec(paths)
            count = spec.hotplug_ports if spec else 0
            free = [i for i in reversed(range(count)) if self._port_free(mon, i)]
            if not free:
                raise DriverError(f"{instance_id}: no free hot-plug port for a NIC (the guest has {count})")
            port = free[0]
            nic_id, netdev_id = f"hbnic{port}", f"hbnet{port}"
            records = self._load_hotplug_nics(paths)
            records[nic_id] = {"port": port, "netdev": netdev_id, "nic": nic.to_dict()}
            self._save_hotplug_nics(paths, records)
            try:
                nic.prepare(instance_id)
                with contextlib.suppress(DriverError):  # left by an unplug that died before removing it
                    self._call(mon.execute("netdev_del", {"id": netdev_id}))
                self._call(mon.execute("netdev_add", {**netdev, "id": netdev_id}))
                try:
                    self._call(mon.execute("device_add", {**device, "id": nic_id, "netdev": netdev_id,
                                                          "bus": hotplug_port_id(port)}))
                except BaseException:
                    with contextlib.suppress(DriverError):
                        self._call(mon.execute("netdev_del", {"id": netdev_id}))
                    raise
            except BaseException:
                records.pop(nic_id, None)
                self._save_hotplug_nics(paths, records)
                with contextlib.suppress(Exception):
                    nic.release(instance_id)
                raise
            log.info("%s: NIC %s hot-plugged into port %s", instance_id, nic_id, hotplug_port_id(port))
            return nic_id

    def detach_nic(self, instance_id: str, nic_id: str, timeout: float = 30.0) -> None:
        """See :meth:`ComputeDriver.detach_nic`: ``device_del``, wait for the guest, ``netdev_del``."""
        self.require(Capability.HOTPLUG_NIC)
        paths = self.paths(instance_id)
        with self._lock(instance_id):
            mon = self._require_monitor(instance_id)
            record = self._load_hotplug_nics(paths).get(nic_id)
            if record is None:
                spec = self._load_spec(paths)
                if spec is not None and nic_id in {f"nic{i}" for i in range(len(spec.nics))}:
                    raise DriverError(f"{instance_id}: {nic_id} is one of the guest's own NICs; it cannot be unplugged")
                return
            if nic_id in self._peripherals(mon):
                with contextlib.suppress(DriverError):  # an unplug already pending: keep waiting for it
                    self._call(mon.execute("device_del", {"id": nic_id}))
        # The guest OS ejects the device (ACPI hot-plug): wait without holding the instance's lock.
        deadline = time.monotonic() + timeout
        while nic_id in self._peripherals(mon):
            if time.monotonic() > deadline:
                raise DriverError(f"{instance_id}: the guest did not release NIC {nic_id} within {timeout:.0f}s "
                                  "(does its OS handle PCI hot-unplug?); the unplug stays requested")
            time.sleep(0.1)
        with self._lock(instance_id):
            with contextlib.suppress(DriverError):
                self._call(mon.execute("netdev_del", {"id": record["netdev"]}))
            records = self._load_hotplug_nics(paths)
            records.pop(nic_id, None)
            self._save_hotplug_nics(paths, records)
            try:
                nic_from_dict(record["nic"]).release(instance_id)
            except Exception:
                log.exception("%s: releasing NIC %s failed", instance_id, nic_id)
        log.info("%s: NIC %s unplugged", instance_id, nic_id)

    def nics(self, instance_id: str) -> dict[str, NicBackend]:
        """See :meth:`ComputeDriver.nics`: the spec's NICs and the recorded ones QEMU still has."""
        self.require(Capability.HOTPLUG_NIC)
        paths = self.paths(instance_id)
        mon = self._require_monitor(instance_id)
        spec = self._load_spec(paths)
        out: dict[str, NicBackend] = {f"nic{i}": n for i, n in enumerate(spec.nics if spec else [])}
        present = self._peripherals(mon)
        for nic_id, record in sorted(self._load_hotplug_nics(paths).items()):
            if nic_id in present:
                out[nic_id] = nic_from_dict(record["nic"])
        return out

    # ----------------------------------------------------------------- disks

    def snapshot_disk(self, instance_id: str, dest: Path, timeout: float = 3600.0) -> None:
        """See :meth:`ComputeDriver.snapshot_disk`: a ``blockdev-backup`` (sync=full) of ``disk0``.

        The copy runs in the guest's own QEMU (the overlay and its backing image as the guest sees
        them).  QEMU cannot create files (it runs unprivileged, with no access to the disk's
        directory): ``dest`` is created here and handed to it as an fd by :meth:`qmp`'s
        ``blockdev-add``.  The temporary nodes are removed whatever happens.
        """
        execute = self.monitor(instance_id)
        job = "snap-" + os.urandom(4).hex()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.close(fd)
        added: list[str] = []
        try:
            nodes = {n["node-name"]: n for n in execute("query-named-block-nodes", {"flat": True})}
            if "disk0" not in nodes:
                raise DriverError(f"{instance_id}: the guest has no root disk node")
            size = int(nodes["disk0"]["image"]["virtual-size"])
            execute("blockdev-add", {"driver": "file", "node-name": f"{job}-f", "filename": str(dest)})
            added.insert(0, f"{job}-f")
            execute("blockdev-create", {"job-id": f"{job}-c",
                                        "options": {"driver": "qcow2", "file": f"{job}-f", "size": size}})
            wait_job(execute, f"{job}-c", 120, DriverError)
            execute("blockdev-add", {"driver": "qcow2", "node-name": f"{job}-t", "file": f"{job}-f"})
            added.insert(0, f"{job}-t")
            execute("blockdev-backup", {"job-id": job, "device": "disk0", "target": f"{job}-t", "sync": "full",
                                        "auto-dismiss": False})
            wait_job(execute, job, timeout, DriverError)
        finally:
            for node in added:
                with contextlib.suppress(DriverError):
                    execute("blockdev-del", {"node-name": node})

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
