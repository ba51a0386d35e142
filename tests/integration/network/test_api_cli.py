"""The network commands of the CLI against the real server: a VPC with a public and a private subnet, a
group with rules, an interface with a floating IP, a NAT gateway, a flow log; then everything deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.integration.network.api_helpers import project_client, unique
from tests.support import REPO, Cloud


def run(cloud: Cloud, project_id: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HACKBOOT_")}
    env.update({"HACKBOOT_URL": cloud.url, "HACKBOOT_TOKEN": cloud.admin_token, "HACKBOOT_PROJECT": project_id,
                "HACKBOOT_CLI_CONFIG": str(cloud.state_dir / "cli-network.toml"), "COLUMNS": "250"})
    proc = subprocess.run([sys.executable, "-m", "hackboot.cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def test_cli_walkthrough(cloud: Cloud) -> None:
    project = project_client(cloud).project_id  # type: ignore[attr-defined]

    def cli(*args: str) -> Any:
        out = run(cloud, project, *args, "-o", "json").stdout
        return json.loads(out)

    name = unique("shop")
    vpc = cli("vpc", "create", name, "--cidr", "10.60.0.0/16", "--internet-gateway")
    assert vpc["cidr"] == "10.60.0.0/16" and vpc["internet_gateway"]
    web_net = cli("subnet", "create", "--vpc", name, "--cidr", "10.60.1.0/24", "--public", "--name", "web",
                  "--zone", "PAR1-a")
    app_net = cli("subnet", "create", "--vpc", vpc["id"], "--cidr", "10.60.2.0/24", "--name", "app")
    assert web_net["public"] and not app_net["public"] and app_net["available_ips"] == 252
    group = cli("security-group", "create", "web", "--vpc", vpc["id"])
    rule = cli("security-group", "rule-add", group["id"], "--port", "443", "--cidr", "0.0.0.0/0")
    assert (rule["protocol"], rule["port_min"], rule["port_max"]) == ("tcp", 443, 443)
    cli("security-group", "rule-add", group["id"], "--protocol", "udp", "--port", "5000-5010",
        "--remote-group", group["id"])
    assert len(cli("security-group", "rule-list", group["id"])) == 3
    nic = cli("nic", "create", "--subnet", web_net["id"], "--name", "web-0", "-g", group["id"], "--private-ip",
              "10.60.1.10")
    assert nic["private_ip"] == "10.60.1.10" and nic["security_group_ids"] == [group["id"]]
    fip = cli("floating-ip", "allocate")
    attached = cli("floating-ip", "attach", fip["address"], "web-0")
    assert attached["network_interface_id"] == nic["id"]
    assert cli("nic", "show", nic["id"])["public_ip"] == fip["address"]
    nat = cli("nat-gateway", "create", "--subnet", "web")
    assert nat["public_ip"] and nat["subnet_id"] == web_net["id"]
    flow = cli("flow-log", "create", nic["id"], "--traffic", "reject")
    assert flow["traffic_type"] == "REJECT"
    assert cli("flow-log", "records", flow["id"], "--action", "reject") == []
    assert {v["id"] for v in cli("vpc", "list")} == {vpc["id"]}
    assert {s["name"] for s in cli("subnet", "list", "--vpc", vpc["id"])} == {"web", "app"}

    # a refusal is one line and exit code 5 (conflict), not a traceback
    proc = run(cloud, project, "vpc", "delete", name, ok=False)
    assert proc.returncode == 5 and "in use" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(cloud, project, "security-group", "rule-add", group["id"], "--port", "x-y", ok=False)
    assert proc.returncode == 2 and "--port" in proc.stderr
    table = run(cloud, project, "nic", "list").stdout  # the table view
    assert "10.60.1.10" in table and fip["address"] in table

    for args in (("flow-log", "delete", flow["id"]), ("nat-gateway", "delete", nat["id"]),
                 ("floating-ip", "detach", fip["id"]), ("floating-ip", "release", fip["id"]),
                 ("nic", "delete", nic["id"]), ("security-group", "delete", group["id"]),
                 ("subnet", "delete", "web"), ("subnet", "delete", app_net["id"]), ("vpc", "delete", name)):
        run(cloud, project, *args)
    assert cli("vpc", "list") == []
    default = cli("vpc", "default")
    assert default["is_default"] and default["cidr"] == "172.31.0.0/16"
