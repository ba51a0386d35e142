"""Pure logic of the object store: SigV4 pieces, chunk decoding, policies, lifecycle XML, encryption."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os

import pytest

from hackboot.objectstore import checksums, lifecycle, policy, sigv4, sse
from hackboot.objectstore.s3xml import S3Error


def test_signing_key_matches_aws_documented_example() -> None:
    # AWS documentation example (secret, 20120215, us-east-1, iam)
    key = sigv4.signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


def test_canonical_query_sorts_and_encodes() -> None:
    assert sigv4.canonical_query("b=2&a=1&prefix=x%2Fy&delete", False) == "a=1&b=2&delete=&prefix=x%2Fy"
    assert "X-Amz-Signature" not in sigv4.canonical_query("X-Amz-Signature=abc&a=1", True)


def _auth() -> sigv4.AuthRequest:
    return sigv4.AuthRequest("AK", "20240101", "us-east-1", "s3", ["host"], "seed" * 16, "20240101T000000Z",
                             sigv4.STREAMING_SIGNED)


def _signed_body(data: bytes, key: bytes, auth: sigv4.AuthRequest, chunk: int) -> bytes:
    prev = auth.signature
    out = b""
    for piece in [data[i:i + chunk] for i in range(0, len(data), chunk)] + [b""]:
        sts = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", auth.amz_date, auth.scope, prev, sigv4.EMPTY_SHA256,
                         hashlib.sha256(piece).hexdigest()])
        prev = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
        out += f"{len(piece):x};chunk-signature={prev}\r\n".encode() + piece + b"\r\n"
    return out


@pytest.mark.parametrize("feed_size", [1, 7, 100, 10_000])
def test_chunked_decoder_any_split(feed_size: int) -> None:
    auth, key = _auth(), b"k" * 32
    data = os.urandom(5000)
    body = _signed_body(data, key, auth, 1024)
    dec = sigv4.ChunkedDecoder(auth, key, sigv4.STREAMING_SIGNED)
    out = b"".join(p for i in range(0, len(body), feed_size) for p in dec.feed(body[i:i + feed_size]))
    dec.close()
    assert out == data


def test_chunked_decoder_rejects_tampering_and_truncation() -> None:
    auth, key = _auth(), b"k" * 32
    body = bytearray(_signed_body(b"a" * 3000, key, auth, 1024))
    body[body.index(b"aaaa")] = ord("b")
    with pytest.raises(S3Error) as e:
        sigv4.ChunkedDecoder(auth, key, sigv4.STREAMING_SIGNED).feed(bytes(body))
    assert e.value.code == "SignatureDoesNotMatch"
    good = _signed_body(b"a" * 3000, key, auth, 1024)
    dec = sigv4.ChunkedDecoder(auth, key, sigv4.STREAMING_SIGNED)
    dec.feed(good[:-40])
    with pytest.raises(S3Error):
        dec.close()


def test_unsigned_trailer_decoding() -> None:
    dec = sigv4.ChunkedDecoder(None, None, sigv4.STREAMING_UNSIGNED_TRAILER)
    out = dec.feed(b"5\r\nhello\r\n0\r\nx-amz-checksum-crc32:NhCmhg==\r\n\r\n")
    assert b"".join(out) == b"hello"
    assert dec.close() == {"x-amz-checksum-crc32": "NhCmhg=="}


def test_checksums() -> None:
    h = checksums.new("CRC32C")
    h.update(b"123456789")
    assert h.digest().hex() == "e3069283"
    h = checksums.new("CRC32")
    h.update(b"123456789")
    assert h.digest().hex() == "cbf43926"
    h = checksums.new("CRC64NVME")
    h.update(b"123456789")
    assert h.digest().hex() == "ae8b14860a799888"
    assert checksums.multipart_etag([hashlib.md5(b"a").digest(), hashlib.md5(b"b").digest()]).endswith('-2"')


def test_sse_roundtrip_and_ranges() -> None:
    key = os.urandom(32)
    data = os.urandom(200_000)
    enc = sse.Encryptor(key, 3)
    ct = enc.feed(data[:70_000]) + enc.feed(data[70_000:]) + enc.finish()
    assert len(ct) == sse.cipher_size(len(data))
    for start, end in [(0, len(data)), (65_535, 65_537), (131_072, 200_000), (5, 6)]:
        got = b"".join(sse.decrypt_range(lambda o, n: ct[o:o + n], key, 3, len(data), start, end))
        assert got == data[start:end]
    truncated = ct[:sse.CHUNK + sse.TAG]
    with pytest.raises(S3Error):
        b"".join(sse.decrypt_range(lambda o, n: truncated[o:o + n], key, 3, sse.CHUNK, 0, sse.CHUNK))


def test_policy_evaluation() -> None:
    doc = policy.validate_policy(b'''{"Version": "2012-10-17", "Statement": [
      {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::prj-b:root"}, "Action": "s3:Get*",
       "Resource": "arn:aws:s3:::bkt/docs/*"},
      {"Effect": "Deny", "Principal": "*", "Action": "s3:*", "Resource": "arn:aws:s3:::bkt/*",
       "Condition": {"NotIpAddress": {"aws:SourceIp": ["127.0.0.0/8"]}}}]}''', "bkt")
    other = policy.Requester("prj-b", "usr-1")
    ctx = {"aws:sourceip": "127.0.0.1"}
    assert policy.evaluate_policy(doc, other, "s3:GetObject", "arn:aws:s3:::bkt/docs/a", ctx, True) == "Allow"
    assert policy.evaluate_policy(doc, other, "s3:PutObject", "arn:aws:s3:::bkt/docs/a", ctx, True) is None
    assert policy.evaluate_policy(doc, other, "s3:GetObject", "arn:aws:s3:::bkt/docs/a",
                                  {"aws:sourceip": "10.1.1.1"}, True) == "Deny"
    with pytest.raises(S3Error):
        policy.authorize(req=policy.ANONYMOUS, action="s3:GetObject", bucket_name="bkt", bucket_owner="prj-a",
                         policy=doc, bucket_acl=[], object_acl=None, key="docs/a", ctx=ctx,
                         ignore_public_policy=True, ignore_public_acls=True)
    grants = policy.canned_acl("public-read", "prj-a")
    policy.authorize(req=policy.ANONYMOUS, action="s3:GetObject", bucket_name="bkt", bucket_owner="prj-a",
                     policy=None, bucket_acl=[], object_acl=grants, key="k", ctx={}, ignore_public_policy=False,
                     ignore_public_acls=False)
    with pytest.raises(S3Error):
        policy.authorize(req=policy.ANONYMOUS, action="s3:GetObject", bucket_name="bkt", bucket_owner="prj-a",
                         policy=None, bucket_acl=[], object_acl=grants, key="k", ctx={}, ignore_public_policy=True,
                         ignore_public_acls=True)
    for bad in (b"[]", b'{"Statement": [{"Effect": "Allow"}]}', b"nope"):
        with pytest.raises(S3Error) as e:
            policy.validate_policy(bad, "bkt")
        assert e.value.code == "MalformedPolicy"


def test_lifecycle_xml_roundtrip() -> None:
    xml = b"""<LifecycleConfiguration><Rule><ID>r1</ID><Status>Enabled</Status>
      <Filter><And><Prefix>logs/</Prefix><Tag><Key>a</Key><Value>b</Value></Tag></And></Filter>
      <Transition><Days>30</Days><StorageClass>GLACIER</StorageClass></Transition>
      <Expiration><Days>365</Days></Expiration>
      <NoncurrentVersionExpiration><NoncurrentDays>7</NoncurrentDays></NoncurrentVersionExpiration>
      <AbortIncompleteMultipartUpload><DaysAfterInitiation>2</DaysAfterInitiation></AbortIncompleteMultipartUpload>
      </Rule></LifecycleConfiguration>"""
    rules = lifecycle.parse_xml(xml)
    assert rules[0]["prefix"] == "logs/" and rules[0]["tags"] == {"a": "b"}
    assert lifecycle.parse_xml(lifecycle.to_xml(rules)) == rules
    with pytest.raises(S3Error):
        lifecycle.parse_xml(b"<LifecycleConfiguration><Rule><Status>On</Status></Rule></LifecycleConfiguration>")


def test_presigned_expiry_and_skew() -> None:
    now = dt.datetime.now(dt.UTC)
    auth = sigv4.AuthRequest("AK", now.strftime("%Y%m%d"), "us-east-1", "s3", ["host"], "x", "", "UNSIGNED-PAYLOAD",
                             presigned=True, expires=10, when=now - dt.timedelta(seconds=20))
    with pytest.raises(S3Error, match="expired"):
        sigv4.check_time(auth, now)
    auth = sigv4.AuthRequest("AK", now.strftime("%Y%m%d"), "us-east-1", "s3", ["host"], "x", "", "UNSIGNED-PAYLOAD",
                             when=now - dt.timedelta(minutes=16))
    with pytest.raises(S3Error) as e:
        sigv4.check_time(auth, now)
    assert e.value.code == "RequestTimeTooSkewed"
