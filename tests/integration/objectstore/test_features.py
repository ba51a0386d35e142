"""Versioning, object lock, lifecycle, encryption, tagging, CORS, ACLs and bucket policies."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.integration.objectstore.conftest import S3Server, new_name


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def status(exc: pytest.ExceptionInfo[ClientError]) -> int:
    return int(exc.value.response["ResponseMetadata"]["HTTPStatusCode"])


# --- versioning -----------------------------------------------------------------------------------

def test_versioning(s3: Any, bucket: str) -> None:
    assert "Status" not in s3.get_bucket_versioning(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"null-version")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    v1 = s3.put_object(Bucket=bucket, Key="k", Body=b"one")["VersionId"]
    v2 = s3.put_object(Bucket=bucket, Key="k", Body=b"two")["VersionId"]
    assert v1 != v2 and v1 != "null"
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"two"
    assert s3.get_object(Bucket=bucket, Key="k", VersionId=v1)["Body"].read() == b"one"
    assert s3.get_object(Bucket=bucket, Key="k", VersionId="null")["Body"].read() == b"null-version"
    d = s3.delete_object(Bucket=bucket, Key="k")
    assert d["DeleteMarker"] is True
    marker = d["VersionId"]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="k")
    assert code(e) == "NoSuchKey"
    assert e.value.response["ResponseMetadata"]["HTTPHeaders"].get("x-amz-delete-marker") == "true"
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    vs = s3.list_object_versions(Bucket=bucket)
    assert [v["VersionId"] for v in vs["Versions"]] == [v2, v1, "null"]
    assert [m["VersionId"] for m in vs["DeleteMarkers"]] == [marker]
    assert vs["DeleteMarkers"][0]["IsLatest"] is True
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="k", VersionId=marker)
    assert status(e) == 405
    # removing the delete marker brings v2 back
    s3.delete_object(Bucket=bucket, Key="k", VersionId=marker)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"two"
    # permanently delete a specific version
    s3.delete_object(Bucket=bucket, Key="k", VersionId=v2)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"one"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="k", VersionId=v2)
    assert code(e) == "NoSuchVersion"
    # suspended: new writes replace the null version
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Suspended"})
    r = s3.put_object(Bucket=bucket, Key="k", Body=b"suspended")
    assert r.get("VersionId") == "null"
    vs = s3.list_object_versions(Bucket=bucket)
    assert sorted(v["VersionId"] for v in vs["Versions"]) == sorted([v1, "null"])
    assert s3.get_object(Bucket=bucket, Key="k", VersionId="null")["Body"].read() == b"suspended"
    # versions listing with pagination markers
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for i in range(3):
        s3.put_object(Bucket=bucket, Key="p", Body=str(i).encode())
    pages = s3.get_paginator("list_object_versions").paginate(Bucket=bucket, PaginationConfig={"PageSize": 2})
    all_versions = [(v["Key"], v["VersionId"]) for p in pages for v in p.get("Versions", [])]
    assert len(all_versions) == 5 and len(set(all_versions)) == 5
    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket=bucket)
    assert code(e) == "BucketNotEmpty"


def test_versioning_cli(s3server: S3Server, bucket: str, tmp_path: Any) -> None:
    s3server.aws("s3api", "put-bucket-versioning", "--bucket", bucket, "--versioning-configuration",
                 "Status=Enabled")
    f = tmp_path / "f"
    f.write_bytes(b"v1")
    s3server.aws("s3", "cp", str(f), f"s3://{bucket}/x")
    f.write_bytes(b"v2")
    s3server.aws("s3", "cp", str(f), f"s3://{bucket}/x")
    out = json.loads(s3server.aws("s3api", "list-object-versions", "--bucket", bucket).stdout)
    assert len(out["Versions"]) == 2


# --- object lock ----------------------------------------------------------------------------------

def test_object_lock_enforced(s3: Any) -> None:
    name = new_name("lock")
    s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    assert s3.get_bucket_versioning(Bucket=name)["Status"] == "Enabled"
    with pytest.raises(ClientError) as e:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Suspended"})
    assert code(e) == "InvalidBucketState"
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    c = s3.put_object(Bucket=name, Key="c", Body=b"compliance", ObjectLockMode="COMPLIANCE",
                      ObjectLockRetainUntilDate=until)["VersionId"]
    g = s3.put_object(Bucket=name, Key="g", Body=b"governance", ObjectLockMode="GOVERNANCE",
                      ObjectLockRetainUntilDate=until)["VersionId"]
    h = s3.put_object(Bucket=name, Key="h", Body=b"hold", ObjectLockLegalHoldStatus="ON")["VersionId"]
    head = s3.head_object(Bucket=name, Key="c")
    assert head["ObjectLockMode"] == "COMPLIANCE" and head["ObjectLockLegalHoldStatus"] == "OFF"
    for key, vid in (("c", c), ("g", g), ("h", h)):
        with pytest.raises(ClientError) as e:
            s3.delete_object(Bucket=name, Key=key, VersionId=vid)
        assert code(e) == "AccessDenied"
    # compliance: no bypass, no shortening
    with pytest.raises(ClientError) as e:
        s3.delete_object(Bucket=name, Key="c", VersionId=c, BypassGovernanceRetention=True)
    assert code(e) == "AccessDenied"
    with pytest.raises(ClientError) as e:
        s3.put_object_retention(Bucket=name, Key="c", VersionId=c, Retention={
            "Mode": "COMPLIANCE", "RetainUntilDate": until - dt.timedelta(hours=1)})
    assert code(e) == "AccessDenied"
    s3.put_object_retention(Bucket=name, Key="c", VersionId=c, Retention={
        "Mode": "COMPLIANCE", "RetainUntilDate": until + dt.timedelta(days=1)})  # extending is fine
    # overwriting creates a new version; the locked one stays
    s3.put_object(Bucket=name, Key="c", Body=b"newer")
    assert s3.get_object(Bucket=name, Key="c", VersionId=c)["Body"].read() == b"compliance"
    # a delete without version id only adds a marker
    s3.delete_object(Bucket=name, Key="c")
    assert s3.get_object(Bucket=name, Key="c", VersionId=c)["Body"].read() == b"compliance"
    # DeleteObjects reports the locked version as an error
    r = s3.delete_objects(Bucket=name, Delete={"Objects": [{"Key": "c", "VersionId": c}]})
    assert r["Errors"][0]["Code"] == "AccessDenied"
    # governance: bypass with header and permission
    s3.delete_object(Bucket=name, Key="g", VersionId=g, BypassGovernanceRetention=True)
    # legal hold: off, then deletable
    assert s3.get_object_legal_hold(Bucket=name, Key="h", VersionId=h)["LegalHold"]["Status"] == "ON"
    s3.put_object_legal_hold(Bucket=name, Key="h", VersionId=h, LegalHold={"Status": "OFF"})
    s3.delete_object(Bucket=name, Key="h", VersionId=h)
    # default retention applies to new objects
    s3.put_object_lock_configuration(Bucket=name, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}})
    cfg = s3.get_object_lock_configuration(Bucket=name)["ObjectLockConfiguration"]
    assert cfg["Rule"]["DefaultRetention"] == {"Mode": "GOVERNANCE", "Days": 1}
    d = s3.put_object(Bucket=name, Key="d", Body=b"default")["VersionId"]
    ret = s3.get_object_retention(Bucket=name, Key="d", VersionId=d)["Retention"]
    assert ret["Mode"] == "GOVERNANCE"
    with pytest.raises(ClientError) as e:
        s3.delete_object(Bucket=name, Key="d", VersionId=d)
    assert code(e) == "AccessDenied"
    # a policy denying s3:BypassGovernanceRetention makes the bypass header useless
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:BypassGovernanceRetention",
        "Resource": f"arn:aws:s3:::{name}/*"}]}))
    with pytest.raises(ClientError) as e:
        s3.delete_object(Bucket=name, Key="d", VersionId=d, BypassGovernanceRetention=True)
    assert code(e) == "AccessDenied"
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=new_name_plain(s3), Key="x", Body=b"x", ObjectLockLegalHoldStatus="ON")
    assert code(e) == "InvalidRequest"


def new_name_plain(s3: Any) -> str:
    name = new_name("plain")
    s3.create_bucket(Bucket=name)
    return name


# --- lifecycle ------------------------------------------------------------------------------------

def test_lifecycle_rules_applied_by_worker(s3server: S3Server, s3: Any, bucket: str) -> None:
    # the test server's lifecycle "day" is one second (HACKBOOT_S3_LIFECYCLE_DAY_S=1)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [
        {"ID": "expire-tmp", "Status": "Enabled", "Filter": {"Prefix": "tmp/"}, "Expiration": {"Days": 2}},
        {"ID": "tier-logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"},
         "Transitions": [{"Days": 1, "StorageClass": "STANDARD_IA"}, {"Days": 3, "StorageClass": "GLACIER"}]},
        {"ID": "tagged", "Status": "Enabled", "Filter": {"Tag": {"Key": "class", "Value": "it"}},
         "Transitions": [{"Days": 1, "StorageClass": "INTELLIGENT_TIERING"}]},
        {"ID": "old-versions", "Status": "Enabled", "Filter": {"Prefix": "ver/"},
         "NoncurrentVersionExpiration": {"NoncurrentDays": 1}},
        {"ID": "mpu", "Status": "Enabled", "Filter": {"Prefix": ""},
         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
    ]})
    rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert {r["ID"] for r in rules} == {"expire-tmp", "tier-logs", "tagged", "old-versions", "mpu"}
    s3.put_object(Bucket=bucket, Key="tmp/a", Body=b"x")
    s3.put_object(Bucket=bucket, Key="logs/a", Body=b"x")
    s3.put_object(Bucket=bucket, Key="keep", Body=b"x", Tagging="class=it")
    old = s3.put_object(Bucket=bucket, Key="ver/a", Body=b"1")["VersionId"]
    s3.put_object(Bucket=bucket, Key="ver/a", Body=b"2")
    uid = s3.create_multipart_upload(Bucket=bucket, Key="never-finished")["UploadId"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        keys = {c["Key"]: c["StorageClass"] for c in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
        versions = [v["VersionId"] for v in s3.list_object_versions(Bucket=bucket, Prefix="ver/")["Versions"]]
        uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        if ("tmp/a" not in keys and keys.get("logs/a") == "GLACIER" and keys.get("keep") == "INTELLIGENT_TIERING"
                and old not in versions and not uploads):
            break
        time.sleep(0.5)
    assert "tmp/a" not in keys
    assert keys.get("logs/a") == "GLACIER"
    assert keys.get("keep") == "INTELLIGENT_TIERING"
    assert old not in versions and len(versions) == 1
    assert not uploads and uid
    assert s3.head_object(Bucket=bucket, Key="logs/a")["StorageClass"] == "GLACIER"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="logs/a")
    assert code(e) == "InvalidObjectState"
    s3.delete_bucket_lifecycle(Bucket=bucket)


# --- encryption -----------------------------------------------------------------------------------

def test_sse_s3_and_sse_c(s3server: S3Server, s3: Any, bucket: str) -> None:
    data = os.urandom(200_000) + b"PLAINTEXT-MARKER" * 10
    r = s3.put_object(Bucket=bucket, Key="sse", Body=data, ServerSideEncryption="AES256")
    assert r["ServerSideEncryption"] == "AES256"
    g = s3.get_object(Bucket=bucket, Key="sse")
    assert g["Body"].read() == data and g["ServerSideEncryption"] == "AES256"
    assert s3.get_object(Bucket=bucket, Key="sse", Range="bytes=65530-65600")["Body"].read() == data[65530:65601]
    blobs = list((s3server.state_dir / "objects" / "blobs").glob("*/*"))
    assert blobs and not any(b"PLAINTEXT-MARKER" in p.read_bytes() for p in blobs)
    key = os.urandom(32)
    kw = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key}
    s3.put_object(Bucket=bucket, Key="ssec", Body=b"secret stuff", **kw)
    assert s3.get_object(Bucket=bucket, Key="ssec", **kw)["Body"].read() == b"secret stuff"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="ssec")
    assert status(e) == 400
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="ssec", SSECustomerAlgorithm="AES256", SSECustomerKey=os.urandom(32))
    assert status(e) == 403
    # multipart with SSE-C, then copy to SSE-S3
    uid = s3.create_multipart_upload(Bucket=bucket, Key="ssec-mp", **kw)["UploadId"]
    parts = [s3.upload_part(Bucket=bucket, Key="ssec-mp", UploadId=uid, PartNumber=i, Body=chunk, **kw)["ETag"]
             for i, chunk in enumerate([b"1" * 5 * 1024 * 1024, b"2" * 100], 1)]
    s3.complete_multipart_upload(Bucket=bucket, Key="ssec-mp", UploadId=uid, MultipartUpload={
        "Parts": [{"PartNumber": i, "ETag": e} for i, e in enumerate(parts, 1)]})
    assert s3.get_object(Bucket=bucket, Key="ssec-mp", Range="bytes=5242878-5242881", **kw)["Body"].read() == \
        b"1122"
    s3.copy_object(Bucket=bucket, Key="re-encrypted", CopySource={"Bucket": bucket, "Key": "ssec"},
                   CopySourceSSECustomerAlgorithm="AES256", CopySourceSSECustomerKey=key,
                   ServerSideEncryption="AES256")
    assert s3.get_object(Bucket=bucket, Key="re-encrypted")["Body"].read() == b"secret stuff"
    # bucket default encryption
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [
        {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    time.sleep(2.1)  # bucket settings are cached up to 2 s
    assert s3.put_object(Bucket=bucket, Key="dflt", Body=b"d")["ServerSideEncryption"] == "AES256"


# --- tagging, cors --------------------------------------------------------------------------------

def test_object_tagging(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="t", Body=b"x", Tagging="a=1&b=two")
    assert s3.get_object_tagging(Bucket=bucket, Key="t")["TagSet"] == [{"Key": "a", "Value": "1"},
                                                                          {"Key": "b", "Value": "two"}]
    assert s3.get_object(Bucket=bucket, Key="t")["TagCount"] == 2
    s3.put_object_tagging(Bucket=bucket, Key="t", Tagging={"TagSet": [{"Key": "c", "Value": "3"}]})
    assert s3.get_object_tagging(Bucket=bucket, Key="t")["TagSet"] == [{"Key": "c", "Value": "3"}]
    s3.delete_object_tagging(Bucket=bucket, Key="t")
    assert s3.get_object_tagging(Bucket=bucket, Key="t")["TagSet"] == []
    with pytest.raises(ClientError) as e:
        s3.put_object_tagging(Bucket=bucket, Key="t", Tagging={"TagSet": [
            {"Key": f"k{i}", "Value": "v"} for i in range(11)]})
    assert status(e) == 400
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": [{"Key": "team", "Value": "x"}]})
    assert s3.get_bucket_tagging(Bucket=bucket)["TagSet"] == [{"Key": "team", "Value": "x"}]


def test_cors(s3server: S3Server, s3: Any, bucket: str) -> None:
    with pytest.raises(ClientError) as e:
        s3.get_bucket_cors(Bucket=bucket)
    assert code(e) == "NoSuchCORSConfiguration"
    s3.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": [
        {"AllowedOrigins": ["https://app.example"], "AllowedMethods": ["GET", "PUT"], "AllowedHeaders": ["*"],
         "ExposeHeaders": ["ETag"], "MaxAgeSeconds": 300}]})
    assert s3.get_bucket_cors(Bucket=bucket)["CORSRules"][0]["AllowedOrigins"] == ["https://app.example"]
    time.sleep(2.1)
    r = httpx.options(f"{s3server.url}/{bucket}/obj", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-type,x-amz-date"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "PUT" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-max-age"] == "300"
    r = httpx.options(f"{s3server.url}/{bucket}/obj", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"})
    assert r.status_code == 403 and b"CORSForbidden" in r.content
    r = httpx.options(f"{s3server.url}/{bucket}/obj", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "DELETE"})
    assert r.status_code == 403
    s3.put_object(Bucket=bucket, Key="obj", Body=b"x")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "obj"})
    r = httpx.get(url, headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert r.headers["access-control-expose-headers"] == "ETag"


# --- access control -------------------------------------------------------------------------------

def _public(s3server: S3Server, blocked: bool, token_key: str = "token") -> None:
    with s3server.api() as api:
        r = api.put("/v1/s3/public-access-block", json={"block_public_access": blocked})
        assert r.status_code == 200, r.text


def test_canned_acl_public_read_and_block(s3server: S3Server, s3: Any) -> None:
    name = new_name("pub")
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="o", Body=b"public data")
    url = f"{s3server.url}/{name}/o"
    assert httpx.get(url).status_code == 403  # anonymous, private
    with pytest.raises(ClientError) as e:  # the project blocks public access by default
        s3.put_object_acl(Bucket=name, Key="o", ACL="public-read")
    assert code(e) == "AccessDenied"
    _public(s3server, False)
    try:
        s3.put_object_acl(Bucket=name, Key="o", ACL="public-read")
        assert httpx.get(url).content == b"public data"
        acl = s3.get_object_acl(Bucket=name, Key="o")
        assert any(g["Grantee"].get("URI", "").endswith("AllUsers") and g["Permission"] == "READ"
                   for g in acl["Grants"])
        assert httpx.get(f"{s3server.url}/{name}").status_code == 403  # listing is not public
        s3.put_bucket_acl(Bucket=name, ACL="public-read")
        assert httpx.get(f"{s3server.url}/{name}").status_code == 200
        s3.put_object(Bucket=name, Key="o2", Body=b"p2", ACL="public-read")
        assert httpx.get(f"{s3server.url}/{name}/o2").content == b"p2"
        assert httpx.put(f"{s3server.url}/{name}/anon", content=b"x").status_code == 403
    finally:
        _public(s3server, True)
    time.sleep(0.1)
    assert httpx.get(url).status_code == 403  # blocking again hides existing public grants


def test_bucket_policy_anonymous_and_deny(s3server: S3Server, s3: Any) -> None:
    name = new_name("pol")
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="public/a", Body=b"A")
    s3.put_object(Bucket=name, Key="private/b", Body=b"B")
    policy = {"Version": "2012-10-17", "Statement": [{
        "Sid": "PublicRead", "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject"],
        "Resource": [f"arn:aws:s3:::{name}/public/*"]}]}
    with pytest.raises(ClientError) as e:
        s3.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))
    assert code(e) == "AccessDenied"  # public policies are blocked by default
    _public(s3server, False)
    try:
        s3.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))
        assert json.loads(s3.get_bucket_policy(Bucket=name)["Policy"]) == policy
        time.sleep(0.05)
        assert httpx.get(f"{s3server.url}/{name}/public/a").content == b"A"
        assert httpx.get(f"{s3server.url}/{name}/private/b").status_code == 403
        # an explicit Deny beats the owner's own rights
        deny = {"Version": "2012-10-17", "Statement": [policy["Statement"][0], {
            "Effect": "Deny", "Principal": {"AWS": "*"}, "Action": "s3:Delete*",
            "Resource": f"arn:aws:s3:::{name}/*"}, {
            "Effect": "Deny", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{name}/*",
            "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}}]}
        s3.put_bucket_policy(Bucket=name, Policy=json.dumps(deny))
        time.sleep(2.1)
        with pytest.raises(ClientError) as e:
            s3.delete_object(Bucket=name, Key="public/a")
        assert code(e) == "AccessDenied"
        assert s3.get_object(Bucket=name, Key="private/b")["Body"].read() == b"B"  # 127.0.0.1 not denied
        s3.delete_bucket_policy(Bucket=name)
    finally:
        _public(s3server, True)
    for bad in ("{not json", json.dumps({"Statement": [{"Effect": "Maybe", "Principal": "*", "Action": "s3:*",
                                                          "Resource": f"arn:aws:s3:::{name}/*"}]}),
                json.dumps({"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                                           "Resource": "arn:aws:s3:::other-bucket/*"}]})):
        with pytest.raises(ClientError) as e:
            s3.put_bucket_policy(Bucket=name, Policy=bad)
        assert code(e) == "MalformedPolicy"


def test_cross_project_access(s3server: S3Server, s3: Any) -> None:
    other = s3server.client("2")
    other_project = s3server.creds["other_project_id"]
    name = new_name("xp")
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="doc", Body=b"shared?")
    with pytest.raises(ClientError) as e:
        other.get_object(Bucket=name, Key="doc")
    assert code(e) == "AccessDenied"
    with pytest.raises(ClientError) as e:
        other.list_objects_v2(Bucket=name)
    assert code(e) == "AccessDenied"
    assert name not in [b["Name"] for b in other.list_buckets()["Buckets"]]
    # object ACL grant to the other project
    s3.put_object_acl(Bucket=name, Key="doc", GrantRead=f'id="{other_project}"')
    assert other.get_object(Bucket=name, Key="doc")["Body"].read() == b"shared?"
    with pytest.raises(ClientError) as e:
        other.put_object(Bucket=name, Key="doc", Body=b"overwrite")
    assert code(e) == "AccessDenied"
    # bucket ACL WRITE + READ via XML grants
    owner = s3.get_bucket_acl(Bucket=name)["Owner"]
    s3.put_bucket_acl(Bucket=name, AccessControlPolicy={"Owner": owner, "Grants": [
        {"Grantee": {"Type": "CanonicalUser", "ID": other_project}, "Permission": "WRITE"},
        {"Grantee": {"Type": "CanonicalUser", "ID": other_project}, "Permission": "READ"}]})
    time.sleep(2.1)
    other.put_object(Bucket=name, Key="from-other", Body=b"hi")
    assert [c["Key"] for c in other.list_objects_v2(Bucket=name)["Contents"]] == ["doc", "from-other"]
    # bucket policy granting the other project
    name2 = new_name("xp2")
    s3.create_bucket(Bucket=name2)
    s3.put_object(Bucket=name2, Key="r", Body=b"policy-shared")
    s3.put_bucket_policy(Bucket=name2, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{other_project}:root"},
        "Action": ["s3:GetObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{name2}", f"arn:aws:s3:::{name2}/*"]}]}))
    assert other.get_object(Bucket=name2, Key="r")["Body"].read() == b"policy-shared"
    assert other.list_objects_v2(Bucket=name2)["KeyCount"] == 1
    with pytest.raises(ClientError) as e:
        other.delete_object(Bucket=name2, Key="r")
    assert code(e) == "AccessDenied"
    with pytest.raises(ClientError) as e:
        other.delete_bucket(Bucket=name2)
    assert code(e) == "AccessDenied"


def test_credential_limits(s3server: S3Server, s3: Any) -> None:
    ro = s3server.client("_ro")
    s3.create_bucket(Bucket="limited-bucket") if "limited-bucket" not in [
        b["Name"] for b in s3.list_buckets()["Buckets"]] else None
    s3.put_object(Bucket="limited-bucket", Key="x", Body=b"1")
    assert ro.get_object(Bucket="limited-bucket", Key="x")["Body"].read() == b"1"
    with pytest.raises(ClientError) as e:
        ro.put_object(Bucket="limited-bucket", Key="y", Body=b"1")
    assert code(e) == "AccessDenied"
    with pytest.raises(ClientError) as e:
        ro.create_bucket(Bucket=new_name("ro"))
    assert code(e) == "AccessDenied"
    lim = s3server.client("_lim")
    lim.put_object(Bucket="limited-bucket", Key="z", Body=b"ok")
    other = new_name("nolim")
    s3.create_bucket(Bucket=other)
    with pytest.raises(ClientError) as e:
        lim.list_objects_v2(Bucket=other)
    assert code(e) == "AccessDenied"
    assert [b["Name"] for b in lim.list_buckets()["Buckets"]] == ["limited-bucket"]


# --- REST management API --------------------------------------------------------------------------

def test_rest_credentials_and_buckets(s3server: S3Server, s3: Any) -> None:
    import boto3
    from botocore.config import Config

    with s3server.api() as api:
        r = api.post("/v1/s3/credentials", json={"name": "ci", "read_only": False})
        assert r.status_code == 201, r.text
        cred = r.json()
        assert cred["secret_key"] and cred["access_key"].startswith("HBK")
        listed = api.get("/v1/s3/credentials").json()["items"]
        assert cred["access_key"] in [c["access_key"] for c in listed]
        assert all("secret_key" not in c for c in listed)
        client = boto3.client("s3", endpoint_url=s3server.url, aws_access_key_id=cred["access_key"],
                              aws_secret_access_key=cred["secret_key"], region_name="us-east-1",
                              config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
        name = new_name("rest")
        client.create_bucket(Bucket=name)
        client.put_object(Bucket=name, Key="a", Body=b"12345")
        client.put_object(Bucket=name, Key="b", Body=b"123", StorageClass="STANDARD_IA")
        b = api.get(f"/v1/buckets/{name}").json()
        assert b["objects"] == 2 and b["bytes"] == 8
        assert b["bytes_by_storage_class"] == {"STANDARD": 5, "STANDARD_IA": 3}
        names = [x["name"] for x in api.get("/v1/buckets", params={"limit": 1000}).json()["items"]]
        assert name in names
        assert api.get("/v1/buckets/does-not-exist").status_code == 404
        r = api.delete(f"/v1/s3/credentials/{cred['id']}")
        assert r.status_code == 200 and r.json()["revoked_at"]
        with pytest.raises(ClientError) as e:
            client.list_objects_v2(Bucket=name)
        assert code(e) == "InvalidAccessKeyId"
        r = api.post("/v1/s3/credentials", json={"name": "bad", "buckets": ["Not_A_Bucket"]})
        assert r.status_code == 422


def test_quota_objects(s3server: S3Server, s3: Any) -> None:
    import sqlite3

    db = sqlite3.connect(s3server.state_dir / "hackboot.db")
    project = s3server.creds["project_id"]
    used = db.execute("SELECT used FROM quota_usage WHERE project_id=? AND resource='buckets'",
                      (project,)).fetchone()[0]
    db.execute("UPDATE quota_usage SET limit_value=? WHERE project_id=? AND resource='buckets'", (used, project))
    db.commit()
    try:
        with pytest.raises(ClientError) as e:
            s3.create_bucket(Bucket=new_name("quota"))
        assert code(e) == "TooManyBuckets"
    finally:
        db.execute("UPDATE quota_usage SET limit_value=100000 WHERE project_id=? AND resource='buckets'", (project,))
        db.commit()
    name = new_name("q")
    s3.create_bucket(Bucket=name)
    bytes_used = db.execute("SELECT used FROM quota_usage WHERE project_id=? AND resource='object_bytes'",
                            (project,)).fetchone()[0]
    db.execute("UPDATE quota_usage SET limit_value=? WHERE project_id=? AND resource='object_bytes'",
               (bytes_used + 100, project))
    db.commit()
    try:
        s3.put_object(Bucket=name, Key="fits", Body=b"x" * 100)
        with pytest.raises(ClientError) as e:
            s3.put_object(Bucket=name, Key="too-much", Body=b"x" * 10)
        assert code(e) == "QuotaExceeded"
        s3.delete_object(Bucket=name, Key="fits")  # releases the bytes
        s3.put_object(Bucket=name, Key="now-fits", Body=b"x" * 10)
    finally:
        db.execute("UPDATE quota_usage SET limit_value=? WHERE project_id=? AND resource='object_bytes'",
                   (1024**4, project))
        db.commit()
        db.close()


# --- browser POST uploads -------------------------------------------------------------------------

def test_browser_post_upload(s3server: S3Server, s3: Any, bucket: str) -> None:
    post = s3.generate_presigned_post(bucket, "uploads/${filename}", Fields={"Content-Type": "text/plain"},
                                      Conditions=[["starts-with", "$key", "uploads/"],
                                                  {"Content-Type": "text/plain"},
                                                  ["content-length-range", 1, 1000]], ExpiresIn=60)
    r = httpx.post(post["url"], data=post["fields"], files={"file": ("hello.txt", b"posted!", "text/plain")})
    assert r.status_code == 204, r.text
    g = s3.get_object(Bucket=bucket, Key="uploads/hello.txt")
    assert g["Body"].read() == b"posted!" and g["ContentType"] == "text/plain"
    r = httpx.post(post["url"], data=post["fields"], files={"file": ("big.txt", b"x" * 2000, "text/plain")})
    assert r.status_code == 400 and b"EntityTooLarge" in r.content
    bad = dict(post["fields"], key="elsewhere/x")
    r = httpx.post(post["url"], data=bad, files={"file": ("x", b"1", "text/plain")})
    assert r.status_code == 403
    forged = dict(post["fields"], policy=post["fields"]["policy"][:-4] + "AAAA")
    r = httpx.post(post["url"], data=forged, files={"file": ("x", b"1", "text/plain")})
    assert r.status_code == 403
    extra = dict(post["fields"], **{"x-amz-meta-sneaky": "1"})
    r = httpx.post(post["url"], data=extra, files={"file": ("y.txt", b"1", "text/plain")})
    assert r.status_code == 403 and b"Extra input fields" in r.content
