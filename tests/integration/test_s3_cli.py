"""The README's S3 walk-through: `hackboot s3 credentials create`, then the unmodified aws CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests.support import Cloud

BIN = Path(sys.executable).parent


def _hackboot(cloud: Cloud, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"HACKBOOT_URL": cloud.url, "HACKBOOT_TOKEN": cloud.admin_token,
                        "HACKBOOT_PROJECT": cloud.project_id, "HACKBOOT_CLI_CONFIG": str(tmp_path / "cli.toml")}
    return subprocess.run([str(BIN / "hackboot"), *args], env=env, capture_output=True, text=True, timeout=60)


def test_cli_credentials_then_aws_cli(cloud: Cloud, tmp_path: Path) -> None:
    created = _hackboot(cloud, tmp_path, "s3", "credentials", "create", "--name", "ci", "-o", "json")
    assert created.returncode == 0, created.stderr
    cred = json.loads(created.stdout)
    assert cred["secret_key"] and cred["access_key"]
    aws_env = os.environ | {"AWS_ACCESS_KEY_ID": cred["access_key"], "AWS_SECRET_ACCESS_KEY": cred["secret_key"],
                            "AWS_DEFAULT_REGION": "PAR1", "AWS_CONFIG_FILE": "/dev/null",
                            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    bucket = f"cli-{uuid.uuid4().hex[:8]}"
    src = tmp_path / "hello.txt"
    src.write_text("hello from the aws cli\n")

    def aws(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "aws"), "--endpoint-url", cloud.s3_url, "s3", *args], env=aws_env,
                              capture_output=True, text=True, timeout=60)

    assert aws("mb", f"s3://{bucket}").returncode == 0
    assert aws("cp", str(src), f"s3://{bucket}/dir/hello.txt").returncode == 0
    listing = aws("ls", f"s3://{bucket}", "--recursive")
    assert "dir/hello.txt" in listing.stdout
    back = tmp_path / "back.txt"
    assert aws("cp", f"s3://{bucket}/dir/hello.txt", str(back)).returncode == 0
    assert back.read_text() == src.read_text()

    buckets = json.loads(_hackboot(cloud, tmp_path, "bucket", "list", "-o", "json").stdout)
    mine = [b for b in buckets if b["name"] == bucket]
    assert mine and mine[0]["objects"] == 1

    listed = json.loads(_hackboot(cloud, tmp_path, "s3", "credentials", "list", "-o", "json").stdout)
    assert cred["id"] in {c["id"] for c in listed}
    assert "secret_key" not in listed[0]
    assert _hackboot(cloud, tmp_path, "s3", "credentials", "revoke", cred["id"]).returncode == 0
    refused = aws("ls", f"s3://{bucket}")
    assert refused.returncode != 0
    assert _hackboot(cloud, tmp_path, "s3", "credentials", "revoke", "s3c-doesnotexist").returncode == 3
