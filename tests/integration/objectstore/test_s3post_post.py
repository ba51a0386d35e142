"""Browser POST uploads (POST Object with a policy document), as boto3's generate_presigned_post builds
them and as hand-built SigV2/SigV4 forms (the shapes the S3 conformance suites send)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import xml.etree.ElementTree as ET
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.integration.objectstore.conftest import S3Server, new_name

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _expiry(seconds: int = 600) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def v2_form(srv: S3Server, policy: dict[str, Any] | str, who: str = "", **fields: str) -> dict[str, str]:
    """A SigV2-signed form: AWSAccessKeyId + signature = base64(HMAC-SHA1(secret, base64(policy)))."""
    raw = policy if isinstance(policy, str) else json.dumps(policy)
    b64 = base64.b64encode(raw.encode()).decode()
    sig = base64.b64encode(hmac.new(srv.creds["sk" + who].encode(), b64.encode(), hashlib.sha1).digest()).decode()
    return {"AWSAccessKeyId": srv.creds["ak" + who], "policy": b64, "signature": sig, **fields}


def v4_form(srv: S3Server, conditions: list[Any], expiration: str | None = None, **fields: str) -> dict[str, str]:
    """A SigV4-signed form built by hand (the credential/algorithm/date fields are conditioned, as AWS asks)."""
    now = dt.datetime.now(dt.UTC)
    cred = f"{srv.creds['ak']}/{now:%Y%m%d}/us-east-1/s3/aws4_request"
    amz_date = f"{now:%Y%m%dT%H%M%SZ}"
    auth = {"x-amz-algorithm": "AWS4-HMAC-SHA256", "x-amz-credential": cred, "x-amz-date": amz_date}
    policy = {"expiration": expiration or _expiry(), "conditions": [*conditions, *({k: v} for k, v in auth.items())]}
    b64 = base64.b64encode(json.dumps(policy).encode()).decode()
    key = ("AWS4" + srv.creds["sk"]).encode()
    for part in (f"{now:%Y%m%d}", "us-east-1", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(key, b64.encode(), hashlib.sha256).hexdigest()
    return {**fields, **auth, "policy": b64, "x-amz-signature": sig}


def post(srv: S3Server, bucket: str, fields: dict[str, str], data: bytes = b"bar", filename: str = "file",
         ctype: str | None = None, follow: bool = False) -> httpx.Response:
    # every field sent as its own multipart part, the file last, as browsers and the S3 test suites do
    parts: list[tuple[str, Any]] = [(k, (None, v)) for k, v in fields.items()]
    parts.append(("file", (filename, data, ctype) if ctype else (filename, data)))
    return httpx.post(f"{srv.url}/{bucket}", files=parts, follow_redirects=follow, timeout=30)


def code(r: httpx.Response) -> str:
    return ET.fromstring(r.content).findtext("Code") or ""


def base_conditions(bucket: str) -> list[Any]:
    return [{"bucket": bucket}, ["starts-with", "$key", "foo"], {"acl": "private"},
            ["starts-with", "$Content-Type", "text/plain"], ["content-length-range", 0, 1024]]


# --- what used to be refused: SigV2 policies, ${filename} against starts-with ------------------------

def test_v2_authenticated_request(s3server: S3Server, s3: Any, bucket: str) -> None:
    policy = {"expiration": _expiry(), "conditions": base_conditions(bucket)}
    form = v2_form(s3server, policy, key="foo.txt", acl="private", **{"Content-Type": "text/plain"})
    r = post(s3server, bucket, form)
    assert r.status_code == 204, r.text
    assert r.headers["etag"] == '"37b51d194a7513e45b56f6524f2d51f2"'
    g = s3.get_object(Bucket=bucket, Key="foo.txt")
    assert g["Body"].read() == b"bar" and g["ContentType"] == "text/plain"


def test_v2_no_content_type(s3server: S3Server, s3: Any, bucket: str) -> None:
    policy = {"expiration": _expiry(), "conditions": [{"bucket": bucket}, ["starts-with", "$key", "foo"],
                                                      {"acl": "private"}, ["content-length-range", 0, 1024]]}
    r = post(s3server, bucket, v2_form(s3server, policy, key="foo.txt", acl="private"))
    assert r.status_code == 204, r.text
    assert s3.get_object(Bucket=bucket, Key="foo.txt")["Body"].read() == b"bar"


def test_key_from_filename_checked_after_substitution(s3server: S3Server, s3: Any, bucket: str) -> None:
    policy = {"expiration": _expiry(), "conditions": base_conditions(bucket)}
    form = v2_form(s3server, policy, key="${filename}", acl="private", **{"Content-Type": "text/plain"})
    assert post(s3server, bucket, form, filename="foo.txt").status_code == 204
    assert s3.get_object(Bucket=bucket, Key="foo.txt")["Body"].read() == b"bar"
    r = post(s3server, bucket, form, filename="other.txt")  # substituted key fails starts-with "foo"
    assert r.status_code == 403 and code(r) == "AccessDenied"
    # boto3's form with a ${filename} key
    p = s3server.client().generate_presigned_post(bucket, "up/${filename}",
                                                  Conditions=[["starts-with", "$key", "up/"]])
    assert post(s3server, bucket, p["fields"], filename="pic.png").status_code == 204
    assert s3.head_object(Bucket=bucket, Key="up/pic.png")["ContentLength"] == 3


def test_v4_hand_built_and_boto3(s3server: S3Server, s3: Any, bucket: str) -> None:
    form = v4_form(s3server, [{"bucket": bucket}, ["eq", "$key", "v4.txt"]], key="v4.txt")
    assert post(s3server, bucket, form).status_code == 204
    p = s3.generate_presigned_post(bucket, "boto.txt", Fields={"Content-Type": "text/plain"},
                                   Conditions=[{"Content-Type": "text/plain"}], ExpiresIn=60)
    r = post(s3server, bucket, p["fields"])
    assert r.status_code == 204, r.text
    assert r.headers["location"].endswith(f"/{bucket}/boto.txt")
    assert s3.get_object(Bucket=bucket, Key="boto.txt")["ContentType"] == "text/plain"


def test_case_insensitive_names_case_sensitive_values(s3server: S3Server, s3: Any, bucket: str) -> None:
    policy = {"expiration": _expiry(), "conditions": [
        {"bUcKeT": bucket}, ["StArTs-WiTh", "$KeY", "foo"], {"AcL": "private"},
        ["StArTs-WiTh", "$CoNtEnT-TyPe", "text/plain"], ["content-length-range", 0, 1024]]}
    form = v2_form(s3server, policy, kEy="foo.txt", aCl="private", **{"Content-Type": "text/plain"})
    form["pOLICy"] = form.pop("policy")
    assert post(s3server, bucket, form).status_code == 204
    # values are case-sensitive
    form2 = v2_form(s3server, policy, key="FOO.txt", acl="private", **{"Content-Type": "text/plain"})
    assert post(s3server, bucket, form2).status_code == 403
    form3 = v2_form(s3server, policy, key="foo.txt", acl="PRIVATE", **{"Content-Type": "text/plain"})
    assert post(s3server, bucket, form3).status_code == 403


def test_condition_forms(s3server: S3Server, s3: Any, bucket: str) -> None:
    conds = [["eq", "$bucket", bucket], ["eq", "$key", "c.txt"], ["starts-with", "$x-amz-meta-tag", ""],
             ["starts-with", "$Content-Type", "image/"], ["content-length-range", "1", "10"]]
    policy = {"expiration": _expiry(), "conditions": conds}
    ok = v2_form(s3server, policy, key="c.txt", **{"x-amz-meta-tag": "Anything", "Content-Type": "image/png"})
    assert post(s3server, bucket, ok).status_code == 204
    h = s3.head_object(Bucket=bucket, Key="c.txt")
    assert h["Metadata"] == {"tag": "Anything"} and h["ContentType"] == "image/png"
    # a comma-separated Content-Type: every type must start with the prefix
    many = v2_form(s3server, policy, key="c.txt", **{"x-amz-meta-tag": "", "Content-Type": "image/png, text/html"})
    assert post(s3server, bucket, many).status_code == 403
    # an empty starts-with prefix admits an absent field
    assert post(s3server, bucket, v2_form(s3server, policy, key="c.txt", **{"Content-Type": "image/gif"})
                ).status_code == 204
    r = post(s3server, bucket, v2_form(s3server, policy, key="c.txt", **{"Content-Type": "image/gif"}), data=b"")
    assert r.status_code == 400 and code(r) == "EntityTooSmall"
    r = post(s3server, bucket, v2_form(s3server, policy, key="c.txt", **{"Content-Type": "image/gif"}), data=b"x" * 11)
    assert r.status_code == 400 and code(r) == "EntityTooLarge"


def test_ignored_and_extra_fields(s3server: S3Server, s3: Any, bucket: str) -> None:
    policy = {"expiration": _expiry(), "conditions": [{"bucket": bucket}, ["starts-with", "$key", ""]]}
    assert post(s3server, bucket, v2_form(s3server, policy, key="i", **{"x-ignore-foo": "bar"})).status_code == 204
    r = post(s3server, bucket, v2_form(s3server, policy, key="i", **{"x-amz-meta-sneaky": "1"}))
    assert r.status_code == 403 and b"Extra input fields: x-amz-meta-sneaky" in r.content
    # the bucket must be named by the policy (else a policy would be valid on any bucket)
    nob = {"expiration": _expiry(), "conditions": [["starts-with", "$key", ""]]}
    r = post(s3server, bucket, v2_form(s3server, nob, key="i"))
    assert r.status_code == 403 and code(r) == "AccessDenied"
    other = new_name()
    s3.create_bucket(Bucket=other)
    r = post(s3server, other, v2_form(s3server, policy, key="i"))
    assert r.status_code == 403 and code(r) == "AccessDenied"


@pytest.mark.parametrize(("policy", "expected"), [
    ({"conditions": [["starts-with", "$key", ""]]}, "InvalidPolicyDocument"),  # no expiration
    ({"EXPIRATION": "X", "conditions": [["starts-with", "$key", ""]]}, "InvalidPolicyDocument"),
    ({"expiration": "EXP"}, "InvalidPolicyDocument"),  # no conditions
    ({"expiration": "EXP", "CONDITIONS": []}, "InvalidPolicyDocument"),
    ({"expiration": "2030-01-01 12:00:00+00:00", "conditions": []}, "InvalidPolicyDocument"),  # not ISO 8601 Z
    ({"expiration": "EXP", "conditions": [{}]}, "InvalidPolicyDocument"),
    ({"expiration": "EXP", "conditions": [{"a": "1", "b": "2"}]}, "InvalidPolicyDocument"),
    ({"expiration": "EXP", "conditions": [["content-length-range", 0]]}, "InvalidPolicyDocument"),
    ({"expiration": "EXP", "conditions": [["content-length-range", -1, 0]]}, "InvalidPolicyDocument"),
    ({"expiration": "EXP", "conditions": [["matches", "$key", "x"]]}, "InvalidPolicyDocument"),
    ({"expiration": "EXP", "conditions": [["eq", "$key"]]}, "InvalidPolicyDocument"),
    ({"expiration": "EXP", "conditions": "nope"}, "InvalidPolicyDocument"),
    ("{not json", "InvalidPolicyDocument"),
    ({"expiration": "PAST", "conditions": [{"bucket": "B"}, ["starts-with", "$key", ""]]}, "AccessDenied"),
])
def test_malformed_and_expired_policies(s3server: S3Server, bucket: str, policy: Any, expected: str) -> None:
    if isinstance(policy, dict):
        text = json.dumps(policy).replace("EXP", _expiry()).replace("PAST", _expiry(-60)).replace('"B"',
                                                                                                    f'"{bucket}"')
    else:
        text = policy
    r = post(s3server, bucket, v2_form(s3server, text, key="m"))
    assert code(r) == expected, r.text
    assert r.status_code == (403 if expected == "AccessDenied" else 400)
    if "PAST" in str(policy):
        assert b"Invalid according to Policy: Policy expired." in r.content


def test_missing_fields(s3server: S3Server, s3: Any, bucket: str) -> None:
    policy = {"expiration": _expiry(), "conditions": [{"bucket": bucket}, ["starts-with", "$key", ""]]}
    form = v2_form(s3server, policy, key="x")
    no_sig = {k: v for k, v in form.items() if k != "signature"}
    r = post(s3server, bucket, no_sig)
    assert r.status_code == 400 and code(r) == "InvalidArgument"
    no_key = {k: v for k, v in form.items() if k != "key"}
    r = post(s3server, bucket, no_key)
    assert r.status_code == 400 and code(r) == "InvalidArgument" and b"'key'" in r.content
    no_policy = {k: v for k, v in form.items() if k != "policy"}
    r = post(s3server, bucket, no_policy)
    assert r.status_code == 400 and code(r) == "InvalidArgument"
    bad_sig = dict(form, signature=form["signature"][::-1])
    r = post(s3server, bucket, bad_sig)
    assert r.status_code == 403 and code(r) == "SignatureDoesNotMatch"
    bad_ak = dict(form, AWSAccessKeyId=form["AWSAccessKeyId"][::-1])
    r = post(s3server, bucket, bad_ak)
    assert r.status_code == 403 and code(r) == "InvalidAccessKeyId"
    # no file part
    r = httpx.post(f"{s3server.url}/{bucket}", files=[(k, (None, v)) for k, v in form.items()])
    assert r.status_code == 400 and code(r) == "InvalidArgument"
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="x")


# --- responses ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "expected"), [("200", 200), ("201", 201), ("204", 204), ("404", 204), ("", 204)])
def test_success_action_status(s3server: S3Server, s3: Any, bucket: str, status: str, expected: int) -> None:
    conds: list[Any] = [{"bucket": bucket}, ["starts-with", "$key", ""],
                        ["starts-with", "$success_action_status", ""]]
    policy = {"expiration": _expiry(), "conditions": conds}
    r = post(s3server, bucket, v2_form(s3server, policy, key="s/t.txt", success_action_status=status))
    assert r.status_code == expected, r.text
    if expected == 201:
        root = ET.fromstring(r.content)
        assert root.tag == NS + "PostResponse"
        assert root.findtext(NS + "Bucket") == bucket and root.findtext(NS + "Key") == "s/t.txt"
        assert root.findtext(NS + "ETag") == '"37b51d194a7513e45b56f6524f2d51f2"'
        assert root.findtext(NS + "Location") == f"{s3server.url}/{bucket}/s/t.txt"
    else:
        assert r.content == b""


def test_success_action_redirect(s3server: S3Server, s3: Any, bucket: str) -> None:
    target = "https://app.example.com/done?x=1"
    policy = {"expiration": _expiry(), "conditions": [{"bucket": bucket}, ["starts-with", "$key", ""],
                                                      ["eq", "$success_action_redirect", target]]}
    r = post(s3server, bucket, v2_form(s3server, policy, key="r k", success_action_redirect=target))
    assert r.status_code == 303
    assert r.headers["location"] == (f"{target}&bucket={bucket}&key=r%20k"
                                     f"&etag=%2237b51d194a7513e45b56f6524f2d51f2%22")
    # the legacy `redirect` field too
    policy2 = {"expiration": _expiry(), "conditions": [{"bucket": bucket}, ["starts-with", "$key", ""],
                                                       ["starts-with", "$redirect", "http://"]]}
    r = post(s3server, bucket, v2_form(s3server, policy2, key="r2", redirect="http://h.example/ok"))
    assert r.status_code == 303 and r.headers["location"].startswith("http://h.example/ok?bucket=")
    # a redirect the server cannot interpret is ignored (204), as S3 does
    policy3 = {"expiration": _expiry(), "conditions": [{"bucket": bucket}, ["starts-with", "$key", ""],
                                                       ["starts-with", "$success_action_redirect", ""]]}
    r = post(s3server, bucket, v2_form(s3server, policy3, key="r3", success_action_redirect="javascript:alert(1)"))
    assert r.status_code == 204 and "example" not in r.headers.get("location", "")


# --- what the form sets on the object -------------------------------------------------------------

def test_tags_metadata_headers(s3server: S3Server, s3: Any, bucket: str) -> None:
    tagging = ("<Tagging><TagSet><Tag><Key>0</Key><Value>0</Value></Tag><Tag><Key>1</Key><Value>1</Value></Tag>"
               "</TagSet></Tagging>")
    fields = {"key": "foo.txt", "acl": "private", "Content-Type": "text/plain", "tagging": tagging,
              "x-amz-meta-foo": "barclamp", "Cache-Control": "max-age=60", "Content-Disposition": "attachment",
              "Content-Language": "fr", "Expires": "Thu, 01 Dec 2033 16:00:00 GMT",
              "x-amz-storage-class": "STANDARD_IA"}
    conds = [*base_conditions(bucket), ["starts-with", "$tagging", ""], ["starts-with", "$x-amz-meta-foo", "bar"],
             {"Cache-Control": "max-age=60"}, {"Content-Disposition": "attachment"}, {"Content-Language": "fr"},
             ["starts-with", "$Expires", ""], {"x-amz-storage-class": "STANDARD_IA"}]
    r = post(s3server, bucket, v2_form(s3server, {"expiration": _expiry(), "conditions": conds}, **fields))
    assert r.status_code == 204, r.text
    tags = s3.get_object_tagging(Bucket=bucket, Key="foo.txt")["TagSet"]
    assert sorted((t["Key"], t["Value"]) for t in tags) == [("0", "0"), ("1", "1")]
    h = s3.head_object(Bucket=bucket, Key="foo.txt")
    assert h["Metadata"] == {"foo": "barclamp"} and h["CacheControl"] == "max-age=60"
    assert h["ContentDisposition"] == "attachment" and h["ContentLanguage"] == "fr"
    assert h["ExpiresString"] == "Thu, 01 Dec 2033 16:00:00 GMT" and h["StorageClass"] == "STANDARD_IA"
    # a tag set that is not XML, and more than 10 tags
    bad = dict(fields, tagging="a=b")
    r = post(s3server, bucket, v2_form(s3server, {"expiration": _expiry(), "conditions": conds}, **bad))
    assert r.status_code == 400 and code(r) == "MalformedXML"
    many = "".join(f"<Tag><Key>k{i}</Key><Value>v</Value></Tag>" for i in range(11))
    bad = dict(fields, tagging=f"<Tagging><TagSet>{many}</TagSet></Tagging>")
    r = post(s3server, bucket, v2_form(s3server, {"expiration": _expiry(), "conditions": conds}, **bad))
    assert r.status_code == 400 and code(r) == "BadRequest"


def test_public_acl_field_blocked_by_default(s3server: S3Server, s3: Any, bucket: str) -> None:
    policy = {"expiration": _expiry(), "conditions": [{"bucket": bucket}, ["starts-with", "$key", ""],
                                                      {"acl": "public-read"}]}
    r = post(s3server, bucket, v2_form(s3server, policy, key="pub", acl="public-read"))
    assert r.status_code == 403 and code(r) == "AccessDenied"


def test_sse_s3_field_and_bucket_default(s3server: S3Server, s3: Any, bucket: str) -> None:
    policy = {"expiration": _expiry(), "conditions": [{"bucket": bucket}, ["starts-with", "$key", ""],
                                                      {"x-amz-server-side-encryption": "AES256"}]}
    r = post(s3server, bucket, v2_form(s3server, policy, key="e", **{"x-amz-server-side-encryption": "AES256"}))
    assert r.status_code == 204 and r.headers["x-amz-server-side-encryption"] == "AES256"
    g = s3.get_object(Bucket=bucket, Key="e")
    assert g["ServerSideEncryption"] == "AES256" and g["Body"].read() == b"bar"
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    plain = {"expiration": _expiry(), "conditions": [{"bucket": bucket}, ["starts-with", "$key", ""]]}
    assert post(s3server, bucket, v2_form(s3server, plain, key="d")).status_code == 204
    assert s3.head_object(Bucket=bucket, Key="d")["ServerSideEncryption"] == "AES256"
    r = post(s3server, bucket, v2_form(s3server, policy, key="e", **{"x-amz-server-side-encryption": "DES"}))
    assert r.status_code in (400, 403)


def test_sse_c_fields(s3server: S3Server, s3: Any, bucket: str) -> None:
    key = os.urandom(32)
    k64 = base64.b64encode(key).decode()
    md5 = base64.b64encode(hashlib.md5(key).digest()).decode()
    conds = [*base_conditions(bucket),
             ["starts-with", "$x-amz-server-side-encryption-customer-algorithm", ""],
             ["starts-with", "$x-amz-server-side-encryption-customer-key", ""],
             ["starts-with", "$x-amz-server-side-encryption-customer-key-md5", ""]]
    fields = {"key": "foo.txt", "acl": "private", "Content-Type": "text/plain",
              "x-amz-server-side-encryption-customer-algorithm": "AES256",
              "x-amz-server-side-encryption-customer-key": k64,
              "x-amz-server-side-encryption-customer-key-md5": md5}
    data = os.urandom(1000)
    r = post(s3server, bucket, v2_form(s3server, {"expiration": _expiry(), "conditions": conds}, **fields), data=data)
    assert r.status_code == 204, r.text
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key="foo.txt")
    g = s3.get_object(Bucket=bucket, Key="foo.txt", SSECustomerAlgorithm="AES256", SSECustomerKey=key)
    assert g["Body"].read() == data
    bad = dict(fields, **{"x-amz-server-side-encryption-customer-key-md5": "AAAA"})
    r = post(s3server, bucket, v2_form(s3server, {"expiration": _expiry(), "conditions": conds}, **bad))
    assert r.status_code == 400 and code(r) == "InvalidArgument"


def test_checksum_field(s3server: S3Server, s3: Any, bucket: str) -> None:
    good = base64.b64encode(hashlib.sha256(b"bar").digest()).decode()
    conds = [{"bucket": bucket}, ["starts-with", "$key", ""], ["starts-with", "$x-amz-checksum-sha256", ""]]
    policy = {"expiration": _expiry(), "conditions": conds}
    r = post(s3server, bucket, v2_form(s3server, policy, key="ck", **{"x-amz-checksum-sha256": good}))
    assert r.status_code == 204 and r.headers["x-amz-checksum-sha256"] == good
    bad = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    r = post(s3server, bucket, v2_form(s3server, policy, key="ck2", **{"x-amz-checksum-sha256": bad}))
    assert r.status_code == 400 and code(r) == "BadDigest"
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="ck2")


def test_large_upload_stops_at_the_policy_limit(s3server: S3Server, s3: Any, bucket: str) -> None:
    policy = {"expiration": _expiry(), "conditions": [{"bucket": bucket}, ["starts-with", "$key", ""],
                                                      ["content-length-range", 0, 1024 * 1024]]}
    data = os.urandom(3 * 1024 * 1024)
    r = post(s3server, bucket, v2_form(s3server, policy, key="big"), data=data)
    assert r.status_code == 400 and code(r) == "EntityTooLarge"
    ok = {"expiration": _expiry(), "conditions": [{"bucket": bucket}, ["starts-with", "$key", ""]]}
    assert post(s3server, bucket, v2_form(s3server, ok, key="big"), data=data).status_code == 204
    assert s3.get_object(Bucket=bucket, Key="big")["Body"].read() == data


def test_versioned_bucket_returns_version_id(s3server: S3Server, s3: Any, bucket: str) -> None:
    policy = {"expiration": _expiry(), "conditions": [{"bucket": bucket}, ["starts-with", "$key", ""]]}
    r = post(s3server, bucket, v2_form(s3server, policy, key="nv"))
    assert r.status_code == 204 and "x-amz-version-id" not in r.headers
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    r = post(s3server, bucket, v2_form(s3server, policy, key="nv"))
    assert r.status_code == 204
    assert s3.head_object(Bucket=bucket, Key="nv")["VersionId"] == r.headers["x-amz-version-id"]
