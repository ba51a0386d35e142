"""Fixtures for the events tests: a webhook receiver on 127.0.0.1 and clouds tuned for fast retries."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support import Cloud, Postgres, make_cloud

# Fast retries so the tests see backoff and give-up within seconds; private targets allowed
# because the receiver listens on 127.0.0.1.
FAST_WEBHOOKS = {
    "HACKBOOT_WEBHOOK_MAX_ATTEMPTS": "3",
    "HACKBOOT_WEBHOOK_BACKOFF_BASE_S": "1",
    "HACKBOOT_WEBHOOK_POLL_INTERVAL_S": "0.1",
    "HACKBOOT_WEBHOOK_TIMEOUT_S": "3",
    "HACKBOOT_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true",
    "HACKBOOT_EVENTS_STREAM_HEARTBEAT_S": "1",
    "HACKBOOT_RUN_LOCAL_AGENT": "false",
}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when received


class Receiver:
    """A tiny HTTP server that records POSTs and answers each path with a scripted list of statuses."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.scripts: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.cond:
                    receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                      body, time.time()))
                    script = receiver.scripts.get(self.path, [])
                    status, headers = script.pop(0) if len(script) > 1 else (script[0] if script else (200, {}))
                    receiver.cond.notify_all()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                reply = b'{"ok":true}' if status < 300 else b"receiver says no"
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def new_path(self, *statuses: int | tuple[int, dict[str, str]]) -> str:
        """A fresh path answering `statuses` in order (the last one repeats; default 200)."""
        path = f"/hook/{uuid.uuid4().hex[:12]}"
        self.scripts[path] = [s if isinstance(s, tuple) else (s, {}) for s in statuses] or [(200, {})]
        return path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def at(self, path: str) -> list[Received]:
        with self.cond:
            return [r for r in self.requests if r.path == path]

    def wait(self, path: str, predicate: Callable[[list[Received]], bool], timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = [r for r in self.requests if r.path == path]
                if predicate(got):
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"receiver {path}: only {len(got)} requests after {timeout}s")
                self.cond.wait(left)


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture(scope="session")
def wh_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    c = make_cloud(tmp_path_factory.mktemp("whcloud"), **FAST_WEBHOOKS)
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def wh_pg_cloud(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> Iterator[Cloud]:
    c = make_cloud(tmp_path_factory.mktemp("whpgcloud"), postgres.create_database(), **FAST_WEBHOOKS)
    c.start()
    yield c
    c.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def wh_any_cloud(request: pytest.FixtureRequest) -> Cloud:
    """A cloud with fast webhook retries (3 attempts, 1 s base), on both database backends."""
    return request.getfixturevalue("wh_cloud" if request.param == "sqlite" else "wh_pg_cloud")  # type: ignore[no-any-return]
