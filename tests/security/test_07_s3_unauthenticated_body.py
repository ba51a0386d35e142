"""Finding 7 (S3 side): unauthenticated bodies must not cost the S3 process memory. Requests are
authenticated from their headers before any body is read; a non-upload route refuses a body larger than
its limit from its declared length; a browser POST form's fields are capped before its policy is checked;
oversized headers are refused. Real sockets, a 300 MB body, and the server's RSS measured."""

from __future__ import annotations

import select
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.security._s3 import boto, bucket_name, s3_key
from tests.security.conftest import Tenant
from tests.support import Cloud

BIG = 300 * 1024 * 1024
PIECE = b"\0" * (1024 * 1024)
GROWTH_LIMIT = 64 * 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class _Answered(Exception):
    pass


def exchange(port: int, head: bytes, body: Iterator[bytes]) -> tuple[bytes, int]:
    """Send `head` then stream `body` until the server answers or drops us; returns (response, bytes sent)."""
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(head)
            for piece in body:
                for i in range(0, len(piece), 65536):
                    if select.select([s], [], [], 0)[0]:
                        raise _Answered  # the server answered while we were still sending
                    s.sendall(piece[i:i + 65536])
                    sent += len(piece[i:i + 65536])
        except (_Answered, BrokenPipeError, ConnectionResetError):
            pass
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
                head_end = answer.find(b"\r\n\r\n")
                if head_end >= 0:
                    length = 0
                    for line in answer[:head_end].split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    if len(answer) >= head_end + 4 + length:
                        break
        except (ConnectionResetError, TimeoutError):
            pass
    return answer, sent


def big_body(total: int = BIG) -> Iterator[bytes]:
    for _ in range(total // len(PIECE)):
        yield PIECE


@pytest.fixture(scope="module")
def target(cloud: Cloud, tenant_factory_module: Callable[..., Tenant]) -> str:
    tenant = tenant_factory_module()
    s3 = boto(cloud, s3_key(tenant))
    name = bucket_name("dos")
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def tenant_factory_module(cloud: Cloud) -> Callable[..., Tenant]:
    from tests.security.conftest import make_tenant

    return lambda role="member": make_tenant(cloud, role)


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def request_head(cloud: Cloud, method: str, path: str, length: int, extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{cloud.s3_port}\r\nContent-Length: {length}\r\n"
            f"Content-Type: application/octet-stream\r\n{extra}\r\n").encode()


def test_unauthenticated_put_and_config_bodies_refused_early(cloud: Cloud, target: str) -> None:
    assert cloud.proc is not None
    pid = cloud.proc.pid
    before = rss(pid)
    cases = [("PUT", f"/{target}/big.bin"), ("POST", f"/{target}?delete"), ("PUT", f"/{target}?tagging"),
             ("PUT", f"/{target}?policy"), ("PUT", f"/{target}/k?uploadId=x&partNumber=1")]
    for method, path in cases:
        answer, sent = exchange(cloud.s3_port, request_head(cloud, method, path, BIG), big_body())
        assert status_of(answer) in (400, 403, 404, 413), answer[:300]
        assert sent < BIG // 2, (method, path, sent)  # answered long before the body was through
    # A signed-looking but bogus Authorization header is checked from the headers alone, too.
    bogus = ("Authorization: AWS4-HMAC-SHA256 Credential=HBKNOTAKEY/20260101/us-east-1/s3/aws4_request, "
             "SignedHeaders=host, Signature=00\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
             "x-amz-date: 20260101T000000Z\r\n")
    answer, sent = exchange(cloud.s3_port, request_head(cloud, "PUT", f"/{target}/b.bin", BIG, bogus), big_body())
    assert status_of(answer) == 403 and sent < BIG // 2
    assert rss(pid) - before < GROWTH_LIMIT


def test_unauthenticated_post_form_fields_are_capped(cloud: Cloud, target: str) -> None:
    """A browser POST form is read before its policy can be checked: its fields are capped in number and size."""
    assert cloud.proc is not None
    pid = cloud.proc.pid
    before = rss(pid)
    boundary = uuid.uuid4().hex
    field = b"x" * (60 * 1024)

    def fields() -> Iterator[bytes]:
        n = 0
        while n * len(field) < BIG:
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"f{n}\"\r\n\r\n").encode() + field + b"\r\n"
            n += 1

    head = (f"POST /{target} HTTP/1.1\r\nHost: 127.0.0.1:{cloud.s3_port}\r\nContent-Length: {BIG + 10 ** 7}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    answer, sent = exchange(cloud.s3_port, head, fields())
    assert status_of(answer) == 400, answer[:300]
    assert b"MalformedPOSTRequest" in answer or b"MaxMessageLengthExceeded" in answer
    assert sent < BIG // 2
    assert rss(pid) - before < GROWTH_LIMIT


def test_oversized_headers_refused(cloud: Cloud, target: str) -> None:
    for extra in (f"x-big: {'a' * 8 * 1024 * 1024}\r\n",
                  "".join(f"x-h{i}: {'b' * 8000}\r\n" for i in range(40))):
        answer, _ = exchange(cloud.s3_port, request_head(cloud, "GET", f"/{target}/k", 0, extra), iter(()))
        # refused by the HTTP server (an answer or a dropped connection) or by the S3 endpoint: never served
        assert not answer or status_of(answer) in (400, 431), answer[:300]
