"""Compute fixtures: the built-in `tiny` image (built once, cached), a cloud whose local agent boots
real QEMU guests, key pairs, SSH, extra agents (real or fake) joining the same database."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hackboot.sdk import Client
from tests.support import REPO, Cloud, make_cloud, session_keypair

# Built once per machine and reused (the builder skips an up-to-date build in well under a second).
IMAGE_CACHE = Path(os.environ.get("HACKBOOT_IMAGE_CACHE", "/var/tmp/hackboot-image-cache"))
SSH_OPTS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=3", "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes"]
HOST_DOWN_AFTER_S = 6


def short_tmpdir(prefix: str) -> Path:
    """QMP socket paths must fit in 107 bytes: keep agent state dirs short."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def builtin_images() -> Path:
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "hackboot.images.builder", "tiny", "--out", str(IMAGE_CACHE)],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"building the tiny image failed: {proc.stderr[-2000:]}")
    return IMAGE_CACHE


def wait_local_host(client: Client, name: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hosts = [h for h in client.get("/v1/hosts", name=name)["items"] if h["name"] == name]
        if hosts and hosts[0]["status"] == "up":
            return hosts[0]  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise TimeoutError(f"host {name} did not register")


@pytest.fixture(scope="session")
def vm_cloud(builtin_images: Path) -> Iterator[Cloud]:
    """A control plane whose local agent runs real guests (TCG here), with the tiny image built in.

    vCPUs are overcommitted 8x on this 2-CPU machine so several small guests can run at once;
    heartbeats are fast so host-down detection is testable in seconds.
    """
    state = short_tmpdir("hbvm-")
    (state / "images").mkdir()
    (state / "images" / "builtin").symlink_to(builtin_images)
    local = unique("local")
    c = make_cloud(state, HACKBOOT_AGENT_NAME=local, HACKBOOT_AGENT_CPU_ALLOCATION_RATIO="8",
                   HACKBOOT_AGENT_DISK_ALLOCATION_RATIO="10",
                   HACKBOOT_AGENT_HEARTBEAT_INTERVAL="1", HACKBOOT_HOST_DOWN_AFTER_S=str(HOST_DOWN_AFTER_S),
                   HACKBOOT_LOG_LEVEL="info")
    c.start()
    c.extra_env["local_host"] = local
    wait_local_host(c.client(), local)
    yield c
    c.stop()
    # Guests outlive the control plane by design: remove the ones this session left behind.
    for pidfile in (state / "agent" / "instances").glob("*/qemu.pid"):
        _kill_pidfile(pidfile)
    shutil.rmtree(state, ignore_errors=True)


def alive(pid: int) -> bool:
    """The process runs (a zombie left for a non-reaping init does not count)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def _kill_pidfile(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().strip())
        if "qemu" in Path(f"/proc/{pid}/cmdline").read_text():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


@pytest.fixture(scope="session")
def vm(vm_cloud: Cloud) -> Client:
    return vm_cloud.client()


keypair = session_keypair("keypair", "vm", "vm_cloud")


def ssh(inst: dict[str, Any], key: str, command: str, timeout: float = 60.0) -> str:
    """Run `command` in the guest over its 127.0.0.1 port forward, retrying until sshd answers."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        proc = subprocess.run(["ssh", *SSH_OPTS, "-i", key, "-p", str(inst["ssh_port"]), "root@127.0.0.1", command],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode == 0:
            return proc.stdout
        last = proc.stderr.strip()
        time.sleep(0.3)
    raise TimeoutError(f"ssh to {inst['name']} failed for {timeout:.0f}s: {last}")


def wait_for(fetch: Callable[[], dict[str, Any]], predicate: Callable[[dict[str, Any]], bool],
             timeout: float = 60.0, interval: float = 0.2) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    current = fetch()
    while not predicate(current):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out; last state {current.get('status')} / {current.get('task_state')} / "
                               f"{current.get('status_reason')}")
        time.sleep(interval)
        current = fetch()
    return current


class ExtraAgent:
    """A `hackboot agent` process joining the cloud's database as another host."""

    def __init__(self, cloud: Cloud, name: str, zone: str, state_dir: Path, *args: str) -> None:
        self.cloud, self.name, self.zone, self.state_dir, self.args = cloud, name, zone, state_dir, args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(self.cloud.env)
        env["HACKBOOT_ACCEL"] = "tcg"  # the local agent already probed this machine
        env["HACKBOOT_AGENT_HEARTBEAT_INTERVAL"] = "1"
        db = env.get("HACKBOOT_DATABASE_URL") or f"sqlite:///{self.cloud.state_dir / 'hackboot.db'}"
        self.log_path = short_tmpdir("hblog-") / f"{self.name}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "hackboot.cli.main", "agent", "--state-dir",
                                      str(self.state_dir), "--name", self.name, "--zone", self.zone,
                                      "--database-url", db, *self.args],
                                     env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_local_host(self.cloud.client(), self.name)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class FakeAgents:
    """Agents with the FakeDriver for hosts of a zone (tests.integration.compute.fakeagents)."""

    def __init__(self, cloud: Cloud, zone: str, hosts: list[str]) -> None:
        self.cloud, self.zone, self.hosts = cloud, zone, hosts
        self.dir = short_tmpdir("hbfake-")
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> FakeAgents:
        env = dict(self.cloud.env)
        db = env.get("HACKBOOT_DATABASE_URL") or f"sqlite:///{self.cloud.state_dir / 'hackboot.db'}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.compute.fakeagents",
                                      "--database-url", db, "--zone", self.zone, "--state-dir", str(self.dir),
                                      *self.hosts], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", line
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)
