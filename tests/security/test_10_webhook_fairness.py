"""Finding 10: one tenant's dead webhook endpoint must not delay another tenant's deliveries.

Project A queues hundreds of deliveries to a receiver that accepts connections and never answers
(the worst kind: every attempt runs into the timeout). Project B's first delivery to a healthy
receiver must still arrive within a couple of seconds, and A's dead receiver must never hold more
than the per-webhook limit of connections at once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from hackboot.core.auth import PROJECT_HEADER
from tests.support import Cloud, make_cloud

BACKLOG = 260
B_DEADLINE_S = 4.0
PER_WEBHOOK = 2  # hackboot.events.webhooks.PER_WEBHOOK


class HangingServer:
    """Accepts TCP connections on 127.0.0.1 and never answers; counts connections open at once."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.open = 0
        self.max_open = 0
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.open += 1
                self.accepted += 1
                self.max_open = max(self.max_open, self.open)
                self.conns.append(conn)
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        try:
            while conn.recv(65536):  # read the request, never answer; ends when the sender gives up
                pass
        except OSError:
            pass
        with self.lock:
            self.open -= 1

    def close(self) -> None:
        self.stopped = True
        self.sock.close()
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()


class Healthy:
    """Answers every POST with 204 and notes when each path was first hit."""

    def __init__(self) -> None:
        self.first_hit: dict[str, float] = {}
        self.cond = threading.Condition()
        healthy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                with healthy.cond:
                    healthy.first_hit.setdefault(self.path, time.monotonic())
                    healthy.cond.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def wait(self, path: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while path not in self.first_hit:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.first_hit[path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fair_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    # Receivers on 127.0.0.1 need private targets; the default 5 s timeout makes a hung receiver costly.
    c = make_cloud(tmp_path_factory.mktemp("wh10"), HACKBOOT_WEBHOOK_ALLOW_PRIVATE_TARGETS="true",
                   HACKBOOT_RUN_LOCAL_AGENT="false", HACKBOOT_WEBHOOK_POLL_INTERVAL_S="0.2")
    c.start()
    yield c
    c.stop()


def _project_client(cloud: Cloud) -> httpx.Client:
    project = cloud.admin_client_unscoped().projects.create(f"fair-{uuid.uuid4().hex[:8]}")
    return httpx.Client(base_url=cloud.url, timeout=30, headers={
        "Authorization": f"Bearer {cloud.admin_token}", PROJECT_HEADER: project["id"]})


def test_dead_endpoint_of_one_project_does_not_delay_another_projects_delivery(fair_cloud: Cloud) -> None:
    hanging, healthy = HangingServer(), Healthy()
    a, b = _project_client(fair_cloud), _project_client(fair_cloud)
    try:
        dead = a.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{hanging.port}/dead"})
        assert dead.status_code == 201, dead.text
        for _ in range(BACKLOG):
            assert a.post(f"/v1/webhooks/{dead.json()['id']}/ping").status_code == 202
        deadline = time.monotonic() + 10
        while hanging.accepted == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hanging.accepted > 0  # A's backlog is being worked on, and hangs

        path = f"/b/{uuid.uuid4().hex[:8]}"
        hook = b.post("/v1/webhooks", json={"url": healthy.url(path)})
        assert hook.status_code == 201, hook.text
        sent = time.monotonic()
        assert b.post(f"/v1/webhooks/{hook.json()['id']}/ping").status_code == 202
        arrived = healthy.wait(path, B_DEADLINE_S)
        assert arrived is not None, f"project B's delivery did not arrive within {B_DEADLINE_S}s"
        assert arrived - sent < B_DEADLINE_S
        # The dead receiver never held more than the per-webhook limit of the sender's slots.
        assert hanging.max_open <= PER_WEBHOOK, hanging.max_open
        pending = a.get(f"/v1/webhooks/{dead.json()['id']}/deliveries", params={"status": "pending", "limit": 1})
        assert pending.json()["items"], "A's backlog should still be pending (its receiver hangs)"
    finally:
        a.close()
        b.close()
        hanging.close()
        healthy.close()
