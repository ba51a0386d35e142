"""A safe toolkit for the network namespaces the data plane lives in.

Everything tenant-facing (routers, taps, VXLAN, nftables, dnsmasq) lives in namespaces this module
creates, all named ``hb-…``; the root namespace's addresses, routes and firewall are never changed.
The guard is structural: every helper takes a namespace name and refuses one without the prefix, and
commands run with ``ip -n <ns>`` / ``ip netns exec <ns>`` only. A veth pair is created directly with
both ends inside our namespaces (``ip -n A link add … peer … netns B``), so nothing ever appears in
the root namespace, not even for a moment.

Threads can enter a namespace (:func:`in_thread`) for the few things that must be *opened* there
(a tap's file descriptor, a netlink socket for flow logs): ``setns(2)`` on a network namespace
changes only the calling thread, so the helper runs the work on a fresh thread that dies afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

PREFIX = "hb-"
NETNS_DIR = Path("/run/netns")
# ip netns names are file names; ours are short and plain so they are also safe in argv and logs.
_NAME_RE = re.compile(r"^hb-[a-z0-9][a-z0-9-]{0,46}$")
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class NetnsError(RuntimeError):
    """A namespace command failed (the message carries the command's stderr)."""


def check_name(name: str) -> str:
    """`name` if it is one of ours (``hb-`` + lowercase letters, digits, dashes), else ValueError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"refusing namespace {name!r}: hackboot only touches namespaces named hb-[a-z0-9-]+")
    return name


def exists(name: str) -> bool:
    return (NETNS_DIR / check_name(name)).exists()


def list_ours(prefix: str = PREFIX) -> list[str]:
    """Our namespaces (names starting with `prefix`, itself starting with ``hb-``), sorted."""
    if not prefix.startswith(PREFIX):
        raise ValueError(f"prefix must start with {PREFIX!r}")
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix) and _NAME_RE.match(n))


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
         timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv[:6])}{' …' if len(argv) > 6 else ''} failed ({proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[:2000]}")
    return proc


def create(name: str) -> bool:
    """Create namespace `name` (idempotent) with its loopback up; True if it was created now."""
    check_name(name)
    if exists(name):
        return False
    proc = _run(["ip", "netns", "add", name], check=False)
    if proc.returncode != 0 and not exists(name):
        raise NetnsError(f"ip netns add {name} failed: {proc.stderr.strip()}")
    _run(["ip", "-n", name, "link", "set", "lo", "up"])
    return True


def pids(name: str) -> list[int]:
    """Processes whose network namespace is `name`."""
    proc = _run(["ip", "netns", "pids", check_name(name)], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def delete(name: str, *, kill: bool = True) -> None:
    """Delete namespace `name` (idempotent). With `kill`, processes inside it are stopped first.

    Every process in an ``hb-`` namespace was started there by hackboot (dnsmasq, or a test's server),
    so stopping them is stopping our own processes; without it the namespace would linger until they exit.
    """
    check_name(name)
    if not exists(name):
        return
    if kill:
        victims = pids(name)
        for pid in victims:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while victims and time.monotonic() < deadline:
            victims = [p for p in victims if _alive(p)]
            time.sleep(0.02)
        for pid in victims:
            _signal(pid, signal.SIGKILL)
    # The kernel tears a deleted namespace's devices down later, on a work queue, so a veth's peer in
    # another namespace (a guest's side of a port) could outlive this call; deleting the veths first
    # takes both ends down before we return.
    with contextlib.suppress(NetnsError):
        for link in ip_json(name, "link", "show", "type", "veth"):
            _run(["ip", "-n", name, "link", "del", str(link["ifname"])], check=False)
    proc = _run(["ip", "netns", "delete", name], check=False)
    if proc.returncode != 0 and exists(name):
        raise NetnsError(f"ip netns delete {name} failed: {proc.stderr.strip()}")


def remove_orphans(prefix: str, keep: Iterable[str]) -> list[str]:
    """Delete our namespaces under `prefix` that are not in `keep`; returns the names deleted."""
    keep_set = set(keep)
    gone = []
    for name in list_ours(prefix):
        if name not in keep_set:
            delete(name)
            gone.append(name)
    return gone


def run(name: str, argv: Sequence[str], *, input: str | None = None, check: bool = True,
        timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside namespace `name` (``ip netns exec``)."""
    return _run(["ip", "netns", "exec", check_name(name), *argv], input=input, check=check, timeout=timeout)


def popen(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start `argv` inside namespace `name`; the caller owns (and must reap) the process."""
    return subprocess.Popen(["ip", "netns", "exec", check_name(name), *argv], **kwargs)


def ip(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip -n <name> …``."""
    return _run(["ip", "-n", check_name(name), *args], check=check)


def ip_json(name: str, *args: str) -> list[dict[str, Any]]:
    """``ip -j -n <name> …`` decoded (an empty list when it prints nothing)."""
    out = _run(["ip", "-j", "-n", check_name(name), *args]).stdout.strip()
    return json.loads(out) if out else []


def ip_batch(name: str, commands: Sequence[str], *, tool: str = "ip") -> None:
    """Run several ``ip``/``bridge`` commands in namespace `name` in one process (``-batch -``).

    Stops at the first failure and raises with its message (no ``-force``: a half-applied batch must
    be visible, the caller re-reads the state and converges on its next pass).
    """
    if not commands:
        return
    if tool not in ("ip", "bridge"):
        raise ValueError(tool)
    _run([tool, "-n", check_name(name), "-batch", "-"], input="\n".join(commands) + "\n")


def sysctl(name: str, values: Mapping[str, str | int]) -> None:
    """Set sysctls inside namespace `name` (network sysctls are per namespace)."""
    if values:
        run(name, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])


def veth(ns_a: str, name_a: str, ns_b: str, name_b: str, *, mtu: int | None = None) -> None:
    """A veth pair with one end in each of our namespaces, created there directly (never in the root one)."""
    extra = ["mtu", str(mtu)] if mtu else []
    ip(ns_a, "link", "add", name_a, *extra, "type", "veth", "peer", "name", name_b, *extra,
       "netns", check_name(ns_b))


def nft(name: str, ruleset: str) -> None:
    """Load an nftables script in namespace `name` as one transaction (``nft -f -``): all or nothing."""
    run(name, ["nft", "-f", "-"], input=ruleset)


def nft_json(name: str, *args: str) -> list[dict[str, Any]]:
    out = run(name, ["nft", "-j", *args]).stdout
    data = json.loads(out) if out.strip() else {"nftables": []}
    return list(data.get("nftables", []))


# --- entering a namespace from a thread -------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def enter(name: str) -> None:
    """Move the *calling thread* into namespace `name` (setns). Only for threads that never go back."""
    fd = os.open(NETNS_DIR / check_name(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_thread(name: str, fn: Callable[[], T], *, timeout: float = 30.0) -> T:
    """Run `fn` on a fresh thread inside namespace `name` and return its result (or raise its error).

    Whatever `fn` opens there (a tap, a socket) stays bound to that namespace after the thread ends.
    """
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            enter(name)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise NetnsError(f"work inside {name} did not finish within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False
