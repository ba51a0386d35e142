"""Finding 17: SigV2 presigned URLs (absolute `Expires`) were accepted ~10 years out; they are capped at
7 days like SigV4's X-Amz-Expires."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.security._s3 import boto, bucket_name, error_code, s3_key
from tests.security.conftest import Tenant
from tests.support import Cloud

TEN_YEARS = 10 * 365 * 24 * 3600


def test_sigv2_presigned_expiry_capped_at_a_week(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    tenant = tenant_factory()
    key = s3_key(tenant)
    s3 = boto(cloud, key)
    bucket = bucket_name("v2x")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="secret.txt", Body=b"payload")
    v2 = boto(cloud, key, signature_version="s3")  # botocore's SigV2 query signer (HmacV1QueryAuth)

    params = {"Bucket": bucket, "Key": "secret.txt"}
    for expires_in in (TEN_YEARS, 7 * 24 * 3600 + 3600):
        url = v2.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_in)
        assert "Signature=" in url and "Expires=" in url
        resp = httpx.get(url, timeout=30)
        assert resp.status_code == 403, (expires_in, resp.status_code, resp.text)
        assert error_code(resp) == "AccessDenied"

    # an ordinary SigV2 URL still works
    url = v2.generate_presigned_url("get_object", Params=params, ExpiresIn=3600)
    resp = httpx.get(url, timeout=30)
    assert resp.status_code == 200 and resp.content == b"payload"
