"""The invoker without sandboxes (a recording engine): the code cache, the concurrency limits and the
unix-socket service the API processes call."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from hackboot.functions import codepkg, invoker
from hackboot.functions.engine import FunctionEngine, FunctionSpec, InvocationResult, Runtime
from hackboot.functions.invoker import CodeCache, Invoker, Limits, Target, Throttled


class RecordingEngine(FunctionEngine):
    def __init__(self) -> None:
        self.specs: list[FunctionSpec] = []
        self.gate: threading.Event | None = None

    def runtimes(self) -> list[Runtime]:
        return []

    def invoke(self, spec: FunctionSpec, event: bytes, *, request_id: str) -> InvocationResult:
        self.specs.append(spec)
        if self.gate is not None:
            self.gate.wait(10)
        files = sorted(p.name for p in spec.code_dir.iterdir())
        return InvocationResult(request_id=request_id, outcome="ok", payload=event + b"|" + ",".join(files).encode())

    def warm(self, version_id: str) -> int:
        return 0

    def reap(self, idle_s: float) -> int:
        return 0

    def close(self) -> None:
        return None


def code(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "code"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def target(code_dir: Path, **kw: object) -> Target:
    fields: dict[str, object] = {"project_id": "prj-1", "function_id": "fn-1", "qualifier": "$LATEST",
                                 "version_id": "fn-1:1", "runtime": "python3.11", "handler": "main.handler",
                                 "code_dir": str(code_dir), "code_sha256": "ab" * 32, "max_concurrency": 2}
    fields.update(kw)
    return Target(**fields)  # type: ignore[arg-type]


@pytest.fixture
def engine() -> RecordingEngine:
    return RecordingEngine()


def test_the_engine_gets_the_versions_spec_and_code(tmp_path: Path, engine: RecordingEngine) -> None:
    root = code(tmp_path, {"main.py": "def handler(e, c): return 1", "lib/util.py": ""})
    inv = Invoker(engine, Limits(10, 10), CodeCache(tmp_path / "cache"))
    result = inv.invoke(target(root, env={"A": "1"}, memory_mb=256), b"{}", request_id="r1")
    assert result.payload == b"{}|lib,main.py" and result.request_id == "r1"
    [spec] = engine.specs
    assert (spec.env, spec.memory_mb, spec.version_id) == ({"A": "1"}, 256, "fn-1:1")
    # The sandbox reads a copy under the cache (readable by its account), made once per package.
    assert spec.code_dir == tmp_path / "cache" / ("ab" * 32) and (spec.code_dir / "lib" / "util.py").exists()
    assert (spec.code_dir / "main.py").stat().st_mode & 0o777 == 0o644
    (root / "main.py").write_text("changed")
    inv.invoke(target(root), b"{}")
    assert (spec.code_dir / "main.py").read_text() == "def handler(e, c): return 1", "not copied again"
    with pytest.raises(codepkg.InvalidPackage):
        inv.invoke(target(tmp_path / "missing", code_sha256="cd" * 32), b"{}")
    with pytest.raises(codepkg.InvalidPackage):
        inv.invoke(target(root, code_sha256=""), b"{}")  # no code uploaded yet


def test_limits_per_function_per_project_and_in_total(tmp_path: Path, engine: RecordingEngine) -> None:
    path = code(tmp_path, {"main.py": ""})
    inv = Invoker(engine, Limits(total=3, per_project=2), CodeCache(tmp_path / "cache"))
    engine.gate = threading.Event()
    threads = [threading.Thread(target=inv.invoke, args=(target(path, max_concurrency=2), b"{}"))
               for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = 5.0
        while inv.limits.in_flight() < 2 and deadline > 0:
            threading.Event().wait(0.01)
            deadline -= 0.01
        with pytest.raises(Throttled, match="function"):
            inv.invoke(target(path, max_concurrency=2), b"{}")
        with pytest.raises(Throttled, match="project"):
            inv.invoke(target(path, function_id="fn-2", max_concurrency=5), b"{}")
        third = threading.Thread(target=inv.invoke, args=(target(path, project_id="prj-2", function_id="fn-3"),
                                                          b"{}"))
        third.start()
        while inv.limits.in_flight() < 3:
            threading.Event().wait(0.01)
        with pytest.raises(Throttled, match="region"):
            inv.invoke(target(path, project_id="prj-3", function_id="fn-4"), b"{}")
    finally:
        engine.gate.set()
        for t in threads:
            t.join()
    third.join()
    assert inv.limits.in_flight() == 0
    inv.invoke(target(path), b"{}")  # the slots came back


@pytest.fixture
def served(tmp_path: Path, engine: RecordingEngine) -> Iterator[tuple[Path, Invoker]]:
    inv = Invoker(engine, Limits(10, 10), CodeCache(tmp_path / "cache"))
    sock = tmp_path / "inv.sock"
    server = uvicorn.Server(uvicorn.Config(invoker.app(inv), uds=str(sock), log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.01)
    yield sock, inv
    server.should_exit = True
    thread.join(10)


def test_the_unix_socket_service_round_trips_results_and_throttling(tmp_path: Path,
                                                                    served: tuple[Path, Invoker]) -> None:
    sock, _ = served
    path = code(tmp_path, {"main.py": ""})
    result = invoker.call(sock, target(path), b'{"x": 1}', request_id="req-9")
    assert result.request_id == "req-9" and result.outcome == "ok" and result.payload == b'{"x": 1}|main.py'
    with pytest.raises(codepkg.InvalidPackage):
        invoker.call(sock, target(tmp_path / "missing", code_sha256="cd" * 32), b"{}")
    with pytest.raises(Throttled):
        invoker.call(sock, target(path, max_concurrency=0), b"{}")
