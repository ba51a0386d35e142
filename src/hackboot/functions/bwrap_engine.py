"""BwrapEngine: the :class:`FunctionEngine` on bubblewrap sandboxes with cgroup limits and a seccomp filter.

Each sandbox is a warm worker of one function version: bwrap (see :mod:`hackboot.functions.sandbox`) runs
the runtime's bootstrap worker, which loads the handler once and then serves invocations one at a time
over two pipes; the function's stdout/stderr is a third pipe, read as the invocation's logs. Idle workers
of a version are reused, the most recently used first (LIFO: the others grow idle and get reaped). A
worker that timed out, crashed, ran out of memory or broke the protocol is killed with its whole process
tree (its cgroup emptied, its PID namespace gone) and never reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from hackboot.core import privsep
from hackboot.functions import sandbox as sb
from hackboot.functions.engine import (
    AtCapacity,
    EngineError,
    FunctionEngine,
    FunctionSpec,
    InvocationResult,
    Outcome,
    Runtime,
    UnknownRuntime,
)
from hackboot.functions.runtimes import detect

LOG_LIMIT = 256 * 1024
PAYLOAD_LIMIT = 6 * 1024 * 1024
TMP_BYTES = 512 * 1024 * 1024
PIDS_MAX = 128
INIT_TIMEOUT_S = 10.0  # like Lambda's init phase
MB_PER_CORE = 1769  # Lambda's ratio: 1769 MB buys one vCPU
_TRUNCATED = "\n[… logs cut at {} bytes]\n"


@dataclass
class _Pool:
    idle: list[_Worker] = field(default_factory=list)  # LIFO
    running: int = 0


class _Worker:
    def __init__(self, spec: FunctionSpec, proc: subprocess.Popen[bytes], cgroup: sb.SandboxCgroup,
                 req_w: int, resp_r: int, log_r: int) -> None:
        self.spec = spec
        self.proc = proc
        self.cgroup = cgroup
        self.req_w = req_w
        self.resp_r = resp_r
        self.log_r = log_r
        self.last_used = time.monotonic()
        self.closed = False
        self.oom_at_destroy = 0
        self.init_logs = ""  # printed while the handler's module was imported
        self.oom_seen = 0  # the cgroup's OOM kills already accounted for (it starts fresh)

    def destroy(self) -> None:
        """Kill the whole sandbox: bwrap (its PID namespace's init dies with it), then anything left."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.cgroup.kill_all()
        self.oom_at_destroy = self.cgroup.oom_kills()  # read before the cgroup is removed
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for fd in (self.req_w, self.resp_r, self.log_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):  # a stale cgroup is removed by the next engine's sweep
            self.cgroup.remove()


class _LogCollector:
    """Keeps an invocation's log bytes up to the limit, and finds the worker's end marker in the stream."""

    def __init__(self, marker: bytes, limit: int) -> None:
        self.marker = marker
        self.limit = limit
        self.kept = bytearray()
        self.dropped = 0
        self.pending = bytearray()  # may hold the start of the marker
        self.done = False

    def _keep(self, data: bytes | bytearray) -> None:
        room = self.limit - len(self.kept)
        self.kept += data[:max(0, room)]
        self.dropped += max(0, len(data) - max(0, room))

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return  # bytes after the marker belong to no invocation (e.g. a background process)
        self.pending += chunk
        at = self.pending.find(self.marker)
        if at >= 0:
            self._keep(self.pending[:at])
            self.pending.clear()
            self.done = True
            return
        keep_back = len(self.marker) - 1
        if len(self.pending) > keep_back:
            self._keep(self.pending[:len(self.pending) - keep_back])
            del self.pending[:len(self.pending) - keep_back]

    def text(self) -> str:
        if not self.done:
            self._keep(self.pending)
            self.pending.clear()
        out = bytes(self.kept).decode("utf-8", "replace")
        if self.dropped:
            out += _TRUNCATED.format(self.limit)
        return out


class BwrapEngine(FunctionEngine):
    def __init__(self, state_dir: Path | None = None, *, log_limit: int = LOG_LIMIT,
                 payload_limit: int = PAYLOAD_LIMIT, tmp_bytes: int = TMP_BYTES, pids_max: int = PIDS_MAX,
                 runtimes: list[Runtime] | None = None, init_timeout_s: float = INIT_TIMEOUT_S) -> None:
        if shutil.which("bwrap") is None:
            raise EngineError("bubblewrap (bwrap) is not installed")
        if platform.machine() != "x86_64":
            raise EngineError(f"the sandbox's seccomp filter is written for x86_64, not {platform.machine()}")
        self._runtimes = {r.name: r for r in (runtimes if runtimes is not None else detect())}
        self.log_limit = log_limit
        self.payload_limit = payload_limit
        self.tmp_bytes = tmp_bytes
        self.pids_max = pids_max
        self.init_timeout_s = init_timeout_s  # for loading the handler (at least the function's timeout)
        self._own_state = state_dir is None
        self.state_dir = Path(tempfile.mkdtemp(prefix="hackboot-functions-")) if state_dir is None else state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)  # bwrap runs as the sandbox account and must reach the bootstrap
        # The bootstrap is copied where the sandbox's account may read it, and bound by fd.
        self.bootstrap_dir = self.state_dir / "bootstrap"
        self.bootstrap_dir.mkdir(exist_ok=True)
        for name in ("python_worker.py", "node_worker.js"):
            source = resources.files("hackboot.functions").joinpath("bootstrap", name)
            (self.bootstrap_dir / name).write_bytes(source.read_bytes())
            os.chmod(self.bootstrap_dir / name, 0o644)
        os.chmod(self.bootstrap_dir, 0o755)
        self._compiled_python_worker: dict[Path, str] = {}
        self._account = privsep.unprivileged_account() if os.geteuid() == 0 else None
        self._lock = threading.Lock()
        self._pools: dict[str, _Pool] = {}
        self._busy: set[_Worker] = set()
        self._closed = False
        self._seq = 0
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hb-fn-spawner")
        self._spare: sb.SandboxCgroup | None = None  # v1: where the spawner thread waits for the next spawn
        self._sweep_stale_cgroups()
        self._cgroup_version = sb.cgroup_version()

    # --- contract ---------------------------------------------------------------------------------------

    def runtimes(self) -> list[Runtime]:
        return list(self._runtimes.values())

    def warm(self, version_id: str) -> int:
        with self._lock:
            pool = self._pools.get(version_id)
            return len(pool.idle) if pool else 0

    def reap(self, idle_s: float) -> int:
        now = time.monotonic()
        victims: list[_Worker] = []
        with self._lock:
            for pool in self._pools.values():
                keep = [w for w in pool.idle if now - w.last_used <= idle_s]
                victims += [w for w in pool.idle if now - w.last_used > idle_s]
                pool.idle[:] = keep
            for version_id in [v for v, pool in self._pools.items() if not pool.idle and not pool.running]:
                del self._pools[version_id]  # versions come and go: forget those with nothing left
        for worker in victims:
            worker.destroy()
        return len(victims)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            victims = [w for pool in self._pools.values() for w in pool.idle] + list(self._busy)
            for pool in self._pools.values():
                pool.idle.clear()
        for worker in victims:
            worker.destroy()
        with contextlib.suppress(RuntimeError):
            self._spawner.submit(self._go_home).result(timeout=30)
        self._spawner.shutdown(wait=False)
        if self._own_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def invoke(self, spec: FunctionSpec, event: bytes, *, request_id: str) -> InvocationResult:
        runtime = self._runtimes.get(spec.runtime)
        if runtime is None:
            raise UnknownRuntime(f"runtime {spec.runtime!r} is not available on this host")
        with self._lock:
            if self._closed:
                raise EngineError("the engine is closed")
            pool = self._pools.setdefault(spec.version_id, _Pool())
            if pool.running >= spec.max_concurrency:
                raise AtCapacity(f"{spec.max_concurrency} invocations of this version already run")
            pool.running += 1
            worker = pool.idle.pop() if pool.idle else None
            if worker is not None:
                self._busy.add(worker)
        try:
            cold = worker is None
            init_ms = 0.0
            if worker is None:
                started = time.monotonic()
                worker, init_error = self._start(spec, runtime)
                init_ms = (time.monotonic() - started) * 1000
                if init_error is not None:
                    return init_error_result(request_id, init_error, init_ms)
                with self._lock:
                    self._busy.add(worker)
            try:
                result = self._run(worker, spec, event, request_id)
            except BaseException:
                with self._lock:
                    self._busy.discard(worker)
                worker.destroy()
                raise
            # What the module printed while it was imported belongs to the first invocation (as on Lambda).
            logs = (worker.init_logs + result.logs) if cold else result.logs
            if len(logs) > self.log_limit + 64:
                logs = logs[:self.log_limit] + _TRUNCATED.format(self.log_limit)
            result = replace(result, cold=cold, init_ms=init_ms, logs=logs)
            worker.init_logs = ""
            reuse = result.outcome in ("ok", "error") and not worker.closed
            with self._lock:
                self._busy.discard(worker)
                if reuse and not self._closed:
                    worker.last_used = time.monotonic()
                    pool.idle.append(worker)
                    worker = None
            if worker is not None:
                worker.destroy()
            return result
        finally:
            with self._lock:
                pool.running -= 1

    # --- sandboxes --------------------------------------------------------------------------------------

    def _sweep_stale_cgroups(self) -> None:
        """Remove empty sandbox cgroups that engines of processes now gone left behind (the name holds the
        owner's pid: another live engine's fresh, still empty cgroups are not touched)."""
        try:
            _, parents = sb.SandboxCgroup.parents()
        except (OSError, RuntimeError) as exc:
            raise EngineError(f"cannot use cgroups: {exc}") from exc
        for parent in parents.values():
            for child in parent.iterdir():
                owner = child.name.split("-")[1] if child.name.startswith("sbx-") else ""
                if child.is_dir() and owner.isdigit() and not Path(f"/proc/{owner}").exists():
                    with contextlib.suppress(OSError):
                        child.rmdir()

    def _command(self, spec: FunctionSpec, runtime: Runtime, req_r: int, resp_w: int) -> list[str]:
        common = [str(req_r), str(resp_w), spec.handler, str(self.payload_limit), spec.version_id.split(":")[0],
                  spec.version_id, str(spec.memory_mb)]
        if runtime.language == "python":
            # -I -S: nothing from the environment, the user's site or the host's dist-packages.
            worker = f"/opt/hackboot/{self._python_worker(runtime)}"
            # -u: what a function printed is in its logs even when it is killed at its timeout.
            return [str(runtime.executable), "-I", "-S", "-B", "-u", worker, *common]
        heap_mb = max(16, int(spec.memory_mb * 0.75))  # V8 sizes its heap from the host's RAM otherwise
        return [str(runtime.executable), f"--max-old-space-size={heap_mb}", "/opt/hackboot/node_worker.js", *common]

    def _python_worker(self, runtime: Runtime) -> str:
        """The worker's file name: compiled once by the runtime itself (a script is otherwise compiled
        from source at every cold start), the source when that fails."""
        with self._lock:
            known = self._compiled_python_worker.get(runtime.executable)
        if known is not None:
            return known
        name = f"python_worker.{runtime.name}.pyc"
        compiled = subprocess.run(
            [str(runtime.executable), "-I", "-S", "-c",
             "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)",
             str(self.bootstrap_dir / "python_worker.py"), str(self.bootstrap_dir / name)],
            capture_output=True, timeout=60, check=False, env={})
        if compiled.returncode == 0:
            os.chmod(self.bootstrap_dir / name, 0o644)
        else:
            name = "python_worker.py"
        with self._lock:
            self._compiled_python_worker[runtime.executable] = name
        return name

    def _env(self, spec: FunctionSpec, runtime: Runtime) -> dict[str, str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "TZ": "UTC", "HOME": "/tmp",
               "TMPDIR": "/tmp", "LAMBDA_TASK_ROOT": "/var/task", "AWS_LAMBDA_FUNCTION_VERSION": spec.version_id,
               "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb), "_HANDLER": spec.handler}
        if runtime.language == "python":
            env["PYTHONUNBUFFERED"] = "1"
        env.update(spec.env)
        return env

    def _start(self, spec: FunctionSpec, runtime: Runtime) -> tuple[_Worker, dict[str, Any] | None]:
        if self._account is not None:
            for path in (spec.code_dir, self.bootstrap_dir):
                blocked = sb.unsearchable_directory(path, self._account.uid, self._account.gid)
                if blocked is not None:
                    raise EngineError(f"{blocked} cannot be searched by the sandbox account {self._account.name!r}: "
                                      f"the code directory and its parents must be (o+x)")
        name = self._new_cgroup_name()
        limits = sb.Limits(memory_bytes=spec.memory_mb * 1024 * 1024, pids_max=self.pids_max,
                           cpu_cores=min(os.cpu_count() or 1, max(0.5, spec.memory_mb / MB_PER_CORE)))
        cgroup: sb.SandboxCgroup | None = None
        if self._cgroup_version != 1:
            try:
                cgroup = sb.SandboxCgroup.create(name, limits)
            except OSError as exc:
                raise EngineError(f"cannot create the sandbox's cgroup: {exc}") from exc
        own: list[int] = []
        ours: list[int] = []
        try:
            code_fd = os.open(spec.code_dir, os.O_PATH | os.O_DIRECTORY)
            own.append(code_fd)
            boot_fd = os.open(self.bootstrap_dir, os.O_PATH | os.O_DIRECTORY)
            own.append(boot_fd)
            seccomp_fd = sb.seccomp_fd()
            own.append(seccomp_fd)
            req_r, req_w = os.pipe()
            resp_r, resp_w = os.pipe()
            log_r, log_w = os.pipe()
            own += [req_r, resp_w, log_w]
            ours += [req_w, resp_r, log_r]
            block_r, block_w = os.pipe()
            own.append(block_r)
            ours.append(block_w)
            for fd in (req_w, resp_r, log_r, block_w):
                os.set_inheritable(fd, False)
            layout = sb.SandboxLayout(executable=runtime.executable, code_fd=code_fd, bootstrap_fd=boot_fd,
                                      seccomp_fd=seccomp_fd, tmp_bytes=self.tmp_bytes, network=spec.network,
                                      env=self._env(spec, runtime), block_fd=block_r)
            argv = sb.bwrap_argv(layout, self._command(spec, runtime, req_r, resp_w))
            pass_fds = (code_fd, boot_fd, seccomp_fd, req_r, resp_w, block_r)
            # bwrap's --die-with-parent follows the *thread* that forked it: spawn from one long-lived
            # thread, or a sandbox started by a short-lived request thread dies when that thread ends.
            if cgroup is None:
                proc, cgroup = self._spawner.submit(self._spawn_v1, limits, argv, log_w, pass_fds,
                                                    block_w).result()
            else:
                proc = self._spawner.submit(self._spawn_v2, cgroup, argv, log_w, pass_fds).result()
                _release(block_w)
            ours.remove(block_w)  # closed by _release
        except OSError as exc:
            for fd in own + ours:
                os.close(fd)
            if cgroup is not None:
                cgroup.kill_all()
                cgroup.remove()
            raise EngineError(f"cannot start a sandbox: {exc}") from exc
        except BaseException:
            for fd in own + ours:
                os.close(fd)
            if cgroup is not None:
                cgroup.kill_all()
                cgroup.remove()
            raise
        for fd in own:
            os.close(fd)
        worker = _Worker(spec, proc, cgroup, req_w, resp_r, log_r)
        # Wait for the worker's ready frame (the handler imported), draining its early logs.
        collector = _LogCollector(b"\x00never\x00", self.log_limit)
        init_timeout = max(self.init_timeout_s, spec.timeout_s)
        deadline = time.monotonic() + init_timeout
        frame = self._read_frame(worker, collector, deadline)
        if frame is None:
            timed_out = time.monotonic() >= deadline
            if not timed_out and not worker.closed:
                _drain(worker.log_r, collector, time.monotonic() + 0.5)
            logs = collector.text()
            worker.destroy()
            if worker.oom_at_destroy:
                kind, message, outcome = "Runtime.OutOfMemory", "out of memory during init", "out_of_memory"
            elif timed_out:
                kind, message, outcome = "Runtime.InitTimeout", f"Init timed out after {init_timeout:.2f} seconds", \
                    "timeout"
            else:
                kind, message, outcome = "Runtime.ExitError", "the runtime exited during init", "crashed"
            return worker, {"errorType": kind, "errorMessage": message, "logs": logs, "outcome": outcome}
        header, _ = frame
        if not header.get("ready"):
            error = dict(header.get("error") or {})
            error["logs"] = collector.text()
            error["outcome"] = "error"
            worker.destroy()
            return worker, error
        worker.init_logs = collector.text()
        return worker, None

    def _popen_args(self, log_w: int, pass_fds: tuple[int, ...]) -> dict[str, Any]:
        return {"stdin": subprocess.DEVNULL, "stdout": log_w, "stderr": log_w, "env": {}, "pass_fds": pass_fds,
                "close_fds": True}

    def _new_cgroup_name(self) -> str:
        with self._lock:
            self._seq += 1
            return f"sbx-{os.getpid()}-{self._seq}"

    def _spawn_v1(self, limits: sb.Limits, argv: list[str], log_w: int, pass_fds: tuple[int, ...],
                  block_w: int) -> tuple[subprocess.Popen[bytes], sb.SandboxCgroup]:
        """(On the spawner thread.) Fork bwrap from inside the sandbox's cgroup, as the unprivileged account.

        The thread already waits in a spare cgroup (entered after the previous spawn), which becomes this
        sandbox's: limits written, bwrap forked (no wrapper shell; setpriv keeps subprocess on vfork);
        then the thread moves on to a new spare, off the invocation's path (while bwrap sets the sandbox
        up). bwrap runs the function's runtime only once the thread has left (``block_w``): the kernel's
        OOM killer must never find the engine's own thread among a sandbox's tasks.
        """
        cgroup, self._spare = self._spare, None
        if cgroup is None:
            cgroup = sb.SandboxCgroup.create(self._new_cgroup_name(), None)
            cgroup.enter_thread()
        account = self._account
        try:
            cgroup.apply(limits)
            proc = subprocess.Popen(sb.unprivileged_argv(argv, uid=account.uid if account else None,
                                                         gid=account.gid if account else None),
                                    **self._popen_args(log_w, pass_fds))
        except BaseException:
            cgroup.leave_thread()
            cgroup.remove()
            raise
        try:
            self._spawner.submit(self._next_spare, block_w)
        except RuntimeError:  # shutting down: leave now
            cgroup.leave_thread()
            _release(block_w)
        return proc, cgroup

    def _next_spare(self, block_w: int) -> None:
        """(On the spawner thread.) Leave the last sandbox's cgroup for a new spare one, then let that
        sandbox run."""
        try:
            if self._spare is not None:
                return  # a spawn in between already moved the thread (into this spare)
            if self._closed:
                sb.SandboxCgroup.thread_home()
                return
            spare = sb.SandboxCgroup.create(self._new_cgroup_name(), None)
            try:
                spare.enter_thread()
            except OSError:
                sb.SandboxCgroup.thread_home()
                spare.remove()
                return
            self._spare = spare
        except OSError:
            sb.SandboxCgroup.thread_home()
        finally:
            _release(block_w)

    def _go_home(self) -> None:
        """(On the spawner thread.) Back to the process's own cgroups; the spare is removed."""
        spare, self._spare = self._spare, None
        if self._cgroup_version == 1:
            with contextlib.suppress(OSError):
                sb.SandboxCgroup.thread_home()
        if spare is not None:
            with contextlib.suppress(OSError):
                spare.remove()

    def _spawn_v2(self, cgroup: sb.SandboxCgroup, argv: list[str], log_w: int,
                  pass_fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
        """(On the spawner thread.) cgroup v2 moves whole processes only: a shell joins the cgroup, drops
        privileges and execs bwrap."""
        account = self._account
        wrapped = sb.wrapped_argv(argv, procs_files=cgroup.procs_files, uid=account.uid if account else None,
                                  gid=account.gid if account else None)
        return subprocess.Popen(wrapped, **self._popen_args(log_w, pass_fds))

    def _read_frame(self, worker: _Worker, logs: _LogCollector, deadline: float,
                    *, need_marker: bool = False) -> tuple[dict[str, Any], bytes] | None:
        """Read one answer frame (and the logs until the marker); None on EOF, timeout or a bad frame."""
        buf = bytearray()
        want: int | None = None
        frame: tuple[dict[str, Any], bytes] | None = None
        fds = [worker.resp_r, worker.log_r]
        while frame is None or (need_marker and not logs.done):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select(fds, [], [], remaining)
            if worker.log_r in ready:
                chunk = os.read(worker.log_r, 65536)
                if chunk:
                    logs.feed(chunk)
                else:
                    fds.remove(worker.log_r)
                    if need_marker and frame is not None:
                        break
            if worker.resp_r in ready and frame is None:
                chunk = os.read(worker.resp_r, 1 << 20)
                if not chunk:
                    return None
                buf += chunk
                if want is None and len(buf) >= 8:
                    header_len, body_len = struct.unpack("<II", buf[:8])
                    if header_len > 65536 or body_len > self.payload_limit + 65536:
                        worker.destroy()  # a worker that breaks the protocol is not trusted again
                        return ({"outcome": "error", "too_large": True}, b"")
                    want = 8 + header_len + body_len
                if want is not None and len(buf) >= want:
                    header_len = struct.unpack("<I", buf[:4])[0]
                    try:
                        header = json.loads(bytes(buf[8:8 + header_len]))
                    except ValueError:
                        header = None
                    if not isinstance(header, dict):  # the function's code can write on this pipe too
                        worker.destroy()
                        return None
                    frame = (header, bytes(buf[8 + header_len:want]))
            if not fds:
                return frame
        return frame

    def _run(self, worker: _Worker, spec: FunctionSpec, event: bytes, request_id: str) -> InvocationResult:
        marker = f"\x00hb-end-{secrets.token_hex(16)}\x00"
        logs = _LogCollector(marker.encode(), self.log_limit)
        started = time.monotonic()
        deadline = started + spec.timeout_s
        header = json.dumps({"request_id": request_id, "marker": marker,
                             "deadline_ms": time.time() * 1000 + spec.timeout_s * 1000}).encode()
        oom_before = worker.oom_seen
        try:
            _write_all(worker.req_w, struct.pack("<II", len(header), len(event)) + header + event)
        except OSError:
            frame = None
        else:
            frame = self._read_frame(worker, logs, deadline, need_marker=True)
        elapsed_ms = (time.monotonic() - started) * 1000
        peak_mb = worker.cgroup.peak_bytes() / (1024 * 1024)
        if frame is None:
            timed_out = time.monotonic() >= deadline
            if not timed_out and not worker.closed:
                _drain(worker.log_r, logs, time.monotonic() + 0.5)  # the runtime's last words
            oom = worker.cgroup.oom_kills() > oom_before
            worker.destroy()  # the whole tree: nothing the function started outlives its timeout
            oom = oom or worker.oom_at_destroy > oom_before
            log_text = logs.text()
            # V8 stops at its heap limit (set below the cgroup's) before the kernel has to step in.
            oom = oom or (not timed_out and "JavaScript heap out of memory" in log_text)
            outcome: Outcome
            if oom:
                outcome, error = "out_of_memory", f"Runtime exited: out of memory (limit {spec.memory_mb} MB)"
            elif timed_out:
                outcome, error = "timeout", f"Task timed out after {spec.timeout_s:.2f} seconds"
            else:
                outcome, error = "crashed", f"Runtime exited without answering (status {worker.proc.returncode})"
            payload = json.dumps({"errorType": f"Runtime.{outcome}", "errorMessage": error}).encode()
            return InvocationResult(request_id=request_id, outcome=outcome, payload=payload, error=error,
                                    logs=log_text, duration_ms=elapsed_ms, max_memory_mb=peak_mb)
        answer, body = frame
        if answer.get("outcome") != "ok":  # a child's OOM kill may explain the error: not counted again later
            worker.oom_seen = worker.cgroup.oom_kills()
        if answer.get("too_large"):
            error = f"Response payload size exceeded the limit of {self.payload_limit} bytes"
            payload = json.dumps({"errorType": "Function.ResponseSizeTooLarge", "errorMessage": error}).encode()
            return InvocationResult(request_id=request_id, outcome="error", payload=payload, error=error,
                                    logs=logs.text(), duration_ms=elapsed_ms, max_memory_mb=peak_mb)
        reported = answer.get("duration_ms")
        duration_ms = float(reported) if isinstance(reported, (int, float)) and 0 <= reported <= elapsed_ms \
            else elapsed_ms
        if answer.get("outcome") == "ok":
            return InvocationResult(request_id=request_id, outcome="ok", payload=body, logs=logs.text(),
                                    duration_ms=duration_ms, max_memory_mb=peak_mb)
        try:
            err = json.loads(body)
            error = f"{err.get('errorType', 'Error')}: {err.get('errorMessage', '')}"
        except (ValueError, AttributeError):
            error = "Error: the function failed"
        return InvocationResult(request_id=request_id, outcome="error", payload=body, error=error,
                                logs=logs.text(), duration_ms=duration_ms, max_memory_mb=peak_mb)


def _drain(fd: int, logs: _LogCollector, deadline: float) -> None:
    """Read what is left in a dead sandbox's log pipe (until EOF, or the deadline when a straggler
    still holds it open)."""
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        logs.feed(chunk)


def _release(block_w: int) -> None:
    """Let a sandbox waiting on its block fd run."""
    try:
        os.write(block_w, b"x")
    except OSError:
        pass  # it died already
    finally:
        os.close(block_w)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def init_error_result(request_id: str, error: dict[str, Any], init_ms: float) -> InvocationResult:
    """The answer when the handler could not be loaded (Lambda's Runtime.ImportModuleError & co.)."""
    outcome: Outcome = error.pop("outcome", "error")
    logs = error.pop("logs", "")
    message = f"{error.get('errorType', 'Error')}: {error.get('errorMessage', '')}"
    return InvocationResult(request_id=request_id, outcome=outcome, payload=json.dumps(error).encode(),
                            error=message, logs=logs, init_ms=init_ms, cold=True)
