"""Snapshot and clone time for 1 GiB and 20 GiB volumes (must be flat), and IOPS measured inside a guest for
each tier with QEMU throttling on, against the tier's cap.

    .venv/bin/python bench/volumes.py            # full run
    .venv/bin/python bench/volumes.py --smoke    # fewer samples, smaller reads

Runs a private cloud on 127.0.0.1 with one TCG guest of the `tiny` image. Writes bench/results/volumes.json.
IOPS: `dd iflag=direct bs=4k` reads in the guest, after a first pass that empties the tier's burst bucket.
Under TCG an emulated guest reaches a few thousand IOPS at most: the tiers whose cap is above what the
unthrottled guest achieves cannot show their cap, and say so; the `test-200iops` tier (tests only) shows a
cap being enforced. A tier whose cap the guest can exceed must measure within +-10 % of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _volcloud import REPO, active_file, boot_guest, fill, ssh, start_cloud, stop_cloud, timed, unique

MiB, GiB = 1024**2, 1024**3


def snapshot_rows(c: Any, samples: int) -> list[dict[str, Any]]:
    client = c.client()
    rows = []
    for size in (1, 20):
        v = client.volumes.wait(client.volumes.create(unique(f"s{size}"), size)["id"])
        fill(active_file(c, v["id"]), 0, 256 * MiB)  # some data in every volume
        snaps, clones = [], []
        for i in range(samples):
            t, s = timed(lambda i=i, v=v: client.volume_snapshots.wait(
                v["id"], client.volume_snapshots.create(v["id"], f"b{i}")["id"]))
            snaps.append(t)
            t, cl = timed(lambda s=s, i=i: client.volumes.wait(
                client.volumes.create(unique("cl"), snapshot=s["id"])["id"]))
            clones.append(t)
            assert cl["status"] == "available", cl
        rows.append({"size_gib": size, "snapshot_s_median": round(statistics.median(snaps), 3),
                     "clone_s_median": round(statistics.median(clones), 3), "samples": samples})
    return rows


def measure_iops(inst: dict[str, Any], key: str, dev: str, count: int) -> float:
    out = ssh(inst, key, f"dd if=/dev/{dev} of=/dev/null bs=4k count={count} iflag=direct 2>/dev/null; "
                         f"s=$(cat /proc/uptime); dd if=/dev/{dev} of=/dev/null bs=4k count={count} skip={count} "
                         f"iflag=direct 2>/dev/null; e=$(cat /proc/uptime); echo $s $e")
    s, _, e, _ = out.split()
    return count / (float(e) - float(s))


def iops_rows(c: Any, count: int) -> list[dict[str, Any]]:
    client = c.client()
    inst, key = boot_guest(c)
    tiers = {t["name"]: t for t in client.volumes.tiers()}
    rows = []
    for name in ("ssd-performance", "ssd-standard", "hdd-standard", "archive", "test-200iops"):
        v = client.volumes.wait(client.volumes.create(unique(name[:8]), 1, tier=name)["id"])
        fill(active_file(c, v["id"]), 0, 64 * MiB)
        client.volumes.attach(v["id"], inst["id"])
        v = client.volumes.wait(v["id"], ("in-use",))
        serial = v["id"][:20]
        dev = ssh(inst, key, f"for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = {serial} ] && basename $d; "
                             "done; true").strip()
        n = count if tiers[name]["iops"] > 500 else max(count // 8, 300)
        measured = measure_iops(inst, key, dev, n)
        cap, burst = tiers[name]["iops"], tiers[name]["iops_burst"]
        reachable = measured >= cap * 0.9
        in_burst = abs(measured / burst - 1) <= 0.1 and burst != cap
        rows.append({"tier": name, "cap_iops": cap, "burst_iops": burst, "measured_iops": round(measured),
                     "ratio": round(measured / cap, 3),
                     "query_block_iops": v["attachments"][0]["io_limits"].get("iops"),
                     "note": "cap enforced (within +-10 %)" if reachable and abs(measured / cap - 1) <= 0.1 else
                     ("burst cap enforced (within +-10 % of iops_burst, measured inside the burst window)"
                      if in_burst else ("cap above what this TCG guest reaches: not measurable here"
                                        if not reachable else "over the cap"))})
        client.volumes.detach(v["id"])
        client.volumes.wait(v["id"], ("available",))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    c = start_cloud("hbbv-")
    try:
        snaps = snapshot_rows(c, 2 if args.smoke else 5)
        iops = iops_rows(c, 1000 if args.smoke else 4000)
    finally:
        stop_cloud(c)
    print("\nSnapshot and clone time (request -> available, median), volumes with 256 MiB written")
    print(f"{'size':>6} {'snapshot s':>11} {'clone s':>9}")
    for r in snaps:
        print(f"{r['size_gib']:>4}Gi {r['snapshot_s_median']:>11.3f} {r['clone_s_median']:>9.3f}")
    ratio = snaps[1]["snapshot_s_median"] / snaps[0]["snapshot_s_median"]
    print(f"20 GiB / 1 GiB snapshot time ratio: {ratio:.2f} (flat = ~1)")
    print("\nIOPS inside a TCG guest (4 KiB direct reads, after the burst) vs the tier's cap")
    print(f"{'tier':<16} {'cap':>7} {'burst':>7} {'measured':>9} {'ratio':>6}  note")
    for r in iops:
        print(f"{r['tier']:<16} {r['cap_iops']:>7} {r['burst_iops']:>7} {r['measured_iops']:>9} {r['ratio']:>6.2f}"
              f"  {r['note']}")
    out = REPO / "bench" / "results" / ("volumes-smoke.json" if args.smoke else "volumes.json")
    out.write_text(json.dumps({"snapshots": snaps, "snapshot_ratio_20g_1g": round(ratio, 3), "iops": iops,
                               "smoke": args.smoke}, indent=2) + "\n")


if __name__ == "__main__":
    main()
