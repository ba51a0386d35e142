"""Finding 7: bodies and headers cannot exhaust the API's memory.

Real sockets against the running cloud: a 300 MB body sent without a (valid) token is refused
with 401 before it is read, an oversized body with a valid token gets 413 (by Content-Length and
while a chunked body streams, whatever its content type), and an 8 MiB header gets 431 on the API
and on the S3 port. The API processes' resident memory stays flat throughout.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from tests.security.conftest import Tenant
from tests.support import Cloud

MiB = 1024 * 1024
ATTACK_BYTES = 300 * MiB
RSS_GROWTH_LIMIT = 64 * MiB


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def api_rss(cloud: Cloud) -> dict[int, int]:
    """Resident memory of the server process and its forked API workers (same program)."""
    assert cloud.proc is not None
    main = cloud.proc.pid
    pids = [main] + [c for c in _children(main)
                     if Path(f"/proc/{c}/cmdline").read_bytes() == Path(f"/proc/{main}/cmdline").read_bytes()]
    rss = {}
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss[pid] = int(line.split()[1]) * 1024
    return rss


def exchange(port: int, head: bytes, body: Iterator[bytes], timeout: float = 30.0) -> tuple[int, bytes, int]:
    """Send `head` then `body` until the server answers; returns (status, response, body bytes sent)."""
    sent = 0
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        answered = False
        for chunk in body:
            if select.select([sock], [], [], 0)[0]:
                answered = True
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            assert time.monotonic() < deadline, "the server neither answered nor stopped reading"
        if not answered:
            select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < 4096:
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
        except (ConnectionResetError, TimeoutError):
            pass
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data.split(b" ", 2)[1]), data, sent


def zeros(total: int, chunk: int = MiB) -> Iterator[bytes]:
    block = bytes(chunk)
    for _ in range(total // chunk):
        yield block


def chunked(total: int, chunk: int = MiB) -> Iterator[bytes]:
    block = b"%x\r\n" % chunk + bytes(chunk) + b"\r\n"
    for _ in range(total // chunk):
        yield block
    yield b"0\r\n\r\n"


def head(method: str, path: str, port: int, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *[f"{k}: {v}" for k, v in headers.items()]]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_unauthenticated_bodies_are_not_read(cloud: Cloud) -> None:
    before = api_rss(cloud)
    for auth in ({}, {"Authorization": "Bearer hbk_not-a-real-token"}, {"Authorization": "Basic YTpi"}):
        for framing, body in (({"Content-Length": str(ATTACK_BYTES)}, zeros(ATTACK_BYTES)),
                              ({"Transfer-Encoding": "chunked"}, chunked(ATTACK_BYTES))):
            status, response, sent = exchange(cloud.api_port, head(
                "POST", "/v1/keypairs", cloud.api_port,
                {"Content-Type": "application/octet-stream", **framing, **auth}), body)
            assert status == 401, response[:300]
            assert b"connection: close" in response.lower()
            assert sent < ATTACK_BYTES // 4, f"{sent} bytes were taken before the 401"
    after = api_rss(cloud)
    for pid, rss in after.items():
        assert rss - before.get(pid, rss) < RSS_GROWTH_LIMIT, (before, after)


def test_oversized_bodies_get_413_whatever_the_content_type(cloud: Cloud,
                                                           tenant_factory: Callable[..., Tenant]) -> None:
    tenant = tenant_factory("member")
    before = api_rss(cloud)
    auth = {"Authorization": f"Bearer {tenant.token}"}
    for ctype in ("application/octet-stream", "application/json", "text/plain"):
        for framing, body in (({"Content-Length": str(ATTACK_BYTES)}, zeros(ATTACK_BYTES)),
                              ({"Transfer-Encoding": "chunked"}, chunked(ATTACK_BYTES))):
            status, response, sent = exchange(cloud.api_port, head(
                "POST", "/v1/keypairs", cloud.api_port, {"Content-Type": ctype, **framing, **auth}), body)
            assert status == 413, response[:300]
            assert b"payload_too_large" in response
            assert sent < ATTACK_BYTES // 4, f"{sent} bytes were taken before the 413"
    after = api_rss(cloud)
    for pid, rss in after.items():
        assert rss - before.get(pid, rss) < RSS_GROWTH_LIMIT, (before, after)
    # The API still answers normally afterwards, on the same cloud.
    assert tenant.client.keypairs.list() == []  # type: ignore[attr-defined]


def test_huge_headers_get_431_on_the_api_and_s3_ports(cloud: Cloud) -> None:
    for port, path in ((cloud.api_port, "/healthz"), (cloud.s3_port, "/")):
        for name, value in (("X-Padding", "a" * (8 * MiB)), ("X-Small", "b" * 1000)):
            count = 1 if len(value) > MiB else 100  # one huge header, or many that add up to 100 kB
            extra = "".join(f"{name}-{i}: {value}\r\n" for i in range(count))
            raw = head("GET", path, port, {}).removesuffix(b"\r\n") + extra.encode() + b"\r\n"
            started = time.monotonic()
            status, response, _ = exchange(port, raw[:1024], iter([raw[i:i + MiB] for i in range(1024, len(raw), MiB)]))
            assert status == 431, (port, response[:300])
            assert time.monotonic() - started < 5
    # Normal requests are untouched.
    assert httpx.get(cloud.url + "/healthz", headers={"X-Fine": "c" * 8000}).status_code == 200


def test_revoked_token_gets_no_idempotent_replay(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    """A replayed Idempotency-Key answer never reaches the route: the token is checked before it."""
    tenant = tenant_factory("admin")
    hook = tenant.client.webhooks.create("https://hooks.example.com/x", enabled=False)  # type: ignore[attr-defined]
    admin = cloud.admin_client_unscoped()
    issued = admin.tokens.create(project_id=tenant.project_id, role="admin", user_id=tenant.user_id, name="gone")
    url = f"{cloud.url}/v1/webhooks/{hook['id']}/rotate-secret"  # a POST without a body
    headers = {"Authorization": f"Bearer {issued['token']}", "Idempotency-Key": "rotate-once"}
    first = httpx.post(url, headers=headers)
    assert first.status_code == 200 and first.json()["secret"]
    admin.tokens.revoke(issued["id"])  # type: ignore[attr-defined]
    replay = httpx.post(url, headers=headers)
    assert replay.status_code == 401, replay.text
    assert "secret" not in replay.json()
