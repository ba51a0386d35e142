"""Listings, object attributes, part reads and part copies between hostile projects.

- GetObjectAttributes, partNumber reads and UploadPartCopy ranges of another project's object answer
  AccessDenied before anything that would tell its size or its part count (InvalidPartNumber, InvalidRange
  with ActualObjectSize, PartsCount).
- ListBuckets' prefix, bucket-region and continuation token only ever page through the caller's own
  buckets: a token forged from another project's bucket name shows none of that project's buckets.
- An upload id of another project cannot be completed, listed or copied into from the attacker's bucket.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.security._s3 import boto, bucket_name, s3_key
from tests.security.conftest import Tenant
from tests.support import Cloud


def _code(call: Any, **kwargs: Any) -> str:
    with pytest.raises(ClientError) as exc:
        call(**kwargs)
    return str(exc.value.response["Error"]["Code"])


def _victim_and_attacker(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> tuple[Any, Any, str, str]:
    victim = boto(cloud, s3_key(tenant_factory("admin")))
    attacker = boto(cloud, s3_key(tenant_factory("admin")))
    vb, ab = bucket_name("vic"), bucket_name("att")
    victim.create_bucket(Bucket=vb)
    attacker.create_bucket(Bucket=ab)
    victim.put_object(Bucket=vb, Key="plain", Body=b"p" * 1000)
    up = victim.create_multipart_upload(Bucket=vb, Key="mp", ChecksumAlgorithm="CRC32")
    part = victim.upload_part(Bucket=vb, Key="mp", UploadId=up["UploadId"], PartNumber=1, Body=b"m" * 3000,
                              ChecksumAlgorithm="CRC32")
    victim.complete_multipart_upload(Bucket=vb, Key="mp", UploadId=up["UploadId"], MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": part["ETag"], "ChecksumCRC32": part["ChecksumCRC32"]}]})
    return victim, attacker, vb, ab


def test_attributes_part_reads_and_part_copies_deny_before_revealing_sizes(
        cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    victim, attacker, vb, ab = _victim_and_attacker(cloud, tenant_factory)
    for key in ("plain", "mp", "missing"):
        assert _code(attacker.get_object_attributes, Bucket=vb, Key=key,
                     ObjectAttributes=["ObjectParts", "ObjectSize", "Checksum", "ETag"]) == "AccessDenied"
        for n in (1, 2, 9999):
            assert _code(attacker.get_object, Bucket=vb, Key=key, PartNumber=n) == "AccessDenied"
            assert _code(attacker.head_object, Bucket=vb, Key=key, PartNumber=n) == "403"
    uid = attacker.create_multipart_upload(Bucket=ab, Key="stolen")["UploadId"]
    for rng in ("bytes=0-0", "bytes=0-999999", "bytes=5000-6000", "bytes=9-1", "nonsense"):
        for key in ("plain", "mp", "missing"):
            assert _code(attacker.upload_part_copy, Bucket=ab, Key="stolen", UploadId=uid, PartNumber=1,
                         CopySource={"Bucket": vb, "Key": key}, CopySourceRange=rng) == "AccessDenied"
    assert attacker.list_parts(Bucket=ab, Key="stolen", UploadId=uid).get("Parts", []) == []
    # the owner sees everything
    attrs = victim.get_object_attributes(Bucket=vb, Key="mp", ObjectAttributes=["ObjectParts"])
    assert attrs["ObjectParts"]["TotalPartsCount"] == 1


def test_list_buckets_pages_only_the_callers_buckets(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    victim, attacker, vb, ab = _victim_and_attacker(cloud, tenant_factory)
    forged = base64.urlsafe_b64encode(b"a").decode().rstrip("=")  # "after bucket 'a'": every name
    seen: list[str] = []
    for kw in ({"Prefix": vb}, {"Prefix": vb[:4]}, {"BucketRegion": "us-east-1"},
               {"ContinuationToken": forged}, {"ContinuationToken": forged, "MaxBuckets": 1}, {"MaxBuckets": 1}):
        seen += [b["Name"] for b in attacker.list_buckets(**kw)["Buckets"]]
    assert vb not in seen and ab in seen
    token = base64.urlsafe_b64encode(vb.encode()).decode().rstrip("=")  # the victim's own name as a cursor
    names = [b["Name"] for b in attacker.list_buckets(ContinuationToken=token, MaxBuckets=1000)["Buckets"]]
    assert vb not in names
    assert vb in [b["Name"] for b in victim.list_buckets(Prefix=vb)["Buckets"]]


def test_another_projects_upload_id_is_useless(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    victim, attacker, vb, ab = _victim_and_attacker(cloud, tenant_factory)
    vid = victim.create_multipart_upload(Bucket=vb, Key="k", ChecksumAlgorithm="CRC32",
                                         ChecksumType="FULL_OBJECT")["UploadId"]
    etag = victim.upload_part(Bucket=vb, Key="k", UploadId=vid, PartNumber=1, Body=b"v" * 100)["ETag"]
    parts = {"Parts": [{"PartNumber": 1, "ETag": etag}]}
    # through the victim's bucket: denied; through the attacker's own bucket: no such upload there
    assert _code(attacker.complete_multipart_upload, Bucket=vb, Key="k", UploadId=vid,
                 MultipartUpload=parts) == "AccessDenied"
    assert _code(attacker.complete_multipart_upload, Bucket=ab, Key="k", UploadId=vid,
                 MultipartUpload=parts) == "NoSuchUpload"
    assert _code(attacker.list_parts, Bucket=ab, Key="k", UploadId=vid) == "NoSuchUpload"
    assert _code(attacker.upload_part, Bucket=ab, Key="k", UploadId=vid, PartNumber=2, Body=b"x") == "NoSuchUpload"
    assert _code(attacker.list_multipart_uploads, Bucket=vb) == "AccessDenied"
    assert _code(attacker.list_object_versions, Bucket=vb, EncodingType="url") == "AccessDenied"
    # the victim's upload is intact and completes
    r = victim.complete_multipart_upload(Bucket=vb, Key="k", UploadId=vid, MultipartUpload=parts)
    assert r["ChecksumType"] == "FULL_OBJECT"
