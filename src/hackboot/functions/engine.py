"""The function engine contract: run one invocation of a function version in a sandbox.

An *engine* runs a host's invocations. It knows nothing of HTTP, the database, tenants or quotas: the
invoker hands it the complete description of a function version (:class:`FunctionSpec`, its code already
unpacked into a read-only directory) and an event, and gets an :class:`InvocationResult` back:

    engine.runtimes()                                   # what this host can run (detected, data)
    engine.invoke(spec, event, request_id=...)          # blocking; a warm sandbox is reused when one is idle
    engine.warm(version_id) / engine.reap(idle_s)       # pool size; scale to zero after idle_s
    engine.close()                                      # stop every sandbox

Every invocation runs in a sandbox (bubblewrap: own user/mount/PID/IPC/UTS namespaces, no network unless
``spec.network``, read-only runtime and code, a size-limited private /tmp, a seccomp filter, cgroup memory
and CPU limits); the whole process tree is killed at the timeout, and output beyond the limits is cut.
A sandbox serves one invocation at a time; ``invoke`` raises :class:`AtCapacity` when `spec.max_concurrency`
invocations of that version already run on this engine.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Outcome = Literal["ok", "error", "timeout", "out_of_memory", "crashed"]


class EngineError(RuntimeError):
    """The engine itself failed (not the function): retry elsewhere or later."""


class AtCapacity(EngineError):
    """The version's concurrency limit is reached on this engine (the API answers 429)."""


class UnknownRuntime(EngineError, ValueError):
    """The spec names a runtime this host does not have."""


@dataclass(frozen=True)
class Runtime:
    name: str  # "python3.11", "nodejs20" — what users choose; detected from the host's interpreters
    language: Literal["python", "nodejs"]
    version: str  # full version, e.g. "3.11.2"
    executable: Path


@dataclass(frozen=True)
class FunctionSpec:
    version_id: str  # identity of the immutable code + configuration (the warm pool is per version)
    runtime: str  # a Runtime.name
    code_dir: Path  # unpacked code (read-only inside the sandbox, at /var/task)
    handler: str  # python: "module.function"; nodejs: "file.export" (file.js or file.mjs)
    memory_mb: int = 128
    timeout_s: float = 3.0
    env: dict[str, str] = field(default_factory=dict)  # environment variables and decrypted secrets
    network: bool = False  # egress allowed (own network namespace otherwise: nothing but loopback)
    max_concurrency: int = 10  # sandboxes of this version running invocations at once on this engine


@dataclass(frozen=True)
class InvocationResult:
    request_id: str
    outcome: Outcome
    payload: bytes = b""  # the handler's return value, JSON-encoded (ok), or the error as JSON (error)
    error: str | None = None  # "ValueError: bad input", "Task timed out after 3.00 seconds", …
    logs: str = ""  # stdout + stderr of this invocation (cut at the output limit, then marked)
    duration_ms: float = 0.0  # handler time (what is billed), not counting a cold start
    init_ms: float = 0.0  # > 0 on a cold start: sandbox + runtime + module import
    cold: bool = False
    max_memory_mb: float = 0.0  # peak of the sandbox's cgroup, when the host reports it


class FunctionEngine(abc.ABC):
    @abc.abstractmethod
    def runtimes(self) -> list[Runtime]: ...

    @abc.abstractmethod
    def invoke(self, spec: FunctionSpec, event: bytes, *, request_id: str) -> InvocationResult:
        """Run the handler with `event` (JSON bytes) and return what it answered (never raises for the
        function's own failures: they are outcomes)."""

    @abc.abstractmethod
    def warm(self, version_id: str) -> int:
        """Idle sandboxes of the version kept for reuse."""

    @abc.abstractmethod
    def reap(self, idle_s: float) -> int:
        """Stop sandboxes idle for more than `idle_s` seconds; returns how many were stopped."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop every sandbox (running invocations end as crashed)."""
