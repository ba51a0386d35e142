"""Finding 6: the project's public-access block refused `"*"` and `{"AWS": "*"}` principals but accepted
`{"CanonicalUser": "*"}`, then served the object anonymously while GetBucketPolicyStatus said "not public".
One definition of "public" now serves the block, the policy status and the authoriser."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.security._s3 import boto, bucket_name, s3_key
from tests.security.conftest import Tenant
from tests.support import Cloud

PUBLIC_PRINCIPALS: list[Any] = ["*", {"AWS": "*"}, {"AWS": ["*"]}, {"CanonicalUser": "*"},
                                {"CanonicalUser": ["prj-nobody", "*"]}, {"AWS": "arn:aws:iam::*:root"},
                                {"Service": "*"}]


def policy(bucket: str, principal: Any = None, **extra: Any) -> str:
    st: dict[str, Any] = {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}
    st |= {"Principal": principal} if principal is not None else {}
    return json.dumps({"Version": "2012-10-17", "Statement": [st | extra]})


def is_public(s3: Any, bucket: str) -> bool:
    return bool(s3.get_bucket_policy_status(Bucket=bucket)["PolicyStatus"]["IsPublic"])


def test_every_public_principal_form_is_blocked(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    tenant = tenant_factory("admin")
    assert tenant.client.buckets.public_access_block()["block_public_access"] is True  # type: ignore[attr-defined]
    s3 = boto(cloud, s3_key(tenant))
    bucket = bucket_name("pab")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="private.txt", Body=b"not for the public")
    anon_url = f"{cloud.s3_url}/{bucket}/private.txt"

    candidates = [policy(bucket, p) for p in PUBLIC_PRINCIPALS]
    candidates.append(policy(bucket, NotPrincipal={"AWS": "prj-nobody"}))  # everyone but one
    candidates.append(policy(bucket, "*", Condition={"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}}))
    candidates.append(policy(bucket, "*", Condition={"StringEqualsIfExists": {"aws:PrincipalAccount": "prj-x"}}))
    for doc in candidates:
        with pytest.raises(ClientError) as exc:
            s3.put_bucket_policy(Bucket=bucket, Policy=doc)
        assert exc.value.response["Error"]["Code"] == "AccessDenied", doc
        assert httpx.get(anon_url, timeout=10).status_code == 403

    # With the block off the same policy is accepted, and every view agrees it is public.
    tenant.client.buckets.set_public_access_block(False)  # type: ignore[attr-defined]
    s3.put_bucket_policy(Bucket=bucket, Policy=policy(bucket, {"CanonicalUser": "*"}))
    assert is_public(s3, bucket)
    resp = httpx.get(anon_url, timeout=10)
    assert resp.status_code == 200 and resp.content == b"not for the public"

    # Block on again: the stored public statement is ignored by the authoriser, and the status says so.
    tenant.client.buckets.set_public_access_block(True)  # type: ignore[attr-defined]
    assert not is_public(s3, bucket)
    assert httpx.get(anon_url, timeout=10).status_code == 403

    # A statement narrowed to fixed source addresses is not public (as S3 defines it): accepted while blocked.
    s3.put_bucket_policy(Bucket=bucket, Policy=policy(
        bucket, {"CanonicalUser": "*"}, Condition={"IpAddress": {"aws:SourceIp": "192.0.2.0/24"}}))
    assert not is_public(s3, bucket)
    assert httpx.get(anon_url, timeout=10).status_code == 403  # we are not 192.0.2.0/24
