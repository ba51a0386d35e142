"""ACLs, owner information and ExpectedBucketOwner between hostile projects.

- A tenant cannot grant itself into another project's bucket or objects: not through PutBucketAcl /
  PutObjectAcl, not with ACL headers on an object it may write (public-read-write bucket), not by
  naming the victim's canonical ID in its own ACLs.
- Owner information (canonical ID, display name) is shown only to callers S3 shows it to: those who may
  read the ACL or list the bucket.
- ExpectedBucketOwner cannot tell a prober whether its guess of another project's id is right: a wrong
  guess and a right one get the same answer when the caller has no right on the bucket.
- A missing key and a private key look the same (403) to a caller who may not list the bucket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.security._s3 import S3Key, boto, bucket_name, error_code, s3_key, send, sign
from tests.security.conftest import Tenant
from tests.support import Cloud


def _code(call: Any, **kwargs: Any) -> str:
    with pytest.raises(ClientError) as exc:
        call(**kwargs)
    return str(exc.value.response["Error"]["Code"])


def _ids(acl: dict[str, Any]) -> set[str]:
    return {g["Grantee"].get("ID") or g["Grantee"].get("URI", "") for g in acl["Grants"]}


def test_a_tenant_cannot_grant_itself_into_another_projects_bucket(
        cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    victim, attacker = tenant_factory("admin"), tenant_factory("admin")
    for t in (victim, attacker):
        t.client.buckets.set_public_access_block(False)  # type: ignore[attr-defined]
    vs3, as3 = boto(cloud, s3_key(victim)), boto(cloud, s3_key(attacker))
    bucket = bucket_name("acl")
    vs3.create_bucket(Bucket=bucket)
    vs3.put_object(Bucket=bucket, Key="secret", Body=b"victim data")
    me = f'id="{attacker.project_id}"'
    assert _code(as3.put_bucket_acl, Bucket=bucket, GrantFullControl=me) == "AccessDenied"
    assert _code(as3.put_object_acl, Bucket=bucket, Key="secret", GrantRead=me) == "AccessDenied"
    assert _code(as3.put_object_acl, Bucket=bucket, Key="secret", ACL="public-read") == "AccessDenied"
    assert _code(as3.put_bucket_ownership_controls, Bucket=bucket,
                 OwnershipControls={"Rules": [{"ObjectOwnership": "ObjectWriter"}]}) == "AccessDenied"
    assert _code(as3.get_object, Bucket=bucket, Key="secret") == "AccessDenied"
    assert _ids(vs3.get_bucket_acl(Bucket=bucket)) == {victim.project_id}
    assert _ids(vs3.get_object_acl(Bucket=bucket, Key="secret")) == {victim.project_id}

    # With a public-read-write bucket the attacker may add objects, but not decide who reads them or give
    # itself rights over existing ones: ACL headers need s3:PutObjectAcl on top of the bucket's WRITE.
    vs3.put_bucket_acl(Bucket=bucket, ACL="public-read-write")
    for acl in ({"GrantFullControl": me}, {"ACL": "public-read"}, {"GrantReadACP": me}):
        assert _code(as3.put_object, Bucket=bucket, Key="planted", Body=b"x", **acl) == "AccessDenied", acl
    assert _code(as3.put_object_acl, Bucket=bucket, Key="secret", GrantRead=me) == "AccessDenied"
    assert _code(as3.get_object, Bucket=bucket, Key="secret") == "AccessDenied"
    as3.put_object(Bucket=bucket, Key="planted", Body=b"x")
    assert _code(as3.get_object_acl, Bucket=bucket, Key="planted") == "AccessDenied"
    vs3.put_bucket_acl(Bucket=bucket, ACL="private")

    # Naming the victim in the attacker's own ACLs gives the attacker nothing of the victim's.
    own = bucket_name("acl")
    as3.create_bucket(Bucket=own, GrantFullControl=f'id="{victim.project_id}"')
    assert _code(as3.get_object, Bucket=bucket, Key="secret") == "AccessDenied"


def test_owner_information_only_for_those_who_may_see_it(cloud: Cloud,
                                                         tenant_factory: Callable[..., Tenant]) -> None:
    victim, prober = tenant_factory("admin"), tenant_factory("admin")
    vs3, ps3 = boto(cloud, s3_key(victim)), boto(cloud, s3_key(prober))
    bucket = bucket_name("own")
    vs3.create_bucket(Bucket=bucket)
    vs3.put_object(Bucket=bucket, Key="k", Body=b"x")
    mp = vs3.create_multipart_upload(Bucket=bucket, Key="mp")
    for call, kwargs in ((ps3.get_bucket_acl, {}), (ps3.get_object_acl, {"Key": "k"}),
                         (ps3.list_objects_v2, {"FetchOwner": True}), (ps3.list_objects, {}),
                         (ps3.list_object_versions, {}), (ps3.list_multipart_uploads, {}),
                         (ps3.list_parts, {"Key": "mp", "UploadId": mp["UploadId"]}),
                         (ps3.get_bucket_ownership_controls, {}), (ps3.get_bucket_policy_status, {})):
        with pytest.raises(ClientError) as exc:
            call(Bucket=bucket, **kwargs)
        assert exc.value.response["Error"]["Code"] == "AccessDenied", call
        assert victim.project_id not in str(exc.value.response), call
    # ListBuckets names the caller's own project, never another's
    assert ps3.list_buckets()["Owner"]["ID"] == prober.project_id
    # Granted READ on the bucket, the prober sees the owner in listings, as S3 shows it; not the ACL.
    vs3.put_bucket_acl(Bucket=bucket, GrantRead=f'id="{prober.project_id}"')
    owner = ps3.list_objects_v2(Bucket=bucket, FetchOwner=True)["Contents"][0]["Owner"]
    assert owner["ID"] == victim.project_id
    assert _code(ps3.get_bucket_acl, Bucket=bucket) == "AccessDenied"


def _raw(cloud: Cloud, key: S3Key, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    url, signed = sign(cloud, key, method, path, headers=headers)
    return send(method, url, headers=signed)


def test_expected_bucket_owner_is_no_oracle_for_other_projects_ids(
        cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    victim, prober = tenant_factory("admin"), tenant_factory("admin")
    vs3 = boto(cloud, s3_key(victim))
    pkey = s3_key(prober)
    bucket = bucket_name("exp")
    vs3.create_bucket(Bucket=bucket)
    vs3.put_object(Bucket=bucket, Key="k", Body=b"x")
    for method, path in (("GET", f"/{bucket}"), ("GET", f"/{bucket}/k"), ("GET", f"/{bucket}?acl"),
                         ("PUT", f"/{bucket}/new"), ("DELETE", f"/{bucket}/k"), ("GET", f"/{bucket}/missing")):
        answers = []
        for guess in (victim.project_id, "prj-00000000000000000000000000", prober.project_id):
            r = _raw(cloud, pkey, method, path, {"x-amz-expected-bucket-owner": guess})
            body = r.text.split("<RequestId>")[0]  # request ids differ, nothing else may
            answers.append((r.status_code, error_code(r), body))
        assert answers[0] == answers[1] == answers[2], (method, path, answers)
        assert answers[0][0] == 403 and answers[0][1] == "AccessDenied"
    for method in ("HEAD",):
        statuses = {_raw(cloud, pkey, method, f"/{bucket}", {"x-amz-expected-bucket-owner": g}).status_code
                    for g in (victim.project_id, "prj-00000000000000000000000000")}
        assert statuses == {403}
    assert vs3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"x"  # nothing was deleted


def test_missing_and_private_keys_look_alike_without_list_permission(
        cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    victim, prober = tenant_factory("admin"), tenant_factory("admin")
    vs3, ps3 = boto(cloud, s3_key(victim)), boto(cloud, s3_key(prober))
    bucket = bucket_name("miss")
    vs3.create_bucket(Bucket=bucket)
    vs3.put_object(Bucket=bucket, Key="exists", Body=b"x")
    for key in ("exists", "missing"):
        assert _code(ps3.get_object, Bucket=bucket, Key=key) == "AccessDenied"
        assert _code(ps3.get_object_acl, Bucket=bucket, Key=key) == "AccessDenied"
        assert _code(ps3.get_object_tagging, Bucket=bucket, Key=key) == "AccessDenied"
        r = httpx.get(f"{cloud.s3_url}/{bucket}/{key}", timeout=10)
        assert r.status_code == 403 and error_code(r) == "AccessDenied"


def test_owning_what_it_writes_gives_a_writer_nothing_else(cloud: Cloud,
                                                          tenant_factory: Callable[..., Tenant]) -> None:
    """Under ObjectWriter ownership a writer owns the versions it writes, and only those: overwriting a key
    gives no access to the versions before it, and the bucket's public access block still binds it."""
    victim, attacker = tenant_factory("admin"), tenant_factory("admin")
    attacker.client.buckets.set_public_access_block(False)  # type: ignore[attr-defined]
    vs3, as3 = boto(cloud, s3_key(victim)), boto(cloud, s3_key(attacker))
    bucket = bucket_name("ow")
    vs3.create_bucket(Bucket=bucket, ObjectOwnership="ObjectWriter")
    vs3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    vs3.put_bucket_acl(Bucket=bucket, GrantWrite=f'id="{attacker.project_id}"',
                       GrantFullControl=f'id="{victim.project_id}"')
    old = vs3.put_object(Bucket=bucket, Key="secret", Body=b"victim data")["VersionId"]
    as3.put_object(Bucket=bucket, Key="secret", Body=b"attacker data")
    assert as3.get_object(Bucket=bucket, Key="secret")["Body"].read() == b"attacker data"
    assert _code(as3.get_object, Bucket=bucket, Key="secret", VersionId=old) == "AccessDenied"
    assert _code(as3.get_object_acl, Bucket=bucket, Key="secret", VersionId=old) == "AccessDenied"
    assert _code(as3.put_object_acl, Bucket=bucket, Key="secret", VersionId=old,
                 GrantRead=f'id="{attacker.project_id}"') == "AccessDenied"
    assert _code(as3.list_object_versions, Bucket=bucket) == "AccessDenied"
    # the victim's project blocks public access (the default): the attacker's own switch does not matter
    assert _code(as3.put_object, Bucket=bucket, Key="pub", Body=b"x", ACL="public-read") == "AccessDenied"
    assert _code(as3.put_object_acl, Bucket=bucket, Key="secret", ACL="public-read") == "AccessDenied"
    assert httpx.get(f"{cloud.s3_url}/{bucket}/secret", timeout=10).status_code == 403
    assert vs3.get_object(Bucket=bucket, Key="secret", VersionId=old)["Body"].read() == b"victim data"
