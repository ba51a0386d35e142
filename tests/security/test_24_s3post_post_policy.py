"""Browser POST uploads: a policy is only as strong as the key that signed it. A policy signed by one
project's key cannot write into another project's bucket; the request's own (unsigned) headers add
nothing to the object; and success_action_redirect is only ever echoed back to the browser, never
fetched by the server, nor able to break out of the Location header."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.security._s3 import S3Key, boto, bucket_name, error_code, s3_key
from tests.security.conftest import Tenant
from tests.support import Cloud


def _form(s3key: S3Key, bucket: str, extra_conditions: list[Any], **fields: str) -> dict[str, str]:
    expiration = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    policy = {"expiration": expiration, "conditions": [{"bucket": bucket}, ["starts-with", "$key", ""],
                                                       *extra_conditions]}
    b64 = base64.b64encode(json.dumps(policy).encode()).decode()
    sig = base64.b64encode(hmac.new(s3key.secret_key.encode(), b64.encode(), hashlib.sha1).digest()).decode()
    return {"AWSAccessKeyId": s3key.access_key, "policy": b64, "signature": sig, **fields}


def _post(cloud: Cloud, bucket: str, fields: dict[str, str], headers: dict[str, str] | None = None) -> httpx.Response:
    parts: list[tuple[str, Any]] = [(k, (None, v)) for k, v in fields.items()]
    parts.append(("file", ("f.txt", b"payload")))
    return httpx.post(f"{cloud.s3_url}/{bucket}", files=parts, headers=headers, timeout=30)


def test_policy_of_another_project_cannot_write(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    victim, attacker = tenant_factory(), tenant_factory()
    vkey, akey = s3_key(victim), s3_key(attacker)
    vs3 = boto(cloud, vkey)
    bucket = bucket_name("postv")
    vs3.create_bucket(Bucket=bucket)

    # the attacker signs a policy naming the victim's bucket with its own key (SigV2 and boto3's SigV4)
    r = _post(cloud, bucket, _form(akey, bucket, [], key="planted.txt"))
    assert r.status_code == 403 and error_code(r) == "AccessDenied", r.text
    post = boto(cloud, akey).generate_presigned_post(bucket, "planted2.txt")
    r = _post(cloud, bucket, post["fields"])
    assert r.status_code == 403 and error_code(r) == "AccessDenied", r.text
    # the attacker's access key with a signature lifted from the victim's form does not verify
    victim_form = _form(vkey, bucket, [], key="planted3.txt")
    r = _post(cloud, bucket, dict(victim_form, AWSAccessKeyId=akey.access_key))
    assert r.status_code == 403 and error_code(r) == "SignatureDoesNotMatch", r.text
    # the victim's policy cannot be replayed on the attacker's bucket either (the bucket is conditioned)
    abucket = bucket_name("posta")
    boto(cloud, akey).create_bucket(Bucket=abucket)
    r = _post(cloud, abucket, victim_form)
    assert r.status_code == 403, r.text
    for k in ("planted.txt", "planted2.txt", "planted3.txt"):
        with pytest.raises(ClientError):
            vs3.head_object(Bucket=bucket, Key=k)

    # the victim's own form works, and the POST request's unsigned headers add nothing to the object
    r = _post(cloud, bucket, victim_form, headers={"x-amz-acl": "public-read", "x-amz-meta-evil": "1",
                                                   "x-amz-tagging": "a=b", "x-amz-storage-class": "GLACIER"})
    assert r.status_code == 204, r.text
    h = vs3.head_object(Bucket=bucket, Key="planted3.txt")
    assert h["Metadata"] == {} and "StorageClass" not in h
    assert vs3.get_object_tagging(Bucket=bucket, Key="planted3.txt")["TagSet"] == []
    assert httpx.get(f"{cloud.s3_url}/{bucket}/planted3.txt", timeout=30).status_code == 403


def test_redirect_is_never_fetched_nor_injected(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    tenant = tenant_factory()
    key = s3_key(tenant)
    bucket = bucket_name("postr")
    boto(cloud, key).create_bucket(Bucket=bucket)
    with socket.socket() as listener:  # an "internal service": the server must never connect to it
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        internal = f"http://127.0.0.1:{listener.getsockname()[1]}/admin?do=1"
        cond = [["starts-with", "$success_action_redirect", ""]]
        r = _post(cloud, bucket, _form(key, bucket, cond, key="a", success_action_redirect=internal))
        assert r.status_code == 303 and r.headers["location"].startswith(internal + "&bucket=")
        with pytest.raises(TimeoutError):
            listener.accept()
    for hostile in ("http://x.example/\r\nSet-Cookie: s=1", "file:///etc/passwd", "gopher://127.0.0.1:25/x",
                    "//x.example/path"):
        cond = [["starts-with", "$success_action_redirect", ""]]
        r = _post(cloud, bucket, _form(key, bucket, cond, key="b", success_action_redirect=hostile))
        assert r.status_code == 204, (hostile, r.status_code, r.text)
        assert "set-cookie" not in r.headers and "example" not in r.headers.get("location", "")
