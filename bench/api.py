"""API latency and throughput: GET one resource, LIST 1,000, POST — at 1, 16, 64 clients, SQLite and PostgreSQL.

The load comes from `wrk` (C, event-driven) so the client is not the bottleneck; client and
server share this machine's cores, so compare rows with each other rather than with other hosts.

    .venv/bin/python bench/api.py            # full run (about 4 minutes)
    .venv/bin/python bench/api.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hackboot.sdk import Client  # noqa: E402
from tests.support import Cloud, Postgres, make_cloud  # noqa: E402

LUA = r"""
local counter = 0
local thread_id = 0
local threads = {}
function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
  table.insert(threads, thread)
end
function init(args)
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("HB_TOKEN")
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  if os.getenv("HB_METHOD") == "POST" then
    counter = counter + 1
    local body = string.format('{"name": "b-%s-%d-%d"}', os.getenv("HB_RUN"), tid, counter)
    return wrk.format("POST", os.getenv("HB_PATH"), nil, body)
  end
  return wrk.format("GET", os.getenv("HB_PATH"))
end
function done(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %f, "errors": %d, "p50_ms": %f, "p95_ms": %f, "p99_ms": %f}\n',
    summary.requests, summary.duration / 1e6, errors, latency:percentile(50) / 1000,
    latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
"""


def run_wrk(cloud: Cloud, method: str, path: str, clients: int, seconds: float, script: Path) -> dict[str, float]:
    env = {"HB_TOKEN": cloud.admin_token, "HB_METHOD": method, "HB_PATH": path, "HB_RUN": uuid.uuid4().hex[:6],
           "PATH": "/usr/bin:/bin"}
    threads = 1 if clients == 1 else 2
    argv = ["wrk", "-t", str(threads), "-c", str(clients), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s",
            "-s", str(script), cloud.url]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["rps"] = result["requests"] / result["seconds"]
    return result  # type: ignore[no-any-return]


def bench_backend(name: str, cloud: Cloud, clients_list: list[int], seconds: float, items: int,
                  script: Path) -> list[dict[str, object]]:
    admin = Client(cloud.url, cloud.admin_token)
    existing = len(admin.projects.list())  # type: ignore[attr-defined]
    for i in range(existing, items):
        admin.post("/v1/projects", {"name": f"seed-{i}"})
    one = admin.projects.list(name="default")[0]["id"]  # type: ignore[attr-defined]
    scenarios = [("GET one", "GET", f"/v1/projects/{one}"),
                 (f"LIST {items}", "GET", f"/v1/projects?limit={items}"),
                 ("POST", "POST", "/v1/projects")]
    rows = []
    for label, method, path in scenarios:
        for clients in clients_list:
            r = run_wrk(cloud, method, path, clients, seconds, script)
            rows.append({"db": name, "operation": label, "clients": clients, **r})
            print(f"  {name:9} {label:10} c={clients:<3} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:6.1f}  "
                  f"p95 {r['p95_ms']:6.1f}  p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the benchmark works")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    clients_list = [1, 4] if args.smoke else [1, 16, 64]
    seconds = 1.0 if args.smoke else args.seconds
    items = 50 if args.smoke else 1000
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="hb-bench-api-") as tmp:
        script = Path(tmp) / "bench.lua"
        script.write_text(LUA)
        pg = Postgres()
        pg.start()
        try:
            for name, url in (("sqlite", ""), ("postgres", pg.create_database("bench_api"))):
                cloud = make_cloud(Path(tmp) / name, url, HACKBOOT_RUN_LOCAL_AGENT="false",
                                   HACKBOOT_RUN_WORKERS="false")
                cloud.start()
                try:
                    rows += bench_backend(name, cloud, clients_list, seconds, items, script)
                finally:
                    cloud.stop()
        finally:
            pg.stop()
    print("\n| DB | operation | clients | req/s | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['db']} | {r['operation']} | {r['clients']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | "
              f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    out = REPO / "bench" / "results" / ("api-smoke.json" if args.smoke else "api.json")
    out.write_text(json.dumps({"rows": rows, "smoke": args.smoke}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
