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
