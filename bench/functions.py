"""Functions: BwrapEngine's cold start, warm invoke and idle memory, each beside its floor from the same run.

Rows (per detected runtime, Python and Node.js):
* ``floor_spawn`` (the floor): the same runtime (same interpreter flags) spawned in a bare ``bwrap`` with
  the same namespaces, mounts and seccomp filter, until it has written its first byte (no cgroup, no
  worker, no handler);
* ``cold``: a first invocation of a new version through the engine (cgroup made, sandbox spawned, worker
  started, handler imported, hello world answered); aim: p50 <= 1.5x the floor;
* ``warm``: an invocation on an idle warm sandbox, straight into the engine, and through a small HTTP
  front (the standard library's threading HTTP server calling ``engine.invoke``) beside the same
  server answering hello itself (the peer); aim: <= 2x the peer; invocations/s at 16 concurrent
  clients through that front (keep-alive connections), once while the pool grows and once warm;
* ``memory``: per idle warm sandbox, the memory charged to its cgroup (pages it faulted in first: the
  runtime's shared libraries already cached elsewhere are not) and the PSS of its processes (shared
  pages split among their users); after ``reap(0)`` the sandboxes' processes and cgroups are gone.

The HTTP front stands in for the cloud's HTTP trigger: it measures the engine's cost behind one HTTP hop,
not the API server's routing. Bounded: counts are fixed (fewer with --smoke); the HTTP server listens on
127.0.0.1 only and stops at the end, also on failure.

    .venv/bin/python bench/functions.py            # full run (about a minute)
    .venv/bin/python bench/functions.py --smoke    # short runs

Writes bench/results/functions.json (functions-smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from hackboot.functions import sandbox as sb  # noqa: E402
from hackboot.functions.bwrap_engine import BwrapEngine  # noqa: E402
from hackboot.functions.engine import FunctionSpec, Runtime  # noqa: E402

PY_HELLO = "def handler(event, context):\n    return {'hello': event}\n"
NODE_HELLO = "exports.handler = async (event) => ({ hello: event });\n"
CLIENTS = 16


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(samples), 3), "p99_ms": pct(samples, 0.99), "n": len(samples)}


def make_code(runtime: Runtime) -> Path:
    root = Path(tempfile.mkdtemp(prefix="hb-fn-bench-"))
    os.chmod(root, 0o755)
    name, text = ("app.py", PY_HELLO) if runtime.language == "python" else ("index.js", NODE_HELLO)
    (root / name).write_text(text)
    os.chmod(root / name, 0o644)
    return root


def spec_for(runtime: Runtime, code: Path) -> FunctionSpec:
    handler = "app.handler" if runtime.language == "python" else "index.handler"
    return FunctionSpec(version_id=f"bench-{uuid.uuid4().hex[:12]}", runtime=runtime.name, code_dir=code,
                        handler=handler, memory_mb=256, timeout_s=10)


def floor_spawn(engine: BwrapEngine, runtime: Runtime, code: Path, n: int) -> list[float]:
    """Bare bwrap with the engine's namespaces and mounts, running the runtime until its first byte."""
    command = ([str(runtime.executable), "-I", "-S", "-c", "import sys; sys.stdout.write('r'); sys.stdout.flush()"]
               if runtime.language == "python" else [str(runtime.executable), "-e", "process.stdout.write('r')"])
    samples = []
    for _ in range(n):
        code_fd = os.open(code, os.O_PATH | os.O_DIRECTORY)
        boot_fd = os.open(engine.bootstrap_dir, os.O_PATH | os.O_DIRECTORY)
        seccomp_fd = sb.seccomp_fd()
        layout = sb.SandboxLayout(executable=runtime.executable, code_fd=code_fd, bootstrap_fd=boot_fd,
                                  seccomp_fd=seccomp_fd, tmp_bytes=engine.tmp_bytes, network=False, env={})
        started = time.monotonic()
        proc = subprocess.Popen(sb.bwrap_argv(layout, command), stdout=subprocess.PIPE, env={},
                                pass_fds=(code_fd, boot_fd, seccomp_fd))
        assert proc.stdout is not None
        first = proc.stdout.read(1)
        samples.append((time.monotonic() - started) * 1000)
        proc.wait()
        for fd in (code_fd, boot_fd, seccomp_fd):
            os.close(fd)
        if first != b"r":
            raise RuntimeError("the floor's runtime did not start")
    return samples


def cold(engine: BwrapEngine, runtime: Runtime, code: Path, n: int) -> tuple[list[float], list[float]]:
    total, init = [], []
    for _ in range(n):
        spec = spec_for(runtime, code)
        started = time.monotonic()
        result = engine.invoke(spec, b'"cold"', request_id="bench")
        total.append((time.monotonic() - started) * 1000)
        if result.outcome != "ok" or not result.cold:
            raise RuntimeError(f"cold invocation failed: {result}")
        init.append(result.init_ms)
        engine.reap(0)
    return total, init


def warm_direct(engine: BwrapEngine, spec: FunctionSpec, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.monotonic()
        result = engine.invoke(spec, b'"warm"', request_id="bench")
        samples.append((time.monotonic() - started) * 1000)
        if result.outcome != "ok":
            raise RuntimeError(f"warm invocation failed: {result}")
    return samples


class _Front(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are written apart: no 40 ms delayed-ACK stalls
    engine: BwrapEngine
    spec: FunctionSpec

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/plain":
            answer = b'{"hello": "plain"}'
        else:
            result = self.engine.invoke(self.spec, body, request_id=uuid.uuid4().hex)
            answer = result.payload if result.outcome == "ok" else b"error"
        self.send_response(200 if answer != b"error" else 502)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # 16 clients connect at once (the default backlog of 5 resets some)


def http_latency(port: int, path: str, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the request's body goes apart too
    samples = []
    try:
        for _ in range(n):
            started = time.monotonic()
            conn.request("POST", path, body=b'"warm"', headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            samples.append((time.monotonic() - started) * 1000)
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}")
    finally:
        conn.close()
    return samples


def http_throughput(port: int, path: str, per_client: int) -> dict[str, Any]:
    failures: list[str] = []

    def client() -> None:
        try:
            http_latency(port, path, per_client)
        except Exception as exc:  # counted, the run goes on
            failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.monotonic() - started
    return {"clients": CLIENTS, "requests": CLIENTS * per_client, "requests_per_s": round(CLIENTS * per_client /
                                                                                          elapsed),
            "failed_clients": len(failures), "failures": failures[:3]}


def _pss_kb(pid: int) -> int:
    """Proportional set size: private pages plus a share of those mapped by others (libraries)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def idle_memory(engine: BwrapEngine, runtime: Runtime, code: Path, count: int) -> dict[str, Any]:
    spec = spec_for(runtime, code)
    barrier = threading.Barrier(count)

    def one() -> None:
        barrier.wait()
        engine.invoke(spec, b'"m"', request_id="bench")

    # Concurrent first invocations make `count` sandboxes of the version, then they all sit idle.
    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    workers = list(engine._pools[spec.version_id].idle)
    usage = []
    for w in workers:
        main = w.cgroup.dirs.get("memory") or w.cgroup.dirs["unified"]
        name = "memory.usage_in_bytes" if "memory" in w.cgroup.dirs else "memory.current"
        usage.append(int((main / name).read_text()) / (1024 * 1024))
    pss = [sum(_pss_kb(pid) for pid in w.cgroup.pids()) / 1024 for w in workers]
    dirs = [d for w in workers for d in w.cgroup.dirs.values()]
    pids = [w.proc.pid for w in workers]
    reaped = engine.reap(0)
    gone = all(not Path(f"/proc/{p}").exists() for p in pids) and not any(d.exists() for d in dirs)
    return {"sandboxes": len(workers), "mb_per_idle_sandbox": round(statistics.mean(usage), 2) if usage else None,
            "pss_mb_per_idle_sandbox": round(statistics.mean(pss), 2) if pss else None,
            "reaped": reaped, "freed_after_reap": gone}


def run(smoke: bool) -> dict[str, Any]:
    engine = BwrapEngine()
    n_cold = 5 if smoke else 30
    n_warm = 50 if smoke else 500
    res: dict[str, Any] = {"smoke": smoke, "runtimes": {}}
    codes: list[Path] = []
    server: _Server | None = None
    try:
        for runtime in engine.runtimes():
            code = make_code(runtime)
            codes.append(code)
            row: dict[str, Any] = {"version": runtime.version}
            # Alternate floor and cold rounds so both see the same machine load.
            floor_samples: list[float] = []
            cold_samples: list[float] = []
            init_samples: list[float] = []
            for _ in range(5):
                floor_samples += floor_spawn(engine, runtime, code, n_cold // 5 or 1)
                total, init = cold(engine, runtime, code, n_cold // 5 or 1)
                cold_samples += total
                init_samples += init
            row["floor_spawn"] = summary(floor_samples)
            row["cold"] = summary(cold_samples) | {"init_p50_ms": round(statistics.median(init_samples), 3)}
            row["cold_vs_floor_p50"] = round(row["cold"]["p50_ms"] / row["floor_spawn"]["p50_ms"], 2)
            spec = spec_for(runtime, code)
            spec = FunctionSpec(**{**spec.__dict__, "max_concurrency": CLIENTS})
            row["warm_direct"] = summary(warm_direct(engine, spec, n_warm))
            _Front.engine = engine
            _Front.spec = spec
            server = _Server(("127.0.0.1", 0), _Front)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            port = server.server_address[1]
            peer, through = [], []
            for _ in range(5):
                peer += http_latency(port, "/plain", n_warm // 5)
                through += http_latency(port, "/invoke", n_warm // 5)
            row["http_plain_peer"] = summary(peer)
            row["http_warm_invoke"] = summary(through)
            row["warm_http_vs_plain_p50"] = round(row["http_warm_invoke"]["p50_ms"] / row["http_plain_peer"]["p50_ms"],
                                                  2)
            per_client = 10 if smoke else 60
            row["throughput_plain_peer"] = http_throughput(port, "/plain", per_client)
            # The first round starts the sandboxes (up to one per client); the second runs on the warm pool.
            row["throughput_invoke_with_cold_starts"] = http_throughput(port, "/invoke", per_client)
            row["throughput_invoke"] = http_throughput(port, "/invoke", per_client)
            row["warm_sandboxes_after_load"] = engine.warm(spec.version_id)
            server.shutdown()
            server.server_close()
            server = None
            engine.reap(0)
            row["memory"] = idle_memory(engine, runtime, code, 2 if smoke else 8)
            res["runtimes"][runtime.name] = row
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        engine.close()
        for code in codes:
            shutil.rmtree(code, ignore_errors=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="short runs")
    args = parser.parse_args()
    res = run(args.smoke)
    for name, row in res["runtimes"].items():
        print(f"{name}: cold p50 {row['cold']['p50_ms']} ms (floor {row['floor_spawn']['p50_ms']} ms, "
              f"x{row['cold_vs_floor_p50']}), warm HTTP p50 {row['http_warm_invoke']['p50_ms']} ms "
              f"(plain {row['http_plain_peer']['p50_ms']} ms, x{row['warm_http_vs_plain_p50']}), "
              f"{row['throughput_invoke']['requests_per_s']} inv/s at {CLIENTS} clients "
              f"(plain {row['throughput_plain_peer']['requests_per_s']}/s), "
              f"{row['memory']['mb_per_idle_sandbox']} MB charged ({row['memory']['pss_mb_per_idle_sandbox']} MB PSS) "
              f"per idle sandbox")
    out = REPO / "bench" / "results" / ("functions-smoke.json" if args.smoke else "functions.json")
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
