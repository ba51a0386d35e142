"""The pieces of one function sandbox: the seccomp filter, the cgroup that limits it and bubblewrap's argv.

* :func:`seccomp_program` assembles a classic BPF program (no libseccomp needed): it kills a process whose
  syscall is not native x86_64, and answers EPERM to the syscalls a function never needs and that widen
  the kernel's attack surface (mounts, namespaces, ptrace, modules, keyrings, bpf, io_uring, ...),
  including ``clone`` with namespace flags (``clone3``'s flags are in memory BPF cannot read: it gets
  ENOSYS, and the C library falls back to ``clone``).
* :class:`SandboxCgroup` is one cgroup per sandbox under a ``hackboot-functions`` parent, on cgroup v1
  (a controller per hierarchy, as on hybrid hosts) or v2 (one unified hierarchy), detected at run time:
  memory limit without swap, a pids limit against fork bombs, a CPU quota; OOM kills and peak memory read
  back; every process in it killed.
* :func:`bwrap_argv` is the command line. bwrap starts in the sandbox's cgroup (on v1 the spawning thread
  waits in the cgroup, forks, and leaves before bwrap may run the runtime, see ``--block-fd``; on v2 a
  wrapper shell writes its own pid into the cgroup first) as the unprivileged account (``setpriv``), so
  nothing of the function runs before it is limited, and nothing runs as the host's root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT_NAME = "hackboot-functions"

# --- seccomp -------------------------------------------------------------------------------------------

AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_SECCOMP_RET_KILL_PROCESS = 0x80000000
_SECCOMP_RET_ERRNO = 0x00050000
_SECCOMP_RET_ALLOW = 0x7FFF0000
# BPF opcodes: ld word abs, jeq/jge/jset with constant, ret constant.
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_OFF_NR = 0
_OFF_ARCH = 4
_OFF_ARG0_LOW = 16  # little-endian: the low 32 bits of args[0]

# x86_64 syscall numbers refused with EPERM.
DENIED_SYSCALLS: dict[str, int] = {
    "ptrace": 101, "syslog": 103, "uselib": 134, "personality": 135, "vhangup": 153, "pivot_root": 155,
    "adjtimex": 159, "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166,
    "swapon": 167, "swapoff": 168, "reboot": 169, "iopl": 172, "ioperm": 173, "init_module": 175,
    "delete_module": 176, "quotactl": 179, "nfsservctl": 180, "lookup_dcookie": 212, "clock_settime": 227,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
    "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305,
    "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}
SYS_CLONE = 56
SYS_CLONE3 = 435
# CLONE_NEWTIME | CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
# | CLONE_NEWNET
CLONE_NAMESPACE_FLAGS = 0x80 | 0x20000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def seccomp_program() -> bytes:
    """The filter as raw ``struct sock_filter`` entries (what ``bwrap --seccomp FD`` reads)."""
    denied = sorted(set(DENIED_SYSCALLS.values()))
    # Conditional jumps name a label of the tail; their offsets are resolved once its place is known.
    body: list[tuple[int, str | None, str | None, int]] = [
        (_LD_W_ABS, None, None, _OFF_ARCH),
        (_JEQ_K, None, "kill", AUDIT_ARCH_X86_64),  # another architecture's syscall table: kill
        (_LD_W_ABS, None, None, _OFF_NR),
        (_JGE_K, "kill", None, _X32_SYSCALL_BIT),  # the x32 ABI aliases: kill
        *[(_JEQ_K, "deny", None, nr) for nr in denied],
        (_JEQ_K, "enosys", None, SYS_CLONE3),
        (_JEQ_K, "clone", None, SYS_CLONE),
    ]
    labels = {"allow": len(body), "deny": len(body) + 1, "enosys": len(body) + 2, "kill": len(body) + 3,
              "clone": len(body) + 4}

    def offset(label: str | None, index: int) -> int:
        if label is None:
            return 0
        jump = labels[label] - index - 1
        if not 0 <= jump <= 255:
            raise AssertionError("seccomp jump out of range")
        return jump

    out = bytearray()
    for index, (code, jt, jf, k) in enumerate(body):
        out += _insn(code, offset(jt, index), offset(jf, index), k)
    out += _insn(_RET_K, 0, 0, _SECCOMP_RET_ALLOW)
    out += _insn(_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.EPERM)
    out += _insn(_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS)
    out += _insn(_RET_K, 0, 0, _SECCOMP_RET_KILL_PROCESS)
    # clone: EPERM when any namespace flag is set, allowed otherwise.
    out += _insn(_LD_W_ABS, 0, 0, _OFF_ARG0_LOW)
    out += _insn(_JSET_K, 0, 1, CLONE_NAMESPACE_FLAGS)
    out += _insn(_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.EPERM)
    out += _insn(_RET_K, 0, 0, _SECCOMP_RET_ALLOW)
    return bytes(out)


def seccomp_fd() -> int:
    """A file descriptor positioned at the start of the program, for ``bwrap --seccomp``."""
    fd = os.memfd_create("hackboot-seccomp", 0)
    os.write(fd, seccomp_program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# --- cgroups -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    pids_max: int
    cpu_cores: float  # hard quota (CFS), in cores


def cgroup_version(root: Path = CGROUP_ROOT) -> int:
    """2 on a pure unified hierarchy, 1 when the v1 controllers are mounted (also on hybrid hosts)."""
    if (root / "cgroup.controllers").exists():
        return 2
    if (root / "memory" / "memory.limit_in_bytes").exists():
        return 1
    raise RuntimeError("no usable cgroup hierarchy (neither v1 memory controller nor v2)")


def _own_cgroup(controller: str | None) -> str:
    """This process's cgroup path in the hierarchy of `controller` (None: the v2 one)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller is None and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return "/"


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class SandboxCgroup:
    """One sandbox's cgroup (created by :meth:`create`, gone after :meth:`remove`)."""

    V1_CONTROLLERS = ("memory", "pids", "cpu")

    def __init__(self, version: int, dirs: dict[str, Path]) -> None:
        self.version = version
        self.dirs = dirs  # controller (or "unified") -> directory

    @classmethod
    def parents(cls, root: Path = CGROUP_ROOT) -> tuple[int, dict[str, Path]]:
        """The ``hackboot-functions`` parents, nested under this process's own cgroups (made if missing)."""
        version = cgroup_version(root)
        parents: dict[str, Path] = {}
        if version == 1:
            for controller in cls.V1_CONTROLLERS:
                base = root / controller / _own_cgroup(controller).lstrip("/")
                parents[controller] = base / PARENT_NAME
                parents[controller].mkdir(exist_ok=True)
            return version, parents
        base = root / _own_cgroup(None).lstrip("/")
        parent = base / PARENT_NAME
        parent.mkdir(exist_ok=True)
        try:
            # The no-internal-process rule: controllers can be delegated only from a cgroup without
            # processes (or the root); when our own has some, the parent goes under the root instead.
            _write(base / "cgroup.subtree_control", "+memory +pids +cpu")
        except OSError:
            parent.rmdir()
            parent = root / PARENT_NAME
            parent.mkdir(exist_ok=True)
            _write(root / "cgroup.subtree_control", "+memory +pids +cpu")
        _write(parent / "cgroup.subtree_control", "+memory +pids +cpu")
        parents["unified"] = parent
        return version, parents

    @classmethod
    def create(cls, name: str, limits: Limits | None, root: Path = CGROUP_ROOT) -> SandboxCgroup:
        """A new cgroup; without `limits` it is a spare (see :meth:`enter_thread`), limited when used."""
        version, parents = cls.parents(root)
        dirs = {key: parent / name for key, parent in parents.items()}
        cgroup = cls(version, dirs)
        try:
            for d in dirs.values():
                d.mkdir()
            if limits is not None:
                cgroup.apply(limits)
        except BaseException:
            cgroup.remove()
            raise
        return cgroup

    def enter_thread(self) -> None:
        """Move the calling thread (only it: cgroup v1's ``tasks``) into this cgroup.

        A process it forks starts here, limited from its first instruction. The first migration after a
        quiet while waits for an RCU grace period in the kernel (~10 ms): the engine's spawner thread
        pays it ahead of time by entering a spare cgroup right after each spawn.
        """
        if self.version != 1:
            raise RuntimeError("moving one thread needs cgroup v1")
        tid = str(threading.get_native_id())
        for d in self.dirs.values():
            _write(d / "tasks", tid)

    @classmethod
    def thread_home(cls, root: Path = CGROUP_ROOT) -> None:
        """Move the calling thread back to this process's own cgroups (v1)."""
        _, parents = cls.parents(root)
        tid = str(threading.get_native_id())
        for parent in parents.values():
            _write(parent.parent / "tasks", tid)

    def leave_thread(self) -> None:
        """Move the calling thread back to this process's own cgroups (above the parent)."""
        tid = str(threading.get_native_id())
        for d in self.dirs.values():
            _write(d.parent.parent / "tasks", tid)

    def apply(self, limits: Limits) -> None:
        period = 100_000
        quota = max(1000, int(limits.cpu_cores * period))
        if self.version == 1:
            mem = self.dirs["memory"]
            _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
            if (mem / "memory.memsw.limit_in_bytes").exists():  # swap accounting on: no swap at all
                _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            _write(mem / "memory.swappiness", "0")
            _write(self.dirs["pids"] / "pids.max", str(limits.pids_max))
            _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(period))
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
            _write(self.dirs["cpu"] / "cpu.shares", str(max(2, limits.memory_bytes // (1024 * 1024) * 8)))
            return
        d = self.dirs["unified"]
        _write(d / "memory.max", str(limits.memory_bytes))
        if (d / "memory.swap.max").exists():
            _write(d / "memory.swap.max", "0")
        _write(d / "pids.max", str(limits.pids_max))
        _write(d / "cpu.max", f"{quota} {period}")

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs.values()]

    def _main_dir(self) -> Path:
        return self.dirs["memory"] if self.version == 1 else self.dirs["unified"]

    def pids(self) -> list[int]:
        try:
            text = (self._main_dir() / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def oom_kills(self) -> int:
        path = self._main_dir() / ("memory.oom_control" if self.version == 1 else "memory.events")
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except FileNotFoundError:
            pass
        return 0

    def peak_bytes(self) -> int:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self._main_dir() / name).read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def kill_all(self, deadline_s: float = 5.0) -> bool:
        """SIGKILL every process in the cgroup until it is empty (a fork bomb keeps forking for a while)."""
        end = time.monotonic() + deadline_s
        if self.version == 2 and (self.dirs["unified"] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(self.dirs["unified"] / "cgroup.kill", "1")
        while True:
            pids = [p for p in self.pids() if p != os.getpid()]
            if not pids:
                return True
            for pid in pids:
                if pid == os.getpid():  # our spawner thread passes through sandbox cgroups
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > end:
                return False
            time.sleep(0.005)

    def remove(self) -> None:
        """Remove the cgroup directories (after :meth:`kill_all`); waits briefly for dying processes."""
        end = time.monotonic() + 5.0
        for d in self.dirs.values():
            while d.exists():
                try:
                    d.rmdir()
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > end:
                        raise
                    time.sleep(0.01)


# --- bubblewrap ----------------------------------------------------------------------------------------

# Enters the cgroup(s) given first (their count, then the cgroup.procs files), then execs the rest.
_ENTER_CGROUP = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'
SANDBOX_UID = 65534
NETWORK_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf")


@dataclass(frozen=True)
class SandboxLayout:
    executable: Path  # the runtime, e.g. /usr/bin/python3 (lives under /usr on Debian)
    code_fd: int  # O_PATH fd of the code directory (mounted at /var/task)
    bootstrap_fd: int  # O_PATH fd of the bootstrap directory (mounted at /opt/hackboot)
    seccomp_fd: int
    tmp_bytes: int
    network: bool
    env: dict[str, str]
    block_fd: int | None = None  # bwrap waits for a byte on it before it runs the command


def bwrap_argv(layout: SandboxLayout, command: list[str]) -> list[str]:
    """bubblewrap's arguments for `command` inside the sandbox (without the cgroup/privilege wrapper)."""
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try"]
    if not layout.network:
        argv.append("--unshare-net")
    argv += ["--die-with-parent", "--new-session", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
             "--hostname", "sandbox", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
    for link in ("bin", "lib", "lib64", "sbin", "lib32", "libx32"):
        host = Path("/") / link
        if host.is_symlink():
            argv += ["--symlink", os.readlink(host), f"/{link}"]
        elif host.is_dir():
            argv += ["--ro-bind", str(host), f"/{link}"]
    if not str(layout.executable).startswith("/usr/"):
        argv += ["--ro-bind", str(layout.executable), str(layout.executable)]
    for path in ("/etc/ssl", "/etc/ca-certificates", "/etc/localtime"):
        if os.path.exists(path):
            argv += ["--ro-bind", path, path]
    if layout.network:
        for path in NETWORK_FILES:
            if os.path.exists(path):
                argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(layout.tmp_bytes), "--tmpfs", "/tmp",
             "--dir", "/var", "--ro-bind-fd", str(layout.code_fd), "/var/task",
             "--ro-bind-fd", str(layout.bootstrap_fd), "/opt/hackboot",
             "--remount-ro", "/", "--chdir", "/var/task", "--clearenv"]
    for key, value in sorted(layout.env.items()):
        argv += ["--setenv", key, value]
    if layout.block_fd is not None:
        argv += ["--block-fd", str(layout.block_fd)]
    argv += ["--seccomp", str(layout.seccomp_fd), "--", *command]
    return argv


def unprivileged_argv(argv: list[str], *, uid: int | None, gid: int | None) -> list[str]:
    """`argv` run as `uid`/`gid` without supplementary groups (through ``setpriv``: subprocess can then
    still use vfork, much quicker than a fork of a large server process)."""
    if uid is None or gid is None:
        return argv
    return [shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--nnp",
            "--", *argv]


def unsearchable_directory(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory on the way to `path` (itself included) that `uid`/`gid` cannot search, if any.

    bwrap runs as the unprivileged account and resolves the paths of what it binds (even when given as
    file descriptors), so the code's directory and all its parents must be searchable by that account.
    """
    resolved = path.resolve()
    for directory in [*reversed(resolved.parents), resolved]:
        st = os.stat(directory)
        if st.st_uid == uid:
            bit = 0o100
        elif st.st_gid == gid:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return directory
    return None


def wrapped_argv(argv: list[str], *, procs_files: list[Path], uid: int | None, gid: int | None) -> list[str]:
    """`argv` started by a shell that first joins the cgroup(s), then (when root) drops to `uid`/`gid`."""
    return ["/bin/sh", "-c", _ENTER_CGROUP, "sh", str(len(procs_files)), *map(str, procs_files),
            *unprivileged_argv(argv, uid=uid, gid=gid)]
