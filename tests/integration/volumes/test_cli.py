"""The README walk-through through the CLI, on a running guest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from hackboot.sdk import Client
from tests.integration.volumes.conftest import disk_of, unique
from tests.support import REPO, Cloud

pytestmark = pytest.mark.qemu


def cli(cloud: Cloud, *args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HACKBOOT_")}
    env.update({"HACKBOOT_URL": cloud.url, "HACKBOOT_TOKEN": cloud.admin_token, "HACKBOOT_PROJECT": cloud.project_id,
                "HACKBOOT_CLI_CONFIG": str(cloud.state_dir / "cli.toml")})
    proc = subprocess.run([sys.executable, "-m", "hackboot.cli.main", *args, "-o", "json"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout) if proc.stdout.strip().startswith(("{", "[")) else proc.stdout


def test_walkthrough(vc: Client, vol_cloud: Cloud, guest: dict[str, Any], vkey: dict[str, Any]) -> None:
    n1, n2, n3 = unique("data1"), unique("data2"), unique("data3")
    v = cli(vol_cloud, "volume", "create", n1, "--size", "20", "--tier", "ssd-standard", "--zone", "PAR1-a",
            "--encrypted", "--wait")
    assert v["status"] == "available" and v["encrypted"] and v["size_gb"] == 20
    v = cli(vol_cloud, "volume", "attach", n1, guest["name"], "--wait")
    assert v["status"] == "in-use"
    assert disk_of(guest, vkey, v["id"]) is not None
    snap = cli(vol_cloud, "volume", "snapshot", "create", n1, "snap1", "--wait")
    assert snap["status"] == "available"
    v2 = cli(vol_cloud, "volume", "create", n2, "--from-snapshot", snap["id"], "--wait")
    assert v2["status"] == "available" and v2["source_type"] == "snapshot"
    v = cli(vol_cloud, "volume", "resize", n1, "--size", "40", "--wait")
    assert v["applied_size_gb"] == 40
    pol = cli(vol_cloud, "backup-policy", "create", unique("daily"), "--every", "6h", "--keep-local", "7d",
              "--keep-remote", "30d", "--bucket", "backups", "--volume", n2)
    assert pol["every_s"] == 21600
    b = cli(vol_cloud, "volume", "backup", "create", n1, "--wait")
    assert b["status"] == "available"
    assert any(x["id"] == b["id"] for x in cli(vol_cloud, "volume", "backup", "list", n1))
    v3 = cli(vol_cloud, "volume", "restore", b["id"], "--as", n3, "--wait")
    assert v3["status"] == "available" and v3["size_gb"] == 40
    v = cli(vol_cloud, "volume", "detach", n1, guest["name"], "--wait")
    assert v["status"] == "available"
    assert {x["name"] for x in cli(vol_cloud, "volume", "list")} >= {n1, n2, n3}
    tiers = {t["name"]: t for t in cli(vol_cloud, "volume", "tiers")}
    assert tiers["hdd-standard"]["iops"] == 1000 and tiers["ssd-standard"]["price_eur_gb_month"] == 0.08
    cli(vol_cloud, "backup-policy", "delete", pol["name"])
    for name in (n2, n3):
        cli(vol_cloud, "volume", "delete", name, "--wait")
    cli(vol_cloud, "volume", "snapshot", "delete", n1, "snap1", "--wait")
    cli(vol_cloud, "volume", "delete", n1, "--wait")
