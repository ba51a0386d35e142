"""Finding 7 (S3 side): unauthenticated bodies must not cost the S3 process memory. Requests are
authenticated from their headers before any body is read; a non-upload route refuses a body larger than
its limit from its declared length; a browser POST form's fields are capped before its policy is checked;
oversized headers are refused. Real sockets, a 300 MB body, and the server's RSS measured."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.security._s3 import boto, bucket_name, raw_exchange, s3_key, sign_unsigned_payload, status_of
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
        answer, sent = raw_exchange(cloud.s3_port, request_head(cloud, method, path, BIG), big_body())
        assert status_of(answer) in (400, 403, 404, 413), answer[:300]
        assert sent < BIG // 2, (method, path, sent)  # answered long before the body was through
    # A signed-looking but bogus Authorization header is checked from the headers alone, too.
    bogus = ("Authorization: AWS4-HMAC-SHA256 Credential=HBKNOTAKEY/20260101/us-east-1/s3/aws4_request, "
             "SignedHeaders=host, Signature=00\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
             "x-amz-date: 20260101T000000Z\r\n")
    answer, sent = raw_exchange(cloud.s3_port, request_head(cloud, "PUT", f"/{target}/b.bin", BIG, bogus), big_body())
    assert status_of(answer) == 403 and sent < BIG // 2
    assert rss(pid) - before < GROWTH_LIMIT


def test_authenticated_config_body_over_its_limit_refused_before_reading(cloud: Cloud) -> None:
    from tests.security.conftest import make_tenant

    key = s3_key(make_tenant(cloud))
    name = bucket_name("cap")
    boto(cloud, key).create_bucket(Bucket=name)
    for method, path in (("PUT", f"/{name}?tagging"), ("POST", f"/{name}?delete"), ("PUT", f"/{name}?cors")):
        url_path, _, query = path.partition("?")
        signed = sign_unsigned_payload(cloud, key, method, url_path, {"content-length": str(BIG)}, query=query + "=")
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in signed.items()) + "\r\n"
        answer, sent = raw_exchange(cloud.s3_port, head.encode(), big_body())
        assert status_of(answer) == 400 and b"MaxMessageLengthExceeded" in answer, answer[:400]
        assert sent < 4 * 1024 * 1024, (path, sent)  # refused from the declared length, not after reading


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
    answer, sent = raw_exchange(cloud.s3_port, head, fields())
    assert status_of(answer) == 400, answer[:300]
    assert b"MalformedPOSTRequest" in answer or b"MaxMessageLengthExceeded" in answer
    assert sent < BIG // 2
    assert rss(pid) - before < GROWTH_LIMIT


def test_oversized_headers_refused(cloud: Cloud, target: str) -> None:
    for extra in (f"x-big: {'a' * 8 * 1024 * 1024}\r\n",
                  "".join(f"x-h{i}: {'b' * 8000}\r\n" for i in range(40))):
        answer, _ = raw_exchange(cloud.s3_port, request_head(cloud, "GET", f"/{target}/k", 0, extra), iter(()))
        # refused by the HTTP server (an answer or a dropped connection) or by the S3 endpoint: never served
        assert not answer or status_of(answer) in (400, 431), answer[:300]
