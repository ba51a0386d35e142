"""CopyObject and UploadPartCopy between every pair of encryption modes (none, SSE-S3, SSE-C with one key or
another), whole objects and ranges, inline-sized and blob-sized sources; missing or wrong source keys."""

from __future__ import annotations

import os
from typing import Any

import pytest
from botocore.exceptions import ClientError

KEY_A = b"A" * 32
KEY_B = b"b" * 32
MODES = ["none", "sse-s3", "sse-c-a"]
TARGETS = ["none", "sse-s3", "sse-c-a", "sse-c-b"]


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def write_args(mode: str) -> dict[str, Any]:
    if mode == "sse-s3":
        return {"ServerSideEncryption": "AES256"}
    if mode.startswith("sse-c"):
        return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": KEY_A if mode.endswith("-a") else KEY_B}
    return {}


def source_args(mode: str) -> dict[str, Any]:
    if mode.startswith("sse-c"):
        return {"CopySourceSSECustomerAlgorithm": "AES256", "CopySourceSSECustomerKey": KEY_A}
    return {}


def read_args(mode: str) -> dict[str, Any]:
    return write_args(mode) if mode.startswith("sse-c") else {}


def check_encryption(s3: Any, bucket: str, key: str, mode: str) -> None:
    head = s3.head_object(Bucket=bucket, Key=key, **read_args(mode))
    if mode == "sse-s3":
        assert head["ServerSideEncryption"] == "AES256"
    elif mode.startswith("sse-c"):
        assert head["SSECustomerAlgorithm"] == "AES256" and "ServerSideEncryption" not in head
        with pytest.raises(ClientError):  # unreadable without its key
            s3.get_object(Bucket=bucket, Key=key)
    else:
        assert "ServerSideEncryption" not in head and "SSECustomerAlgorithm" not in head


@pytest.mark.parametrize("size", [100, 200_000])
@pytest.mark.parametrize("dst", TARGETS)
@pytest.mark.parametrize("src", MODES)
def test_copy_object_between_encryption_modes(s3: Any, bucket: str, src: str, dst: str, size: int) -> None:
    data = os.urandom(size)
    s3.put_object(Bucket=bucket, Key="src", Body=data, **write_args(src))
    s3.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": bucket, "Key": "src"},
                   **source_args(src), **write_args(dst))
    assert s3.get_object(Bucket=bucket, Key="dst", **read_args(dst))["Body"].read() == data
    check_encryption(s3, bucket, "dst", dst)
    # the source is untouched and still reads with its own key
    assert s3.get_object(Bucket=bucket, Key="src", **read_args(src))["Body"].read() == data


@pytest.mark.parametrize("dst", TARGETS)
@pytest.mark.parametrize("src", MODES)
def test_upload_part_copy_between_encryption_modes(s3: Any, bucket: str, src: str, dst: str) -> None:
    data = os.urandom(300_000)
    s3.put_object(Bucket=bucket, Key="src", Body=data, **write_args(src))
    uid = s3.create_multipart_upload(Bucket=bucket, Key="dst", **write_args(dst))["UploadId"]
    target = read_args(dst)  # UploadPartCopy into an SSE-C upload names the upload's key
    r = s3.upload_part_copy(Bucket=bucket, Key="dst", UploadId=uid, PartNumber=1,
                            CopySource={"Bucket": bucket, "Key": "src"}, CopySourceRange="bytes=70000-250000",
                            **source_args(src), **target)
    s3.complete_multipart_upload(Bucket=bucket, Key="dst", UploadId=uid, MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": r["CopyPartResult"]["ETag"]}]}, **target)
    assert s3.get_object(Bucket=bucket, Key="dst", **read_args(dst))["Body"].read() == data[70000:250001]
    check_encryption(s3, bucket, "dst", dst)


def test_copy_into_a_bucket_with_default_encryption(s3: Any, bucket: str) -> None:
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    s3.put_object(Bucket=bucket, Key="c", Body=b"customer", **write_args("sse-c-a"))
    s3.copy_object(Bucket=bucket, Key="d", CopySource={"Bucket": bucket, "Key": "c"}, **source_args("sse-c-a"))
    check_encryption(s3, bucket, "d", "sse-s3")
    assert s3.get_object(Bucket=bucket, Key="d")["Body"].read() == b"customer"


def test_sse_c_source_needs_its_key(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="src", Body=b"secret" * 1000, **write_args("sse-c-a"))
    uid = s3.create_multipart_upload(Bucket=bucket, Key="dst")["UploadId"]
    wrong = {"CopySourceSSECustomerAlgorithm": "AES256", "CopySourceSSECustomerKey": KEY_B}
    for extra, want in (({}, "InvalidRequest"), (wrong, "AccessDenied")):
        with pytest.raises(ClientError) as e:
            s3.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": bucket, "Key": "src"}, **extra)
        assert code(e) == want
        with pytest.raises(ClientError) as e:
            s3.upload_part_copy(Bucket=bucket, Key="dst", UploadId=uid, PartNumber=1,
                                CopySource={"Bucket": bucket, "Key": "src"}, **extra)
        assert code(e) == want
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=bucket, Key="dst")
    assert code(e) == "404"
    assert s3.list_parts(Bucket=bucket, Key="dst", UploadId=uid).get("Parts", []) == []


def test_copy_source_key_on_a_plain_source_is_refused(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="plain", Body=b"x")
    with pytest.raises(ClientError) as e:
        s3.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": bucket, "Key": "plain"},
                       **source_args("sse-c-a"))
    assert code(e) == "InvalidRequest"
