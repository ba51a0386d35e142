"""Buckets and objects with boto3 and the aws CLI: the core S3 surface."""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.objectstore.conftest import S3Server, new_name


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def test_bucket_lifecycle_boto3(s3: Any) -> None:
    name = new_name("b")
    s3.create_bucket(Bucket=name)
    assert name in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    s3.head_bucket(Bucket=name)
    assert s3.get_bucket_location(Bucket=name)["LocationConstraint"] in (None, "")
    with pytest.raises(ClientError) as e:
        s3.create_bucket(Bucket=name)
    assert code(e) == "BucketAlreadyOwnedByYou"
    s3.put_object(Bucket=name, Key="k", Body=b"x")
    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket=name)
    assert code(e) == "BucketNotEmpty"
    s3.delete_object(Bucket=name, Key="k")
    s3.delete_bucket(Bucket=name)
    with pytest.raises(ClientError) as e:
        s3.head_bucket(Bucket=name)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as e:
        s3.list_objects_v2(Bucket=name)
    assert code(e) == "NoSuchBucket"


@pytest.mark.parametrize("bad", ["ab", "A" * 5 + "bc", "bad_name", "-abc", "abc-", "a..b", "192.168.1.1",
                                 "x" * 64, "xn--abc"])
def test_bad_bucket_names(s3: Any, bad: str) -> None:
    with pytest.raises(ClientError) as e:
        s3.create_bucket(Bucket=bad)
    assert code(e) == "InvalidBucketName"


def test_put_get_head_delete(s3: Any, bucket: str) -> None:
    body = b"hello world" * 100
    r = s3.put_object(Bucket=bucket, Key="dir/hello.txt", Body=body, ContentType="text/plain",
                      Metadata={"owner": "me", "x": "y"}, CacheControl="max-age=60", ContentDisposition="inline",
                      ContentEncoding="identity", ContentLanguage="fr")
    assert r["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    g = s3.get_object(Bucket=bucket, Key="dir/hello.txt")
    assert g["Body"].read() == body
    assert g["ContentType"] == "text/plain"
    assert g["Metadata"] == {"owner": "me", "x": "y"}
    assert g["CacheControl"] == "max-age=60"
    assert g["ContentDisposition"] == "inline"
    assert g["ContentLanguage"] == "fr"
    assert g["ETag"] == r["ETag"]
    h = s3.head_object(Bucket=bucket, Key="dir/hello.txt")
    assert h["ContentLength"] == len(body)
    s3.delete_object(Bucket=bucket, Key="dir/hello.txt")
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="dir/hello.txt")
    assert code(e) == "NoSuchKey"
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=bucket, Key="dir/hello.txt")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    s3.delete_object(Bucket=bucket, Key="never-existed")  # idempotent, 204


def test_large_object_streams_to_blob(s3: Any, bucket: str) -> None:
    body = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: stored as a blob, not inline
    r = s3.put_object(Bucket=bucket, Key="big", Body=body)
    assert r["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    assert s3.get_object(Bucket=bucket, Key="big")["Body"].read() == body
    part = s3.get_object(Bucket=bucket, Key="big", Range="bytes=1000-1999")
    assert part["Body"].read() == body[1000:2000]
    assert part["ContentRange"] == f"bytes 1000-1999/{len(body)}"
    assert s3.get_object(Bucket=bucket, Key="big", Range="bytes=-10")["Body"].read() == body[-10:]
    assert s3.get_object(Bucket=bucket, Key="big", Range=f"bytes={len(body) - 3}-")["Body"].read() == body[-3:]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="big", Range=f"bytes={len(body)}-")
    assert code(e) == "InvalidRange"


def test_empty_object(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    g = s3.get_object(Bucket=bucket, Key="empty")
    assert g["Body"].read() == b""
    assert g["ETag"] == '"d41d8cd98f00b204e9800998ecf8427e"'


def test_conditional_get(s3: Any, bucket: str) -> None:
    r = s3.put_object(Bucket=bucket, Key="c", Body=b"data")
    etag = r["ETag"]
    assert s3.get_object(Bucket=bucket, Key="c", IfMatch=etag)["Body"].read() == b"data"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="c", IfMatch='"nope"')
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="c", IfNoneMatch=etag)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 304
    lm = s3.head_object(Bucket=bucket, Key="c")["LastModified"]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="c", IfModifiedSince=lm)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 304
    import datetime as dt

    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="c", IfUnmodifiedSince=lm - dt.timedelta(days=1))
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=bucket, Key="c", IfModifiedSince=lm - dt.timedelta(days=1))["Body"].read() == b"data"


def test_conditional_writes(s3: Any, bucket: str) -> None:
    r = s3.put_object(Bucket=bucket, Key="once", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="once", Body=b"2", IfNoneMatch="*")
    assert code(e) == "PreconditionFailed"
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="once", Body=b"3", IfMatch='"0123"')
    assert code(e) == "PreconditionFailed"
    s3.put_object(Bucket=bucket, Key="once", Body=b"4", IfMatch=r["ETag"])
    assert s3.get_object(Bucket=bucket, Key="once")["Body"].read() == b"4"


def test_list_objects_v1_v2(s3: Any, bucket: str) -> None:
    keys = ["a/1", "a/2", "a/b/3", "b/1", "c", "d/x/y", "e"]
    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    r = s3.list_objects_v2(Bucket=bucket)
    assert [c["Key"] for c in r["Contents"]] == sorted(keys)
    assert r["KeyCount"] == len(keys)
    r = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [c["Key"] for c in r["Contents"]] == ["c", "e"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["a/", "b/", "d/"]
    r = s3.list_objects_v2(Bucket=bucket, Prefix="a/", Delimiter="/")
    assert [c["Key"] for c in r["Contents"]] == ["a/1", "a/2"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["a/b/"]
    # pagination with max-keys and continuation tokens, delimiter included
    seen: list[str] = []
    token = None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        r = s3.list_objects_v2(Bucket=bucket, Delimiter="/", MaxKeys=2, **kw)
        seen += [c["Key"] for c in r.get("Contents", [])] + [p["Prefix"] for p in r.get("CommonPrefixes", [])]
        if not r["IsTruncated"]:
            break
        token = r["NextContinuationToken"]
    assert sorted(seen) == ["a/", "b/", "c", "d/", "e"]
    r = s3.list_objects_v2(Bucket=bucket, StartAfter="b/1")
    assert [c["Key"] for c in r["Contents"]] == ["c", "d/x/y", "e"]
    # V1 with markers
    r = s3.list_objects(Bucket=bucket, MaxKeys=3)
    assert r["IsTruncated"] and [c["Key"] for c in r["Contents"]] == sorted(keys)[:3]
    r2 = s3.list_objects(Bucket=bucket, Marker=r["Contents"][-1]["Key"])
    assert [c["Key"] for c in r2["Contents"]] == sorted(keys)[3:]
    r = s3.list_objects(Bucket=bucket, Delimiter="/", MaxKeys=2)
    assert r["IsTruncated"] and r["NextMarker"] == "b/"
    # paginator (boto3 follows tokens itself)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, PaginationConfig={"PageSize": 3})
    assert [c["Key"] for p in pages for c in p["Contents"]] == sorted(keys)


def test_list_url_encoding(s3: Any, bucket: str) -> None:
    key = "spaced key/é+ü&<x>"
    s3.put_object(Bucket=bucket, Key=key, Body=b"1")
    from urllib.parse import unquote_plus

    r = s3.list_objects_v2(Bucket=bucket, EncodingType="url")  # explicit: boto3 leaves keys encoded
    assert [unquote_plus(c["Key"]) for c in r["Contents"]] == [key]
    assert "<" not in r["Contents"][0]["Key"] and " " not in r["Contents"][0]["Key"]
    r = s3.list_objects_v2(Bucket=bucket)  # boto3 asks for url encoding itself and decodes
    assert [c["Key"] for c in r["Contents"]] == [key]
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"1"


def test_delete_objects_batch(s3: Any, bucket: str) -> None:
    for i in range(5):
        s3.put_object(Bucket=bucket, Key=f"k{i}", Body=b"x")
    r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": f"k{i}"} for i in range(4)] + [{"Key": "zz"}]})
    assert sorted(d["Key"] for d in r["Deleted"]) == ["k0", "k1", "k2", "k3", "zz"]
    assert [c["Key"] for c in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["k4"]


def test_copy_object(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="src", Body=b"copy me" * 20000, ContentType="text/x", Metadata={"a": "1"})
    r = s3.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": bucket, "Key": "src"})
    g = s3.get_object(Bucket=bucket, Key="dst")
    assert g["Body"].read() == b"copy me" * 20000
    assert g["Metadata"] == {"a": "1"} and g["ContentType"] == "text/x"
    assert r["CopyObjectResult"]["ETag"] == g["ETag"]
    s3.copy_object(Bucket=bucket, Key="dst2", CopySource={"Bucket": bucket, "Key": "src"},
                   MetadataDirective="REPLACE", Metadata={"b": "2"}, ContentType="text/y")
    g = s3.head_object(Bucket=bucket, Key="dst2")
    assert g["Metadata"] == {"b": "2"} and g["ContentType"] == "text/y"
    with pytest.raises(ClientError) as e:
        s3.copy_object(Bucket=bucket, Key="src", CopySource={"Bucket": bucket, "Key": "src"})
    assert code(e) == "InvalidRequest"
    with pytest.raises(ClientError) as e:
        s3.copy_object(Bucket=bucket, Key="dst3", CopySource={"Bucket": bucket, "Key": "src"},
                       CopySourceIfMatch='"bad"')
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    # deleting the source keeps the copy readable (shared blobs are reference counted)
    s3.delete_object(Bucket=bucket, Key="src")
    assert s3.get_object(Bucket=bucket, Key="dst")["Body"].read() == b"copy me" * 20000


def test_multipart_upload(s3: Any, bucket: str) -> None:
    mb = 1024 * 1024
    parts_data = [b"a" * 5 * mb, b"b" * 5 * mb, b"c" * 1234]
    up = s3.create_multipart_upload(Bucket=bucket, Key="mp", ContentType="video/x", Metadata={"m": "1"})
    uid = up["UploadId"]
    etags = []
    for i, data in enumerate(parts_data, 1):
        etags.append(s3.upload_part(Bucket=bucket, Key="mp", UploadId=uid, PartNumber=i, Body=data)["ETag"])
    lp = s3.list_parts(Bucket=bucket, Key="mp", UploadId=uid)
    assert [p["PartNumber"] for p in lp["Parts"]] == [1, 2, 3]
    assert [p["Size"] for p in lp["Parts"]] == [len(d) for d in parts_data]
    ups = s3.list_multipart_uploads(Bucket=bucket)
    assert [u["UploadId"] for u in ups["Uploads"]] == [uid]
    r = s3.complete_multipart_upload(Bucket=bucket, Key="mp", UploadId=uid, MultipartUpload={
        "Parts": [{"PartNumber": i, "ETag": e} for i, e in enumerate(etags, 1)]})
    md5s = b"".join(hashlib.md5(d).digest() for d in parts_data)
    assert r["ETag"] == f'"{hashlib.md5(md5s).hexdigest()}-3"'
    g = s3.get_object(Bucket=bucket, Key="mp")
    assert g["Body"].read() == b"".join(parts_data)
    assert g["ContentType"] == "video/x" and g["Metadata"] == {"m": "1"}
    assert g["ETag"] == r["ETag"]
    # a range spanning two parts
    rng = s3.get_object(Bucket=bucket, Key="mp", Range=f"bytes={5 * mb - 2}-{5 * mb + 1}")["Body"].read()
    assert rng == b"aabb"
    p2 = s3.get_object(Bucket=bucket, Key="mp", PartNumber=2)
    assert p2["ContentLength"] == 5 * mb and p2["PartsCount"] == 3
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_multipart_errors_and_abort(s3: Any, bucket: str) -> None:
    mb = 1024 * 1024
    uid = s3.create_multipart_upload(Bucket=bucket, Key="bad")["UploadId"]
    e1 = s3.upload_part(Bucket=bucket, Key="bad", UploadId=uid, PartNumber=1, Body=b"x" * 100)["ETag"]
    e2 = s3.upload_part(Bucket=bucket, Key="bad", UploadId=uid, PartNumber=2, Body=b"y" * 100)["ETag"]
    with pytest.raises(ClientError) as e:
        s3.upload_part(Bucket=bucket, Key="bad", UploadId=uid, PartNumber=10001, Body=b"z")
    assert code(e) == "InvalidArgument"
    with pytest.raises(ClientError) as e:
        s3.upload_part(Bucket=bucket, Key="bad", UploadId=uid, PartNumber=0, Body=b"z")
    assert code(e) == "InvalidArgument"
    with pytest.raises(ClientError) as e:  # part 1 is below 5 MiB and not last
        s3.complete_multipart_upload(Bucket=bucket, Key="bad", UploadId=uid, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
    assert code(e) == "EntityTooSmall"
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket=bucket, Key="bad", UploadId=uid, MultipartUpload={
            "Parts": [{"PartNumber": 2, "ETag": e2}, {"PartNumber": 1, "ETag": e1}]})
    assert code(e) == "InvalidPartOrder"
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket=bucket, Key="bad", UploadId=uid, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 3, "ETag": e2}]})
    assert code(e) == "InvalidPart"
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket=bucket, Key="bad", UploadId=uid, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": '"0000"'}]})
    assert code(e) == "InvalidPart"
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=bucket, Key="bad")  # nothing became visible
    s3.abort_multipart_upload(Bucket=bucket, Key="bad", UploadId=uid)
    with pytest.raises(ClientError) as e:
        s3.list_parts(Bucket=bucket, Key="bad", UploadId=uid)
    assert code(e) == "NoSuchUpload"
    with pytest.raises(ClientError) as e:
        s3.upload_part(Bucket=bucket, Key="bad", UploadId=uid, PartNumber=1, Body=b"x")
    assert code(e) == "NoSuchUpload"
    # a single small part is fine (the last part has no minimum)
    uid = s3.create_multipart_upload(Bucket=bucket, Key="one")["UploadId"]
    et = s3.upload_part(Bucket=bucket, Key="one", UploadId=uid, PartNumber=1, Body=b"q" * 10)["ETag"]
    s3.complete_multipart_upload(Bucket=bucket, Key="one", UploadId=uid,
                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": et}]})
    assert s3.get_object(Bucket=bucket, Key="one")["Body"].read() == b"q" * 10
    del mb


def test_upload_part_copy(s3: Any, bucket: str) -> None:
    mb = 1024 * 1024
    src = bytes(range(256)) * (24 * 1024)  # 6 MiB
    s3.put_object(Bucket=bucket, Key="src", Body=src)
    uid = s3.create_multipart_upload(Bucket=bucket, Key="assembled")["UploadId"]
    p1 = s3.upload_part_copy(Bucket=bucket, Key="assembled", UploadId=uid, PartNumber=1,
                             CopySource={"Bucket": bucket, "Key": "src"}, CopySourceRange=f"bytes=0-{5 * mb - 1}")
    p2 = s3.upload_part_copy(Bucket=bucket, Key="assembled", UploadId=uid, PartNumber=2,
                             CopySource={"Bucket": bucket, "Key": "src"},
                             CopySourceRange=f"bytes={5 * mb}-{6 * mb - 1}")
    s3.complete_multipart_upload(Bucket=bucket, Key="assembled", UploadId=uid, MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": p1["CopyPartResult"]["ETag"]},
        {"PartNumber": 2, "ETag": p2["CopyPartResult"]["ETag"]}]})
    assert s3.get_object(Bucket=bucket, Key="assembled")["Body"].read() == src


def test_boto3_transfer_manager(s3: Any, bucket: str, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    data = uuid.uuid4().bytes * (1024 * 1024)  # 16 MiB → multipart with 5 MiB parts
    cfg = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    s3.upload_fileobj(io.BytesIO(data), bucket, "tm", Config=cfg)
    out = io.BytesIO()
    s3.download_fileobj(bucket, "tm", out, Config=cfg)
    assert out.getvalue() == data


def test_aws_cli_roundtrip(s3server: S3Server, tmp_path: Path) -> None:
    name = new_name("cli")
    s3server.aws("s3", "mb", f"s3://{name}")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    (src / "sub").mkdir()
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01" * 5_000_000)  # 10 MB: the CLI uses multipart
    s3server.aws("s3", "sync", str(src), f"s3://{name}/data")
    ls = s3server.aws("s3", "ls", "--recursive", f"s3://{name}").stdout
    assert "data/a.txt" in ls and "data/sub/b.bin" in ls
    dst = tmp_path / "dst"
    s3server.aws("s3", "cp", "--recursive", f"s3://{name}/data", str(dst))
    assert (dst / "a.txt").read_bytes() == b"alpha"
    assert (dst / "sub" / "b.bin").read_bytes() == b"\x00\x01" * 5_000_000
    out = s3server.aws("s3api", "head-object", "--bucket", name, "--key", "data/a.txt").stdout
    assert '"ContentLength": 5' in out
    s3server.aws("s3", "rm", "--recursive", f"s3://{name}")
    s3server.aws("s3", "rb", f"s3://{name}")
    res = s3server.aws("s3api", "head-bucket", "--bucket", name, check=False)
    assert res.returncode != 0
