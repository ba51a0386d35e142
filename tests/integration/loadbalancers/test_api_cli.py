"""The load balancer commands of the CLI against the real server: a certificate uploaded from files, an
internet-facing load balancer with an https listener, an http one redirecting to it, a pool with a health check,
members added, drained and removed, rules, stats and logs; refusals as one line with an exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration.loadbalancers.lb_api_helpers import lb_network
from tests.integration.network.api_helpers import project_client
from tests.support import REPO, Cloud
from tests.unit.loadbalancers import pki


def run(cloud: Cloud, project_id: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HACKBOOT_")}
    env.update({"HACKBOOT_URL": cloud.url, "HACKBOOT_TOKEN": cloud.admin_token, "HACKBOOT_PROJECT": project_id,
                "HACKBOOT_CLI_CONFIG": str(cloud.state_dir / "cli-lb.toml"), "COLUMNS": "250"})
    proc = subprocess.run([sys.executable, "-m", "hackboot.cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def test_cli_walkthrough(cloud: Cloud, tmp_path: Path) -> None:
    client = project_client(cloud)
    project = client.project_id  # type: ignore[attr-defined]
    _, subnet = lb_network(client, 71)
    web0 = client.network_interfaces.create(subnet["id"], name="web-0")

    def cli(*args: str) -> Any:
        return json.loads(run(cloud, project, *args, "-o", "json").stdout)

    chain_pem, key_pem = pki.server_pem("shop.example.com")
    (tmp_path / "chain.pem").write_text(chain_pem)
    (tmp_path / "key.pem").write_text(key_pem)
    cert = cli("certificate", "upload", "--chain", str(tmp_path / "chain.pem"), "--key", str(tmp_path / "key.pem"),
               "--name", "shop")
    assert cert["names"] == ["shop.example.com"] and "key_pem" not in cert
    assert [c["id"] for c in cli("certificate", "list")] == [cert["id"]]
    assert cli("certificate", "show", "shop")["fingerprint_sha256"] == cert["fingerprint_sha256"]

    lb = cli("lb", "create", "shop", "--subnet", subnet["name"], "--internet-facing")
    assert lb["status"] == "PENDING" and lb["public_ip"]
    pool = cli("lb", "pool-add", "shop", "--name", "web", "--check", "http", "--check-path", "/health",
               "--check-codes", "200", "--check-interval", "2", "--check-timeout", "1", "--sticky", "cookie")
    assert pool["health_check"]["path"] == "/health" and pool["sticky"] == "cookie"
    https = cli("lb", "listener-add", "shop", "--protocol", "https", "--port", "443", "--default-pool", "web",
                "--certificate", "shop", "--request-rate-limit", "100")
    assert https["certificate_ids"] == [cert["id"]] and https["request_rate_limit"] == 100
    http = cli("lb", "listener-add", "shop", "--protocol", "http", "--port", "80", "--redirect-to-https", "443")
    assert http["redirect_to_https_port"] == 443
    a = cli("lb", "member-add", "shop", "--pool", "web", "--port", "8080", "--nic", "web-0")
    b = cli("lb", "member-add", "shop", "--pool", "web", "--port", "8080", "--address", "10.71.1.99",
            "--weight", "5")
    assert a["address"] == web0["private_ip"] and b["weight"] == 5
    assert cli("lb", "member-drain", "shop", b["id"], "--pool", "web")["admin_state"] == "drain"
    assert cli("lb", "member-drain", "shop", b["id"], "--pool", "web", "--undo")["admin_state"] == "enabled"
    rule = cli("lb", "rule-add", "shop", "--listener", https["id"], "--priority", "10", "--path-prefix", "/status",
               "--fixed-status", "200", "--body", "ok")
    assert rule["action"] == "fixed_response" and rule["body"] == "ok"
    cli("lb", "rule-add", "shop", "--listener", https["id"], "--priority", "20", "--host", "old.example.com",
        "--redirect", "https://shop.example.com/")
    assert [r["priority"] for r in cli("lb", "rule-list", "shop", "--listener", https["id"])] == [10, 20]
    assert sorted(x["port"] for x in cli("lb", "listener-list", "shop")) == [80, 443]
    assert [p["name"] for p in cli("lb", "pool-list", "shop")] == ["web"]
    assert len(cli("lb", "member-list", "shop", "--pool", "web")) == 2
    stats = cli("lb", "stats", "shop")
    assert stats["load_balancer_id"] == lb["id"] and stats["listeners"] == {}
    assert cli("lb", "logs", "shop", "--status", "500") == []
    table = run(cloud, project, "lb", "list").stdout
    assert lb["vip"] in table and "shop" in table
    assert "never" in run(cloud, project, "lb", "stats", "shop").stdout

    # refusals: one line, the API's exit code, no traceback
    proc = run(cloud, project, "lb", "listener-add", "shop", "--protocol", "tcp", "--port", "443", ok=False)
    assert proc.returncode == 5 and "listens on port 443" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(cloud, project, "lb", "pool-delete", "shop", "web", ok=False)
    assert proc.returncode == 5 and "in use" in proc.stderr
    proc = run(cloud, project, "lb", "listener-add", "shop", "--protocol", "udp", "--port", "53", ok=False)
    assert proc.returncode != 0 and "UDP" in proc.stderr
    proc = run(cloud, project, "lb", "member-add", "shop", "--pool", "web", "--port", "80", ok=False)
    assert proc.returncode == 2 and "--nic or --address" in proc.stderr
    proc = run(cloud, project, "certificate", "upload", "--chain", str(tmp_path / "chain.pem"), "--key",
               str(tmp_path / "missing.pem"), ok=False)
    assert proc.returncode == 2 and "Cannot read the key" in proc.stderr

    run(cloud, project, "lb", "member-remove", "shop", a["id"], "--pool", "web")
    run(cloud, project, "lb", "listener-delete", "shop", http["id"])
    assert cli("lb", "delete", "shop")["status"] == "DELETING"
    run(cloud, project, "certificate", "delete", "shop")
    assert cli("certificate", "list") == []
