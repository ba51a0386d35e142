"""Talking to a running HAProxy: the master CLI (``show proc``) and a worker's stats socket (``show stat``,
``set server …``), and reading its statistics CSV back into ids."""

from __future__ import annotations

import csv
import io
import socket
from dataclasses import dataclass
from pathlib import Path

from hackboot.loadbalancers.driver import Counters, LoadBalancerDriverError


def command(sock_path: Path, line: str, *, timeout: float = 5.0) -> str:
    """Send one command line to an HAProxy CLI socket and return its whole answer (it closes after it)."""
    if "\n" in line or "\r" in line:
        raise ValueError("one command line at a time")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            s.sendall(line.encode() + b"\n")
            # The master CLI answers once the client's side is closed (as `socat` does at EOF).
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
    except OSError as exc:
        raise LoadBalancerDriverError(f"HAProxy socket {sock_path.name}: {exc}") from exc
    return b"".join(chunks).decode(errors="replace")


@dataclass(frozen=True)
class Processes:
    master: int
    workers: tuple[int, ...]  # the current generation
    old_workers: tuple[int, ...]  # still finishing connections after a reload
    reloads: int
    failed_reloads: int


def show_proc(master_sock: Path) -> Processes:
    """The master's view of its processes (master CLI ``show proc``)."""
    text = command(master_sock, "show proc")
    master = reloads = failed = 0
    workers: list[int] = []
    old: list[int] = []
    section = "master"
    for line in text.splitlines():
        if line.startswith("# workers"):
            section = "workers"
            continue
        if line.startswith("# old workers"):
            section = "old"
            continue
        if line.startswith("# programs"):
            section = "programs"
            continue
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if not words[0].isdigit():
            continue
        pid = int(words[0])
        if section == "master" and len(words) > 2 and words[1] == "master":
            master = pid
            reloads = int(words[2]) if words[2].isdigit() else 0
            if "[failed:" in line:
                failed = int(line.split("[failed:", 1)[1].split("]", 1)[0].strip() or 0)
        elif section == "workers":
            workers.append(pid)
        elif section == "old":
            old.append(pid)
    if not master:
        raise LoadBalancerDriverError(f"unexpected answer to 'show proc': {text[:300]!r}")
    return Processes(master, tuple(workers), tuple(old), reloads, failed)


def show_stat(stats_sock: Path) -> list[dict[str, str]]:
    """``show stat`` as one dict per row (keys: the CSV header's column names)."""
    text = command(stats_sock, "show stat")
    if not text.startswith("# "):
        raise LoadBalancerDriverError(f"unexpected answer to 'show stat': {text[:300]!r}")
    return list(csv.DictReader(io.StringIO(text[2:])))


def _int(row: dict[str, str], key: str) -> int:
    value = row.get(key) or "0"
    return int(value) if value.isdigit() else 0


def counters(row: dict[str, str], *, http: bool) -> Counters:
    """A stats row (frontend, backend or server) as Counters."""
    if row.get("svname") == "FRONTEND":
        errors = _int(row, "ereq") + (_int(row, "hrsp_5xx") if http else 0)
    else:
        errors = _int(row, "econ") + _int(row, "eresp") + (_int(row, "hrsp_5xx") if http else 0)
    requests = _int(row, "req_tot") if http and row.get("req_tot") else _int(row, "stot")
    return Counters(requests=requests, errors=errors, active_connections=_int(row, "scur"),
                    bytes_in=_int(row, "bin"), bytes_out=_int(row, "bout"),
                    response_time_ms=float(_int(row, "rtime")))


EMPTY_SERVER_STATE = "1\n"  # the format's version line: what HAProxy reads as "no saved state"


def down_servers_state(text: str, weights: dict[str, int], pool_prefix: str) -> str:
    """From a ``show servers state`` answer, a server-state file holding only the servers that are
    operationally down (``srv_op_state`` 0) and still wanted (``weights``: ``pool/member`` → weight),
    with admin state cleared and weights set to the configured ones."""
    lines = text.splitlines()
    if len(lines) < 2 or not lines[1].startswith("# "):
        return EMPTY_SERVER_STATE
    columns = lines[1][2:].split()
    kept = []
    for line in lines[2:]:
        values = line.split()
        if len(values) != len(columns):
            continue
        row = dict(zip(columns, values, strict=True))
        backend = row.get("be_name", "")
        key = f"{backend[len(pool_prefix):]}/{row.get('srv_name', '')}"
        if not backend.startswith(pool_prefix) or key not in weights or row.get("srv_op_state") != "0":
            continue
        row["srv_admin_state"] = "0"
        row["srv_uweight"] = row["srv_iweight"] = str(weights[key])
        kept.append(" ".join(row[c] for c in columns))
    return "\n".join([lines[0], lines[1], *kept]) + "\n"
