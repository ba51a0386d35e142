"""Functions end to end through a real `hackboot serve`: the HTTP trigger (a function URL), beside peers from the
same run.

Rows (Python; Node.js too when the machine has it):
* ``warm``: GET on the function URL with a warm sandbox (API process → invoker over its unix socket →
  sandbox → back, invocation recorded) beside GET /healthz on the same server (same ASGI stack and
  middleware, no function): aim p50 <= 2x the peer; alternating rounds, one keep-alive connection;
* ``throughput``: requests/s of each at 16 concurrent clients;
* ``cold``: GET on the function URL right after a configuration change (a new revision: no warm sandbox)
  beside the floor of bench/functions.py — the same runtime spawned in a bare ``bwrap`` with the same
  namespaces: aim p50 <= 1.5x the floor.

Bounded: fixed counts (fewer with --smoke); the server listens on 127.0.0.1 and is stopped at the end.

    .venv/bin/python bench/functions_http.py [--smoke]

Writes bench/results/functions_http.json (functions_http-smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from bench.functions import floor_spawn, make_code, summary  # noqa: E402
from hackboot.functions.bwrap_engine import BwrapEngine  # noqa: E402
from tests.support import make_cloud  # noqa: E402

CLIENTS = 16
CODE = {"python": ("app.py", "app.handler", "def handler(event, context):\n    return {'statusCode': 200, "
                   "'headers': {'content-type': 'application/json'}, 'body': '{\"status\":\"ok\"}'}\n"),
        "nodejs": ("app.js", "app.handler", "exports.handler = async () => ({statusCode: 200, "
                   "headers: {'content-type': 'application/json'}, body: '{\"status\":\"ok\"}'});\n")}


def get_latency(port: int, path: str, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    try:
        for _ in range(n):
            started = time.monotonic()
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            samples.append((time.monotonic() - started) * 1000)
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}")
    finally:
        conn.close()
    return samples


def throughput(port: int, path: str, per_client: int) -> dict[str, Any]:
    failures: list[str] = []

    def client() -> None:
        try:
            get_latency(port, path, per_client)
        except Exception as exc:  # counted; the run goes on
            failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.monotonic() - started
    return {"clients": CLIENTS, "requests": CLIENTS * per_client,
            "requests_per_s": round(CLIENTS * per_client / elapsed), "failed_clients": len(failures),
            "failures": failures[:3]}


def zipped(name: str, text: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, text)
    return buf.getvalue()


def run(smoke: bool) -> dict[str, Any]:
    n_warm = 50 if smoke else 400
    n_cold = 5 if smoke else 20
    per_client = 10 if smoke else 40
    state = Path(tempfile.mkdtemp(prefix="hb-bench-fn-"))
    # Limits high enough for the 16 clients; one API process, so the peer and the trigger share one.
    cloud = make_cloud(state, HACKBOOT_RUN_LOCAL_AGENT="false", HACKBOOT_API_WORKERS="1",
                       HACKBOOT_FUNCTIONS_PROJECT_CONCURRENCY="32")
    engine = BwrapEngine()  # only for the floor's bootstrap directory and runtimes
    res: dict[str, Any] = {"smoke": smoke, "runtimes": {}}
    try:
        cloud.start()
        port = cloud.api_port
        admin = cloud.admin_client_unscoped()
        client = cloud.client(project=admin.projects.create(f"bench-{uuid.uuid4().hex[:6]}")["id"])
        for runtime in engine.runtimes():
            name, handler, text = CODE[runtime.language]
            fn = client.functions.create(f"{runtime.language}-{uuid.uuid4().hex[:6]}", runtime.name, handler,
                                         max_concurrency=CLIENTS)
            client.functions.upload_code(fn["id"], zipped(name, text))
            path = client.functions.add_trigger(fn["id"], "http")["url_path"]
            get_latency(port, path, 3)  # warm it
            peer, through = [], []
            for _ in range(5):  # alternate so both see the same load
                peer += get_latency(port, "/healthz", n_warm // 5)
                through += get_latency(port, path, n_warm // 5)
            row: dict[str, Any] = {"warm_peer_healthz": summary(peer), "warm_function_url": summary(through)}
            row["warm_vs_peer_p50"] = round(row["warm_function_url"]["p50_ms"] / row["warm_peer_healthz"]["p50_ms"],
                                            2)
            row["throughput_peer_healthz"] = throughput(port, "/healthz", per_client)
            throughput(port, path, 2)  # a sandbox per client first
            row["throughput_function_url"] = throughput(port, path, per_client)
            code = make_code(runtime)
            try:
                floor: list[float] = []
                cold: list[float] = []
                for i in range(n_cold):
                    floor += floor_spawn(engine, runtime, code, 1)
                    client.functions.update(fn["id"], description=f"revision {i}")  # no warm sandbox for it
                    cold += get_latency(port, path, 1)
            finally:
                shutil.rmtree(code, ignore_errors=True)
            row["cold_floor_bare_bwrap"] = summary(floor)
            row["cold_function_url"] = summary(cold)
            row["cold_vs_floor_p50"] = round(statistics.median(cold) / statistics.median(floor), 2)
            res["runtimes"][runtime.name] = row
    finally:
        engine.close()
        cloud.stop()
        shutil.rmtree(state, ignore_errors=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="short runs")
    args = parser.parse_args()
    res = run(args.smoke)
    for name, row in res["runtimes"].items():
        print(f"{name}: warm function URL p50 {row['warm_function_url']['p50_ms']} ms vs /healthz "
              f"{row['warm_peer_healthz']['p50_ms']} ms (x{row['warm_vs_peer_p50']}); "
              f"{row['throughput_function_url']['requests_per_s']} req/s at {CLIENTS} clients vs "
              f"{row['throughput_peer_healthz']['requests_per_s']}; cold p50 {row['cold_function_url']['p50_ms']} ms "
              f"vs bare bwrap {row['cold_floor_bare_bwrap']['p50_ms']} ms (x{row['cold_vs_floor_p50']})")
    out = REPO / "bench" / "results" / ("functions_http-smoke.json" if args.smoke else "functions_http.json")
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
