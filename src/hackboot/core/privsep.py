"""Privilege separation: the unprivileged account that guests and tenant-file tools run as.

The agent runs as root (it manages namespaces, taps and disks), but nothing that parses
tenant-supplied bytes or runs tenant code should: QEMU (a guest escape), ``qemu-img`` on an
uploaded or restored image (a parser bug). They run as ``settings.unprivileged_user`` (a
system account created on first use, with no shell and no home), under ``prlimit``.
When the cloud itself runs unprivileged, that account is simply the current one.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hackboot.core.config import get_settings


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int

    @property
    def is_current(self) -> bool:
        """True when we already run as this account (no switching, no chown needed)."""
        return self.uid == os.geteuid()


def _lookup(name: str) -> Account | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return Account(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


def unprivileged_account() -> Account:
    """The account for guests and tenant-file tools, created (as a system user) when missing."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return Account(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)
    name = get_settings().unprivileged_user
    account = _lookup(name)
    if account is None:
        # Several processes may race here: the loser's useradd fails and the lookup finds the winner's.
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", name], capture_output=True, check=False)
        account = _lookup(name)
    if account is None:
        raise RuntimeError(f"cannot create the unprivileged system user {name!r} (useradd failed)")
    return account


def give_to(account: Account, *paths: Path) -> None:
    """Make files the account must open (disks, sockets' directories) owned by it, mode 0600/0700."""
    for path in paths:
        if not account.is_current:
            os.chown(path, account.uid, account.gid)
        os.chmod(path, 0o700 if path.is_dir() else 0o600)


def limited_argv(argv: list[str], *, address_space: int, cpu_seconds: int) -> list[str]:
    """`argv` under prlimit: a crafted input cannot make the tool allocate or loop without bound."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise RuntimeError("prlimit (util-linux) is required to run tools on tenant-supplied files")
    return [prlimit, f"--as={address_space}", f"--cpu={cpu_seconds}", "--", *argv]


def run_unprivileged(argv: list[str], *, address_space: int = 2 * 1024**3, cpu_seconds: int = 120,
                     timeout: float = 300.0, account: Account | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool on tenant-supplied files as the unprivileged account, under resource limits.

    The files it reads or writes must be readable/writable by that account (see `give_to`).
    """
    acct = account or unprivileged_account()
    limited = limited_argv(argv, address_space=address_space, cpu_seconds=cpu_seconds)
    if acct.is_current:
        return subprocess.run(limited, capture_output=True, text=True, timeout=timeout, check=False)
    return subprocess.run(limited, capture_output=True, text=True, timeout=timeout, check=False,
                          user=acct.uid, group=acct.gid, extra_groups=[])


# Recorded in a process just before it forks, so its child knows who its parent was: a child whose
# parent is already another process (init, a subreaper) was orphaned before it could ask for the signal.
# (Comparing with pid 1 alone would kill the children of a server that runs as pid 1 in a container.)
_forked_by = [0]
os.register_at_fork(before=lambda: _forked_by.__setitem__(0, os.getpid()))


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (even by SIGKILL); exit if it already has.

    Used as the `preexec_fn` of helper processes (a block helper killed with its agent would otherwise
    live on as an orphan, holding images open; the setting follows the *thread* that started it) and
    by the server's forked API workers. Set after subprocess has switched user (a credential change
    clears the setting), so it sticks.
    """
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    parent = _forked_by[0]
    if (os.getppid() != parent) if parent else (os.getppid() == 1):  # the parent died before prctl
        os._exit(1)
