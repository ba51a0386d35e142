"""S3 helpers for the adversarial tests: a tenant's S3 keys, boto3 clients and hand-signed raw requests."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import select
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import httpx
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from tests.security.conftest import Tenant
from tests.support import Cloud

REGION = "us-east-1"


@dataclass
class S3Key:
    id: str
    access_key: str
    secret_key: str


def s3_key(tenant: Tenant, **kwargs: Any) -> S3Key:
    """An S3 key the tenant issues for itself through the REST API (as `hackboot s3 credentials create`)."""
    issued = tenant.client.s3_credentials.create(**kwargs)  # type: ignore[attr-defined]
    return S3Key(issued["id"], issued["access_key"], issued["secret_key"])


def boto(cloud: Cloud, key: S3Key, signature_version: str = "s3v4") -> Any:
    cfg = Config(signature_version=signature_version, retries={"max_attempts": 1}, s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=cloud.s3_url, aws_access_key_id=key.access_key,
                        aws_secret_access_key=key.secret_key, region_name=REGION, config=cfg)


def bucket_name(prefix: str = "sec") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def sign(cloud: Cloud, key: S3Key, method: str, path: str, *, body: bytes = b"",
         headers: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """Sign with botocore's SigV4 (every header given is signed, as SDKs do); returns url and headers."""
    url = cloud.s3_url + path
    req = AWSRequest(method=method, url=url, data=body, headers=dict(headers or {}))
    req.context["payload_signing_enabled"] = True
    S3SigV4Auth(Credentials(key.access_key, key.secret_key), "s3", REGION).add_auth(req)
    return url, dict(req.headers.items())


def presign(cloud: Cloud, key: S3Key, method: str, path: str, expires: int = 300) -> str:
    """A SigV4 presigned URL signing only `host` (what `generate_presigned_url` gives)."""
    req = AWSRequest(method=method, url=cloud.s3_url + path)
    S3SigV4QueryAuth(Credentials(key.access_key, key.secret_key), "s3", REGION, expires=expires).add_auth(req)
    return str(req.url)


def send(method: str, url: str, *, headers: dict[str, str] | None = None, body: bytes = b"") -> httpx.Response:
    return httpx.request(method, url, headers=headers, content=body, timeout=30)


def error_code(resp: httpx.Response) -> str:
    text = resp.text
    if "<Code>" not in text:
        return ""
    return text.split("<Code>", 1)[1].split("</Code>", 1)[0]


def sign_unsigned_payload(cloud: Cloud, key: S3Key, method: str, path: str,
                          headers: dict[str, str] | None = None, query: str = "") -> dict[str, str]:
    """Header-signed SigV4 with `x-amz-content-sha256: UNSIGNED-PAYLOAD` (for bodies streamed by hand);
    `query` is the canonical query string (e.g. "tagging=")."""
    now = dt.datetime.now(dt.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    h = {k.lower(): v for k, v in (headers or {}).items()} | {
        "host": f"127.0.0.1:{cloud.s3_port}", "x-amz-date": amz_date, "x-amz-content-sha256": "UNSIGNED-PAYLOAD"}
    names = sorted(h)
    canonical = "\n".join([method, path, query, "".join(f"{n}:{h[n].strip()}\n" for n in names), ";".join(names),
                           "UNSIGNED-PAYLOAD"])
    scope = f"{amz_date[:8]}/{REGION}/s3/aws4_request"
    sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + key.secret_key).encode()
    for part in (amz_date[:8], REGION, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    h["authorization"] = (f"AWS4-HMAC-SHA256 Credential={key.access_key}/{scope}, SignedHeaders={';'.join(names)}, "
                          f"Signature={sig}")
    return h


class _Answered(Exception):
    pass


def raw_exchange(port: int, head: bytes, body: Iterator[bytes]) -> tuple[bytes, int]:
    """Send `head`, then stream `body` over a real socket until the server answers or drops us;
    returns (the response, body bytes sent)."""
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
                end = answer.find(b"\r\n\r\n")
                if end >= 0:
                    length = 0
                    for line in answer[:end].split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    if len(answer) >= end + 4 + length:
                        break
        except (ConnectionResetError, TimeoutError):
            pass
    return answer, sent


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])
