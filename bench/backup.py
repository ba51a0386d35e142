"""Backup and restore throughput to the cloud's own S3 service, RTO of a 10 GiB volume, and the size of an
incremental backup after 1 % of the volume changed.

    .venv/bin/python bench/backup.py            # 10 GiB volume, fully written (several minutes)
    .venv/bin/python bench/backup.py --smoke    # 512 MiB

Everything runs on 127.0.0.1 (a private `hackboot serve`, its S3 endpoint). Writes bench/results/backup.json.
The volume is filled offline with qemu-io (a guest under TCG would take far longer); the backup path is the
real one: a point-in-time snapshot, then the qcow2 layers streamed to S3 by the agent with boto3.
RTO = from the restore request to a new volume `available` (download of the chain + conversion).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _volcloud import REPO, active_file, fill, start_cloud, stop_cloud, timed, unique

MiB, GiB = 1024**2, 1024**3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    size_gb = 1 if args.smoke else 10
    data = 512 * MiB if args.smoke else 10 * GiB
    c = start_cloud("hbbk-")
    try:
        client = c.client()
        v = client.volumes.wait(client.volumes.create(unique("big"), size_gb)["id"])  # type: ignore[attr-defined]
        fill(active_file(c, v["id"]), 0, data)
        t_full, full = timed(lambda: client.volume_backups.wait(  # type: ignore[attr-defined]
            client.volume_backups.create(v["id"], bucket="bench")["id"], timeout=3600))  # type: ignore[attr-defined]
        assert full["status"] == "available", full
        changed = max(int(size_gb * GiB * 0.01) // MiB * MiB, MiB)
        fill(active_file(c, v["id"]), 123 * MiB, changed, pattern=0x33)
        t_inc, inc = timed(lambda: client.volume_backups.wait(  # type: ignore[attr-defined]
            client.volume_backups.create(v["id"], bucket="bench")["id"], timeout=3600))  # type: ignore[attr-defined]
        assert inc["status"] == "available" and inc["kind"] == "incremental", inc
        t_restore, r = timed(lambda: client.volumes.wait(  # type: ignore[attr-defined]
            client.volume_backups.restore(inc["id"], unique("restored"))["id"], timeout=3600))  # type: ignore[attr-defined]
        assert r["status"] == "available", r
        rows = [
            {"what": "full backup", "bytes": full["size_bytes"], "seconds": round(t_full, 2),
             "mib_s": round(full["size_bytes"] / MiB / t_full, 1)},
            {"what": f"incremental after {changed // MiB} MiB (1 %) changed", "bytes": inc["size_bytes"],
             "seconds": round(t_inc, 2), "mib_s": round(inc["size_bytes"] / MiB / t_inc, 1)},
            {"what": "restore full+incremental (RTO)", "bytes": full["size_bytes"] + inc["size_bytes"],
             "seconds": round(t_restore, 2),
             "mib_s": round((full["size_bytes"] + inc["size_bytes"]) / MiB / t_restore, 1)},
        ]
        result = {"volume_gb": size_gb, "data_bytes": data, "rows": rows,
                  "incremental_ratio": round(inc["size_bytes"] / full["size_bytes"], 4),
                  "rto_seconds": round(t_restore, 2), "rto_target_seconds": 3600, "smoke": args.smoke}
        print(f"\nBackup/restore of a {size_gb} GiB volume ({data // MiB} MiB written) to the local S3 service")
        print(f"{'operation':<42} {'MiB':>9} {'s':>8} {'MiB/s':>8}")
        for row in rows:
            print(f"{row['what']:<42} {row['bytes'] / MiB:>9.1f} {row['seconds']:>8.2f} {row['mib_s']:>8.1f}")
        print(f"incremental / full = {result['incremental_ratio']:.2%}; RTO {t_restore:.1f} s (target < 1 h)")
        out = REPO / "bench" / "results" / ("backup-smoke.json" if args.smoke else "backup.json")
        out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        stop_cloud(c)


if __name__ == "__main__":
    main()
