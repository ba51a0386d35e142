"""The function and queue commands of the CLI against the real server: a function created from a folder,
updated, its code replaced by a single file, versions, a canary alias, triggers of each kind, logs; a queue
sent to, received from and emptied; refusals as one line with an exit code."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from hackboot.sdk.functions import zip_directory
from tests.integration.network.api_helpers import project_client
from tests.support import REPO, Cloud


def run(cloud: Cloud, project_id: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HACKBOOT_")}
    env.update({"HACKBOOT_URL": cloud.url, "HACKBOOT_TOKEN": cloud.admin_token, "HACKBOOT_PROJECT": project_id,
                "HACKBOOT_CLI_CONFIG": str(cloud.state_dir / "cli-fn.toml"), "COLUMNS": "250"})
    proc = subprocess.run([sys.executable, "-m", "hackboot.cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def test_cli_walkthrough(cloud: Cloud, tmp_path: Path) -> None:
    client = project_client(cloud)
    project = client.project_id  # type: ignore[attr-defined]

    def cli(*args: str) -> Any:
        return json.loads(run(cloud, project, *args, "-o", "json").stdout)

    src = tmp_path / "hello"
    src.mkdir()
    (src / "main.py").write_text("def handler(event, context):\n    return {'hello': event.get('name')}\n")
    (src / "lib").mkdir()
    (src / "lib" / "util.py").write_text("X = 1\n")
    (src / ".git").mkdir()
    (src / ".git" / "config").write_text("secret\n")
    fn = cli("function", "create", "hello", "--runtime", "python3.11", "--handler", "main.handler", "--code", str(src),
             "--memory", "256", "--env", "STAGE=dev", "--secret", "API_KEY=abc123-secret")
    assert fn["code_size"] > 0 and fn["memory_mb"] == 256 and fn["environment"] == {"STAGE": "dev"}
    assert fn["secret_names"] == ["API_KEY"] and "abc123-secret" not in json.dumps(fn)
    # the folder was zipped without its hidden entries: the same bytes as the SDK's zip of it
    packed = zip_directory(src)
    assert zipfile.ZipFile(io.BytesIO(packed)).namelist() == ["main.py", "lib/util.py"]
    assert fn["code_sha256"] == hashlib.sha256(packed).hexdigest()
    assert [f["name"] for f in cli("function", "list")] == ["hello"]
    assert cli("function", "show", "hello")["id"] == fn["id"]
    assert cli("function", "update", "hello", "--timeout", "30", "--no-network")["timeout_s"] == 30
    single = tmp_path / "main.py"
    single.write_text("def handler(event, context):\n    return 2\n")
    assert cli("function", "code-upload", "hello", str(single))["code_sha256"] != fn["code_sha256"]
    assert cli("function", "version-publish", "hello", "--description", "one")["number"] == 1
    assert cli("function", "version-publish", "hello")["number"] == 1  # unchanged: the same version
    cli("function", "update", "hello", "--memory", "512")
    assert cli("function", "version-publish", "hello")["number"] == 2
    assert [v["number"] for v in cli("function", "version-list", "hello")] == [1, 2]
    alias = cli("function", "alias-set", "hello", "prod", "--version", "1", "--canary-version", "2", "--weight", "0.1")
    assert (alias["version"], alias["additional_version"], alias["weight"]) == (1, 2, 0.1)
    assert [a["name"] for a in cli("function", "alias-list", "hello")] == ["prod"]
    http = cli("function", "trigger-add", "hello", "--http", "--auth", "token", "--qualifier", "prod")
    assert http["url_path"] == f"/fn/{http['id']}/" and http["token"]
    sched = cli("function", "trigger-add", "hello", "--schedule", "rate(10 minutes)", "--disabled")
    assert sched["enabled"] is False and sched["schedule"] == "rate(10 minutes)"
    assert cli("function", "trigger-enable", "hello", sched["id"])["enabled"] is True
    cli("queue", "create", "jobs", "--visibility-timeout", "60", "--max-receives", "3")
    queue_trigger = cli("function", "trigger-add", "hello", "--queue", "jobs", "--batch-size", "5", "--disabled")
    assert queue_trigger["queue_name"] == "jobs"
    assert {t["kind"] for t in cli("function", "trigger-list", "hello")} == {"http", "schedule", "queue"}
    table = run(cloud, project, "function", "trigger-list", "hello").stdout
    assert http["id"] in table and "rate(10 minutes)" in table
    run(cloud, project, "function", "trigger-delete", "hello", queue_trigger["id"])
    assert run(cloud, project, "function", "logs", "hello").stdout == ""
    assert cli("function", "invocations", "hello") == []
    # queues
    sent = cli("queue", "send", "jobs", '{"n": 1}')
    [msg] = cli("queue", "receive", "jobs", "--max", "5")
    assert msg["message_id"] == sent["message_id"] and msg["body"] == '{"n": 1}'
    assert cli("queue", "show", "jobs")["messages_in_flight"] == 1
    run(cloud, project, "queue", "delete-message", "jobs", msg["receipt_handle"])
    assert cli("queue", "show", "jobs")["messages_in_flight"] == 0
    assert [q["name"] for q in cli("queue", "list")] == ["jobs"]
    # refusals: one line, an exit code, nothing changed
    bad = run(cloud, project, "function", "create", "x", "--runtime", "cobol", "--handler", "main.handler", ok=False)
    assert bad.returncode == 2 and "runtime" in bad.stderr + bad.stdout
    gone = run(cloud, project, "function", "show", "nope", ok=False)
    assert gone.returncode == 3
    usage = run(cloud, project, "function", "trigger-add", "hello", "--http", "--queue", "jobs", ok=False)
    assert usage.returncode == 2
    bad_env = run(cloud, project, "function", "update", "hello", "--env", "NOEQUALS", ok=False)
    assert bad_env.returncode == 2
    stale = run(cloud, project, "queue", "delete-message", "jobs", msg["receipt_handle"], ok=False)
    assert stale.returncode == 3
    run(cloud, project, "function", "delete", "hello")
    run(cloud, project, "queue", "delete", "jobs")
    assert cli("function", "list") == [] and cli("queue", "list") == []
