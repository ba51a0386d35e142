"""SigV4 variants (header, presigned, streaming chunked with and without trailers) and bad input."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import http.client
import time
import zlib
from typing import Any

import boto3
import httpx
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.integration.objectstore.conftest import S3Server


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signed_headers(srv: S3Server, method: str, path: str, headers: dict[str, str], payload_hash: str,
                   amz_date: str | None = None, region: str = "us-east-1") -> tuple[dict[str, str], bytes, str]:
    """Sign like an SDK would (independent of the server's code); returns headers, signing key, scope."""
    now = dt.datetime.now(dt.UTC)
    amz_date = amz_date or now.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    host = f"127.0.0.1:{srv.s3_port}"
    h = {k.lower(): v for k, v in headers.items()} | {"host": host, "x-amz-date": amz_date,
                                                        "x-amz-content-sha256": payload_hash}
    names = sorted(h)
    path, _, query = path.partition("?")
    cq = "&".join(sorted(f"{k}={v}" for k, _, v in (item.partition("=") for item in query.split("&") if item)))
    canonical = "\n".join([method, path, cq, "".join(f"{n}:{h[n].strip()}\n" for n in names), ";".join(names),
                           payload_hash])
    scope = f"{date}/{region}/s3/aws4_request"
    sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + srv.creds["sk"]).encode(), date), region), "s3"), "aws4_request")
    sig = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
    h["authorization"] = (f"AWS4-HMAC-SHA256 Credential={srv.creds['ak']}/{scope}, SignedHeaders={';'.join(names)}, "
                          f"Signature={sig}")
    return h, key, scope


def chunked_body(data: bytes, key: bytes, scope: str, amz_date: str, seed: str, chunk: int, signed: bool,
                 trailer: tuple[str, str] | None, sign_trailer: bool, corrupt: bool = False) -> bytes:
    out = []
    prev = seed
    empty = hashlib.sha256(b"").hexdigest()
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] + [b""]
    for i, piece in enumerate(pieces):
        if signed:
            sts = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, prev, empty,
                             hashlib.sha256(piece).hexdigest()])
            sig = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
            prev = sig
            if corrupt and i == 1:
                piece = b"X" + piece[1:]
            out.append(f"{len(piece):x};chunk-signature={sig}\r\n".encode() + piece + (b"\r\n" if piece else b""))
        else:
            out.append(f"{len(piece):x}\r\n".encode() + piece + (b"\r\n" if piece else b""))
    if trailer is not None:
        name, value = trailer
        out.append(f"{name}:{value}\r\n".encode())
        if sign_trailer:
            digest = hashlib.sha256(f"{name}:{value}\n".encode()).hexdigest()
            sts = "\n".join(["AWS4-HMAC-SHA256-TRAILER", amz_date, scope, prev, digest])
            out.append(f"x-amz-trailer-signature:{hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()}\r\n"
                       .encode())
    out.append(b"\r\n")
    return b"".join(out)


def put_streaming(srv: S3Server, bucket: str, key: str, data: bytes, mode: str, trailer_alg: str | None = None,
                  corrupt: bool = False, bad_trailer: bool = False) -> httpx.Response:
    path = f"/{bucket}/{key}"
    extra = {"content-encoding": "aws-chunked", "x-amz-decoded-content-length": str(len(data))}
    trailer = None
    if trailer_alg:
        extra["x-amz-trailer"] = f"x-amz-checksum-{trailer_alg}"
        value = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
        if bad_trailer:
            value = base64.b64encode(b"\x00\x00\x00\x00").decode()
        trailer = (f"x-amz-checksum-{trailer_alg}", value)
    h, skey, scope = signed_headers(srv, "PUT", path, extra, mode)
    seed = h["authorization"].rsplit("Signature=", 1)[1]
    body = chunked_body(data, skey, scope, h["x-amz-date"], seed, 8192, mode != "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                        trailer, mode.endswith("PAYLOAD-TRAILER") and "UNSIGNED" not in mode, corrupt)
    h["content-length"] = str(len(body))
    return httpx.put(srv.url + path, headers=h, content=body)


@pytest.mark.parametrize("mode,trailer", [("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", None),
                                          ("STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER", "crc32"),
                                          ("STREAMING-UNSIGNED-PAYLOAD-TRAILER", "crc32")])
def test_streaming_payloads(s3server: S3Server, s3: Any, bucket: str, mode: str, trailer: str | None) -> None:
    data = bytes(range(256)) * 300  # 76,800 bytes: several 8 KiB chunks
    r = put_streaming(s3server, bucket, "streamed", data, mode, trailer)
    assert r.status_code == 200, r.text
    assert s3.get_object(Bucket=bucket, Key="streamed")["Body"].read() == data
    # a corrupted chunk or a wrong trailer checksum fails and leaves the previous object intact
    if mode != "STREAMING-UNSIGNED-PAYLOAD-TRAILER":
        r = put_streaming(s3server, bucket, "streamed", b"z" * len(data), mode, trailer, corrupt=True)
        assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content
    if trailer:
        r = put_streaming(s3server, bucket, "streamed", b"y" * len(data), mode, trailer, bad_trailer=True)
        assert r.status_code in (400, 403), r.text
        assert b"BadDigest" in r.content or b"SignatureDoesNotMatch" in r.content
    assert s3.get_object(Bucket=bucket, Key="streamed")["Body"].read() == data


def test_unsigned_payload_and_checksums(s3server: S3Server, s3: Any, bucket: str) -> None:
    data = b"unsigned body"
    h, _, _ = signed_headers(s3server, "PUT", f"/{bucket}/u", {}, "UNSIGNED-PAYLOAD")
    assert httpx.put(f"{s3server.url}/{bucket}/u", headers=h, content=data).status_code == 200
    assert s3.get_object(Bucket=bucket, Key="u")["Body"].read() == data
    # wrong x-amz-content-sha256
    h, _, _ = signed_headers(s3server, "PUT", f"/{bucket}/u", {}, hashlib.sha256(b"other").hexdigest())
    r = httpx.put(f"{s3server.url}/{bucket}/u", headers=h, content=data)
    assert r.status_code == 400 and b"XAmzContentSHA256Mismatch" in r.content
    # checksum headers computed by boto3 and verified by the server
    import google_crc32c

    crc32c = base64.b64encode(google_crc32c.value(b"checked").to_bytes(4, "big")).decode()
    r = s3.put_object(Bucket=bucket, Key="ck-CRC32C", Body=b"checked", ChecksumCRC32C=crc32c)
    assert r["ChecksumCRC32C"] == crc32c
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="ck-bad", Body=b"checked!", ChecksumCRC32C=crc32c)
    assert code(e) == "BadDigest"
    for alg in ("CRC32", "SHA256", "SHA1"):
        r = s3.put_object(Bucket=bucket, Key=f"ck-{alg}", Body=b"checked", ChecksumAlgorithm=alg)
        assert r[f"Checksum{alg}"]
        got = s3.get_object(Bucket=bucket, Key=f"ck-{alg}", ChecksumMode="ENABLED")
        assert got[f"Checksum{alg}"] == r[f"Checksum{alg}"]
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="ck-bad", Body=b"checked", ChecksumCRC32="AAAAAA==")
    assert code(e) == "BadDigest"
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="ck-bad", Body=b"checked", ContentMD5=base64.b64encode(b"0" * 16).decode())
    assert code(e) == "BadDigest"
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=bucket, Key="ck-bad")


def test_signature_errors(s3server: S3Server, bucket: str) -> None:
    bad = boto3.client("s3", endpoint_url=s3server.url, aws_access_key_id=s3server.creds["ak"],
                       aws_secret_access_key="wrong-secret", region_name="us-east-1",
                       config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    with pytest.raises(ClientError) as e:
        bad.put_object(Bucket=bucket, Key="x", Body=b"1")
    assert code(e) == "SignatureDoesNotMatch"
    assert e.value.response["ResponseMetadata"]["RequestId"]
    unknown = boto3.client("s3", endpoint_url=s3server.url, aws_access_key_id="HBKNOPE", aws_secret_access_key="x",
                           region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
    with pytest.raises(ClientError) as e:
        unknown.list_buckets()
    assert code(e) == "InvalidAccessKeyId"
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=20)).strftime("%Y%m%dT%H%M%SZ")
    h, _, _ = signed_headers(s3server, "GET", f"/{bucket}", {}, hashlib.sha256(b"").hexdigest(), amz_date=old)
    r = httpx.get(f"{s3server.url}/{bucket}", headers=h)
    assert r.status_code == 403 and b"RequestTimeTooSkewed" in r.content
    r = httpx.get(f"{s3server.url}/{bucket}", headers={"Authorization": "AWS4-HMAC-SHA256 garbage"})
    assert r.status_code == 400 and b"AuthorizationHeaderMalformed" in r.content
    r = httpx.put(f"{s3server.url}/{bucket}/anon", content=b"x")
    assert r.status_code == 403 and b"AccessDenied" in r.content and b"<RequestId>" in r.content


def test_presigned_urls(s3server: S3Server, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="p", Body=b"presigned!")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "p"}, ExpiresIn=60)
    assert httpx.get(url).content == b"presigned!"
    assert httpx.get(url.replace("Signature=", "Signature=0")).status_code == 403
    put_url = s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "up"}, ExpiresIn=60)
    assert httpx.put(put_url, content=b"via presigned put").status_code == 200
    assert s3.get_object(Bucket=bucket, Key="up")["Body"].read() == b"via presigned put"
    short = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "p"}, ExpiresIn=1)
    time.sleep(2.1)
    r = httpx.get(short)
    assert r.status_code == 403 and b"Request has expired" in r.content
    # the aws CLI's presign works too
    out = s3server.aws("s3", "presign", f"s3://{bucket}/p", "--expires-in", "60").stdout.strip()
    assert httpx.get(out).content == b"presigned!"


def test_virtual_host_addressing(s3server: S3Server, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="v/h.txt", Body=b"vhost")
    creds = Credentials(s3server.creds["ak"], s3server.creds["sk"])
    host = f"{bucket}.s3.localhost:{s3server.s3_port}"
    req = AWSRequest(method="GET", url=f"http://{host}/v/h.txt", headers={"host": host})
    S3SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
    headers = dict(req.headers.items())
    conn = http.client.HTTPConnection("127.0.0.1", s3server.s3_port)
    conn.request("GET", "/v/h.txt", headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"vhost"


def _raw(srv: S3Server, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send a request with the path exactly as given (no client-side normalisation)."""
    payload = hashlib.sha256(body).hexdigest()
    h, _, _ = signed_headers(srv, method, path, {"content-length": str(len(body))}, payload)
    conn = http.client.HTTPConnection("127.0.0.1", srv.s3_port)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for k, v in h.items():
        conn.putheader(k, v)
    conn.endheaders(body)
    r = conn.getresponse()
    return r.status, r.read()


@pytest.mark.parametrize("key", ["../etc/passwd", "a/../../b", "./x", "a/./b", "%2E%2E/secret", "a%00b",
                                 "%2Fabsolute"])
def test_bad_keys_rejected(s3server: S3Server, s3: Any, bucket: str, key: str) -> None:
    status, body = _raw(s3server, "PUT", f"/{bucket}/{key}", b"evil")
    assert status == 400 and b"InvalidArgument" in body, body
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_limits(s3: Any, bucket: str) -> None:
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="k" * 1025, Body=b"x")
    assert code(e) == "KeyTooLongError"
    s3.put_object(Bucket=bucket, Key="k" * 1024, Body=b"x")  # the limit itself is fine
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="meta", Body=b"x", Metadata={"big": "v" * 2100})
    assert code(e) == "MetadataTooLarge"
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="sc", Body=b"x", StorageClass="NOPE")  # type: ignore[arg-type]
    assert code(e) == "InvalidStorageClass"
    keys = [c["Key"] for c in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["k" * 1024]


def test_malformed_xml(s3server: S3Server, bucket: str) -> None:
    for body in (b"<Delete><Object><Key>a</Key>", b"not xml at all", b"<?xml version='1.0'?><!DOCTYPE x "
                 b"[<!ENTITY a 'b'>]><Delete/>", b"<Wrong/>"):
        status, out = _raw(s3server, "POST", f"/{bucket}?delete", body)
        assert status == 400 and b"MalformedXML" in out, out
    status, out = _raw(s3server, "PUT", f"/{bucket}?versioning", b"<VersioningConfiguration><Status>Maybe"
                                                                 b"</Status></VersioningConfiguration>")
    assert status == 400 and b"IllegalVersioningConfigurationException" in out


def test_sigv2_presigned_and_header(s3server: S3Server, s3: Any, bucket: str) -> None:
    """boto3 presigns with Signature Version 2 unless configured for s3v4: such URLs work too."""
    s3.put_object(Bucket=bucket, Key="v2 key", Body=b"legacy")
    legacy = boto3.client("s3", endpoint_url=s3server.url, aws_access_key_id=s3server.creds["ak"],
                          aws_secret_access_key=s3server.creds["sk"], region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}))
    url = legacy.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "v2 key"}, ExpiresIn=60)
    assert "AWSAccessKeyId=" in url
    assert httpx.get(url).content == b"legacy"
    listing = legacy.generate_presigned_url("list_objects_v2", Params={"Bucket": bucket}, ExpiresIn=60)
    assert b"v2%20key" in httpx.get(listing).content  # boto3 asks for encoding-type=url
    assert httpx.get(url.replace("Signature=", "Signature=x")).status_code == 403
    v2 = boto3.client("s3", endpoint_url=s3server.url, aws_access_key_id=s3server.creds["ak"],
                      aws_secret_access_key=s3server.creds["sk"], region_name="us-east-1",
                      config=Config(signature_version="s3", s3={"addressing_style": "path"}))
    v2.put_object(Bucket=bucket, Key="by-v2", Body=b"header auth v2", Metadata={"a": "b"})
    assert v2.get_object(Bucket=bucket, Key="by-v2")["Body"].read() == b"header auth v2"
