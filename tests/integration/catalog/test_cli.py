"""`hackboot region|zone|flavor|price|host|capacity` run as a user would, against the real server."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.catalog.conftest import make_role_clients, unique
from tests.support import REPO, Cloud

HACKBOOT = str(REPO / ".venv" / "bin" / "hackboot")
Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(cloud: Cloud, tmp_path: Path) -> Run:
    def run(*args: str, token: str | None = None, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HACKBOOT_")}
        env.update(HACKBOOT_URL=cloud.url, HACKBOOT_CLI_CONFIG=str(tmp_path / "cli.toml"), COLUMNS="200")
        if token != "":
            env["HACKBOOT_TOKEN"] = token or cloud.admin_token
        proc = subprocess.run([HACKBOOT, *args], check=False, env=env, capture_output=True, text=True, timeout=60)
        if expect is not None:
            assert proc.returncode == expect, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    return run


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def test_region_and_zone_commands(cli: Run) -> None:
    regions = {r["id"]: r for r in _json(cli("region", "list", "-o", "json"))}
    assert set(regions) == {"PAR1", "FRA1", "AMS1", "LON1", "MAD1", "MIL1"}
    assert regions["LON1"]["jurisdiction"] == "UK"
    assert [r["id"] for r in yaml.safe_load(cli("region", "list", "--country", "FR", "-o", "yaml").stdout)] == [
        "PAR1"]
    table = cli("region", "list", "--status", "planned").stdout
    assert "MAD1" in table and "2025-Q2" in table and "PAR1" not in table
    assert _json(cli("region", "show", "AMS1", "-o", "json"))["peering"].startswith("AMS-IX")
    missing = cli("region", "show", "NOPE9", expect=3)
    assert "not found" in missing.stderr.lower()
    zones = _json(cli("zone", "list", "--region", "MAD1", "-o", "json"))
    assert [(z["id"], z["effective_status"]) for z in zones] == [("MAD1-a", "planned")]


def test_region_set_status_as_superuser_and_forbidden_for_others(cloud: Cloud, cli: Run) -> None:
    roles = make_role_clients(cloud)
    member_token = roles.member.http.headers["Authorization"].split()[1]
    denied = cli("region", "set-status", "PAR1", "maintenance", token=member_token, expect=4)
    assert "forbidden" in denied.stderr
    cli("host", "list", token=member_token, expect=4)
    try:
        out = _json(cli("region", "set-status", "MIL1", "operational", "--reason", "opened early", "-o", "json"))
        assert (out["status"], out["status_reason"]) == ("operational", "opened early")
    finally:
        cli("region", "set-status", "MIL1", "planned", "--reason", "New site: 400 vCPUs and 8x RTX 4090 planned")
    cli("region", "set-status", "MIL1", "closed", expect=2)  # not a status: a usage error


def test_flavor_commands(cloud: Cloud, cli: Run) -> None:
    t4 = {f["id"] for f in _json(cli("flavor", "list", "--gpu-model", "T4", "-o", "json"))}
    assert t4 == {"GPU-T4", "g4.xlarge"}
    table = cli("flavor", "list", "--family", "vps").stdout
    assert "VPS-ENTERPRISE+" in table and "5.04" in table  # ~EUR per month for VPS-NANO
    assert _json(cli("flavor", "show", "m5.2xlarge", "-o", "json"))["memory_mb"] == 32768
    cli("flavor", "show", "nope.flavor", expect=3)
    fid = unique("cli").replace("-", ".")
    made = _json(cli("flavor", "create", fid, "--family", "compute", "--vcpus", "2", "--memory-mb", "2048",
                     "--disk-gb", "20", "--price-eur-hour", "0.03", "-o", "json"))
    assert (made["vcpus"], made["price_eur_hour"]) == (2, 0.03)
    cli("flavor", "create", fid, "--family", "compute", "--vcpus", "2", "--memory-mb", "2048", "--disk-gb", "20",
        expect=5)  # conflict
    assert _json(cli("flavor", "delete", fid, "-o", "json"))["outcome"] == "deleted"
    try:
        assert "deactivated" in cli("flavor", "delete", "t3.medium").stdout
        assert "t3.medium" not in {f["id"] for f in _json(cli("flavor", "list", "-o", "json"))}
        assert "t3.medium" in {f["id"] for f in _json(cli("flavor", "list", "--all", "-o", "json"))}
    finally:
        assert _json(cli("flavor", "set", "t3.medium", "--active", "-o", "json"))["active"] is True
    member_token = make_role_clients(cloud).member.http.headers["Authorization"].split()[1]
    cli("flavor", "delete", "t3.small", token=member_token, expect=4)


def test_price_commands(cli: Run) -> None:
    prices = _json(cli("price", "list", "--kind", "object_storage", "-o", "json"))
    assert {p["sku"] for p in prices} >= {"s3:STANDARD", "s3:STANDARD_IA", "s3:GLACIER", "s3:INTELLIGENT_TIERING"}
    try:
        set_ = _json(cli("price", "set", "s3:GLACIER", "0.0035", "--region", "AMS1", "-o", "json"))
        assert (set_["region_id"], set_["amount_eur"], set_["unit"]) == ("AMS1", 0.0035, "GB-month")
        ams = {p["sku"]: p for p in _json(cli("price", "list", "--region", "AMS1", "-o", "json"))}
        assert ams["s3:GLACIER"]["amount_eur"] == 0.0035 and ams["s3:STANDARD"]["region_id"] is None
        assert "all" in cli("price", "list", "--sku", "s3:GLACIER").stdout
    finally:
        cli("price", "delete", "s3:GLACIER", "--region", "AMS1")
    cli("price", "set", "unknown-thing", "1", expect=3)
    cli("price", "set", "s3:GLACIER", "abc", expect=2)


def test_host_commands_and_capacity(cli: Run) -> None:
    name = unique("cli-hv")
    pci = "0000:41:00.0,0000:42:00.0"
    host = _json(cli("host", "register", name, "--zone", "AMS1-c", "--vcpus", "16", "--memory-mb", "65536",
                     "--disk-gb", "500", "--gpu", f"A100:2:{pci}", "--fact", "accel=kvm", "-o", "json"))
    try:
        inv = {i["resource_class"]: i for i in host["inventories"]}
        assert inv["GPU:A100"]["devices"] == pci.split(",") and host["facts"] == {"accel": "kvm"}
        again = _json(cli("host", "register", name, "--zone", "AMS1-c", "--vcpus", "16", "--memory-mb", "65536",
                          "--disk-gb", "500", "--gpu", f"A100:2:{pci}", "--fact", "accel=kvm", "-o", "json"))
        assert again["id"] == host["id"]
        shown = cli("host", "show", name).stdout
        assert "GPU:A100" in shown and "0000:41:00.0" in shown
        updated = _json(cli("host", "set", name, "--ratio", "VCPU=2", "--reserved", "MEMORY_MB=4096", "-o", "json"))
        vcpu = next(i for i in updated["inventories"] if i["resource_class"] == "VCPU")
        assert (vcpu["allocation_ratio"], vcpu["allocatable"]) == (2.0, 32)
        cli("host", "set", name, "--ratio", "VCPU", expect=2)
        cli("host", "set", name, "--ratio", "GPU:A100=2", expect=2)
        assert _json(cli("host", "set", name, "--status", "disabled", "--reason", "test", "-o", "json"))[
            "status"] == "disabled"
        assert name in cli("host", "list", "--zone", "AMS1-c").stdout
        report = _json(cli("capacity", "--region", "AMS1", "-o", "json"))
        assert [r["id"] for r in report["regions"]] == ["AMS1"]
        figs = {f["resource_class"]: f for f in report["total"]["resources"]}
        assert figs["GPU:A100"]["total"] >= 2 and {"allocatable", "used", "free", "utilisation_pct"} <= set(
            figs["VCPU"])
        assert yaml.safe_load(cli("capacity", "--zone", "AMS1-c", "-o", "yaml").stdout)["regions"][0]["zones"][0][
            "id"] == "AMS1-c"
        table = cli("capacity").stdout
        for text in ("Capacity vs used", "PAR1", "AMS1-c", "A100", "Total"):
            assert text in table
        cli("capacity", "--region", "NOPE1", expect=3)
    finally:
        cli("host", "delete", name)
    cli("host", "show", name, expect=3)
    cli("host", "register", unique("bad"), "--zone", "PAR1-a", "--vcpus", "1", "--memory-mb", "1",
        "--disk-gb", "1", "--gpu", "A100", expect=2)


def test_not_logged_in_is_an_auth_error(cli: Run) -> None:
    proc = cli("region", "list", token="", expect=4)
    assert "Not logged in" in proc.stderr
