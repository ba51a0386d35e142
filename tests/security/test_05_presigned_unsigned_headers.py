"""Finding 5: a presigned PUT (only `host` signed) accepted unsigned `x-amz-*` headers: a copy source
(copying a private object the key can read), a public ACL, COMPLIANCE object locks, storage class,
tagging, metadata. As S3, every `x-amz-*` header must be covered by the signature, presigned or not."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.security._s3 import boto, bucket_name, error_code, presign, s3_key, send, sign
from tests.security.conftest import Tenant
from tests.support import Cloud


def test_unsigned_amz_headers_are_refused(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    tenant = tenant_factory()
    key = s3_key(tenant)
    s3 = boto(cloud, key)
    bucket = bucket_name("psu")
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    s3.put_object(Bucket=bucket, Key="private/secret.txt", Body=b"top secret")
    until = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3650)).strftime("%Y-%m-%dT%H:%M:%SZ")

    smuggled = [
        {"x-amz-copy-source": f"/{bucket}/private/secret.txt"},
        {"x-amz-acl": "public-read"},
        {"x-amz-grant-read": 'uri="http://acs.amazonaws.com/groups/global/AllUsers"'},
        {"x-amz-object-lock-mode": "COMPLIANCE", "x-amz-object-lock-retain-until-date": until},
        {"x-amz-object-lock-legal-hold": "ON"},
        {"x-amz-storage-class": "GLACIER"},
        {"x-amz-tagging": "owner=attacker"},
        {"x-amz-meta-planted": "yes"},
        {"x-amz-server-side-encryption": "AES256"},
    ]
    for extra in smuggled:
        url = presign(cloud, key, "PUT", f"/{bucket}/upload.bin")  # what the key holder hands out
        resp = send("PUT", url, headers=extra, body=b"ordinary upload")
        assert resp.status_code == 403, (extra, resp.status_code, resp.text)
        assert error_code(resp) == "AccessDenied"
        assert "not signed" in resp.text
        with pytest.raises(ClientError):
            s3.head_object(Bucket=bucket, Key="upload.bin")  # nothing was written

    # The same rule for header-signed requests: a header added after signing is refused.
    url, headers = sign(cloud, key, "PUT", f"/{bucket}/signed.bin", body=b"abc")
    resp = send("PUT", url, headers=headers | {"x-amz-acl": "public-read"}, body=b"abc")
    assert resp.status_code == 403 and error_code(resp) == "AccessDenied", resp.text

    # What clients legitimately do keeps working: a plain presigned PUT, headers signed at presign time,
    # and header-signed requests whose x-amz-* headers are all signed (as botocore and the aws CLI do).
    resp = send("PUT", presign(cloud, key, "PUT", f"/{bucket}/upload.bin"), body=b"ordinary upload")
    assert resp.status_code == 200, resp.text
    url = s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "meta.bin",
                                                          "Metadata": {"colour": "blue"}})
    assert httpx.put(url, content=b"m", headers={"x-amz-meta-colour": "blue"}, timeout=30).status_code == 200
    assert s3.head_object(Bucket=bucket, Key="meta.bin")["Metadata"] == {"colour": "blue"}
    url, headers = sign(cloud, key, "PUT", f"/{bucket}/signed.bin", body=b"abc",
                        headers={"x-amz-meta-a": "1", "x-amz-storage-class": "STANDARD_IA"})
    assert send("PUT", url, headers=headers, body=b"abc").status_code == 200
    s3.copy_object(Bucket=bucket, Key="copy.txt", CopySource={"Bucket": bucket, "Key": "private/secret.txt"})
    assert s3.get_object(Bucket=bucket, Key="upload.bin")["Body"].read() == b"ordinary upload"
    head = s3.head_object(Bucket=bucket, Key="upload.bin")
    assert "ObjectLockMode" not in head and head.get("StorageClass", "STANDARD") == "STANDARD"


def test_put_grant_alone_cannot_lock_tag_or_share(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    """The same class of hole through a signed request: another project granted only s3:PutObject by a bucket
    policy could attach a COMPLIANCE retention (an object the owner can never delete), a legal hold, tags or
    an ACL to what it writes. As S3, those need their own permissions."""
    import json

    owner, other = tenant_factory(), tenant_factory()
    s3_owner, s3_other = boto(cloud, s3_key(owner)), boto(cloud, s3_key(other))
    bucket = bucket_name("grant")
    s3_owner.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    s3_owner.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": other.project_id}, "Action": "s3:PutObject",
        "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=3650)
    attempts = [{"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until},
                {"ObjectLockLegalHoldStatus": "ON"}, {"Tagging": "a=b"},
                {"GrantFullControl": f"id={other.project_id}"}]
    for extra in attempts:
        with pytest.raises(ClientError) as exc:
            s3_other.put_object(Bucket=bucket, Key="planted", Body=b"x", **extra)
        assert exc.value.response["Error"]["Code"] == "AccessDenied", extra
        with pytest.raises(ClientError) as exc:
            s3_other.create_multipart_upload(Bucket=bucket, Key="planted", **extra)
        assert exc.value.response["Error"]["Code"] == "AccessDenied", extra
    s3_other.put_object(Bucket=bucket, Key="plain", Body=b"x")  # the grant itself works
    s3_owner.delete_object(Bucket=bucket, Key="plain")
