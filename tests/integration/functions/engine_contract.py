"""A reusable contract suite for FunctionEngine implementations, on real sandboxes.

A test module imports these tests and defines an ``engine`` fixture (a fresh engine, closed after the
test). Code directories are made by ``code_dir`` (world-traversable: engines may read them as an
unprivileged account). Nothing is timed: waits are conditions with deadlines.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hackboot.functions.engine import AtCapacity, FunctionEngine, FunctionSpec, Runtime
from hackboot.functions.runtimes import detect

RUNTIMES: list[Runtime] = detect()
PYTHON = next((r.name for r in RUNTIMES if r.language == "python"), None)
NODE = next((r.name for r in RUNTIMES if r.language == "nodejs"), None)
needs_python = pytest.mark.skipif(PYTHON is None, reason="no python3 runtime on this host")

CodeDir = Callable[[dict[str, str]], Path]


@pytest.fixture
def code_dir() -> Iterator[CodeDir]:
    roots: list[Path] = []

    def make(files: dict[str, str]) -> Path:
        root = Path(tempfile.mkdtemp(prefix="hb-fn-code-"))
        os.chmod(root, 0o755)
        roots.append(root)
        code = root / "code"
        code.mkdir(mode=0o755)
        for name, text in files.items():
            (code / name).write_text(textwrap.dedent(text))
            os.chmod(code / name, 0o644)
        return code

    yield make
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


def spec_for(code: Path, runtime: str | None, handler: str, **kw: object) -> FunctionSpec:
    assert runtime is not None
    return FunctionSpec(version_id=f"fn-{uuid.uuid4().hex[:10]}:1", runtime=runtime, code_dir=code, handler=handler,
                        **kw)  # type: ignore[arg-type]


def invoke(engine: FunctionEngine, spec: FunctionSpec, event: object = None) -> tuple[str, object, str]:
    result = engine.invoke(spec, json.dumps(event).encode(), request_id=uuid.uuid4().hex)
    payload = json.loads(result.payload) if result.payload else None
    return result.outcome, payload, result.logs


def host_pids_with(token: str) -> list[int]:
    """Host processes whose command line contains `token` (what a sandbox left behind)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return [p for p in found if p != os.getpid()]


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


PY_HELLO = """
    import os
    print("module loaded")
    COUNT = 0
    def handler(event, context):
        global COUNT
        COUNT += 1
        print("hello from python", event["name"])
        return {"greeting": "hello " + event["name"], "count": COUNT, "request_id": context.aws_request_id,
                "remaining_ok": 0 < context.get_remaining_time_in_millis() <= 3000,
                "memory": context.memory_limit_in_mb, "uid": os.getuid(), "cwd": os.getcwd()}
"""
NODE_HELLO = """
    console.log("module loaded");
    let count = 0;
    exports.handler = async (event, context) => {
      count += 1;
      console.log("hello from node", event.name);
      const remaining = context.getRemainingTimeInMillis();
      return { greeting: "hello " + event.name, count, request_id: context.awsRequestId,
               remaining_ok: remaining > 0 && remaining <= 3000, memory: context.memoryLimitInMB,
               uid: process.getuid(), cwd: process.cwd() };
    };
"""


def hello_spec(code_dir: CodeDir, runtime: Runtime) -> FunctionSpec:
    if runtime.language == "python":
        return spec_for(code_dir({"app.py": PY_HELLO}), runtime.name, "app.handler")
    return spec_for(code_dir({"index.js": NODE_HELLO}), runtime.name, "index.handler")


@pytest.mark.parametrize("runtime", RUNTIMES, ids=[r.name for r in RUNTIMES])
def test_hello_world_then_warm_reuse(engine: FunctionEngine, code_dir: CodeDir, runtime: Runtime) -> None:
    spec = hello_spec(code_dir, runtime)
    first = engine.invoke(spec, b'{"name": "ada"}', request_id="req-1")
    assert first.outcome == "ok", first
    body = json.loads(first.payload)
    assert body == {"greeting": "hello ada", "count": 1, "request_id": "req-1", "remaining_ok": True,
                    "memory": 128, "uid": 65534, "cwd": "/var/task"}
    assert first.cold and first.init_ms > 0
    assert f"hello from {runtime.language.replace('nodejs', 'node')} ada" in first.logs
    assert first.logs.index("module loaded") < first.logs.index("hello from")  # the init's logs come first
    assert engine.warm(spec.version_id) == 1
    second = engine.invoke(spec, b'{"name": "bob"}', request_id="req-2")
    assert second.outcome == "ok" and not second.cold and second.init_ms == 0
    assert json.loads(second.payload)["count"] == 2  # the module's state was kept: the same sandbox
    assert "bob" in second.logs and "ada" not in second.logs  # logs are per invocation
    assert "module loaded" not in second.logs


@pytest.mark.parametrize("runtime", RUNTIMES, ids=[r.name for r in RUNTIMES])
def test_events_and_answers_round_trip_as_json(engine: FunctionEngine, code_dir: CodeDir, runtime: Runtime) -> None:
    if runtime.language == "python":
        spec = spec_for(code_dir({"echo.py": "def handler(event, context):\n    return event\n"}), runtime.name,
                        "echo.handler")
    else:
        spec = spec_for(code_dir({"echo.js": "exports.handler = async (event) => event;\n"}), runtime.name,
                        "echo.handler")
    event = {"text": "héllo \u2028 wörld ☃ \"quoted\" \\ back", "nested": [1, 2.5, -0.25, None, True, {"k": []}],
             "empty": {}, "big": 2**40, "": "empty key"}
    result = engine.invoke(spec, json.dumps(event).encode(), request_id="r")
    assert result.outcome == "ok" and json.loads(result.payload) == event
    for raw in (b"null", b"  [1, 2]  ", b'"just a string"'):
        answer = engine.invoke(spec, raw, request_id="r")
        assert answer.outcome == "ok" and json.loads(answer.payload) == json.loads(raw)
    broken = engine.invoke(spec, b"{not json", request_id="r")
    assert broken.outcome == "error"
    assert engine.invoke(spec, b"1", request_id="r").outcome == "ok"  # the sandbox goes on


def test_runtimes_detected(engine: FunctionEngine) -> None:
    names = {r.name for r in engine.runtimes()}
    assert PYTHON in names
    assert all(r.executable.is_file() for r in engine.runtimes())


@needs_python
def test_exception_is_an_error_outcome(engine: FunctionEngine, code_dir: CodeDir) -> None:
    spec = spec_for(code_dir({"app.py": """
        def handler(event, context):
            raise ValueError("bad input " + str(event))
    """}), PYTHON, "app.handler")
    result = engine.invoke(spec, b"7", request_id="r")
    assert result.outcome == "error" and result.error == "ValueError: bad input 7"
    assert json.loads(result.payload)["errorType"] == "ValueError"
    assert "Traceback" in result.logs and "raise ValueError" in result.logs
    assert engine.invoke(spec, b"8", request_id="r2").error == "ValueError: bad input 8"  # the sandbox lives on


@pytest.mark.skipif(NODE is None, reason="no nodejs runtime on this host")
def test_node_rejection_sync_and_callback_handlers(engine: FunctionEngine, code_dir: CodeDir) -> None:
    code = code_dir({"a.js": "exports.handler = async () => { throw new TypeError('nope'); };\n",
                     "b.mjs": "export function handler(event) { return event * 2; }\n",
                     "c.js": "exports.handler = (event, context, callback) => {\n"
                             "  setTimeout(() => event < 0 ? callback(new RangeError('negative'))\n"
                             "                             : callback(null, event + 1), 5);\n"
                             "};\n"})
    outcome, payload, logs = invoke(engine, spec_for(code, NODE, "a.handler"), 1)
    assert outcome == "error" and isinstance(payload, dict) and payload["errorType"] == "TypeError"
    assert "nope" in logs
    assert invoke(engine, spec_for(code, NODE, "b.handler"), 21)[:2] == ("ok", 42)
    callback = spec_for(code, NODE, "c.handler")
    assert invoke(engine, callback, 1)[:2] == ("ok", 2)
    outcome, payload, _ = invoke(engine, callback, -1)
    assert outcome == "error" and isinstance(payload, dict) and payload["errorType"] == "RangeError"


@needs_python
def test_import_error_reported(engine: FunctionEngine, code_dir: CodeDir) -> None:
    spec = spec_for(code_dir({"app.py": "import no_such_module_here\n"}), PYTHON, "app.handler")
    result = engine.invoke(spec, b"{}", request_id="r")
    assert result.outcome == "error" and "ModuleNotFoundError" in (result.error or "")
    assert engine.warm(spec.version_id) == 0


@needs_python
def test_timeout_kills_the_whole_tree(engine: FunctionEngine, code_dir: CodeDir) -> None:
    token = str(900000 + int(uuid.uuid4().int % 99999))
    spec = spec_for(code_dir({"app.py": f"""
        import os, subprocess, time
        def handler(event, context):
            for _ in range(3):
                subprocess.Popen(["/usr/bin/sleep", "{token}"], start_new_session=True)
            if os.fork() == 0:
                os.setsid()
                os.execv("/usr/bin/sleep", ["sleep", "{token}"])
            print("children started", flush=True)
            time.sleep(60)
    """}), PYTHON, "app.handler", timeout_s=4)
    result = engine.invoke(spec, b"{}", request_id="r")
    assert result.outcome == "timeout" and result.error == "Task timed out after 4.00 seconds"
    assert "children started" in result.logs
    assert wait_for(lambda: not host_pids_with(token)), host_pids_with(token)
    assert engine.warm(spec.version_id) == 0  # a timed-out sandbox is discarded


@needs_python
def test_memory_bomb_is_out_of_memory(engine: FunctionEngine, code_dir: CodeDir) -> None:
    spec = spec_for(code_dir({"app.py": """
        def handler(event, context):
            if event == "small":
                return len(bytearray(1024))
            hog = []
            while True:
                hog.append(bytearray(8 * 1024 * 1024))
    """}), PYTHON, "app.handler", memory_mb=64, timeout_s=20)
    result = engine.invoke(spec, b'"bomb"', request_id="r")
    assert result.outcome == "out_of_memory", result
    assert engine.warm(spec.version_id) == 0
    assert invoke(engine, spec, "small")[:2] == ("ok", 1024)  # a new sandbox serves the next one


@pytest.mark.skipif(NODE is None, reason="no nodejs runtime on this host")
def test_node_memory_bomb_is_out_of_memory(engine: FunctionEngine, code_dir: CodeDir) -> None:
    spec = spec_for(code_dir({"index.js": """
        exports.handler = async (event) => {
          if (event === "small") return "fine";
          const hog = [];
          for (;;) hog.push(new Array(1024 * 1024).fill(event.length));
        };
    """}), NODE, "index.handler", memory_mb=128, timeout_s=30)
    result = engine.invoke(spec, b'"bomb"', request_id="r")
    assert result.outcome == "out_of_memory", result
    assert invoke(engine, spec, "small")[:2] == ("ok", "fine")


@needs_python
def test_crashed_worker_is_replaced(engine: FunctionEngine, code_dir: CodeDir) -> None:
    spec = spec_for(code_dir({"app.py": """
        import os, sys
        def handler(event, context):
            if event == "die":
                print("going down", flush=True)
                os._exit(3)
            return "alive"
    """}), PYTHON, "app.handler")
    assert invoke(engine, spec, "x")[:2] == ("ok", "alive")
    result = engine.invoke(spec, b'"die"', request_id="r")
    assert result.outcome == "crashed" and "going down" in result.logs
    assert engine.warm(spec.version_id) == 0
    again = engine.invoke(spec, b'"x"', request_id="r2")
    assert again.outcome == "ok" and again.cold


@needs_python
def test_fork_bomb_contained(engine: FunctionEngine, code_dir: CodeDir) -> None:
    spec = spec_for(code_dir({"app.py": """
        import os, time
        def handler(event, context):
            children = 0
            try:
                for _ in range(100000):
                    if os.fork() == 0:
                        time.sleep(60)
                        os._exit(0)
                    children += 1
            except OSError as exc:
                return {"children": children, "error": exc.errno}
            return {"children": children, "error": None}
    """}), PYTHON, "app.handler", timeout_s=20)
    outcome, payload, _ = invoke(engine, spec)
    assert outcome == "ok" and isinstance(payload, dict)
    assert payload["error"] == 11  # EAGAIN: the pids limit of the cgroup
    assert payload["children"] < 1000
    hello = spec_for(spec.code_dir, PYTHON, "app.handler")
    assert engine.invoke(hello, b'"x"', request_id="r2").outcome in ("ok", "error")  # the host still forks


@needs_python
def test_output_limits(engine: FunctionEngine, code_dir: CodeDir) -> None:
    spec = spec_for(code_dir({"app.py": """
        import sys
        def handler(event, context):
            if event == "logs":
                for _ in range(1024):
                    sys.stdout.write("x" * 1023 + "\\n")
                return "done"
            return "y" * (7 * 1024 * 1024)
    """}), PYTHON, "app.handler", timeout_s=20)
    result = engine.invoke(spec, b'"logs"', request_id="r")
    assert result.outcome == "ok" and json.loads(result.payload) == "done"
    assert len(result.logs) < 300 * 1024 and "logs cut at" in result.logs
    big = engine.invoke(spec, b'"payload"', request_id="r2")
    assert big.outcome == "error" and "exceeds the limit" in (big.error or "")
    assert len(big.payload) < 64 * 1024


class _Signal:
    """A server on the host's 127.0.0.1 that counts connections (network-enabled handlers call it)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.release = threading.Event()  # cleared: connections are held until it is set
        self.release.set()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.release.wait(60)
            try:
                conn.sendall(b"pong")
            finally:
                conn.close()

    def close(self) -> None:
        self.release.set()
        self.sock.close()


@pytest.fixture
def host_server() -> Iterator[_Signal]:
    server = _Signal()
    try:
        yield server
    finally:
        server.close()


@needs_python
def test_concurrency_limit(engine: FunctionEngine, code_dir: CodeDir, host_server: _Signal) -> None:
    spec = spec_for(code_dir({"app.py": f"""
        import socket
        def handler(event, context):
            # Held by the test's server until the test has tried a second invocation.
            return socket.create_connection(("127.0.0.1", {host_server.port}), timeout=60).recv(4).decode()
    """}), PYTHON, "app.handler", network=True, max_concurrency=1, timeout_s=90)
    results: list[str] = []
    host_server.release.clear()
    runner = threading.Thread(target=lambda: results.append(invoke(engine, spec, None)[0]))
    runner.start()
    try:
        assert wait_for(lambda: host_server.connections == 1)
        with pytest.raises(AtCapacity):
            engine.invoke(spec, b"0", request_id="second")
    finally:
        host_server.release.set()
        runner.join(90)
    assert results == ["ok"]
    again = invoke(engine, spec, None)
    assert again[:2] == ("ok", "pong"), again  # below the limit again


@needs_python
def test_many_threads_share_a_version_within_its_limit(engine: FunctionEngine, code_dir: CodeDir) -> None:
    spec = spec_for(code_dir({"app.py": PY_HELLO}), PYTHON, "app.handler", max_concurrency=6)
    outcomes: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(5):
            outcome, payload, logs = invoke(engine, spec, {"name": f"c{n}-{i}"})
            ok = outcome == "ok" and isinstance(payload, dict) and payload["greeting"] == f"hello c{n}-{i}"
            with lock:
                outcomes.append("ok" if ok and f"c{n}-{i}" in logs else f"{outcome}: {payload}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outcomes == ["ok"] * 30
    assert 1 <= engine.warm(spec.version_id) <= 6


@needs_python
def test_reap_frees_sandboxes(engine: FunctionEngine, code_dir: CodeDir) -> None:
    spec = spec_for(code_dir({"app.py": PY_HELLO}), PYTHON, "app.handler")
    assert invoke(engine, spec, {"name": "x"})[0] == "ok"
    assert engine.warm(spec.version_id) == 1
    assert host_pids_with(spec.version_id)  # the warm worker runs (its argv names the version)
    assert engine.reap(3600) == 0 and engine.warm(spec.version_id) == 1
    assert engine.reap(0) == 1
    assert engine.warm(spec.version_id) == 0
    assert wait_for(lambda: not host_pids_with(spec.version_id))
    outcome, payload, _ = invoke(engine, spec, {"name": "y"})
    assert outcome == "ok" and isinstance(payload, dict) and payload["count"] == 1  # a cold start again


@needs_python
def test_close_stops_everything(engine: FunctionEngine, code_dir: CodeDir) -> None:
    spec = spec_for(code_dir({"app.py": PY_HELLO}), PYTHON, "app.handler")
    assert invoke(engine, spec, {"name": "x"})[0] == "ok"
    engine.close()
    assert wait_for(lambda: not host_pids_with(spec.version_id))
