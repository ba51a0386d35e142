"""Test helpers: run a real `hackboot serve` process and a real PostgreSQL cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from hackboot.sdk import Client

REPO = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@dataclass
class Cloud:
    """A running control plane: its URLs, admin credentials and process."""

    state_dir: Path
    api_port: int
    s3_port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    admin_password: str = ""
    admin_token: str = ""
    project_id: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 90.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([sys.executable, "-m", "hackboot.cli.main", "serve"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.state_dir)
        wait_http(self.url + "/readyz", timeout, self.proc)
        pw_file = self.state_dir / "initial-admin-password"
        self.admin_password = pw_file.read_text().strip()
        with Client(self.url) as c:
            issued = c.auth.login("admin", self.admin_password)  # type: ignore[attr-defined]
        self.admin_token = issued["token"]
        self.project_id = issued["project_id"] or self.admin_client_unscoped().projects.list(name="default")[0]["id"]  # type: ignore[attr-defined]

    def admin_client_unscoped(self) -> Client:
        return Client(self.url, self.admin_token)

    def client(self, token: str | None = None, project: str | None = None) -> Client:
        """SDK client; by default the admin acting in the default project."""
        if token is None:
            return Client(self.url, self.admin_token, project=project or self.project_id)
        return Client(self.url, token, project=project)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def session_keypair(name: str, client: str, cloud: str) -> Any:
    """A session fixture `name`: a key pair created through the SDK client fixture `client`, its private key
    written (0600) in the state dir of the Cloud fixture `cloud`; the SDK's dict plus `path` (the key file)."""

    @pytest.fixture(scope="session", name=name)
    def fixture(request: pytest.FixtureRequest) -> dict[str, Any]:
        c: Client = request.getfixturevalue(client)
        target: Cloud = request.getfixturevalue(cloud)
        kp: dict[str, Any] = c.keypairs.create(f"{name}-{uuid.uuid4().hex[:6]}")  # type: ignore[attr-defined]
        path = target.state_dir / f"{name}.key"
        path.write_text(kp["private_key"])
        path.chmod(0o600)
        kp["path"] = str(path)
        return kp

    return fixture


def make_cloud(state_dir: Path, database_url: str = "", **extra_env: str) -> Cloud:
    state_dir.mkdir(parents=True, exist_ok=True)
    api_port, s3_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HACKBOOT_")}
    env.update({
        "HACKBOOT_STATE_DIR": str(state_dir),
        "HACKBOOT_API_PORT": str(api_port),
        "HACKBOOT_S3_PORT": str(s3_port),
        "HACKBOOT_DATABASE_URL": database_url,
        "HACKBOOT_CONFIG": str(state_dir / "none.toml"),
        "HACKBOOT_LOG_LEVEL": "warning",
    })
    env.update(extra_env)
    return Cloud(state_dir=state_dir, api_port=api_port, s3_port=s3_port, env=env,
                 log_path=state_dir / "server.log", extra_env=dict(extra_env))


class Postgres:
    """A private PostgreSQL 15 cluster on 127.0.0.1 for the test session (Debian's packages)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hb-pg-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._dbs = 0

    def _as_postgres(self, *argv: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)

    def start(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres",
                                         "--auth=trust", "-E", "UTF8"), check=True, capture_output=True)
        self.proc = subprocess.Popen(self._as_postgres(
            str(PG_BIN / "postgres"), "-D", str(self.dir / "data"), "-h", "127.0.0.1", "-p", str(self.port),
            "-k", str(self.dir), "-c", "fsync=on", "-c", "max_connections=300", "-c", "shared_buffers=128MB"),
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "pg.log", "wb"))  # noqa: SIM115
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ok = subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                capture_output=True).returncode == 0
            if ok:
                return
            time.sleep(0.2)
        raise TimeoutError("PostgreSQL did not start")

    def create_database(self, name: str | None = None) -> str:
        self._dbs += 1
        name = name or f"hb_test_{os.getpid()}_{self._dbs}"
        subprocess.run([str(PG_BIN.parent / "bin" / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", "postgres", name], check=True, capture_output=True)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted, in sorted order.

    The import-graph tests (packages, and the object store's modules) find cycles with it.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)
