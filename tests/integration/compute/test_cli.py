"""The issue's walk-through with the `hackboot` CLI against a real cloud and a real guest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.compute.conftest import unique
from tests.support import REPO, Cloud

pytestmark = pytest.mark.qemu


def cli(cloud: Cloud, home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HACKBOOT_")}
    env.update({"HACKBOOT_URL": cloud.url, "HACKBOOT_TOKEN": cloud.admin_token, "HACKBOOT_PROJECT": cloud.project_id,
                "HACKBOOT_CLI_CONFIG": str(home / "config.toml"), "HOME": str(home), "COLUMNS": "200"})
    return subprocess.run([sys.executable, "-m", "hackboot.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)


def test_cli_walkthrough(vm_cloud: Cloud, tmp_path: Path) -> None:
    key, name = unique("clikey"), unique("cli")
    made = cli(vm_cloud, tmp_path, "keypair", "create", key, "-o", "json")
    assert made.returncode == 0, made.stderr
    saved = Path(json.loads(made.stdout)["private_key_file"])
    assert saved == tmp_path / "keys" / key and oct(saved.stat().st_mode & 0o777) == "0o600"
    assert "private_key" not in json.loads(made.stdout)

    user_data = tmp_path / "cloud-config.yaml"
    user_data.write_text("#cloud-config\nruncmd:\n  - echo from-cli > /root/cli\n")
    created = cli(vm_cloud, tmp_path, "instance", "create", name, "--flavor", "VPS-NANO", "--image", "tiny",
                  "--key", key, "--user-data", str(user_data), "--wait", "-o", "json")
    assert created.returncode == 0, created.stderr + created.stdout
    assert json.loads(created.stdout)["status"] == "ACTIVE"

    for _ in range(60):  # sshd comes up a few seconds after ACTIVE
        out = cli(vm_cloud, tmp_path, "instance", "ssh", name, "--", "hostname", timeout=60)
        if out.returncode == 0:
            break
    assert out.stdout.strip() == name, out.stderr
    assert cli(vm_cloud, tmp_path, "instance", "ssh", name, "--", "cat", "/root/cli").stdout.strip() == "from-cli"

    log = cli(vm_cloud, tmp_path, "instance", "console-log", name)
    assert log.returncode == 0 and "hackboot: starting" in log.stdout
    listed = cli(vm_cloud, tmp_path, "instance", "list", "-o", "json")
    assert name in [i["name"] for i in json.loads(listed.stdout)]
    stopped = cli(vm_cloud, tmp_path, "instance", "stop", name, "--wait", "-o", "json")
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["status"] == "SHUTOFF", stopped.stderr
    again = cli(vm_cloud, tmp_path, "instance", "stop", name)
    assert again.returncode == 5 and "SHUTOFF" in again.stderr  # 409: clear message, conflict exit code
    started = cli(vm_cloud, tmp_path, "instance", "start", name, "--wait", "-o", "json")
    assert started.returncode == 0 and json.loads(started.stdout)["status"] == "ACTIVE"
    rebooted = cli(vm_cloud, tmp_path, "instance", "reboot", name, "--hard", "--wait", "-o", "json")
    assert rebooted.returncode == 0, rebooted.stderr
    deleted = cli(vm_cloud, tmp_path, "instance", "delete", name, "--wait")
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    assert cli(vm_cloud, tmp_path, "keypair", "delete", key).returncode == 0


def test_cli_errors_have_exit_codes(vm_cloud: Cloud, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("#cloud-config\nruncmd: [unclosed\n")
    out = cli(vm_cloud, tmp_path, "instance", "create", unique("x"), "--flavor", "VPS-NANO", "--image", "tiny",
              "--user-data", str(bad))
    assert out.returncode == 2 and "not valid YAML" in out.stderr
    out = cli(vm_cloud, tmp_path, "instance", "create", unique("x"), "--flavor", "VPS-ENTERPRISE+", "--image", "tiny")
    assert out.returncode == 5 and "flavor_too_large" in out.stderr
    out = cli(vm_cloud, tmp_path, "instance", "show", "no-such-instance")
    assert out.returncode == 3
