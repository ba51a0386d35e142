"""S3 helpers for the adversarial tests: a tenant's S3 keys, boto3 clients and hand-signed raw requests."""

from __future__ import annotations

import uuid
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
