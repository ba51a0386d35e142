"""Load balancers: HaproxyDriver (Debian's HAProxy 2.6) against its backends, measured in one run.

Rows:
* ``direct`` (the peer): ``wrk`` from the client namespace straight to one backend;
  (direct and lb alternate, three rounds each, and the median of each is kept);
* ``lb``: the same ``wrk`` through the load balancer's VIP, two backends behind it; aims: >= 0.8x the
  direct rate, p99 added < 1 ms;
* ``reloads``: a configuration change (a structural one: a hitless reload) every second for 30 s
  while ``wrk`` runs through the LB, once on keep-alive connections and once with a new connection
  per request; the headline is the number of failed requests (socket errors + non-2xx answers): 0;
* ``create``: apply of a new load balancer → the first request served (polled from the client);
  aim < 3 s.

The backends are small asyncio HTTP servers (tests/integration/loadbalancers/engine_topology.py), the
same for both rows, so the ratio compares the proxy hop with no proxy hop. They cost almost no CPU, so on
a small machine shared by wrk, HAProxy and the backends the ratio measures the proxy's CPU cost per
request (roughly one more hop of socket work), not a limit a real application would reach. Bounded: every wrk run lasts
--seconds (the reload runs 30 s, 5 s with --smoke); all traffic stays in hb- namespaces this script
creates and removes (also on failure).

    .venv/bin/python bench/lb.py            # full run (about 2 minutes)
    .venv/bin/python bench/lb.py --smoke    # short runs

Writes bench/results/lb.json (lb-smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from hackboot.loadbalancers.driver import ListenerSpec, LoadBalancerSpec, MemberSpec, PoolSpec  # noqa: E402
from hackboot.loadbalancers.haproxy import HaproxyDriver  # noqa: E402
from hackboot.network import netns  # noqa: E402
from tests.integration.loadbalancers.engine_topology import (  # noqa: E402
    HTTP_PORT,
    VIP,
    Topology,
    http_get,
    topology,
)

WRK_THREADS = 2
WRK_CONNECTIONS = 32
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(topo: Topology, url: str, seconds: int, *, close: bool = False) -> dict[str, Any]:
    """wrk from the client namespace: requests/s, p50/p99 (ms) and failures."""
    argv = ["wrk", "-t", str(WRK_THREADS), "-c", str(WRK_CONNECTIONS), "-d", f"{seconds}s", "--timeout", "10s",
            "--latency", url]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    out = netns.run(topo.client_ns, argv, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    latency = {p: float(v) * _UNITS[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)}
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = sum(int(x) for x in socket_errors.groups()) if socket_errors else 0
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = errors + (int(non_2xx.group(1)) if non_2xx else 0)
    return {"requests_per_s": round(rps), "p50_ms": round(latency["50"], 3), "p99_ms": round(latency["99"], 3),
            "requests": total, "failed": failed}


def lb_spec(topo: Topology, lb_id: str = "lb-bench", timeout_s: float = 60.0, extra: bool = False) -> LoadBalancerSpec:
    members = tuple(MemberSpec(n, topo.backends[n].ip, HTTP_PORT) for n in ("b1", "b2"))
    listeners = [ListenerSpec("web", "http", 80, "web", idle_timeout_s=timeout_s)]
    if extra:
        listeners.append(ListenerSpec("extra", "http", 8080, "web"))
    return LoadBalancerSpec(lb_id, VIP, tuple(listeners), (PoolSpec("web", members=members),))


def reloads_under_load(topo: Topology, driver: HaproxyDriver, seconds: int, *, close: bool) -> dict[str, Any]:
    """wrk through the LB while a thread applies a structural change every second."""
    stop = threading.Event()
    applied: list[float] = []
    errors: list[str] = []

    def changer() -> None:
        time.sleep(1)
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            try:
                driver.apply(lb_spec(topo, timeout_s=30 + i % 30, extra=i % 2 == 0), topo.lb_ns)
            except Exception as exc:  # reported in the result, not hidden
                errors.append(repr(exc))
            applied.append(time.perf_counter() - t)
            i += 1
            stop.wait(max(0.0, 1.0 - (time.perf_counter() - t)))

    thread = threading.Thread(target=changer, daemon=True)
    thread.start()
    try:
        result = wrk(topo, f"http://{VIP}/", seconds, close=close)
    finally:
        stop.set()
        thread.join(30)
    driver.apply(lb_spec(topo), topo.lb_ns)
    result.update(reloads=len(applied), apply_p50_ms=round(statistics.median(applied) * 1000, 1) if applied else None,
                  apply_errors=errors)
    return result


def create_to_first_request(topo: Topology, driver: HaproxyDriver, samples: int) -> dict[str, Any]:
    times = []
    for i in range(samples):
        spec = dataclasses.replace(lb_spec(topo), id=f"lb-create{i}")
        t = time.perf_counter()
        driver.apply(spec, topo.lb_ns)

        def first_request() -> None:
            while True:
                try:
                    if http_get(VIP, 80, timeout=1).status == 200:
                        return
                except OSError:
                    time.sleep(0.005)

        topo.in_client(first_request, timeout=30)
        times.append(time.perf_counter() - t)
        driver.remove(spec.id)
    return {"samples": samples, "p50_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}


def run(smoke: bool, seconds: int) -> dict[str, Any]:
    res: dict[str, Any] = {"smoke": smoke, "wrk": {"threads": WRK_THREADS, "connections": WRK_CONNECTIONS,
                                                   "seconds": seconds}}
    with topology(backends=2, prefix=f"hb-lbb{__import__('uuid').uuid4().hex[:5]}") as topo:
        state = Path(tempfile.mkdtemp(prefix="hb-bench-lb-"))
        driver = HaproxyDriver(state / "lb")
        try:
            res["create"] = create_to_first_request(topo, driver, 3 if smoke else 10)
            driver.apply(lb_spec(topo), topo.lb_ns)
            direct_url = f"http://{topo.backends['b1'].ip}:{HTTP_PORT}/"
            wrk(topo, direct_url, 1)  # warm-up
            # Alternating rounds, the median of each: the machine's load drifts during a run.
            rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "lb": []}
            for _ in range(1 if smoke else 3):
                rounds["direct"].append(wrk(topo, direct_url, seconds))
                rounds["lb"].append(wrk(topo, f"http://{VIP}/", seconds))
            for key, runs in rounds.items():
                res[key] = {field: statistics.median(r[field] for r in runs) for field in runs[0]}
                res[key]["rounds"] = runs
            reload_seconds = 5 if smoke else 30
            res["reloads_keepalive"] = reloads_under_load(topo, driver, reload_seconds, close=False)
            res["reloads_new_connections"] = reloads_under_load(topo, driver, reload_seconds, close=True)
        finally:
            for lb_id in driver.running():
                driver.remove(lb_id)
            for p in sorted(state.rglob("*"), reverse=True):
                p.unlink() if p.is_file() or p.is_socket() else p.rmdir()
            state.rmdir()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="short runs")
    parser.add_argument("--seconds", type=int, default=None, help="wrk duration of the throughput rows")
    args = parser.parse_args()
    res = run(args.smoke, args.seconds or (3 if args.smoke else 10))
    d, lb = res["direct"], res["lb"]
    res["ratios"] = {"lb_vs_direct_requests_per_s": round(lb["requests_per_s"] / d["requests_per_s"], 3),
                     "added_p99_ms": round(lb["p99_ms"] - d["p99_ms"], 3)}
    failed = res["reloads_keepalive"]["failed"] + res["reloads_new_connections"]["failed"]
    res["headline_failed_requests_during_reloads"] = failed
    print(f"\nLoad balancer (HAProxy 2.6; wrk {WRK_THREADS} threads, {WRK_CONNECTIONS} connections, "
          f"{res['wrk']['seconds']} s)")
    print(f"{'path':<26} {'req/s':>9} {'x direct':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}")
    for key, label in (("direct", "direct to one backend"), ("lb", "through the LB (2 backends)")):
        r = res[key]
        print(f"{label:<26} {r['requests_per_s']:>9} {r['requests_per_s'] / d['requests_per_s']:>9.2f} "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['failed']:>7}")
    for key, label in (("reloads_keepalive", "reloads, keep-alive"), ("reloads_new_connections", "reloads, new conns")):
        r = res[key]
        print(f"{label:<26} {r['requests_per_s']:>9} {r['requests_per_s'] / d['requests_per_s']:>9.2f} "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['failed']:>7}   ({r['reloads']} reloads, "
              f"{r['requests']} requests)")
    print(f"\nadded p99: {res['ratios']['added_p99_ms']} ms; failed requests during reloads: {failed}")
    c = res["create"]
    print(f"create → first request served: p50 {c['p50_s']} s, max {c['max_s']} s ({c['samples']} samples)")
    out = REPO / "bench" / "results" / ("lb-smoke.json" if args.smoke else "lb.json")
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
