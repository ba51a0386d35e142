"""Placement throughput: 10,000 instances over a fleet of the seeds' size, SQLite and PostgreSQL.

The fleet (seed 000: ~2,500 vCPUs, 48 GPUs): 39 VPS hosts of 48 vCPUs / 512 GB / 15 TB and 11 GPU
hosts of 56 vCPUs (1x8 A100, 5x4 RTX 4090, 5x4 T4), in the three zones of PAR1. GPU hosts take
GPU flavors only, so the 9,952 one-vCPU VPS share the VPS hosts' 1,872 vCPUs: they are sold 6:1
here (``--cpu-ratio``; the default ratio 1.0 of a real deployment would stop at 1,872).

Rows:
* ``create``: the API's create path without HTTP – `compute.service.create_instance`: flavor,
  image, quota claims, placement with the host-generation CAS, instance row, event – from
  ``--threads`` threads at once, one tenant (project) each (9,952 VPS-NANO and 48 GPU
  instances, shuffled);
* ``scheduler``: `scheduler.place` alone, one transaction per placement, sequential;
* ``peer``: the same placements with the per-host usage cache disabled (usage recomputed from the
  allocations table for every candidate, as a naive scheduler would), on the first 2,000 only.

At the end: zero overcommit (usage from the allocations table <= capacity for every inventory)
and every GPU PCI address held by at most one instance.

    .venv/bin/python bench/placement.py            # 10,000 per backend (a few minutes)
    .venv/bin/python bench/placement.py --smoke    # 300 per backend, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.support import Postgres  # noqa: E402

GPU_HOSTS = [("A100", 8)] + [("RTX4090", 4)] * 5 + [("T4", 4)] * 5
GPU_FLAVORS = {"A100": "GPU-A100", "RTX4090": "GPU-RTX4090", "T4": "GPU-T4"}
ZONES = ("PAR1-a", "PAR1-b", "PAR1-c")


def setup_database(url: str, state: Path) -> None:
    os.environ.update({"HACKBOOT_DATABASE_URL": url, "HACKBOOT_STATE_DIR": str(state),
                       "HACKBOOT_CONFIG": str(state / "none.toml")})
    from hackboot.core import config, db

    config.reset_settings_cache()
    db.dispose_engine()
    from hackboot.catalog import service as catalog
    from hackboot.compute import scheduler
    from hackboot.core.migrate import upgrade

    upgrade(url)
    catalog.seed()
    scheduler.clear_cache()


def build_fleet(ratio: float) -> dict[str, int]:
    from hackboot.catalog.models import Host, Inventory
    from hackboot.core.db import session_scope

    totals: Counter[str] = Counter()
    with session_scope() as s:
        n = 0
        for i in range(39):
            n += 1
            hid = f"host-vps{i:02d}"
            s.add(Host(id=hid, name=hid, zone_id=ZONES[n % 3], status="up", facts={}, generation=0))
            s.flush()
            for rc, total, r in (("VCPU", 48, ratio), ("MEMORY_MB", 512 * 1024, 1.0), ("DISK_GB", 15_000, 1.0)):
                s.add(Inventory(host_id=hid, resource_class=rc, total=total, reserved=0, allocation_ratio=r,
                                devices=[]))
                totals[rc] += total
        for i, (model, count) in enumerate(GPU_HOSTS):
            n += 1
            hid = f"host-gpu{i:02d}"
            s.add(Host(id=hid, name=hid, zone_id=ZONES[n % 3], status="up", facts={}, generation=0))
            s.flush()
            for rc, total, r in (("VCPU", 56, ratio), ("MEMORY_MB", 768 * 1024, 1.0), ("DISK_GB", 15_000, 1.0)):
                s.add(Inventory(host_id=hid, resource_class=rc, total=total, reserved=0, allocation_ratio=r,
                                devices=[]))
                totals[rc] += total
            devices = [f"0000:{0x81 + d:02x}:00.0" for d in range(count)]
            s.add(Inventory(host_id=hid, resource_class=f"GPU:{model}", total=count, reserved=0,
                            allocation_ratio=1.0, devices=devices))
            totals["GPU"] += count
    return dict(totals)


def make_project() -> tuple[Any, str]:
    from hackboot.core import quotas
    from hackboot.core.auth import Principal
    from hackboot.core.db import session_scope
    from hackboot.images.models import Image

    project = "prj-bench" + uuid.uuid4().hex[:8]
    image_id = "img-bench" + uuid.uuid4().hex[:6]
    with session_scope() as s:
        quotas.init_project_quotas(s, project)
        for resource in ("instances", "vcpus", "ram_mb", "gpus"):
            quotas.set_limit(s, project, resource, 10**12)
        s.add(Image(id=image_id, project_id=None, name=image_id, status="active", visibility="public",
                    disk_format="qcow2", file_name="bench.qcow2", source="upload"))
    return Principal(user_id="usr-bench", username="bench", token_id="tok-bench", role="admin", is_superuser=True,
                     project_id=project), image_id


def run_create(n: int, threads: int) -> dict[str, Any]:
    from hackboot.compute import service
    from hackboot.core import errors

    # one project per thread: tenants' quota rows are independent (one project's creates serialise on them)
    tenants = [make_project() for _ in range(threads)]
    gpu_requests = [GPU_FLAVORS[m] for m, count in GPU_HOSTS for _ in range(count)]
    gpu_requests = gpu_requests[: max(1, n * len(gpu_requests) // 10_000)]
    flavors = gpu_requests + ["VPS-NANO"] * (n - len(gpu_requests))
    random.Random(42).shuffle(flavors)
    work = list(enumerate(flavors))
    lock = threading.Lock()
    outcome: Counter[str] = Counter()
    latencies: list[float] = []

    def worker(principal: Any, image_id: str) -> None:
        while True:
            with lock:
                if not work:
                    return
                i, flavor = work.pop()
            t0 = time.perf_counter()
            try:
                service.create_instance(principal, service.CreateRequest(
                    name=f"b{i}", flavor=flavor, image=image_id, region="PAR1"))
                result = "placed"
            except errors.NoCapacity:
                result = "no_capacity"
            took = time.perf_counter() - t0
            with lock:
                outcome[result] += 1
                latencies.append(took)

    started = time.perf_counter()
    pool = [threading.Thread(target=worker, args=tenant) for tenant in tenants]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": n, "threads": threads, "placed": outcome["placed"], "no_capacity": outcome["no_capacity"],
            "seconds": round(elapsed, 2), "per_s": round(n / elapsed, 1),
            "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2)}


def run_scheduler(n: int, *, cache: bool) -> dict[str, Any]:
    from hackboot.compute import scheduler
    from hackboot.core import errors
    from hackboot.core.db import session_scope

    placed = refused = 0
    if not cache:
        original = scheduler._cache.get
        scheduler._cache.get = lambda host_id, generation: None  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        for i in range(n):
            req = scheduler.Request(consumer_id=f"i-s{'c' if cache else 'n'}{i:06d}{uuid.uuid4().hex[:6]}",
                                    project_id="prj-sched", vcpus=1, memory_mb=1024, disk_gb=20, zone_ids=list(ZONES))
            try:
                with session_scope() as s:
                    scheduler.place(s, req)
                placed += 1
            except errors.NoCapacity:
                refused += 1
        elapsed = time.perf_counter() - started
    finally:
        if not cache:
            scheduler._cache.get = original  # type: ignore[method-assign]
    return {"requests": n, "threads": 1, "placed": placed, "no_capacity": refused, "seconds": round(elapsed, 2),
            "per_s": round(n / elapsed, 1)}


def check(totals: dict[str, int]) -> dict[str, Any]:
    from sqlalchemy import func, select

    from hackboot.catalog.models import Allocation
    from hackboot.compute import scheduler
    from hackboot.core.db import session_scope

    with session_scope(write=False) as s:
        over = scheduler.overcommitted(s)
        devices = [(host, d) for host, devs in s.execute(select(Allocation.host_id, Allocation.devices)
                                                         .where(Allocation.resource_class.like("GPU:%")))
                   for d in devs]  # PCI addresses are per host
        used = {rc: int(u or 0) for rc, u in s.execute(
            select(Allocation.resource_class, func.sum(Allocation.amount)).group_by(Allocation.resource_class))}
    dup = [d for d, c in Counter(devices).items() if c > 1]
    return {"overcommitted_inventories": len(over), "duplicate_gpu_devices": len(dup),
            "vcpus_used": used.get("VCPU", 0), "vcpus_total": totals["VCPU"],
            "gpus_used": sum(v for k, v in used.items() if k.startswith("GPU:")), "gpus_total": totals["GPU"]}


def bench_backend(name: str, url: str, state: Path, n: int, threads: int, ratio: float) -> dict[str, Any]:
    setup_database(url, state)
    totals = build_fleet(ratio)
    create = run_create(n, threads)
    checked = check(totals)
    # scheduler-only rows on a fresh fleet (same database, other hosts' zones are full by now)
    from sqlalchemy import delete

    from hackboot.catalog.models import Allocation
    from hackboot.compute import scheduler
    from hackboot.core.db import session_scope

    with session_scope() as s:
        s.execute(delete(Allocation))
        s.execute(scheduler.update(scheduler.Host).values(generation=scheduler.Host.generation + 1))
    sched = run_scheduler(n, cache=True)
    with session_scope() as s:
        s.execute(delete(Allocation))
        s.execute(scheduler.update(scheduler.Host).values(generation=scheduler.Host.generation + 1))
    peer = run_scheduler(min(n, 2000), cache=False)
    return {"backend": name, "fleet": totals, "create": create, "scheduler": sched, "peer_no_cache": peer,
            "check": checked}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="300 instances per backend")
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--cpu-ratio", type=float, default=6.0)
    parser.add_argument("--backends", default="sqlite,postgres")
    args = parser.parse_args()
    n = 300 if args.smoke else args.n
    results = []
    for backend in args.backends.split(","):
        state = Path(tempfile.mkdtemp(prefix="hb-place-"))
        pg = None
        try:
            if backend == "sqlite":
                url = f"sqlite:///{state / 'bench.db'}"
            else:
                pg = Postgres()
                pg.start()
                url = pg.create_database("hb_bench_placement")
            results.append(bench_backend(backend, url, state, n, args.threads, args.cpu_ratio))
        finally:
            from hackboot.core import db

            db.dispose_engine()
            if pg is not None:
                pg.stop()
            shutil.rmtree(state, ignore_errors=True)
    print(f"\nPlacement, {n} instances over {results[0]['fleet']['VCPU']} vCPUs "
          f"(x{args.cpu_ratio} for VCPU) and {results[0]['fleet']['GPU']} GPUs on 50 hosts")
    print(f"{'backend':<9} {'path':<22} {'threads':>7} {'placed':>7} {'refused':>7} {'seconds':>8} {'per s':>8}")
    for r in results:
        for label, row in (("create (service)", r["create"]), ("scheduler only", r["scheduler"]),
                           ("peer: no usage cache", r["peer_no_cache"])):
            print(f"{r['backend']:<9} {label:<22} {row['threads']:>7} {row['placed']:>7} {row['no_capacity']:>7} "
                  f"{row['seconds']:>8} {row['per_s']:>8}")
        c = r["check"]
        print(f"{'':<9} check: {c['overcommitted_inventories']} overcommitted inventories, "
              f"{c['duplicate_gpu_devices']} GPUs given twice, vCPUs {c['vcpus_used']}/{c['vcpus_total']}x, "
              f"GPUs {c['gpus_used']}/{c['gpus_total']}; create p50 {r['create']['p50_ms']} ms, "
              f"p99 {r['create']['p99_ms']} ms")
    for r in results:
        r["speedup_vs_peer"] = round(r["scheduler"]["per_s"] / r["peer_no_cache"]["per_s"], 2)
    out = REPO / "bench" / "results" / ("placement-smoke.json" if args.smoke else "placement.json")
    out.write_text(json.dumps({"n": n, "cpu_ratio": args.cpu_ratio, "results": results}, indent=2) + "\n")
    print(f"\nwritten {out.relative_to(REPO)}")
    bad = any(r["check"]["overcommitted_inventories"] or r["check"]["duplicate_gpu_devices"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
