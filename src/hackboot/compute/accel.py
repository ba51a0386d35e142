"""Choosing the accelerator: KVM when it really works, TCG otherwise.

``/dev/kvm`` being present and answering ioctls is not enough: under some
nested-virtualisation setups a KVM guest hangs forever right after SeaBIOS's
"Booting from ROM", burning a host core.  So :func:`probe_accelerator` boots a
throw-away guest with ``-accel kvm`` -- the host's kernel plus a tiny busybox
initramfs generated here -- and requires a marker on its serial console within a
few seconds.  Anything else (no device, QEMU error, silence, timeout) selects
TCG, with the reason recorded.

The result is cached in ``<state_dir>/accel.json`` together with a fingerprint
of the host (kernel release, QEMU binary), so agent restarts don't re-probe; pass
``reprobe=True`` to force it.  The ``accel`` setting (``HACKBOOT_ACCEL=kvm|tcg|auto``) or the
``force`` argument overrides the probe.

The initramfs helpers (:func:`build_busybox_initramfs`, :func:`newc_archive`)
are pure Python, so no ``cpio`` binary is needed; the test-suite uses them to
build its guests too.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import re
import selectors
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from hackboot.core.config import ACCEL_MODES, get_settings

log = logging.getLogger(__name__)

CACHE_FILE = "accel.json"
PROBE_MARKER = "HACKBOOT-ACCEL-PROBE-OK"
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

AccelName = Literal["kvm", "tcg"]


@dataclass(frozen=True)
class AccelInfo:
    """The chosen accelerator.

    ``accel``        ``"kvm"`` or ``"tcg"``.
    ``reason``       human-readable why.
    ``probed_at``    UNIX time of the decision.
    ``duration_s``   how long the probe took (0 when forced/cached).
    ``source``       ``"probe"``, ``"cache"`` or ``"forced"``.
    ``fingerprint``  host fingerprint the cached result is valid for.
    """

    accel: AccelName
    reason: str
    probed_at: float
    duration_s: float = 0.0
    source: str = "probe"
    fingerprint: str = ""

    @property
    def cpu_model(self) -> str:
        """``host`` with KVM, ``max`` with TCG (what QemuDriver's argv uses)."""
        return "host" if self.accel == "kvm" else "max"


# --------------------------------------------------------------------------- initramfs


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive; ``mode`` includes the file-type bits."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise entries as an uncompressed "newc" cpio archive (what the kernel unpacks)."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, e in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = e.name.lstrip("/").encode() + b"\0"
        fields = (ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
        out.extend(b"070701" + "".join(f"{v:08x}" for v in fields).encode())
        out.extend(name)
        pad()
        out.extend(e.data)
        pad()
    return bytes(out)


def find_busybox() -> Path | None:
    for cand in BUSYBOX_CANDIDATES:
        p = Path(cand)
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def build_busybox_initramfs(
    out: Path,
    init_script: str,
    *,
    busybox: Path | None = None,
    extra_files: Mapping[str, bytes | Path] | None = None,
) -> Path:
    """Write an initramfs whose ``/init`` is ``init_script`` run by static busybox.

    Layout: ``/bin/busybox`` (+ ``/bin/sh`` symlink), ``/init``, ``/dev/console``
    (so the kernel can give init a console), empty ``/proc /sys /tmp /etc /lib``.
    ``extra_files`` maps archive paths to contents (bytes or a host file), e.g.
    kernel modules; missing parent directories are created.  ``busybox`` must be
    statically linked (Debian's ``busybox-static``).
    """
    busybox = busybox or find_busybox()
    if busybox is None:
        raise FileNotFoundError("static busybox not found (install busybox-static)")
    dirs = {"bin", "dev", "proc", "sys", "tmp", "etc", "lib", "run"}
    files: dict[str, bytes] = {}
    for name, content in (extra_files or {}).items():
        name = name.strip("/")
        files[name] = content.read_bytes() if isinstance(content, Path) else bytes(content)
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    entries = [CpioEntry(d, 0o040755) for d in sorted(dirs)]
    entries += [
        CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
        CpioEntry("dev/null", 0o020666, rdev=(1, 3)),
        CpioEntry("bin/busybox", 0o100755, busybox.read_bytes()),
        CpioEntry("bin/sh", 0o120777, b"busybox"),
        CpioEntry("init", 0o100755, init_script.encode()),
    ]
    entries += [CpioEntry(n, 0o100644, d) for n, d in sorted(files.items())]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(newc_archive(entries))
    tmp.replace(out)
    return out


PROBE_INIT = f"""#!/bin/busybox sh
/bin/busybox echo {PROBE_MARKER}
/bin/busybox poweroff -f
"""


def find_probe_kernel() -> Path | None:
    """A host kernel to boot: ``/boot/vmlinuz-*-cloud-amd64`` preferred, else the running one, else any."""
    cands = sorted(glob.glob("/boot/vmlinuz-*"))
    readable = [Path(c) for c in cands if os.access(c, os.R_OK)]
    for pat in (r"cloud-amd64$", re.escape(os.uname().release) + "$", r"."):
        for c in reversed(readable):
            if re.search(pat, c.name):
                return c
    return None


# --------------------------------------------------------------------------- probing


def kvm_device_usable(path: str = "/dev/kvm") -> tuple[bool, str]:
    """Cheap check: the device opens read-write and speaks the stable KVM API."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"{path} not usable: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return False, f"KVM_GET_API_VERSION failed: {e.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return False, f"unexpected KVM API version {version}"
    return True, "ok"


def boot_probe(
    work_dir: Path,
    accel: AccelName,
    *,
    qemu_binary: str = "qemu-system-x86_64",
    kernel: Path | None = None,
    first_output_timeout: float = 5.0,
    marker_timeout: float | None = None,
) -> tuple[bool, str, float]:
    """Boot the probe guest with ``accel``; return ``(ok, reason, seconds)``.

    A guest whose serial console stays silent for ``first_output_timeout``
    seconds is declared hung (the nested-KVM failure mode prints nothing at all
    -- or, with ``earlyprintk``, a KASLR warning from the boot stub and then
    nothing).  Once the kernel talks, the marker must arrive within
    ``marker_timeout`` seconds of the start (default: 3 x first_output_timeout,
    at least 15 s; a working KVM guest needs about one second).
    The QEMU child is always killed (by pid) before returning.

    The probe guest runs like real guests do: as the unprivileged guest account (with the
    group of ``/dev/kvm``), under the full seccomp sandbox, given its kernel and initramfs as
    memfd copies (it can enter no directory of ours).
    """
    kernel = kernel or find_probe_kernel()
    if kernel is None:
        raise FileNotFoundError("no kernel found in /boot")
    kernel, work_dir = Path(kernel).absolute(), Path(work_dir).absolute()  # QEMU runs in /
    if marker_timeout is None:
        marker_timeout = max(15.0, 3 * first_output_timeout)
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    initrd = work_dir / "probe-initramfs.cpio"
    if not initrd.exists():
        build_busybox_initramfs(initrd, PROBE_INIT)
    from hackboot.compute.qemu import SANDBOX_OPTS
    from hackboot.core.privsep import unprivileged_account

    kernel_fd, initrd_fd = _memfd_copy(kernel), _memfd_copy(initrd)
    argv = [
        qemu_binary, "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-machine", "q35", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
        "-smp", "1", "-m", "96", "-no-reboot", "-sandbox", SANDBOX_OPTS,
        "-kernel", f"/proc/self/fd/{kernel_fd}", "-initrd", f"/proc/self/fd/{initrd_fd}",
        "-append", "console=ttyS0 panic=-1 loglevel=4",
        "-serial", "stdio",
    ]  # fmt: skip
    account = unprivileged_account()
    user: int | None = None
    group: int | None = None
    extra_groups: list[int] | None = None
    if not account.is_current:
        user, group = account.uid, account.gid
        extra_groups = [os.stat("/dev/kvm").st_gid] if accel == "kvm" and os.path.exists("/dev/kvm") else []
    # If our process dies mid-probe (agent killed, test timeout), a hung KVM guest
    # would otherwise spin forever: have the kernel SIGKILL it when we go away.
    setpriv = shutil.which("setpriv")
    if setpriv:
        argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, cwd="/", pass_fds=(kernel_fd, initrd_fd),
            user=user, group=group, extra_groups=extra_groups,
        )  # fmt: skip
    finally:
        os.close(kernel_fd)
        os.close(initrd_fd)
    assert proc.stdout is not None
    buf = b""
    got_output = False
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while True:
            elapsed = time.monotonic() - t0
            limit = marker_timeout if got_output else first_output_timeout
            if elapsed >= limit:
                what = "did not print the marker" if got_output else "printed nothing on its console"
                return False, f"{accel} guest {what} within {limit:.0f}s (hung?)", elapsed
            if not sel.select(timeout=min(0.2, limit - elapsed)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:  # QEMU exited
                proc.wait(timeout=5)
                elapsed = time.monotonic() - t0
                if PROBE_MARKER.encode() in buf:
                    return True, f"{accel} guest booted in {elapsed:.2f}s", elapsed
                tail = buf.decode(errors="replace").strip().splitlines()[-3:]
                return False, f"qemu exited with {proc.returncode}: {' | '.join(tail)}", elapsed
            buf += chunk
            got_output = got_output or bool(buf.strip())
            if PROBE_MARKER.encode() in buf:
                elapsed = time.monotonic() - t0
                return True, f"{accel} guest booted in {elapsed:.2f}s", elapsed
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()  # our own child, by pid
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - D-state after kill
            log.warning("probe qemu pid %s did not exit after SIGKILL", proc.pid)
        proc.stdout.close()


def _memfd_copy(path: Path) -> int:
    """An anonymous in-memory copy of ``path`` (readable through /proc/self/fd by any uid)."""
    fd = os.memfd_create(f"hackboot-probe-{path.name}", os.MFD_CLOEXEC)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                os.write(fd, chunk)
    except BaseException:
        os.close(fd)
        raise
    return fd


def guest_account_can_use_kvm(path: str = "/dev/kvm") -> tuple[bool, str]:
    """Whether guests (run as the unprivileged account, with the device's group) can open ``path``."""
    from hackboot.core.privsep import unprivileged_account

    account = unprivileged_account()
    if account.is_current:
        return True, "ok"
    st = os.stat(path)
    if st.st_mode & 0o006 == 0o006 or st.st_mode & 0o060 == 0o060 or st.st_uid == account.uid:
        return True, "ok"
    return False, (f"{path} (mode {oct(st.st_mode & 0o777)}) is not usable by the guest account {account.name}: "
                   "give it a group guests get (e.g. 0660 root:kvm)")


def host_fingerprint(qemu_binary: str) -> str:
    path = shutil.which(qemu_binary) or qemu_binary
    try:
        st = os.stat(path)
        qemu = f"{os.path.realpath(path)}:{st.st_size}:{int(st.st_mtime)}"
    except OSError:
        qemu = f"{path}:missing"
    return f"{os.uname().release}|{qemu}|kvm={os.path.exists('/dev/kvm')}"


def _resolve_force(force: str | None) -> str:
    # The setting is read at each call (a cached Settings; validated there, so a bad value is a clear error)
    value = (force or get_settings().accel or "auto").strip().lower()
    if value not in ACCEL_MODES:
        raise ValueError(f"accelerator must be kvm, tcg or auto, got {value!r}")
    return value


def probe_accelerator(
    state_dir: Path,
    timeout: float = 5.0,
    *,
    force: str | None = None,
    reprobe: bool = False,
    qemu_binary: str = "qemu-system-x86_64",
    kernel: Path | None = None,
) -> AccelInfo:
    """Decide between KVM and TCG (see module docstring).

    :param state_dir: where ``accel.json`` (cache) and the probe initramfs live.
    :param timeout: seconds the KVM probe guest may stay silent before it is
        declared hung (a working KVM guest talks within well under a second).
    :param force: ``"kvm"``, ``"tcg"`` or ``"auto"``; default: the ``accel`` setting
        (``HACKBOOT_ACCEL``), else ``auto``.  Forced choices are neither probed nor cached.
    :param reprobe: ignore the cache.
    """
    mode = _resolve_force(force)
    now = time.time()
    if mode != "auto":
        origin = "argument" if force else "the accel setting (HACKBOOT_ACCEL)"
        return AccelInfo(mode, f"forced by {origin}", now, source="forced")  # type: ignore[arg-type]

    state_dir = Path(state_dir)
    cache = state_dir / CACHE_FILE
    fingerprint = host_fingerprint(qemu_binary)
    if not reprobe:
        try:
            d = json.loads(cache.read_text())
            if d.get("fingerprint") == fingerprint and d.get("accel") in ("kvm", "tcg"):
                d["source"] = "cache"
                return AccelInfo(**d)
        except (OSError, ValueError, TypeError):
            pass

    t0 = time.monotonic()
    ok, why = kvm_device_usable()
    if ok:
        ok, why = guest_account_can_use_kvm()
    if not ok:
        info = AccelInfo("tcg", why, now, time.monotonic() - t0, "probe", fingerprint)
    else:
        try:
            ok, why, _ = boot_probe(
                state_dir / "accel-probe", "kvm", qemu_binary=qemu_binary, kernel=kernel,
                first_output_timeout=timeout,
            )  # fmt: skip
            accel: AccelName = "kvm" if ok else "tcg"
            reason = f"KVM probe guest booted: {why}" if ok else f"KVM probe failed: {why}"
        except FileNotFoundError as e:
            # Nothing to boot: trust the device.  Only nested setups misbehave, and
            # those normally ship a kernel in /boot.
            accel, reason = "kvm", f"/dev/kvm usable; boot probe skipped ({e})"
        except OSError as e:
            accel, reason = "tcg", f"KVM probe could not run: {e}"
        info = AccelInfo(accel, reason, now, round(time.monotonic() - t0, 3), "probe", fingerprint)

    log.info("accelerator: %s (%s)", info.accel, info.reason)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(asdict(info), indent=2))
        tmp.replace(cache)
    except OSError as e:  # caching is an optimisation only
        log.warning("cannot cache accelerator choice in %s: %s", cache, e)
    return info
