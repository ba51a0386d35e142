"""Multipart checksums (COMPOSITE vs FULL_OBJECT, CRC64NVME), GetObjectAttributes, partNumber reads and
multipart edge cases (part order, re-sent parts, small parts, UploadPartCopy ranges), against a real server
whose minimum part size is small so that multi-part objects stay small."""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.integration.objectstore.conftest import S3Server, server_env

MIN_PART = 1024


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    state = tmp_path_factory.mktemp("s3list-parts")
    server = S3Server(state, server_env(state, HACKBOOT_S3_MIN_PART_SIZE=str(MIN_PART)))
    server.provision()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def c(srv: S3Server) -> Any:
    return srv.client()


@pytest.fixture()
def bk(c: Any) -> str:
    name = f"ck-{uuid.uuid4().hex[:12]}"
    c.create_bucket(Bucket=name)
    return name


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def status(exc: pytest.ExceptionInfo[ClientError]) -> int:
    return int(exc.value.response["ResponseMetadata"]["HTTPStatusCode"])


# independent CRC implementations (bit at a time), so the server's own code is not its own oracle
_POLY = {"CRC32": (0xEDB88320, 32), "CRC32C": (0x82F63B78, 32), "CRC64NVME": (0x9A6C9329AC4BC9B5, 64)}


def crc_b64(alg: str, data: bytes) -> str:
    if alg == "CRC32":
        return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    poly, width = _POLY[alg]
    mask = (1 << width) - 1
    crc = mask
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
    return base64.b64encode((crc ^ mask).to_bytes(width // 8, "big")).decode()


def signed(srv: S3Server, method: str, path: str, headers: dict[str, str] | None = None,
           body: bytes = b"") -> httpx.Response:
    """A raw SigV4-signed request (for what boto3 cannot send without the CRT, e.g. CRC64NVME)."""
    url = srv.url + path
    h = {"x-amz-content-sha256": hashlib.sha256(body).hexdigest()} | (headers or {})
    req = AWSRequest(method=method, url=url, data=body, headers=h)
    S3SigV4Auth(Credentials(srv.creds["ak"], srv.creds["sk"]), "s3", "us-east-1").add_auth(req)
    return httpx.request(method, url, headers=dict(req.headers.items()), content=body, timeout=30)


def upload(c: Any, bucket: str, key: str, parts: list[bytes], alg: str | None = None,
           ck_type: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    kw: dict[str, Any] = {}
    if alg:
        kw["ChecksumAlgorithm"] = alg
    if ck_type:
        kw["ChecksumType"] = ck_type
    up = c.create_multipart_upload(Bucket=bucket, Key=key, **kw)
    if alg:
        assert up["ChecksumAlgorithm"] == alg
        assert up["ChecksumType"] == (ck_type or "COMPOSITE")
    done = []
    for n, data in enumerate(parts, 1):
        r = c.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=n, Body=data,
                          **({"ChecksumAlgorithm": alg} if alg else {}))
        entry = {"PartNumber": n, "ETag": r["ETag"]}
        if alg:
            entry["Checksum" + alg] = r["Checksum" + alg]
        done.append(entry)
    return up["UploadId"], done


# --- COMPOSITE and FULL_OBJECT --------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["CRC32"])  # CRC32C and CRC64NVME need the CRT in boto3: raw requests below
def test_full_object_crc_of_a_multipart_upload_is_the_crc_of_the_whole_data(c: Any, bk: str, alg: str) -> None:
    parts = [os.urandom(MIN_PART + 17), os.urandom(MIN_PART), b"tail"]
    upload_id, done = upload(c, bk, "full", parts, alg, "FULL_OBJECT")
    whole = crc_b64(alg, b"".join(parts))
    r = c.complete_multipart_upload(Bucket=bk, Key="full", UploadId=upload_id, MultipartUpload={"Parts": done},
                                    ChecksumType="FULL_OBJECT", **{"Checksum" + alg: whole})
    assert r["Checksum" + alg] == whole and r["ChecksumType"] == "FULL_OBJECT"
    head = c.head_object(Bucket=bk, Key="full", ChecksumMode="ENABLED")
    assert head["Checksum" + alg] == whole and head["ChecksumType"] == "FULL_OBJECT"
    got = c.get_object(Bucket=bk, Key="full", ChecksumMode="ENABLED")  # botocore validates it while reading
    assert got["Body"].read() == b"".join(parts)
    attrs = c.get_object_attributes(Bucket=bk, Key="full", ObjectAttributes=["Checksum", "ObjectParts"])
    assert attrs["Checksum"] == {"Checksum" + alg: whole, "ChecksumType": "FULL_OBJECT"}
    assert attrs["ObjectParts"]["TotalPartsCount"] == 3


def test_full_object_checksum_sent_at_completion_must_match(c: Any, bk: str) -> None:
    parts = [os.urandom(MIN_PART), b"end"]
    upload_id, done = upload(c, bk, "bad", parts, "CRC32", "FULL_OBJECT")
    wrong = crc_b64("CRC32", b"something else")
    with pytest.raises(ClientError) as e:
        c.complete_multipart_upload(Bucket=bk, Key="bad", UploadId=upload_id, MultipartUpload={"Parts": done},
                                    ChecksumCRC32=wrong)
    assert code(e) == "BadDigest"
    with pytest.raises(ClientError) as e:  # the type asserted must be the upload's
        c.complete_multipart_upload(Bucket=bk, Key="bad", UploadId=upload_id, MultipartUpload={"Parts": done},
                                    ChecksumType="COMPOSITE")
    assert code(e) == "InvalidRequest"
    with pytest.raises(ClientError) as e:
        c.complete_multipart_upload(Bucket=bk, Key="bad", UploadId=upload_id, MultipartUpload={"Parts": done},
                                    MpuObjectSize=1)
    assert code(e) == "InvalidRequest"
    with pytest.raises(ClientError) as e:
        c.head_object(Bucket=bk, Key="bad")
    assert status(e) == 404  # nothing was made; the upload is still there and completes
    r = c.complete_multipart_upload(Bucket=bk, Key="bad", UploadId=upload_id, MultipartUpload={"Parts": done},
                                    MpuObjectSize=MIN_PART + 3)
    assert r["ChecksumCRC32"] == crc_b64("CRC32", b"".join(parts))


@pytest.mark.parametrize("alg", ["CRC32", "SHA256"])
def test_composite_checksum_is_checksum_of_part_checksums_with_count(c: Any, bk: str, alg: str) -> None:
    parts = [os.urandom(MIN_PART), os.urandom(10)]
    upload_id, done = upload(c, bk, "comp", parts, alg)
    r = c.complete_multipart_upload(Bucket=bk, Key="comp", UploadId=upload_id, MultipartUpload={"Parts": done})
    raw = b"".join(base64.b64decode(p["Checksum" + alg]) for p in done)
    inner = crc_b64(alg, raw) if alg == "CRC32" else base64.b64encode(hashlib.sha256(raw).digest()).decode()
    assert r["Checksum" + alg] == f"{inner}-2" and r["ChecksumType"] == "COMPOSITE"
    head = c.head_object(Bucket=bk, Key="comp", ChecksumMode="ENABLED")
    assert head["Checksum" + alg] == f"{inner}-2" and head["ChecksumType"] == "COMPOSITE"
    attrs = c.get_object_attributes(Bucket=bk, Key="comp", ObjectAttributes=["Checksum", "ObjectParts", "ETag",
                                                                            "ObjectSize", "StorageClass"])
    assert attrs["Checksum"] == {"Checksum" + alg: inner, "ChecksumType": "COMPOSITE"}
    assert attrs["ETag"] == r["ETag"].strip('"') and attrs["ETag"].endswith("-2")
    assert attrs["ObjectSize"] == MIN_PART + 10 and attrs["StorageClass"] == "STANDARD"
    op = attrs["ObjectParts"]
    assert op["TotalPartsCount"] == 2 and op["IsTruncated"] is False
    assert [(p["PartNumber"], p["Size"], p["Checksum" + alg]) for p in op["Parts"]] == \
        [(1, MIN_PART, done[0]["Checksum" + alg]), (2, 10, done[1]["Checksum" + alg])]
    # a page of parts
    page = c.get_object_attributes(Bucket=bk, Key="comp", ObjectAttributes=["ObjectParts"], MaxParts=1)
    assert page["ObjectParts"]["IsTruncated"] is True and page["ObjectParts"]["NextPartNumberMarker"] == 1
    assert [p["PartNumber"] for p in page["ObjectParts"]["Parts"]] == [1]
    page = c.get_object_attributes(Bucket=bk, Key="comp", ObjectAttributes=["ObjectParts"], PartNumberMarker=1)
    assert [p["PartNumber"] for p in page["ObjectParts"]["Parts"]] == [2]
    assert page["ObjectParts"]["PartNumberMarker"] == 1 and page["ObjectParts"]["IsTruncated"] is False


@pytest.mark.parametrize(("alg", "ck_type"), [("SHA256", "FULL_OBJECT"), ("SHA1", "FULL_OBJECT"),
                                              ("CRC64NVME", "COMPOSITE")])
def test_checksum_type_not_offered_for_the_algorithm(srv: S3Server, bk: str, alg: str, ck_type: str) -> None:
    r = signed(srv, "POST", f"/{bk}/k?uploads", {"x-amz-checksum-algorithm": alg, "x-amz-checksum-type": ck_type})
    assert r.status_code == 400 and b"<Code>InvalidRequest</Code>" in r.content


def test_checksum_type_needs_an_algorithm_and_a_known_value(srv: S3Server, bk: str) -> None:
    r = signed(srv, "POST", f"/{bk}/k?uploads", {"x-amz-checksum-type": "FULL_OBJECT"})
    assert r.status_code == 400 and b"InvalidRequest" in r.content
    r = signed(srv, "POST", f"/{bk}/k?uploads", {"x-amz-checksum-algorithm": "CRC32", "x-amz-checksum-type": "BOTH"})
    assert r.status_code == 400 and b"InvalidRequest" in r.content


def _upload_id(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.text.split("<UploadId>")[1].split("</UploadId>")[0]


@pytest.mark.parametrize(("alg", "ck_type"), [("CRC64NVME", None), ("CRC32C", "FULL_OBJECT")])
def test_full_object_crc64nvme_and_crc32c(srv: S3Server, c: Any, bk: str, alg: str, ck_type: str | None) -> None:
    """Raw requests (boto3 needs the CRT for these two); CRC64NVME is FULL_OBJECT without being asked."""
    h = {"x-amz-checksum-algorithm": alg} | ({"x-amz-checksum-type": ck_type} if ck_type else {})
    r = signed(srv, "POST", f"/{bk}/nv?uploads", h)
    upload_id = _upload_id(r)
    assert r.headers["x-amz-checksum-type"] == "FULL_OBJECT"
    name = "x-amz-checksum-" + alg.lower()
    parts = [os.urandom(MIN_PART), os.urandom(300)]
    xml = ""
    for n, data in enumerate(parts, 1):
        ck = crc_b64(alg, data)
        pr = signed(srv, "PUT", f"/{bk}/nv?partNumber={n}&uploadId={upload_id}", {name: ck}, data)
        assert pr.status_code == 200 and pr.headers[name] == ck
        xml += f"<Part><PartNumber>{n}</PartNumber><ETag>{pr.headers['etag']}</ETag></Part>"
    # a part with a wrong checksum is refused and changes nothing
    bad = signed(srv, "PUT", f"/{bk}/nv?partNumber=2&uploadId={upload_id}", {name: crc_b64(alg, b"x")}, parts[1])
    assert bad.status_code == 400 and b"BadDigest" in bad.content
    body = f"<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>".encode()
    whole = crc_b64(alg, b"".join(parts))
    done = signed(srv, "POST", f"/{bk}/nv?uploadId={upload_id}", {name: whole}, body)
    assert done.status_code == 200, done.text
    assert f"<Checksum{alg}>{whole}</Checksum{alg}>" in done.text
    assert "<ChecksumType>FULL_OBJECT</ChecksumType>" in done.text
    head = signed(srv, "HEAD", f"/{bk}/nv", {"x-amz-checksum-mode": "ENABLED"})
    assert head.headers[name] == whole and head.headers["x-amz-checksum-type"] == "FULL_OBJECT"
    assert c.get_object(Bucket=bk, Key="nv")["Body"].read() == b"".join(parts)


def test_crc64nvme_single_put(srv: S3Server, bk: str) -> None:
    data = os.urandom(5000)
    ck = crc_b64("CRC64NVME", data)
    r = signed(srv, "PUT", f"/{bk}/one", {"x-amz-checksum-crc64nvme": ck}, data)
    assert r.status_code == 200 and r.headers["x-amz-checksum-crc64nvme"] == ck
    r = signed(srv, "PUT", f"/{bk}/two", {"x-amz-checksum-crc64nvme": crc_b64("CRC64NVME", b"no")}, data)
    assert r.status_code == 400 and b"BadDigest" in r.content


def test_part_without_checksum_gets_the_uploads_algorithm(c: Any, bk: str) -> None:
    """A FULL_OBJECT upload whose parts came without a checksum: the server computes them, and completion
    still yields the whole object's CRC."""
    up = c.create_multipart_upload(Bucket=bk, Key="k", ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT")
    parts = [os.urandom(MIN_PART), b"last"]
    done = []
    for n, data in enumerate(parts, 1):
        r = c.upload_part(Bucket=bk, Key="k", UploadId=up["UploadId"], PartNumber=n, Body=data)
        assert r["ChecksumCRC32"] == crc_b64("CRC32", data)
        done.append({"PartNumber": n, "ETag": r["ETag"]})
    listed = c.list_parts(Bucket=bk, Key="k", UploadId=up["UploadId"])
    assert listed["ChecksumAlgorithm"] == "CRC32" and listed["ChecksumType"] == "FULL_OBJECT"
    r = c.complete_multipart_upload(Bucket=bk, Key="k", UploadId=up["UploadId"], MultipartUpload={"Parts": done})
    assert r["ChecksumCRC32"] == crc_b64("CRC32", b"".join(parts))


def test_reuploaded_part_with_another_checksum_last_wins(c: Any, bk: str) -> None:
    up = c.create_multipart_upload(Bucket=bk, Key="k", ChecksumAlgorithm="CRC32")
    uid = up["UploadId"]
    first = c.upload_part(Bucket=bk, Key="k", UploadId=uid, PartNumber=1, Body=b"a" * MIN_PART,
                          ChecksumAlgorithm="CRC32")
    second = c.upload_part(Bucket=bk, Key="k", UploadId=uid, PartNumber=1, Body=b"b" * MIN_PART,
                           ChecksumAlgorithm="CRC32")
    assert first["ChecksumCRC32"] != second["ChecksumCRC32"]
    assert [p["ChecksumCRC32"] for p in c.list_parts(Bucket=bk, Key="k", UploadId=uid)["Parts"]] == \
        [second["ChecksumCRC32"]]
    with pytest.raises(ClientError) as e:  # the first upload's checksum no longer names the part
        c.complete_multipart_upload(Bucket=bk, Key="k", UploadId=uid, MultipartUpload={"Parts": [
            {"PartNumber": 1, "ETag": second["ETag"], "ChecksumCRC32": first["ChecksumCRC32"]}]})
    assert code(e) == "InvalidPart"
    with pytest.raises(ClientError) as e:  # nor its ETag
        c.complete_multipart_upload(Bucket=bk, Key="k", UploadId=uid, MultipartUpload={"Parts": [
            {"PartNumber": 1, "ETag": first["ETag"], "ChecksumCRC32": second["ChecksumCRC32"]}]})
    assert code(e) == "InvalidPart"
    c.complete_multipart_upload(Bucket=bk, Key="k", UploadId=uid, MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": second["ETag"], "ChecksumCRC32": second["ChecksumCRC32"]}]})
    assert c.get_object(Bucket=bk, Key="k")["Body"].read() == b"b" * MIN_PART


# --- partNumber reads -----------------------------------------------------------------------------

def test_part_number_reads(c: Any, bk: str) -> None:
    parts = [os.urandom(MIN_PART + 5), os.urandom(MIN_PART), b"xyz"]
    upload_id, done = upload(c, bk, "mp", parts, "SHA256")
    c.complete_multipart_upload(Bucket=bk, Key="mp", UploadId=upload_id, MultipartUpload={"Parts": done})
    offset = 0
    for n, data in enumerate(parts, 1):
        r = c.get_object(Bucket=bk, Key="mp", PartNumber=n)
        assert r["Body"].read() == data and r["PartsCount"] == 3
        assert r["ContentRange"] == f"bytes {offset}-{offset + len(data) - 1}/{sum(map(len, parts))}"
        assert r["ResponseMetadata"]["HTTPStatusCode"] == 206
        h = c.head_object(Bucket=bk, Key="mp", PartNumber=n, ChecksumMode="ENABLED")
        assert h["ContentLength"] == len(data) and h["PartsCount"] == 3
        assert h["ChecksumSHA256"] == done[n - 1]["ChecksumSHA256"]  # the part's own checksum
        offset += len(data)
    with pytest.raises(ClientError) as e:
        c.get_object(Bucket=bk, Key="mp", PartNumber=4)
    assert code(e) == "InvalidPartNumber" and status(e) == 416
    with pytest.raises(ClientError) as e:
        c.get_object(Bucket=bk, Key="mp", PartNumber=1, Range="bytes=0-1")
    assert code(e) == "InvalidRequest"


def test_part_number_reads_of_a_plain_object(c: Any, bk: str) -> None:
    c.put_object(Bucket=bk, Key="plain", Body=b"whole object")
    r = c.get_object(Bucket=bk, Key="plain", PartNumber=1)
    assert r["Body"].read() == b"whole object"
    assert "PartsCount" not in r
    with pytest.raises(ClientError) as e:
        c.get_object(Bucket=bk, Key="plain", PartNumber=2)
    assert code(e) == "InvalidPartNumber" and status(e) == 416
    with pytest.raises(ClientError) as e:
        c.head_object(Bucket=bk, Key="plain", PartNumber=2)
    assert status(e) == 416
    attrs = c.get_object_attributes(Bucket=bk, Key="plain", ObjectAttributes=["ObjectParts", "ObjectSize"])
    assert "ObjectParts" not in attrs and attrs["ObjectSize"] == 12


# --- multipart edge cases -------------------------------------------------------------------------

def test_parts_uploaded_out_of_order_and_resent(c: Any, bk: str) -> None:
    uid = c.create_multipart_upload(Bucket=bk, Key="k")["UploadId"]
    etags = {}
    for n, data in [(3, b"three"), (1, b"1" * MIN_PART), (2, b"old" * MIN_PART), (2, b"2" * MIN_PART)]:
        etags[n] = c.upload_part(Bucket=bk, Key="k", UploadId=uid, PartNumber=n, Body=data)["ETag"]
    listed = c.list_parts(Bucket=bk, Key="k", UploadId=uid)["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in listed] == [(1, MIN_PART), (2, MIN_PART), (3, 5)]
    descending = [{"PartNumber": n, "ETag": etags[n]} for n in (2, 1, 3)]
    with pytest.raises(ClientError) as e:
        c.complete_multipart_upload(Bucket=bk, Key="k", UploadId=uid, MultipartUpload={"Parts": descending})
    assert code(e) == "InvalidPartOrder"
    repeated = [{"PartNumber": n, "ETag": etags[n]} for n in (1, 2, 2, 3)]
    with pytest.raises(ClientError) as e:
        c.complete_multipart_upload(Bucket=bk, Key="k", UploadId=uid, MultipartUpload={"Parts": repeated})
    assert code(e) == "InvalidPartOrder"
    c.complete_multipart_upload(Bucket=bk, Key="k", UploadId=uid, MultipartUpload={"Parts": [
        {"PartNumber": n, "ETag": etags[n]} for n in (1, 2, 3)]})
    assert c.get_object(Bucket=bk, Key="k")["Body"].read() == b"1" * MIN_PART + b"2" * MIN_PART + b"three"


def test_small_parts_rule(c: Any, bk: str) -> None:
    uid = c.create_multipart_upload(Bucket=bk, Key="k")["UploadId"]
    e1 = c.upload_part(Bucket=bk, Key="k", UploadId=uid, PartNumber=1, Body=b"a" * (MIN_PART - 1))["ETag"]
    e2 = c.upload_part(Bucket=bk, Key="k", UploadId=uid, PartNumber=2, Body=b"b")["ETag"]
    with pytest.raises(ClientError) as e:
        c.complete_multipart_upload(Bucket=bk, Key="k", UploadId=uid, MultipartUpload={"Parts": [
            {"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
    assert code(e) == "EntityTooSmall"
    # the last part may be small, and so may the only one
    c.complete_multipart_upload(Bucket=bk, Key="k", UploadId=uid, MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": e1}]})
    assert c.head_object(Bucket=bk, Key="k")["ContentLength"] == MIN_PART - 1


@pytest.mark.parametrize(("rng", "want"), [("bytes=0-99", "InvalidRange"), ("bytes=50-60", "InvalidRange"),
                                           ("bytes=5-2", "InvalidArgument"), ("bytes=abc", "InvalidArgument"),
                                           ("0-3", "InvalidArgument"), ("bytes=-3", "InvalidArgument"),
                                           ("bytes=1-", "InvalidArgument")])
def test_upload_part_copy_invalid_ranges(c: Any, bk: str, rng: str, want: str) -> None:
    c.put_object(Bucket=bk, Key="src", Body=b"0123456789" * 5)  # 50 bytes
    uid = c.create_multipart_upload(Bucket=bk, Key="dst")["UploadId"]
    with pytest.raises(ClientError) as e:
        c.upload_part_copy(Bucket=bk, Key="dst", UploadId=uid, PartNumber=1,
                           CopySource={"Bucket": bk, "Key": "src"}, CopySourceRange=rng)
    assert code(e) == want and status(e) == (416 if want == "InvalidRange" else 400)
    assert c.list_parts(Bucket=bk, Key="dst", UploadId=uid).get("Parts", []) == []


def test_upload_part_copy_valid_range_and_checksum(c: Any, bk: str) -> None:
    c.put_object(Bucket=bk, Key="src", Body=b"0123456789" * 5)
    uid = c.create_multipart_upload(Bucket=bk, Key="dst", ChecksumAlgorithm="CRC32",
                                    ChecksumType="FULL_OBJECT")["UploadId"]
    r = c.upload_part_copy(Bucket=bk, Key="dst", UploadId=uid, PartNumber=1, CopySource={"Bucket": bk, "Key": "src"},
                           CopySourceRange="bytes=10-49")
    assert r["CopyPartResult"]["ChecksumCRC32"] == crc_b64("CRC32", (b"0123456789" * 5)[10:])
    done = c.complete_multipart_upload(Bucket=bk, Key="dst", UploadId=uid, MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": r["CopyPartResult"]["ETag"]}]})
    assert done["ChecksumCRC32"] == crc_b64("CRC32", (b"0123456789" * 5)[10:])
    assert c.get_object(Bucket=bk, Key="dst")["Body"].read() == (b"0123456789" * 5)[10:]


def test_object_attributes_names_and_sse_c(srv: S3Server, c: Any, bk: str) -> None:
    for header in ("ETag,Colour", "", "etag"):
        r = signed(srv, "GET", f"/{bk}/missing?attributes", {"x-amz-object-attributes": header})
        assert r.status_code == 400 and b"<Code>InvalidArgument</Code>" in r.content
    key = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": b"k" * 32}
    c.put_object(Bucket=bk, Key="secret", Body=b"data", **key)

    def sse_c(raw: bytes) -> dict[str, str]:  # botocore does not encode SSE-C keys for this operation
        return {"x-amz-server-side-encryption-customer-algorithm": "AES256",
                "x-amz-server-side-encryption-customer-key": base64.b64encode(raw).decode(),
                "x-amz-server-side-encryption-customer-key-md5": base64.b64encode(hashlib.md5(raw).digest()).decode()}

    attrs = {"x-amz-object-attributes": "ObjectSize"}
    r = signed(srv, "GET", f"/{bk}/secret?attributes", attrs)
    assert r.status_code == 400 and b"<Code>InvalidRequest</Code>" in r.content
    r = signed(srv, "GET", f"/{bk}/secret?attributes", attrs | sse_c(b"x" * 32))
    assert r.status_code == 403 and b"<Code>AccessDenied</Code>" in r.content
    r = signed(srv, "GET", f"/{bk}/secret?attributes", attrs | sse_c(b"k" * 32))
    assert r.status_code == 200 and "<ObjectSize>4</ObjectSize>" in r.text


def test_reencrypting_copy_of_a_composite_object_gets_a_full_object_checksum(c: Any, bk: str) -> None:
    parts = [os.urandom(MIN_PART), b"end"]
    upload_id, done = upload(c, bk, "comp", parts, "SHA256")
    c.complete_multipart_upload(Bucket=bk, Key="comp", UploadId=upload_id, MultipartUpload={"Parts": done})
    c.copy_object(Bucket=bk, Key="copy", CopySource={"Bucket": bk, "Key": "comp"}, ServerSideEncryption="AES256")
    head = c.head_object(Bucket=bk, Key="copy", ChecksumMode="ENABLED")
    whole = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
    assert head["ChecksumSHA256"] == whole and head["ChecksumType"] == "FULL_OBJECT"
    assert "PartsCount" not in head
    got = c.get_object(Bucket=bk, Key="copy", ChecksumMode="ENABLED")  # botocore checks it while reading
    assert got["Body"].read() == b"".join(parts)


def test_checksum_type_in_put_copy_and_listings(c: Any, bk: str) -> None:
    r = c.put_object(Bucket=bk, Key="one", Body=b"data", ChecksumAlgorithm="CRC32")
    assert r["ChecksumCRC32"] == crc_b64("CRC32", b"data") and r["ChecksumType"] == "FULL_OBJECT"
    upload_id, done = upload(c, bk, "two", [b"x" * MIN_PART, b"y"], "CRC32")
    c.complete_multipart_upload(Bucket=bk, Key="two", UploadId=upload_id, MultipartUpload={"Parts": done})
    listed = {o["Key"]: o for o in c.list_objects_v2(Bucket=bk)["Contents"]}
    assert (listed["one"]["ChecksumAlgorithm"], listed["one"]["ChecksumType"]) == (["CRC32"], "FULL_OBJECT")
    assert (listed["two"]["ChecksumAlgorithm"], listed["two"]["ChecksumType"]) == (["CRC32"], "COMPOSITE")
    versions = {v["Key"]: v for v in c.list_object_versions(Bucket=bk)["Versions"]}
    assert versions["two"]["ChecksumType"] == "COMPOSITE"
    copied = c.copy_object(Bucket=bk, Key="three", CopySource={"Bucket": bk, "Key": "one"})
    assert copied["CopyObjectResult"]["ChecksumType"] == "FULL_OBJECT"
    assert copied["CopyObjectResult"]["ChecksumCRC32"] == crc_b64("CRC32", b"data")


def test_zero_sized_pages_of_parts_and_uploads_are_not_truncated(c: Any, bk: str) -> None:
    uid = c.create_multipart_upload(Bucket=bk, Key="k")["UploadId"]
    c.upload_part(Bucket=bk, Key="k", UploadId=uid, PartNumber=1, Body=b"x")
    r = c.list_parts(Bucket=bk, Key="k", UploadId=uid, MaxParts=0)
    assert r["IsTruncated"] is False and "Parts" not in r
    r = c.list_multipart_uploads(Bucket=bk, MaxUploads=0)
    assert r["IsTruncated"] is False and "Uploads" not in r
    assert [u["Key"] for u in c.list_multipart_uploads(Bucket=bk, MaxUploads=1)["Uploads"]] == ["k"]
