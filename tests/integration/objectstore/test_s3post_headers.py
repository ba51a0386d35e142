"""Conditional writes (If-Match / If-None-Match on PutObject and CompleteMultipartUpload), header
round-trips (Content-Encoding with aws-chunked, Cache-Control/Expires/Content-Disposition/Content-Language),
non-ASCII metadata, CORS answers and presigned URL expiry bounds."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.integration.objectstore.conftest import S3Server


def err(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    return exc.value.response["Error"]["Code"], exc.value.response["ResponseMetadata"]["HTTPStatusCode"]


def code(r: httpx.Response) -> str:
    return ET.fromstring(r.content).findtext("Code") or ""


def signed_headers(srv: S3Server, method: str, path: str, headers: dict[str, str], payload_hash: str) -> dict[str, str]:
    """Header-signed SigV4 for a body sent by hand (every given header signed)."""
    now = dt.datetime.now(dt.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    h = {k.lower(): v for k, v in headers.items()} | {
        "host": f"127.0.0.1:{srv.s3_port}", "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash}
    names = sorted(h)
    canonical = "\n".join([method, path, "", "".join(f"{n}:{h[n].strip()}\n" for n in names), ";".join(names),
                           payload_hash])
    scope = f"{amz_date[:8]}/us-east-1/s3/aws4_request"
    sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + srv.creds["sk"]).encode()
    for part in (amz_date[:8], "us-east-1", "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    h["authorization"] = (f"AWS4-HMAC-SHA256 Credential={srv.creds['ak']}/{scope}, SignedHeaders={';'.join(names)}, "
                          f"Signature={sig}")
    return h


# --- conditional writes -------------------------------------------------------------------------

def test_put_if_none_match_and_if_match(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    assert err(e) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"1"
    etag = s3.head_object(Bucket=bucket, Key="k")["ETag"]
    s3.put_object(Bucket=bucket, Key="k", Body=b"3", IfMatch=etag)
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="k", Body=b"4", IfMatch=etag)  # the ETag changed
    assert err(e) == ("PreconditionFailed", 412)
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="absent", Body=b"4", IfMatch=etag)
    assert err(e) == ("NoSuchKey", 404)
    # If-None-Match with an ETag is not something S3 does on writes (only "*"): 501, as S3 answers
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="k", Body=b"5", IfNoneMatch=etag)
    assert err(e) == ("NotImplemented", 501)
    # a delete marker is no object: If-None-Match: * succeeds over it
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.delete_object(Bucket=bucket, Key="k")
    s3.put_object(Bucket=bucket, Key="k", Body=b"6", IfNoneMatch="*")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"6"


def _mpu(s3: Any, bucket: str, key: str) -> tuple[str, list[dict[str, Any]]]:
    up = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    etag = s3.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=1, Body=b"part")["ETag"]
    return up, [{"PartNumber": 1, "ETag": etag}]


def test_complete_multipart_conditions(s3: Any, bucket: str) -> None:
    up, parts = _mpu(s3, bucket, "m")
    s3.complete_multipart_upload(Bucket=bucket, Key="m", UploadId=up, MultipartUpload={"Parts": parts},
                                 IfNoneMatch="*")
    up, parts = _mpu(s3, bucket, "m")
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket=bucket, Key="m", UploadId=up, MultipartUpload={"Parts": parts},
                                     IfNoneMatch="*")
    assert err(e) == ("PreconditionFailed", 412)
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket=bucket, Key="m", UploadId=up, MultipartUpload={"Parts": parts},
                                     IfMatch='"0123456789abcdef0123456789abcdef"')
    assert err(e) == ("PreconditionFailed", 412)
    etag = s3.head_object(Bucket=bucket, Key="m")["ETag"]
    out = s3.complete_multipart_upload(Bucket=bucket, Key="m", UploadId=up, MultipartUpload={"Parts": parts},
                                       IfMatch=etag)
    assert out["ETag"].endswith('-1"')
    up, parts = _mpu(s3, bucket, "none")
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket=bucket, Key="none", UploadId=up, MultipartUpload={"Parts": parts},
                                     IfMatch=etag)
    assert err(e) == ("NoSuchKey", 404)


def test_concurrent_create_conflicts(s3server: S3Server, s3: Any, bucket: str) -> None:
    """Two If-None-Match: * uploads of the same new key in flight at once: the first to finish wins; the
    other held its condition when it started, so it answers 409 ConditionalRequestConflict."""
    path = f"/{bucket}/race"
    results: dict[str, httpx.Response] = {}

    def slow_body(tag: bytes, delay: float) -> Iterator[bytes]:
        yield tag
        time.sleep(delay)
        yield b"-end"

    def upload(name: str, delay: float) -> None:
        headers = signed_headers(s3server, "PUT", path, {"if-none-match": "*"}, "UNSIGNED-PAYLOAD")
        headers["content-length"] = str(len(name) + 4)
        results[name] = httpx.put(s3server.url + path, content=slow_body(name.encode(), delay), headers=headers,
                                  timeout=30)

    fast = threading.Thread(target=upload, args=("fast", 0.5))
    slow = threading.Thread(target=upload, args=("slow", 2.0))
    slow.start()
    fast.start()
    fast.join()
    slow.join()
    assert results["fast"].status_code == 200, results["fast"].text
    assert results["slow"].status_code == 409 and code(results["slow"]) == "ConditionalRequestConflict"
    assert s3.get_object(Bucket=bucket, Key="race")["Body"].read() == b"fast-end"
    # started after the first finished: the condition fails up front (412), before the body is read
    r = httpx.put(s3server.url + path, content=b"late",
                  headers=signed_headers(s3server, "PUT", path, {"if-none-match": "*"}, "UNSIGNED-PAYLOAD"))
    assert r.status_code == 412 and code(r) == "PreconditionFailed"


# --- headers ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sent", "stored"), [
    ("aws-chunked,gzip", "gzip"), ("aws-chunked, deflate, gzip", "deflate, gzip"), ("gzip,aws-chunked", "gzip"),
    ("aws-chunked", None)])
def test_aws_chunked_is_stripped_from_content_encoding(s3server: S3Server, s3: Any, bucket: str, sent: str,
                                                       stored: str | None) -> None:
    path = f"/{bucket}/enc"
    mode = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    headers = signed_headers(s3server, "PUT", path, {"content-encoding": sent, "x-amz-decoded-content-length": "3"},
                             mode)
    r = httpx.put(s3server.url + path, content=b"3\r\nabc\r\n0\r\n\r\n", headers=headers)
    assert r.status_code == 200, r.text
    g = s3.get_object(Bucket=bucket, Key="enc")
    assert g["Body"].read() == b"abc" and g.get("ContentEncoding") == stored


def test_content_encoding_kept_as_sent(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="e", Body=b"x", ContentEncoding="deflate, gzip")
    assert s3.head_object(Bucket=bucket, Key="e")["ContentEncoding"] == "deflate, gzip"


def test_content_headers_round_trip(s3: Any, bucket: str) -> None:
    expires = dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    attrs = {"CacheControl": "max-age=3600, must-revalidate", "ContentDisposition": 'attachment; filename="a b.txt"',
             "ContentLanguage": "fr-CH", "ContentEncoding": "identity", "ContentType": "text/csv"}
    s3.put_object(Bucket=bucket, Key="h", Body=b"x", Expires=expires, **attrs)
    for got in (s3.head_object(Bucket=bucket, Key="h"), s3.get_object(Bucket=bucket, Key="h")):
        assert {k: got[k] for k in attrs} == attrs
        assert got["ExpiresString"] == "Tue, 06 May 2031 07:08:09 GMT"
    # response-* overrides on GET (the stored object is unchanged)
    g = s3.get_object(Bucket=bucket, Key="h", ResponseCacheControl="no-store", ResponseContentLanguage="de",
                      ResponseExpires=dt.datetime(2032, 1, 1, tzinfo=dt.UTC), ResponseContentDisposition="inline",
                      ResponseContentEncoding="br", ResponseContentType="text/plain")
    assert (g["CacheControl"], g["ContentLanguage"], g["ContentDisposition"], g["ContentEncoding"],
            g["ContentType"]) == ("no-store", "de", "inline", "br", "text/plain")
    assert g["ExpiresString"] == "Thu, 01 Jan 2032 00:00:00 GMT"
    assert s3.head_object(Bucket=bucket, Key="h")["CacheControl"] == attrs["CacheControl"]
    # copy: COPY keeps them, REPLACE takes the request's (and drops the rest)
    s3.copy_object(Bucket=bucket, Key="c1", CopySource={"Bucket": bucket, "Key": "h"})
    h = s3.head_object(Bucket=bucket, Key="c1")
    assert {k: h[k] for k in attrs} == attrs and h["ExpiresString"] == "Tue, 06 May 2031 07:08:09 GMT"
    s3.copy_object(Bucket=bucket, Key="c2", CopySource={"Bucket": bucket, "Key": "h"}, MetadataDirective="REPLACE",
                   CacheControl="no-cache", ContentLanguage="it", Expires=dt.datetime(2033, 1, 1, tzinfo=dt.UTC))
    h = s3.head_object(Bucket=bucket, Key="c2")
    assert (h["CacheControl"], h["ContentLanguage"], h["ExpiresString"]) == (
        "no-cache", "it", "Sat, 01 Jan 2033 00:00:00 GMT")
    assert "ContentDisposition" not in h and "ContentEncoding" not in h
    # multipart: given at create, served after complete
    up = s3.create_multipart_upload(Bucket=bucket, Key="m", Expires=expires, **attrs)["UploadId"]
    etag = s3.upload_part(Bucket=bucket, Key="m", UploadId=up, PartNumber=1, Body=b"x")["ETag"]
    s3.complete_multipart_upload(Bucket=bucket, Key="m", UploadId=up,
                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    h = s3.head_object(Bucket=bucket, Key="m")
    assert {k: h[k] for k in attrs} == attrs and h["ExpiresString"] == "Tue, 06 May 2031 07:08:09 GMT"


def test_non_ascii_metadata(s3server: S3Server, s3: Any, bucket: str) -> None:
    # botocore refuses non-ASCII metadata before sending (clients RFC 2047-encode it themselves) ...
    with pytest.raises(Exception, match="ASCII"):
        s3.put_object(Bucket=bucket, Key="u", Body=b"x", Metadata={"name": "héllo"})
    s3.put_object(Bucket=bucket, Key="enc", Body=b"x", Metadata={"name": "=?UTF-8?B?aMOpbGxv?="})
    assert s3.head_object(Bucket=bucket, Key="enc")["Metadata"] == {"name": "=?UTF-8?B?aMOpbGxv?="}
    # ... other SDKs send the UTF-8 bytes and sign them: the signature is over the bytes as sent, and S3
    # answers the value RFC 2047-encoded
    value = "héllo wörld ✓"
    req = AWSRequest(method="PUT", url=f"{s3server.url}/{bucket}/u", data=b"x", headers={"x-amz-meta-name": value})
    S3SigV4Auth(Credentials(s3server.creds["ak"], s3server.creds["sk"]), "s3", "us-east-1").add_auth(req)
    raw = [(k.encode(), v.encode() if isinstance(v, str) else v) for k, v in req.headers.items()]
    r = httpx.put(req.url, content=b"x", headers=raw)
    assert r.status_code == 200, r.text
    meta = s3.head_object(Bucket=bucket, Key="u")["Metadata"]["name"]
    assert meta.startswith("=?UTF-8?B?")
    import email.header

    text, charset = email.header.decode_header(meta)[0]
    assert isinstance(text, bytes) and text.decode(charset or "ascii") == value
    # a tampered value does not verify
    bad = [(k, v.replace("ö".encode(), b"o") if k == b"x-amz-meta-name" else v) for k, v in raw]
    r = httpx.put(req.url, content=b"x", headers=bad)
    assert r.status_code == 403 and code(r) == "SignatureDoesNotMatch"


# --- CORS -----------------------------------------------------------------------------------------

def test_cors_wildcards_and_methods(s3server: S3Server, s3: Any, bucket: str) -> None:
    s3.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": [
        {"AllowedMethods": ["GET", "HEAD"], "AllowedOrigins": ["https://*.example.com"], "AllowedHeaders": ["x-amz-*"],
         "ExposeHeaders": ["ETag"], "MaxAgeSeconds": 60},
        {"AllowedMethods": ["PUT"], "AllowedOrigins": ["*.put"]},
        {"AllowedMethods": ["GET"], "AllowedOrigins": ["https://[ab].test"]}]})
    s3.put_object(Bucket=bucket, Key="o", Body=b"x")
    url = f"{s3server.url}/{bucket}/o"
    # actual requests (signed GET through a presigned URL) carry Allow-Origin and Allow-Methods
    get_url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "o"})
    r = httpx.get(get_url, headers={"Origin": "https://app.example.com"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert r.headers["access-control-allow-methods"] == "GET, HEAD"
    assert r.headers["access-control-expose-headers"] == "ETag"
    for origin in ("https://example.com", "http://app.example.com", "https://app.example.com.evil"):
        r = httpx.get(get_url, headers={"Origin": origin})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers, origin
    # `[`/`?` are no glob characters in S3 patterns
    r = httpx.get(get_url, headers={"Origin": "https://a.test"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(get_url, headers={"Origin": "https://[ab].test"})
    assert r.headers["access-control-allow-origin"] == "https://[ab].test"
    # errors carry the CORS headers too (the browser must see them to read the error)
    r = httpx.get(url, headers={"Origin": "https://app.example.com"})
    assert r.status_code == 403 and r.headers["access-control-allow-origin"] == "https://app.example.com"
    # the method counts
    r = httpx.put(url, headers={"Origin": "https://app.example.com"}, content=b"")
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = httpx.put(url, headers={"Origin": "foo.put"}, content=b"")
    assert r.headers["access-control-allow-origin"] == "foo.put" and r.headers["access-control-allow-methods"] == "PUT"
    # preflights
    ok = httpx.options(url, headers={"Origin": "https://x.example.com", "Access-Control-Request-Method": "GET",
                                     "Access-Control-Request-Headers": "x-amz-date, X-Amz-Content-Sha256"})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-methods"] == "GET, HEAD"
    assert ok.headers["access-control-allow-headers"] == "x-amz-date, x-amz-content-sha256"
    assert ok.headers["access-control-max-age"] == "60"
    for headers, status, expected in [
            ({}, 400, "BadRequest"),
            ({"Origin": "https://x.example.com"}, 400, "BadRequest"),
            ({"Origin": "https://x.example.com", "Access-Control-Request-Method": "DELETE"}, 403, "CORSForbidden"),
            ({"Origin": "https://x.example.com", "Access-Control-Request-Method": "GET",
              "Access-Control-Request-Headers": "authorization"}, 403, "CORSForbidden"),
            ({"Origin": "https://evil.test", "Access-Control-Request-Method": "GET"}, 403, "CORSForbidden")]:
        r = httpx.options(url, headers=headers)
        assert (r.status_code, code(r)) == (status, expected), headers
    with pytest.raises(ClientError) as e:
        s3.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": [
            {"AllowedMethods": ["GET"], "AllowedOrigins": ["https://*.*.example.com"]}]})
    assert err(e) == ("InvalidRequest", 400)


# --- presigned URL expiry -----------------------------------------------------------------------------

@pytest.mark.parametrize(("expires", "status", "expected"), [
    (604801, 400, "AuthorizationQueryParametersError"), (-1, 400, "AuthorizationQueryParametersError"),
    (0, 403, "AccessDenied"), (604800, 200, ""), (10, 200, "")])
def test_presign_expiry_bounds(s3: Any, bucket: str, expires: int, status: int, expected: str) -> None:
    s3.put_object(Bucket=bucket, Key="p", Body=b"x")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "p"}, ExpiresIn=expires)
    if expires == 0:
        time.sleep(1.1)
    r = httpx.get(url)
    assert r.status_code == status, r.text
    if expected:
        assert code(r) == expected
    if expires == -1:
        assert b"X-Amz-Expires must be non-negative" in r.content
    if expires == 604801:
        assert b"X-Amz-Expires must be less than a week" in r.content


def test_presign_expires_not_a_number(s3: Any, bucket: str) -> None:
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "p"}, ExpiresIn=60)
    r = httpx.get(url.replace("X-Amz-Expires=60", "X-Amz-Expires=abc"))
    assert r.status_code == 400 and code(r) == "AuthorizationQueryParametersError"
    r = httpx.get(url.replace("&X-Amz-Expires=60", ""))
    assert r.status_code == 400 and code(r) == "AuthorizationQueryParametersError"
