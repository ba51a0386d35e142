"""The `hackboot event|webhook|audit` commands against a real server."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.events.conftest import Receiver
from tests.support import Cloud


@pytest.fixture
def cli_env(wh_cloud: Cloud, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HACKBOOT_")}
    env.update({"HACKBOOT_URL": wh_cloud.url, "HACKBOOT_TOKEN": wh_cloud.admin_token,
                "HACKBOOT_PROJECT": wh_cloud.project_id, "HACKBOOT_CLI_CONFIG": str(tmp_path / "cli.toml"),
                "COLUMNS": "200"})
    return env


def hb(env: dict[str, str], *args: str) -> Any:
    proc = subprocess.run([sys.executable, "-m", "hackboot.cli.main", *args], env=env, capture_output=True, check=False,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout) if "json" in args else proc.stdout


def test_webhook_commands(cli_env: dict[str, str], receiver: Receiver) -> None:
    path = receiver.new_path(200)
    hook = hb(cli_env, "webhook", "create", receiver.url(path), "--event", "token.*", "--event", "webhook.*",
              "-d", "from the cli", "-o", "json")
    assert hook["secret"].startswith("whsec_") and hook["event_types"] == ["token.*", "webhook.*"]
    assert hook["id"] in [h["id"] for h in hb(cli_env, "webhook", "list", "-o", "json")]
    assert hb(cli_env, "webhook", "show", hook["id"], "-o", "json")["description"] == "from the cli"
    delivered = hb(cli_env, "webhook", "ping", hook["id"], "--wait", "-o", "json")
    assert delivered["status"] == "delivered" and delivered["event_type"] == "webhook.ping"
    [logged] = hb(cli_env, "webhook", "deliveries", hook["id"], "-o", "json")
    assert logged["id"] == delivered["id"] and logged["attempt_log"][0]["status_code"] == 200
    assert "delivered" in hb(cli_env, "webhook", "deliveries", hook["id"])  # table
    assert hb(cli_env, "webhook", "delivery", hook["id"], delivered["id"], "-o", "json")["attempts"] == 1
    assert "Attempts" in hb(cli_env, "webhook", "delivery", hook["id"], delivered["id"])
    again = hb(cli_env, "webhook", "redeliver", hook["id"], delivered["id"], "-o", "json")
    assert again["redelivery_of"] == delivered["id"]
    rotated = hb(cli_env, "webhook", "rotate-secret", hook["id"], "-o", "json")
    assert rotated["secret"] != hook["secret"]
    updated = hb(cli_env, "webhook", "update", hook["id"], "--disable", "--all-events", "-o", "json")
    assert updated["enabled"] is False and updated["event_types"] == []
    hb(cli_env, "webhook", "delete", hook["id"])
    types = [e["type"] for e in hb(cli_env, "event", "list", "--type", "webhook.*", "--resource-id", hook["id"],
                                   "-o", "json")]
    assert types == ["webhook.created", "webhook.ping", "webhook.secret_rotated", "webhook.updated",
                     "webhook.deleted"]
    audit = hb(cli_env, "audit", "list", "--path", "/v1/webhooks", "-o", "json")
    assert {"POST", "PATCH", "DELETE"} <= {r["method"] for r in audit}
    assert "admin" in hb(cli_env, "audit", "list")
    assert "webhook.deleted" in hb(cli_env, "event", "list", "--type", "webhook.*")


def test_event_list_follow_prints_new_events(cli_env: dict[str, str], wh_cloud: Cloud) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "hackboot.cli.main", "event", "list", "--follow", "-n", "1",
                             "--type", "token.*", "-o", "json"], env=cli_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        time.sleep(2)  # let it connect; events made before it follows are in its first page anyway
        token = wh_cloud.client().tokens.create(role="viewer", name="followed")
        deadline = time.monotonic() + 20
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline and token["id"] not in [e["resource_id"] for e in seen]:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                line = proc.stdout.readline()
                if line.strip():
                    seen.append(json.loads(line))
        assert token["id"] in [e["resource_id"] for e in seen], seen
    finally:
        proc.terminate()
        proc.wait(10)
