"""HaproxyDriver: one HAProxy 2.6 (Debian's package) per load balancer, in the load balancer's namespace.

Process model. ``haproxy -W`` (master-worker) runs inside the namespace, started in a new session so it
outlives the agent; its pid file and ``/proc/<pid>/cmdline`` (which names our configuration file) let a
new driver object adopt it. The master stays root (it re-reads the configuration, certificates and
bodies on a reload); its workers run as the ``haproxy`` account. A reload is SIGUSR2 to the master: it
re-executes itself, and in 2.6 its new workers take the listening sockets from the old ones over the
master's socket pair (no rebinding, so no SYN meets a closed port); the old workers finish what they
serve (``option idle-close-on-response``: an idle keep-alive connection gets its next request answered
with ``Connection: close`` instead of being closed under the client), up to ``hard-stop-after``.

Files (``<state_dir>/<lb id>/``, mode 0700; ours are 0600, HAProxy's pid file 0644):
  ``haproxy.cfg``    the configuration in use (rewritten after a runtime weight/state change, so a later
                     reload keeps it); a candidate is checked with ``haproxy -c`` before it replaces it;
  ``certs/``         certificate chain + key per certificate, content-addressed;
  ``bodies/``        fixed-response bodies;
  ``state.json``     namespace, the structure digest of the configuration (the spec with member weights
                     and admin states normalised) and each member's weight/state: what decides between
                     nothing, the runtime API and a reload;
  ``master.sock``, ``stats.sock``  the master CLI and the workers' CLI (admin level), in a short
                     per-LB directory under ``run_root`` instead (0700), as a unix socket path must
                     fit in 108 bytes (97 for HAProxy);
  ``access.log``     the processes' stdout, where HAProxy writes one record per request/session
                     (``log stdout``). It is appended to by HAProxy even while the agent is down; the
                     cursor of a record is the byte offset of its end, and the start of the file is
                     punched out (``fallocate(PUNCH_HOLE)``) past ``log_keep_bytes`` whenever it is
                     read and on every apply, so offsets stay valid and the disk used stays bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hackboot.loadbalancers import haproxy_config, haproxy_runtime
from hackboot.loadbalancers.driver import (
    AccessLogRecord,
    Counters,
    Health,
    InvalidSpec,
    LoadBalancerDriver,
    LoadBalancerDriverError,
    LoadBalancerSpec,
    MemberHealth,
    Stats,
)
from hackboot.loadbalancers.haproxy_config import LISTENER_PREFIX, POOL_PREFIX, check_id
from hackboot.network import netns

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]

RUN_ROOT = Path("/run/hackboot/loadbalancers")
DEBIAN_CHROOT = Path("/var/lib/haproxy")
MAX_CONNECTIONS = 50_000  # per load balancer
ERRORS_KEEP_BYTES = 64 << 10  # of the master's messages (haproxy.err)
SOCKET_PATH_MAX = 97  # HAProxy's limit: sun_path (108) less the suffix of the temporary name it binds first

# Runtime API words for the member admin states.
_RUNTIME_STATE = {"enabled": "ready", "drain": "drain", "disabled": "maint"}


class HaproxyDriver(LoadBalancerDriver):
    def __init__(self, state_dir: Path, *, run_root: Path = RUN_ROOT, haproxy: str = "haproxy",
                 log_keep_bytes: int = 8 << 20, start_timeout_s: float = 20.0,
                 chroot: Path | None = DEBIAN_CHROOT) -> None:
        """`state_dir`: the load balancers' files; `run_root`: their sockets (a short path); `chroot`:
        the workers' root (Debian's package makes this empty one; skipped when it does not exist)."""
        self.state_dir = Path(state_dir).absolute()
        self.run_root = Path(run_root).absolute()
        for path in (self.state_dir, self.run_root):
            if any(c in str(path) for c in ",'\"#\\") or any(c.isspace() for c in str(path)):
                # Its paths go into HAProxy's configuration and its -S argument (comma-separated options).
                raise ValueError(f"directory {path}: no commas, quotes, '#', backslashes or spaces")
        if len(str(self.run_dir("x") / "master.sock")) > SOCKET_PATH_MAX:
            raise ValueError(f"run root {run_root} is too long for unix socket paths")
        # Explicit, and within the descriptors HAProxy may raise its limit to (two per connection and a
        # margin); without it HAProxy sizes itself from whatever limit the agent runs with.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        hard = hard if hard != resource.RLIM_INFINITY else 1 << 20
        self.global_maxconn = max(256, min(MAX_CONNECTIONS, (hard - 1000) // 2))
        self.chroot = chroot if chroot is not None and chroot.is_dir() else None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.haproxy = haproxy
        self.log_keep_bytes = log_keep_bytes
        self.start_timeout_s = start_timeout_s
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # --- paths and process discovery -------------------------------------------------------------

    def lb_dir(self, lb_id: str) -> Path:
        return self.state_dir / check_id("load balancer", lb_id)

    def run_dir(self, lb_id: str) -> Path:
        """The LB's socket directory: named by a digest of the state directory and the id, so drivers
        over different state directories (test runs side by side) never share one."""
        digest = hashlib.sha256(f"{self.state_dir}\0{check_id('load balancer', lb_id)}".encode()).hexdigest()
        return self.run_root / digest[:16]

    def master_socket(self, lb_id: str) -> Path:
        return self.run_dir(lb_id) / "master.sock"

    def stats_socket(self, lb_id: str) -> Path:
        return self.run_dir(lb_id) / "stats.sock"

    def _lock(self, lb_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(lb_id, threading.Lock())

    def master_pid(self, lb_id: str) -> int | None:
        """The pid of the load balancer's HAProxy master if it runs (its command line names our
        configuration file, so a recycled pid is never mistaken for it), else None."""
        child = self._children.get(lb_id)
        if child is not None and child.poll() is not None:
            del self._children[lb_id]  # reaped: it died
        d = self.lb_dir(lb_id)
        try:
            pid = int((d / "haproxy.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _is_ours(pid, d / "haproxy.cfg") else None

    def running(self) -> list[str]:
        try:
            names = sorted(p.name for p in self.state_dir.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        return [n for n in names if haproxy_config.ID_RE.match(n) and self.master_pid(n) is not None]

    def _state(self, lb_id: str) -> dict[str, Any]:
        try:
            data = json.loads((self.lb_dir(lb_id) / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    # --- apply -----------------------------------------------------------------------------------

    def apply(self, spec: LoadBalancerSpec, namespace: str) -> None:
        netns.check_name(namespace)
        check_id("load balancer", spec.id)
        with self._lock(spec.id):
            self._trim_log(spec.id)
            self._apply(spec, namespace)

    def _apply(self, spec: LoadBalancerSpec, namespace: str) -> None:
        d = self.lb_dir(spec.id)
        run = self.run_dir(spec.id)
        options: dict[str, Any] = {"global_maxconn": self.global_maxconn, "chroot": self.chroot}
        rendered = haproxy_config.render(spec, d, run, **options)
        structure = hashlib.sha256(
            haproxy_config.render(haproxy_config.normalized(spec), d, run, **options).text.encode()).hexdigest()
        members = {f"{p.id}/{m.id}": [m.weight, m.admin_state] for p in spec.pools for m in p.members}
        for directory in (d, run):
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        cfg = d / "haproxy.cfg"
        old = self._state(spec.id)
        pid = self.master_pid(spec.id)
        current = cfg.read_text() if cfg.exists() else None
        new_state = {"namespace": namespace, "structure": structure, "members": members}
        if pid is not None and old.get("namespace") == namespace and current is not None:
            if current == rendered.text:
                if old != new_state:
                    _write(d / "state.json", json.dumps(new_state).encode())
                return
            if old.get("structure") == structure and self._apply_runtime(spec.id, old.get("members", {}), members):
                _write(cfg, rendered.text.encode())
                _write(d / "state.json", json.dumps(new_state).encode())
                log.info("load balancer %s: member weights/states changed at runtime", spec.id)
                return
        for rel, data in rendered.files.items():
            path = d / rel
            path.parent.mkdir(mode=0o700, exist_ok=True)
            if not path.exists() or path.read_bytes() != data:
                _write(path, data)
        candidate = d / "haproxy.cfg.new"
        _write(candidate, rendered.text.encode())
        check = subprocess.run([self.haproxy, "-c", "-f", str(candidate)], capture_output=True, text=True,
                               timeout=60, check=False)
        if check.returncode != 0:
            candidate.unlink(missing_ok=True)
            # Paths of this host mean nothing to the tenant who reads the message: relative to the LB's dir.
            output = (check.stderr + check.stdout).replace(str(candidate), "haproxy.cfg").replace(f"{d}/", "")
            alerts = [line for line in output.splitlines() if "[ALERT]" in line]
            message = "\n".join(alerts) if alerts else output.strip()
            raise InvalidSpec(f"HAProxy refused the configuration of {spec.id}: {message[:2000]}")
        os.replace(candidate, cfg)
        try:
            if pid is not None and old.get("namespace") not in (None, namespace):
                self._stop(spec.id, pid)
                pid = None
            if pid is None:
                self._start(spec.id, namespace)
            else:
                self._save_server_state(spec.id, members)
                self._reload(spec.id, pid)
        except LoadBalancerDriverError:
            if current is not None and pid is not None:
                # The running proxy keeps its old configuration: the file must say so for a later restart.
                _write(cfg, current.encode())
            raise
        _write(d / "state.json", json.dumps(new_state).encode())
        self._remove_unreferenced(d, set(rendered.files))

    def _apply_runtime(self, lb_id: str, before: dict[str, Any], after: dict[str, list[Any]]) -> bool:
        """Set changed member weights/admin states through the stats socket; False if it did not take."""
        sock = self.stats_socket(lb_id)
        for key, (weight, admin) in sorted(after.items()):
            if before.get(key) == [weight, admin]:
                continue
            pool_id, member_id = key.split("/", 1)
            server = f"{POOL_PREFIX}{pool_id}/{member_id}"
            for line in (f"set server {server} weight {weight}", f"set server {server} state {_RUNTIME_STATE[admin]}"):
                try:
                    answer = haproxy_runtime.command(sock, line).strip()
                except LoadBalancerDriverError as exc:
                    log.warning("load balancer %s: runtime change failed (%s): reloading instead", lb_id, exc)
                    return False
                if answer:
                    log.warning("load balancer %s: %r answered %r: reloading instead", lb_id, line, answer)
                    return False
        return True

    def _start(self, lb_id: str, namespace: str) -> None:
        d = self.lb_dir(lb_id)
        (d / "haproxy.pid").unlink(missing_ok=True)
        self.master_socket(lb_id).unlink(missing_ok=True)
        # A fresh start has no health to carry over.
        _write(d / "server-state", haproxy_runtime.EMPTY_SERVER_STATE.encode())
        argv = [self.haproxy, "-W", "-S", f"{self.master_socket(lb_id)},mode,600", "-f", str(d / "haproxy.cfg"),
                "-p", str(d / "haproxy.pid")]
        out = os.open(d / "access.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        err = os.open(d / "haproxy.err", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # A new session: the agent's exit (or its process group's signals) must not stop the proxy.
            proc = netns.popen(namespace, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                               start_new_session=True, close_fds=True)
        finally:
            os.close(out)
            os.close(err)
        self._children[lb_id] = proc
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if proc.poll() is not None:
                raise LoadBalancerDriverError(f"HAProxy of {lb_id} exited at start ({proc.returncode}): "
                                              f"{self._errors(lb_id)}")
            pid = self.master_pid(lb_id)
            if pid is not None:
                with contextlib.suppress(LoadBalancerDriverError):
                    if haproxy_runtime.show_proc(self.master_socket(lb_id)).workers:
                        haproxy_runtime.command(self.stats_socket(lb_id), "show info")
                        log.info("load balancer %s: HAProxy started (master %d) in %s", lb_id, pid, namespace)
                        return
            if time.monotonic() > deadline:
                raise LoadBalancerDriverError(f"HAProxy of {lb_id} did not come up: {self._errors(lb_id)}")
            time.sleep(0.02)

    def _errors(self, lb_id: str) -> str:
        try:
            with open(self.lb_dir(lb_id) / "haproxy.err", "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 2000))
                return f.read().decode(errors="replace").strip("\0 \n")
        except OSError:
            return ""

    def _save_server_state(self, lb_id: str, members: dict[str, list[Any]]) -> None:
        """Before a reload: the members the health checks took out, for the new workers to start with.

        New workers otherwise start every server as up and send it traffic until `fall` checks fail.
        Only that (operational DOWN) is carried over: each kept line's admin state and weights are
        rewritten from the desired state, so a saved runtime state never overrides the configuration.
        """
        path = self.lb_dir(lb_id) / "server-state"
        try:
            text = haproxy_runtime.command(self.stats_socket(lb_id), "show servers state")
        except LoadBalancerDriverError as exc:
            log.warning("load balancer %s: cannot read the server states (%s)", lb_id, exc)
            text = ""
        _write(path, haproxy_runtime.down_servers_state(text, _effective_weights(members), POOL_PREFIX).encode())

    def _reload(self, lb_id: str, pid: int) -> None:
        """Hitless reload through the master; returns once a new worker generation serves."""
        sock = self.master_socket(lb_id)
        before = haproxy_runtime.show_proc(sock)
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.02)
            try:
                now = haproxy_runtime.show_proc(sock)
            except LoadBalancerDriverError:
                continue  # the master is re-executing itself
            if now.failed_reloads > before.failed_reloads:
                raise LoadBalancerDriverError(f"HAProxy of {lb_id} refused the reload: {self._errors(lb_id)}")
            if now.reloads > before.reloads and now.workers and not set(now.workers) & set(before.workers):
                log.info("load balancer %s: reloaded (workers %s)", lb_id, ",".join(map(str, now.workers)))
                return
        raise LoadBalancerDriverError(f"HAProxy of {lb_id} did not finish reloading: {self._errors(lb_id)}")

    def _remove_unreferenced(self, d: Path, keep: set[str]) -> None:
        for sub in ("certs", "bodies"):
            with contextlib.suppress(FileNotFoundError):
                for path in (d / sub).iterdir():
                    if f"{sub}/{path.name}" not in keep:
                        path.unlink(missing_ok=True)

    # --- remove ----------------------------------------------------------------------------------

    def remove(self, lb_id: str) -> None:
        with self._lock(lb_id):
            d = self.lb_dir(lb_id)
            pid = self.master_pid(lb_id)
            if pid is not None:
                self._stop(lb_id, pid)
            shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(self.run_dir(lb_id), ignore_errors=True)

    def _stop(self, lb_id: str, pid: int) -> None:
        d = self.lb_dir(lb_id)
        workers: tuple[int, ...] = ()
        with contextlib.suppress(LoadBalancerDriverError):
            procs = haproxy_runtime.show_proc(self.master_socket(lb_id))
            workers = procs.workers + procs.old_workers
        cfg = d / "haproxy.cfg"
        # Only processes checked to be ours (command line) are signalled; the waits then watch the pid
        # itself, as an exiting process loses its command line before it is gone.
        workers = tuple(w for w in workers if _is_ours(w, cfg))
        # SIGTERM to the master is a hard stop: it stops its workers and exits.
        _signal(pid, signal.SIGTERM)
        if not _wait_gone(pid, 10.0, self._children.get(lb_id)):
            _signal(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0, self._children.get(lb_id))
        for worker in workers:
            if not _wait_gone(worker, 2.0, None):
                _signal(worker, signal.SIGKILL)
                _wait_gone(worker, 5.0, None)
        self._children.pop(lb_id, None)

    def close(self) -> None:
        """Forget the processes started here (they keep running: a new driver adopts them)."""
        self._children.clear()

    # --- observed state --------------------------------------------------------------------------

    def _stats_rows(self, lb_id: str) -> list[dict[str, str]]:
        if self.master_pid(lb_id) is None:
            raise LoadBalancerDriverError(f"HAProxy of {lb_id} is not running")
        return haproxy_runtime.show_stat(self.stats_socket(lb_id))

    def health(self, lb_id: str) -> dict[str, MemberHealth]:
        admin = {key: value[1] for key, value in self._state(lb_id).get("members", {}).items()}
        out: dict[str, MemberHealth] = {}
        for row in self._stats_rows(lb_id):
            px, sv = row.get("pxname", ""), row.get("svname", "")
            if not px.startswith(POOL_PREFIX) or sv in ("FRONTEND", "BACKEND"):
                continue
            pool_id = px[len(POOL_PREFIX):]
            status = _health(row.get("status", ""), admin.get(f"{pool_id}/{sv}", "enabled"),
                             row.get("check_status", ""))
            out[sv] = MemberHealth(member_id=sv, pool_id=pool_id, status=status, reason=_reason(row))
        return out

    def stats(self, lb_id: str) -> Stats:
        listeners: dict[str, Counters] = {}
        pools: dict[str, Counters] = {}
        members: dict[str, Counters] = {}
        for row in self._stats_rows(lb_id):
            px, sv = row.get("pxname", ""), row.get("svname", "")
            http = row.get("mode") == "http"
            if px.startswith(LISTENER_PREFIX) and sv == "FRONTEND":
                listeners[px[len(LISTENER_PREFIX):]] = haproxy_runtime.counters(row, http=http)
            elif px.startswith(POOL_PREFIX) and sv == "BACKEND":
                pools[px[len(POOL_PREFIX):]] = haproxy_runtime.counters(row, http=http)
            elif px.startswith(POOL_PREFIX) and sv != "FRONTEND":
                members[sv] = haproxy_runtime.counters(row, http=http)
        return Stats(listeners=listeners, pools=pools, members=members)

    # --- access logs -----------------------------------------------------------------------------

    def access_logs(self, lb_id: str, after: int = 0, limit: int = 1000) -> list[AccessLogRecord]:
        path = self.lb_dir(lb_id) / "access.log"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        try:
            self._trim(fd)
            with os.fdopen(os.dup(fd), "rb") as f:
                return list(_read_records(f, os.fstat(fd).st_size, after, limit, self.log_keep_bytes))
        finally:
            os.close(fd)

    def _trim_log(self, lb_id: str) -> None:
        """Bound the logs' disk use also when nobody reads them (called on every apply): the access log,
        and the master's messages (a few lines per reload)."""
        for name, keep in (("access.log", self.log_keep_bytes), ("haproxy.err", ERRORS_KEEP_BYTES)):
            with contextlib.suppress(OSError):
                fd = os.open(self.lb_dir(lb_id) / name, os.O_RDWR | os.O_CLOEXEC)
                try:
                    _punch_old(fd, keep)
                finally:
                    os.close(fd)

    def _trim(self, fd: int) -> None:
        _punch_old(fd, self.log_keep_bytes)


def _punch_old(fd: int, keep: int) -> None:
    """Free the disk blocks of an append-only file but its last `keep` bytes (offsets stay valid)."""
    st = os.fstat(fd)
    if st.st_blocks * 512 <= 2 * keep:
        return
    end = (st.st_size - keep) // 4096 * 4096
    if end > 0 and _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, end) != 0:
        log.warning("cannot punch old log records out: %s", os.strerror(ctypes.get_errno()))


def _read_records(f: Any, size: int, after: int, limit: int, keep: int) -> Iterator[AccessLogRecord]:
    if after > size:
        after = 0  # a cursor past the end is from a log that was removed since (the LB made anew)
    start = max(after, size - keep, 0)
    f.seek(start)
    if start > after:
        skipped = f.readline()  # the records before are gone: resume at the next record boundary
        start += len(skipped)
    offset = start
    produced = 0
    while produced < limit:
        line = f.readline()
        if not line.endswith(b"\n"):
            return  # the end, or a record being written
        offset += len(line)
        record = haproxy_config.parse_access_record(line.decode(errors="replace"), offset)
        if record is not None:
            produced += 1
            yield record


def _effective_weights(members: dict[str, list[Any]]) -> dict[str, int]:
    """`pool/member` → its configured weight, for members that are not disabled (drain: 0)."""
    return {key: 0 if admin == "drain" else int(weight)
            for key, (weight, admin) in members.items() if admin != "disabled"}


def _health(status: str, admin: str, check_status: str = "") -> Health:
    if admin == "disabled" or status.startswith("MAINT"):
        return "disabled"
    if admin == "drain" or status.startswith(("DRAIN", "NOLB")):
        return "drain"
    if status.startswith("DOWN"):
        return "down"
    # No check configured, or its first result not in yet (HAProxy starts members up before it).
    if status == "no check" or check_status.lstrip("* ") == "INI":
        return "unchecked"
    return "up"  # "UP", or "UP 1/3" (failing, not yet taken out)


def _reason(row: dict[str, str]) -> str:
    desc = row.get("check_desc", "")
    code = row.get("check_code", "")
    detail = row.get("last_chk", "")
    parts = [p for p in (desc, code) if p]
    text = ": ".join(parts)
    if detail and detail != code:
        text = f"{text} ({detail})" if text else detail
    return text


def _write(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0600."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _is_ours(pid: int, cfg: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return str(cfg).encode() in cmdline and stat.split(") ", 1)[1][:1] != "Z"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float, child: subprocess.Popen[bytes] | None) -> bool:
    """Wait until process `pid` has exited (gone, or a zombie); False after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None:
            child.poll()
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False
