"""One real object-storage server per test session, driven by boto3 and the aws CLI.

The server runs as a subprocess (uvicorn, S3 + REST API + workers) on free 127.0.0.1 ports with a
temporary state dir; credentials are issued through the service layer (`service.create_credential`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config

REPO = Path(__file__).resolve().parents[3]
AWS = str(Path(sys.executable).parent / "aws")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(state_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HACKBOOT_", "AWS_"))}
    env.update({"HACKBOOT_STATE_DIR": str(state_dir), "HACKBOOT_CONFIG": str(state_dir / "none.toml"),
                "HACKBOOT_LOG_LEVEL": "warning", "HACKBOOT_S3_LIFECYCLE_DAY_S": "1",
                # this checkout's code, not whatever `hackboot` the venv has installed (editable elsewhere)
                "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])})
    env.update(extra)
    return env


@dataclass
class S3Server:
    state_dir: Path
    env: dict[str, str]
    s3_port: int = 0
    api_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    creds: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def provision(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([sys.executable, "-m", "tests.integration.objectstore._server", "provision"],
                             env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("PROVISIONED ")]
        if not line:
            raise RuntimeError(f"provision failed: {out.stdout}\n{out.stderr}")
        self.creds = json.loads(line[0][len("PROVISIONED "):])

    def start(self) -> None:
        self.s3_port, self.api_port = free_port(), free_port()
        log = open(self.state_dir / "server.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.objectstore._server",
                                      str(self.s3_port), str(self.api_port)], env=self.env, cwd=REPO,
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(self.state_dir / 'server.log').read_text()[-3000:]}")
            try:
                httpx.get(self.url + "/", timeout=1)
                httpx.get(self.api_url + "/healthz", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError("S3 server did not start")

    def pids(self) -> list[int]:
        """The server process and the S3 worker processes it forked."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [self.proc.pid, *map(int, children)]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self, who: str = "", **config: Any) -> Any:
        ak, sk = self.creds["ak" + who], self.creds["sk" + who]
        cfg = Config(signature_version="s3v4", retries={"max_attempts": 1},
                     s3={"addressing_style": config.pop("addressing_style", "path")}, **config)
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=ak, aws_secret_access_key=sk,
                            region_name="us-east-1", config=cfg)

    def aws(self, *args: str, who: str = "", check: bool = True, input: bytes | None = None) \
            -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        config = self.state_dir / "aws-config"
        if not config.exists():  # aws CLI v1 presigns with SigV2 unless told otherwise
            config.write_text("[default]\ns3 =\n    signature_version = s3v4\n")
        env.update({"AWS_ACCESS_KEY_ID": self.creds["ak" + who], "AWS_SECRET_ACCESS_KEY": self.creds["sk" + who],
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(config),
                    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_MAX_ATTEMPTS": "1"})
        out = subprocess.run([AWS, "--endpoint-url", self.url, *args], env=env, capture_output=True, text=True,
                             timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"aws {' '.join(args)} failed ({out.returncode}): {out.stdout}\n{out.stderr}")
        return out

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {self.creds['token']}"},
                            timeout=30)


@pytest.fixture(scope="session")
def s3server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    state = tmp_path_factory.mktemp("s3state")
    srv = S3Server(state, server_env(state))
    srv.provision()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def s3(s3server: S3Server) -> Any:
    return s3server.client()


@pytest.fixture()
def bucket(s3: Any) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name


def new_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
