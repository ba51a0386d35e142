"""The invoker: runs this cloud's function invocations on this machine's sandbox engine.

One invoker per machine, in the main `hackboot serve` process, so a function's warm sandboxes, its
concurrency limits and its scale to zero are counted once: the API processes (and the trigger loops) hand it
invocations over a unix socket (:func:`call`). It applies the limits — the function's own maximum
concurrency, the project's share of the machine (so one tenant cannot take every sandbox), the machine's
total — and asks the engine to run the version's code (unpacked by the control plane at upload).

Over the limits an invocation is *throttled* (the API answers 429, asynchronous sources retry later).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hackboot.functions import codepkg
from hackboot.functions.engine import AtCapacity, FunctionEngine, FunctionSpec, InvocationResult

log = logging.getLogger("hackboot.functions.invoker")


class Throttled(RuntimeError):
    """Over a concurrency limit: answer 429 / retry later."""


@dataclass(frozen=True)
class Target:
    """One resolved function version, as the control plane describes it."""

    project_id: str
    function_id: str
    qualifier: str  # "$LATEST", a version number, or the alias it was reached through
    version_id: str  # the engine's pool key: changes whenever code or configuration change
    runtime: str
    handler: str
    code_dir: str  # the unpacked package, as the control plane stored it
    code_sha256: str  # the package's checksum: the code cache's key
    memory_mb: int = 128
    timeout_s: float = 3.0
    env: dict[str, str] = field(default_factory=dict)
    network: bool = False
    max_concurrency: int = 10


class CodeCache:
    """Copies of the packages' trees where the sandboxes' unprivileged account may read them (the control
    plane's own tree sits under the private state directory), one per sha256, made once, read-only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()

    def directory(self, target: Target) -> Path:
        sha = target.code_sha256
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise codepkg.InvalidPackage("The function has no code yet")
        final = self.root / sha
        if final.is_dir():
            return final
        source = Path(target.code_dir)
        if not source.is_dir():
            raise codepkg.InvalidPackage("The function's code is not on this machine")
        with self._lock:
            if final.is_dir():
                return final
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o755)
            work = Path(tempfile.mkdtemp(prefix=".copy-", dir=self.root))
            try:
                shutil.copytree(source, work / "code", symlinks=True)
                for path in [work / "code", *(work / "code").rglob("*")]:
                    if not path.is_symlink():
                        os.chmod(path, 0o755 if path.is_dir() else 0o644)
                os.replace(work / "code", final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return final


class Limits:
    """In-flight invocations per function, per project and in total, each with its ceiling."""

    def __init__(self, total: int, per_project: int) -> None:
        self.total = total
        self.per_project = per_project
        self._lock = threading.Lock()
        self._functions: dict[str, int] = {}
        self._projects: dict[str, int] = {}
        self._all = 0

    @contextlib.contextmanager
    def slot(self, project_id: str, function_id: str, function_max: int) -> Iterator[None]:
        with self._lock:
            if self._functions.get(function_id, 0) >= function_max:
                raise Throttled(f"The function's concurrency limit ({function_max}) is reached")
            if self._projects.get(project_id, 0) >= self.per_project:
                raise Throttled(f"The project's concurrency limit ({self.per_project}) is reached")
            if self._all >= self.total:
                raise Throttled("Every sandbox of this region is busy: retry")
            self._functions[function_id] = self._functions.get(function_id, 0) + 1
            self._projects[project_id] = self._projects.get(project_id, 0) + 1
            self._all += 1
        try:
            yield
        finally:
            with self._lock:
                self._functions[function_id] -= 1
                self._projects[project_id] -= 1
                self._all -= 1

    def in_flight(self, function_id: str | None = None) -> int:
        with self._lock:
            return self._all if function_id is None else self._functions.get(function_id, 0)


class Invoker:
    def __init__(self, engine: FunctionEngine, limits: Limits, cache: CodeCache) -> None:
        self.engine = engine
        self.limits = limits
        self.cache = cache

    def invoke(self, target: Target, event: bytes, *, request_id: str | None = None) -> InvocationResult:
        """Run one invocation (blocking). Raises Throttled over a limit, InvalidPackage for missing code."""
        request_id = request_id or str(uuid.uuid4())
        code_dir = self.cache.directory(target)
        with self.limits.slot(target.project_id, target.function_id, target.max_concurrency):
            spec = FunctionSpec(version_id=target.version_id, runtime=target.runtime, code_dir=code_dir,
                                handler=target.handler,
                                memory_mb=target.memory_mb, timeout_s=target.timeout_s, env=dict(target.env),
                                network=target.network, max_concurrency=target.max_concurrency)
            try:
                return self.engine.invoke(spec, event, request_id=request_id)
            except AtCapacity as exc:
                raise Throttled(str(exc)) from exc

    def close(self) -> None:
        self.engine.close()


# --- the unix-socket service the API processes call -------------------------------------------------

def _result_json(result: InvocationResult) -> dict[str, Any]:
    out = asdict(result)
    out["payload"] = base64.b64encode(result.payload).decode()
    return out


def _result_from(data: dict[str, Any]) -> InvocationResult:
    data = dict(data)
    data["payload"] = base64.b64decode(data.get("payload", ""))
    return InvocationResult(**data)


def app(invoker: Invoker) -> Starlette:
    async def invoke(request: Request) -> JSONResponse:
        body = await request.json()
        target = Target(**body["target"])
        event = base64.b64decode(body["event"])
        try:
            result = await run_in_threadpool(invoker.invoke, target, event, request_id=body.get("request_id"))
        except Throttled as exc:
            return JSONResponse({"throttled": str(exc)}, status_code=429)
        except codepkg.InvalidPackage as exc:
            return JSONResponse({"invalid_code": str(exc)}, status_code=422)
        return JSONResponse(_result_json(result))

    return Starlette(routes=[Route("/invoke", invoke, methods=["POST"])])


_local: Invoker | None = None  # the invoker of this process, when it runs one (the main serve process)


def set_local(invoker: Invoker | None) -> None:
    global _local
    _local = invoker


def local() -> Invoker | None:
    return _local


def call(socket_path: Path, target: Target, event: bytes, *, request_id: str | None = None,
         timeout: float | None = None) -> InvocationResult:
    """Invoke through this machine's invoker: in-process when it runs here, else over its unix socket."""
    if _local is not None:
        return _local.invoke(target, event, request_id=request_id)
    transport = httpx.HTTPTransport(uds=str(socket_path))
    with httpx.Client(transport=transport, timeout=(timeout or target.timeout_s) + 30) as client:
        answer = client.post("http://invoker/invoke", json={
            "target": asdict(target), "event": base64.b64encode(event).decode(), "request_id": request_id})
    if answer.status_code == 429:
        raise Throttled(answer.json().get("throttled", "throttled"))
    if answer.status_code == 422:
        raise codepkg.InvalidPackage(answer.json().get("invalid_code", "invalid code"))
    answer.raise_for_status()
    return _result_from(answer.json())


def make_engine(state_dir: Path) -> FunctionEngine:
    """This machine's sandbox engine (bubblewrap)."""
    from hackboot.functions.bwrap_engine import BwrapEngine

    return BwrapEngine(state_dir)


def make_invoker(run_dir: Path, *, total: int, per_project: int,
                 engine_factory: Callable[[Path], FunctionEngine] = make_engine) -> Invoker:
    """`run_dir`: where the sandboxes' account can read (every directory above it traversable)."""
    return Invoker(engine_factory(run_dir / "engine"), Limits(total, per_project), CodeCache(run_dir / "code"))
