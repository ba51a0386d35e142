"""Escape attempts from a function sandbox (BwrapEngine, real bubblewrap): every one must fail.

A hostile handler tries to read the host's secrets and other functions' code, reach the host's network,
write outside /tmp, fill /tmp, see the host's environment, and use the syscalls the seccomp filter
denies. Each attempt reports what happened; the test asserts that it was refused.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hackboot.functions.engine import FunctionEngine
from tests.integration.functions.engine_contract import PYTHON, CodeDir, _Signal, code_dir, host_server, spec_for

__all__ = ["code_dir", "host_server"]  # fixtures used here

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup limits need root"),
    pytest.mark.skipif(PYTHON is None, reason="no python3 runtime on this host"),
]

TMP_LIMIT = 4 * 1024 * 1024

PROBE = """
import ctypes, errno, json, os, socket

libc = ctypes.CDLL(None, use_errno=True)

def attempt(fn):
    try:
        value = fn()
        return {"ok": True, "value": value if isinstance(value, (str, int, list, bool)) else repr(value)[:200]}
    except OSError as exc:
        return {"ok": False, "errno": exc.errno, "error": str(exc)[:200]}

def syscall(nr, *args):
    ctypes.set_errno(0)
    res = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    if res == -1:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return res

def read(path):
    with open(path, "rb") as f:
        return f.read(4096).decode("latin-1")

def fill_tmp():
    written = 0
    with open("/tmp/fill", "wb") as f:
        for _ in range(64):
            f.write(b"\\0" * (256 * 1024))
            f.flush()
            written += 256 * 1024
    return written

def handler(event, context):
    port = event["port"]
    out = {}
    out["shadow"] = attempt(lambda: read("/etc/shadow"))
    out["passwd"] = attempt(lambda: read("/etc/passwd"))
    out["root_home"] = attempt(lambda: os.listdir("/root"))
    out["other_code"] = attempt(lambda: os.listdir(event["other_code"]))
    out["host_proc_1_environ"] = attempt(lambda: read("/proc/1/environ"))
    out["proc_pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    out["connect_host"] = attempt(lambda: socket.create_connection(("127.0.0.1", port), timeout=2).recv(4).decode())
    out["write_task"] = attempt(lambda: open("/var/task/evil.py", "w").write("x"))
    out["write_root"] = attempt(lambda: open("/evil", "w").write("x"))
    out["write_usr"] = attempt(lambda: open("/usr/evil", "w").write("x"))
    out["write_tmp"] = attempt(lambda: open("/tmp/ok", "w").write("fine"))
    out["fill_tmp"] = attempt(fill_tmp)
    out["unshare_user"] = attempt(lambda: syscall(272, 0x10000000))
    out["unshare_net"] = attempt(lambda: syscall(272, 0x40000000))
    out["clone_newns"] = attempt(lambda: syscall(56, 0x20000 | 17, 0, 0, 0, 0))
    out["mount"] = attempt(lambda: syscall(165, 0, 0, 0, 0, 0))
    out["ptrace"] = attempt(lambda: syscall(101, 0, 0, 0, 0))  # PTRACE_TRACEME
    out["bpf"] = attempt(lambda: syscall(321, 0, 0, 0))
    out["keyctl"] = attempt(lambda: syscall(250, 0, 0, 0, 0, 0))
    out["setuid_root"] = attempt(lambda: os.setuid(0))
    out["env"] = dict(os.environ)
    out["uid"] = [os.getuid(), os.geteuid(), os.getgid()]
    out["hostname"] = socket.gethostname()
    out["seccomp_mode"] = [l.split()[1] for l in read("/proc/self/status").splitlines() if l.startswith("Seccomp:")]
    return out
"""


@pytest.fixture
def engine() -> Iterator[FunctionEngine]:
    from hackboot.functions.bwrap_engine import BwrapEngine

    eng = BwrapEngine(tmp_bytes=TMP_LIMIT)
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture
def host_secret_env() -> Iterator[str]:
    value = f"host-secret-{uuid.uuid4().hex}"
    os.environ["HB_TEST_HOST_SECRET"] = value
    try:
        yield value
    finally:
        del os.environ["HB_TEST_HOST_SECRET"]


def probe(engine: FunctionEngine, code_dir: CodeDir, server: _Signal, *, network: bool) -> dict[str, object]:
    other = code_dir({"secret.py": "KEY = 'other tenant'\n"})
    spec = spec_for(code_dir({"probe.py": PROBE}), PYTHON, "probe.handler", network=network, timeout_s=30,
                    env={"GREETING": "hi"})
    result = engine.invoke(spec, json.dumps({"port": server.port, "other_code": str(other)}).encode(),
                           request_id="probe")
    assert result.outcome == "ok", result
    answer = json.loads(result.payload)
    assert isinstance(answer, dict)
    return answer


def refused(attempt: object, *errnos: int) -> bool:
    assert isinstance(attempt, dict)
    return attempt["ok"] is False and (not errnos or attempt["errno"] in errnos)


def test_host_files_other_code_and_host_processes_out_of_reach(engine: FunctionEngine, code_dir: CodeDir,
                                                               host_server: _Signal, host_secret_env: str) -> None:
    out = probe(engine, code_dir, host_server, network=False)
    assert refused(out["shadow"]) and refused(out["passwd"])  # /etc holds no more than ssl certificates
    assert refused(out["root_home"])
    assert refused(out["other_code"])  # another function's code directory is not mounted
    environ = out["host_proc_1_environ"]
    assert isinstance(environ, dict)
    assert host_secret_env not in json.dumps(environ)  # /proc is the sandbox's own PID namespace
    assert out["proc_pids"] == [1, 2] or max(out["proc_pids"]) < 10  # type: ignore[operator]
    assert Path("/etc/shadow").exists()  # (the host does have one)


def test_environment_is_only_the_functions(engine: FunctionEngine, code_dir: CodeDir, host_server: _Signal,
                                           host_secret_env: str) -> None:
    out = probe(engine, code_dir, host_server, network=False)
    env = out["env"]
    assert isinstance(env, dict)
    assert env["GREETING"] == "hi"
    assert "HB_TEST_HOST_SECRET" not in env and host_secret_env not in json.dumps(env)
    assert not {"SSH_AUTH_SOCK", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST", "HOSTNAME"} & set(env)
    assert out["uid"] == [65534, 65534, 65534]
    assert refused(out["setuid_root"])
    assert out["hostname"] == "sandbox"


def test_no_network_unless_allowed(engine: FunctionEngine, code_dir: CodeDir, host_server: _Signal) -> None:
    isolated = probe(engine, code_dir, host_server, network=False)
    assert refused(isolated["connect_host"])
    assert host_server.connections == 0
    allowed = probe(engine, code_dir, host_server, network=True)
    assert allowed["connect_host"] == {"ok": True, "value": "pong"}
    assert host_server.connections == 1


def test_writes_only_in_tmp_and_tmp_is_bounded(engine: FunctionEngine, code_dir: CodeDir,
                                              host_server: _Signal) -> None:
    out = probe(engine, code_dir, host_server, network=False)
    for name in ("write_task", "write_root", "write_usr"):
        assert refused(out[name], 30, 13), (name, out[name])  # EROFS / EACCES
    assert out["write_tmp"] == {"ok": True, "value": 4}
    assert refused(out["fill_tmp"], 28)  # ENOSPC at the tmpfs size
    assert not Path("/evil").exists() and not Path("/usr/evil").exists()


def test_seccomp_denies_namespace_mount_ptrace_and_kernel_interfaces(engine: FunctionEngine, code_dir: CodeDir,
                                                                     host_server: _Signal) -> None:
    out = probe(engine, code_dir, host_server, network=False)
    for name in ("unshare_user", "unshare_net", "clone_newns", "mount", "ptrace", "bpf", "keyctl"):
        assert refused(out[name], 1), (name, out[name])  # EPERM from the filter
    assert out["seccomp_mode"] == ["2"]  # a filter is loaded (ptrace(TRACEME) and a nested user namespace
    # would be allowed without it: an unprivileged user namespace may create another)


FORGER = """
import os, struct, sys

RESP_FD = int(sys.argv[2])  # the worker's answer pipe, reachable by the function's code too

def frame(header: bytes, body_len: int) -> bytes:
    return struct.pack("<II", len(header), body_len) + header

def handler(event, context):
    if event == "not-a-dict":
        os.write(RESP_FD, frame(b"[1, 2]", 0))
    elif event == "huge":
        os.write(RESP_FD, struct.pack("<II", 10, 1 << 31))
    elif event == "garbage":
        os.write(RESP_FD, frame(b"{not json", 0))
    else:
        return "honest"
    import time
    time.sleep(5)
"""


@pytest.mark.parametrize("attack", ["not-a-dict", "huge", "garbage"])
def test_forged_frames_on_the_answer_pipe_only_harm_the_forger(engine: FunctionEngine, code_dir: CodeDir,
                                                                attack: str) -> None:
    spec = spec_for(code_dir({"forger.py": FORGER}), PYTHON, "forger.handler", timeout_s=10)
    result = engine.invoke(spec, json.dumps(attack).encode(), request_id="forged")
    assert result.outcome in ("error", "crashed"), result
    assert result.outcome != "ok"
    assert engine.warm(spec.version_id) == 0  # a worker that broke the protocol is not reused
    honest = engine.invoke(spec, b'"x"', request_id="after")
    assert honest.outcome == "ok" and json.loads(honest.payload) == "honest"
