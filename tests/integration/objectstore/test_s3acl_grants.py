"""ACLs as S3 clients see them: owners with display names, canned ACLs and their effect on access, grants by
canonical ID, email address and group (headers and AccessControlPolicy XML), ACLs of object versions, and
anonymous access through ACLs (404 vs 403 by the caller's right to list).

Two fresh projects with their public access block switched off play two S3 accounts ("owner" and "peer"),
so these tests change no setting the rest of the session relies on.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from typing import Any

import boto3
import httpx
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.integration.objectstore.conftest import AWS, S3Server, new_name

ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"
AUTH_USERS = "http://acs.amazonaws.com/groups/global/AuthenticatedUsers"
LOG_DELIVERY = "http://acs.amazonaws.com/groups/s3/LogDelivery"
XSI = 'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'


@dataclass
class Account:
    project_id: str
    name: str
    s3: Any
    url: str
    access_key: str
    secret_key: str

    def anon_get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}/{path}", timeout=30)

    def signed(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) \
            -> httpx.Response:
        """A raw request signed with SigV4 (every header given is signed), as other SDKs send them."""
        req = AWSRequest(method=method, url=f"{self.url}/{path}", data=body, headers=dict(headers or {}))
        req.context["payload_signing_enabled"] = True
        S3SigV4Auth(Credentials(self.access_key, self.secret_key), "s3", "us-east-1").add_auth(req)
        return httpx.request(method, req.url, headers=dict(req.headers.items()), content=body, timeout=30)


def make_account(s3server: S3Server, prefix: str, email: str = "") -> Account:
    """A new project (public access block off) and an S3 key for it, made through the REST API."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    with s3server.api() as api:
        project = api.post("/v1/projects", json={"name": name}).json()
        token = api.post("/v1/tokens", json={"project_id": project["id"], "role": "admin", "name": "acl"}).json()
        if email:
            user = api.post("/v1/users", json={"username": f"u-{uuid.uuid4().hex[:8]}", "email": email})
            assert user.status_code == 201, user.text
            r = api.put(f"/v1/projects/{project['id']}/members/{user.json()['id']}", json={"role": "member"})
            assert r.status_code == 200, r.text
    headers = {"Authorization": f"Bearer {token['token']}"}
    with httpx.Client(base_url=s3server.api_url, headers=headers, timeout=30) as api:
        r = api.put("/v1/s3/public-access-block", json={"block_public_access": False})
        assert r.status_code == 200, r.text
        key = api.post("/v1/s3/credentials", json={"name": "acl"}).json()
    cfg = Config(signature_version="s3v4", retries={"max_attempts": 1}, s3={"addressing_style": "path"})
    client = boto3.client("s3", endpoint_url=s3server.url, aws_access_key_id=key["access_key"],
                          aws_secret_access_key=key["secret_key"], region_name="us-east-1", config=cfg)
    return Account(project["id"], name, client, s3server.url, key["access_key"], key["secret_key"])


@pytest.fixture(scope="module")
def owner(s3server: S3Server) -> Account:
    return make_account(s3server, "acl-owner")


@pytest.fixture(scope="module")
def peer_email() -> str:
    return f"peer-{uuid.uuid4().hex[:8]}@example.com"


@pytest.fixture(scope="module")
def peer(s3server: S3Server, peer_email: str) -> Account:
    return make_account(s3server, "acl-peer", email=peer_email)


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def status(exc: pytest.ExceptionInfo[ClientError]) -> int:
    return int(exc.value.response["ResponseMetadata"]["HTTPStatusCode"])


def fails(call: Any, expected: str, **kwargs: Any) -> int:
    with pytest.raises(ClientError) as exc:
        call(**kwargs)
    assert code(exc) == expected, (kwargs, exc.value.response["Error"])
    return status(exc)


def grants(acl: dict[str, Any]) -> set[tuple[str, str]]:
    """{(grantee ID or group URI, permission)} of a GetBucketAcl/GetObjectAcl answer."""
    return {(g["Grantee"].get("ID") or g["Grantee"]["URI"], g["Permission"]) for g in acl["Grants"]}


def new_bucket(acc: Account, **kwargs: Any) -> str:
    name = new_name("acl")
    acc.s3.create_bucket(Bucket=name, **kwargs)
    return name


# --- owners -------------------------------------------------------------------------------------

def test_owner_id_and_display_name_are_the_same_everywhere(owner: Account) -> None:
    expected = {"ID": owner.project_id, "DisplayName": owner.name}
    b = new_bucket(owner)
    owner.s3.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    owner.s3.put_object(Bucket=b, Key="k", Body=b"x")
    up = owner.s3.create_multipart_upload(Bucket=b, Key="mp")
    assert owner.s3.list_buckets()["Owner"] == expected
    assert owner.s3.list_objects_v2(Bucket=b, FetchOwner=True)["Contents"][0]["Owner"] == expected
    assert "Owner" not in owner.s3.list_objects_v2(Bucket=b)["Contents"][0]
    assert owner.s3.list_objects(Bucket=b)["Contents"][0]["Owner"] == expected
    assert owner.s3.list_object_versions(Bucket=b)["Versions"][0]["Owner"] == expected
    upload = owner.s3.list_multipart_uploads(Bucket=b)["Uploads"][0]
    assert upload["Owner"] == expected and upload["Initiator"] == expected
    parts = owner.s3.list_parts(Bucket=b, Key="mp", UploadId=up["UploadId"])
    assert parts["Owner"] == expected and parts["Initiator"] == expected
    for acl in (owner.s3.get_bucket_acl(Bucket=b), owner.s3.get_object_acl(Bucket=b, Key="k")):
        assert acl["Owner"] == expected
        assert acl["Grants"] == [{"Grantee": {"Type": "CanonicalUser", **expected}, "Permission": "FULL_CONTROL"}]


# --- canned ACLs ----------------------------------------------------------------------------------

CANNED_BUCKET = {
    "private": set(),
    "public-read": {(ALL_USERS, "READ")},
    "public-read-write": {(ALL_USERS, "READ"), (ALL_USERS, "WRITE")},
    "authenticated-read": {(AUTH_USERS, "READ")},
    "log-delivery-write": {(LOG_DELIVERY, "WRITE"), (LOG_DELIVERY, "READ_ACP")},
    "bucket-owner-read": set(),
    "bucket-owner-full-control": set(),
}


def test_canned_acls_on_buckets_and_objects(owner: Account) -> None:
    me = (owner.project_id, "FULL_CONTROL")
    for canned, extra in CANNED_BUCKET.items():
        b = new_bucket(owner, ACL=canned) if canned != "log-delivery-write" else new_bucket(owner)
        owner.s3.put_bucket_acl(Bucket=b, ACL=canned)
        assert grants(owner.s3.get_bucket_acl(Bucket=b)) == {me} | extra, canned
        if canned != "log-delivery-write":
            owner.s3.put_object(Bucket=b, Key="o", Body=b"x", ACL=canned)
            assert grants(owner.s3.get_object_acl(Bucket=b, Key="o")) == {me} | extra, canned
    fails(owner.s3.put_bucket_acl, "InvalidArgument", Bucket=new_bucket(owner), ACL="public-everything")


def test_canned_acls_decide_who_reads(owner: Account, peer: Account) -> None:
    b = new_bucket(owner)
    for canned in ("private", "public-read", "authenticated-read", "bucket-owner-full-control"):
        owner.s3.put_object(Bucket=b, Key=canned, Body=canned.encode(), ACL=canned)
    assert owner.anon_get(f"{b}/public-read").content == b"public-read"  # no signature at all
    assert peer.s3.get_object(Bucket=b, Key="public-read")["Body"].read() == b"public-read"
    assert peer.s3.get_object(Bucket=b, Key="authenticated-read")["Body"].read() == b"authenticated-read"
    assert owner.anon_get(f"{b}/authenticated-read").status_code == 403
    for key in ("private", "bucket-owner-full-control"):
        assert owner.anon_get(f"{b}/{key}").status_code == 403
        assert fails(peer.s3.get_object, "AccessDenied", Bucket=b, Key=key) == 403
    # READ on an object is not the right to change or read its ACL
    fails(peer.s3.get_object_acl, "AccessDenied", Bucket=b, Key="public-read")
    fails(peer.s3.put_object_acl, "AccessDenied", Bucket=b, Key="public-read", ACL="public-read-write")
    fails(peer.s3.delete_object, "AccessDenied", Bucket=b, Key="public-read")


def test_bucket_canned_acls_open_listing_and_writing(owner: Account, peer: Account) -> None:
    b = new_bucket(owner, ACL="authenticated-read")
    owner.s3.put_object(Bucket=b, Key="k", Body=b"x")
    assert [o["Key"] for o in peer.s3.list_objects_v2(Bucket=b)["Contents"]] == ["k"]
    assert owner.anon_get(b).status_code == 403
    fails(peer.s3.put_object, "AccessDenied", Bucket=b, Key="p", Body=b"p")
    owner.s3.put_bucket_acl(Bucket=b, ACL="public-read-write")
    assert owner.anon_get(b).status_code == 200
    r = httpx.put(f"{owner.url}/{b}/anon", content=b"anonymous write", timeout=30)
    assert r.status_code == 200, r.text
    peer.s3.put_object(Bucket=b, Key="p", Body=b"p")
    assert owner.s3.get_object(Bucket=b, Key="anon")["Body"].read() == b"anonymous write"
    owner.s3.put_bucket_acl(Bucket=b, ACL="private")
    assert owner.anon_get(b).status_code == 403
    fails(peer.s3.list_objects_v2, "AccessDenied", Bucket=b)


# --- grants ---------------------------------------------------------------------------------------

def test_header_grants_by_id_email_and_group(owner: Account, peer: Account, peer_email: str) -> None:
    b = new_bucket(owner)
    owner.s3.put_object(Bucket=b, Key="k", Body=b"granted", GrantRead=f'id="{peer.project_id}"')
    acl = owner.s3.get_object_acl(Bucket=b, Key="k")
    assert grants(acl) == {(peer.project_id, "READ")}  # header grants are the whole ACL, as in S3
    shown = [g["Grantee"] for g in acl["Grants"] if g["Grantee"].get("ID") == peer.project_id]
    assert shown == [{"Type": "CanonicalUser", "ID": peer.project_id, "DisplayName": peer.name}]
    assert peer.s3.get_object(Bucket=b, Key="k")["Body"].read() == b"granted"

    owner.s3.put_object_acl(Bucket=b, Key="k", GrantFullControl=f'emailAddress="{peer_email.upper()}", '
                                                                f'id="{owner.project_id}"',
                            GrantRead=f'uri="{AUTH_USERS}"')
    assert grants(owner.s3.get_object_acl(Bucket=b, Key="k")) == {
        (owner.project_id, "FULL_CONTROL"), (peer.project_id, "FULL_CONTROL"), (AUTH_USERS, "READ")}
    assert grants(peer.s3.get_object_acl(Bucket=b, Key="k"))  # FULL_CONTROL includes READ_ACP
    peer.s3.put_object_acl(Bucket=b, Key="k", ACL="private")  # …and WRITE_ACP
    fails(peer.s3.get_object, "AccessDenied", Bucket=b, Key="k")

    owner.s3.put_bucket_acl(Bucket=b, GrantWrite=f'uri="{LOG_DELIVERY}"', GrantReadACP=f'uri="{LOG_DELIVERY}"')
    assert grants(owner.s3.get_bucket_acl(Bucket=b)) >= {(LOG_DELIVERY, "WRITE"), (LOG_DELIVERY, "READ_ACP")}


def test_grants_to_unknown_accounts_are_refused(owner: Account) -> None:
    b = new_bucket(owner)
    owner.s3.put_object(Bucket=b, Key="k", Body=b"x")
    assert fails(owner.s3.put_object_acl, "UnresolvableGrantByEmailAddress", Bucket=b, Key="k",
                 GrantRead='emailAddress="nobody-here@example.com"') == 400
    assert fails(owner.s3.put_object_acl, "InvalidArgument", Bucket=b, Key="k", GrantRead='id="prj-doesnotexist"') \
        == 400
    fails(owner.s3.put_bucket_acl, "InvalidArgument", Bucket=b, GrantRead='uri="http://example.com/groups/x"')
    fails(owner.s3.put_object, "InvalidArgument", Bucket=b, Key="n", Body=b"x", GrantRead='id="prj-doesnotexist"')
    fails(owner.s3.create_bucket, "UnresolvableGrantByEmailAddress", Bucket=new_name("acl"),
          GrantRead='emailAddress="nobody-here@example.com"')
    fails(owner.s3.put_object_acl, "InvalidRequest", Bucket=b, Key="k", ACL="private",
          GrantRead=f'uri="{ALL_USERS}"')
    assert grants(owner.s3.get_object_acl(Bucket=b, Key="k")) == {(owner.project_id, "FULL_CONTROL")}
    with pytest.raises(ClientError):  # nothing was created either
        owner.s3.head_object(Bucket=b, Key="n")


def _policy_body(owner: Account, *grantees: tuple[str, str]) -> dict[str, Any]:
    g = [{"Grantee": {"Type": "CanonicalUser", "ID": owner.project_id}, "Permission": "FULL_CONTROL"}]
    for kind, value in grantees:
        grantee = {"CanonicalUser": {"Type": "CanonicalUser", "ID": value},
                   "Email": {"Type": "AmazonCustomerByEmail", "EmailAddress": value},
                   "Group": {"Type": "Group", "URI": value}}[kind]
        g.append({"Grantee": grantee, "Permission": "READ"})
    return {"Owner": {"ID": owner.project_id}, "Grants": g}


def test_access_control_policy_documents_and_revoking_all(owner: Account, peer: Account, peer_email: str) -> None:
    b = new_bucket(owner)
    owner.s3.put_object(Bucket=b, Key="k", Body=b"doc")
    owner.s3.put_bucket_acl(Bucket=b, AccessControlPolicy=_policy_body(owner, ("Email", peer_email)))
    owner.s3.put_object_acl(Bucket=b, Key="k", AccessControlPolicy=_policy_body(
        owner, ("CanonicalUser", peer.project_id), ("Group", ALL_USERS)))
    assert grants(owner.s3.get_bucket_acl(Bucket=b)) == {(owner.project_id, "FULL_CONTROL"),
                                                         (peer.project_id, "READ")}
    assert [o["Key"] for o in peer.s3.list_objects_v2(Bucket=b)["Contents"]] == ["k"]
    assert owner.anon_get(f"{b}/k").content == b"doc"
    fails(owner.s3.put_object_acl, "UnresolvableGrantByEmailAddress", Bucket=b, Key="k",
          AccessControlPolicy=_policy_body(owner, ("Email", "nobody-here@example.com")))
    fails(owner.s3.put_object_acl, "InvalidArgument", Bucket=b, Key="k",
          AccessControlPolicy=_policy_body(owner, ("CanonicalUser", "prj-doesnotexist")))
    # an AccessControlPolicy needs its Owner
    r = owner.signed("PUT", f"{b}/k?acl", b"<AccessControlPolicy><AccessControlList/></AccessControlPolicy>")
    assert r.status_code == 400 and b"<Code>MalformedACLError</Code>" in r.content
    # an ACL of the owner alone revokes every other grant
    owner.s3.put_bucket_acl(Bucket=b, AccessControlPolicy=_policy_body(owner))
    owner.s3.put_object_acl(Bucket=b, Key="k", AccessControlPolicy=_policy_body(owner))
    assert grants(owner.s3.get_object_acl(Bucket=b, Key="k")) == {(owner.project_id, "FULL_CONTROL")}
    fails(peer.s3.list_objects_v2, "AccessDenied", Bucket=b)
    fails(peer.s3.get_object, "AccessDenied", Bucket=b, Key="k")
    assert owner.anon_get(f"{b}/k").status_code == 403
    # an empty one revokes the owner's grant too (as S3 shows it); the owner keeps its rights
    owner.s3.put_bucket_acl(Bucket=b, AccessControlPolicy={"Owner": {"ID": owner.project_id}, "Grants": []})
    owner.s3.put_object_acl(Bucket=b, Key="k", AccessControlPolicy={"Owner": {"ID": owner.project_id}, "Grants": []})
    assert owner.s3.get_bucket_acl(Bucket=b)["Grants"] == []
    assert owner.s3.get_object_acl(Bucket=b, Key="k")["Grants"] == []
    assert owner.s3.get_object(Bucket=b, Key="k")["Body"].read() == b"doc"
    fails(peer.s3.get_object, "AccessDenied", Bucket=b, Key="k")
    owner.s3.put_bucket_acl(Bucket=b, ACL="private")
    assert grants(owner.s3.get_bucket_acl(Bucket=b)) == {(owner.project_id, "FULL_CONTROL")}
    # a raw document with a grantee by email, as other SDKs send it
    body = (f'<AccessControlPolicy><Owner><ID>{owner.project_id}</ID></Owner><AccessControlList><Grant>'
            f'<Grantee {XSI} xsi:type="AmazonCustomerByEmail"><EmailAddress>{peer_email}</EmailAddress></Grantee>'
            f"<Permission>READ</Permission></Grant></AccessControlList></AccessControlPolicy>").encode()
    r = owner.signed("PUT", f"{b}/k?acl", body)
    assert r.status_code == 200, r.text
    assert peer.s3.get_object(Bucket=b, Key="k")["Body"].read() == b"doc"


def test_acls_of_object_versions(owner: Account, peer: Account) -> None:
    b = new_bucket(owner)
    owner.s3.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    v1 = owner.s3.put_object(Bucket=b, Key="k", Body=b"one")["VersionId"]
    v2 = owner.s3.put_object(Bucket=b, Key="k", Body=b"two")["VersionId"]
    r = owner.s3.put_object_acl(Bucket=b, Key="k", VersionId=v1, ACL="public-read")
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-amz-version-id"] == v1
    assert grants(owner.s3.get_object_acl(Bucket=b, Key="k", VersionId=v1)) == {
        (owner.project_id, "FULL_CONTROL"), (ALL_USERS, "READ")}
    assert grants(owner.s3.get_object_acl(Bucket=b, Key="k", VersionId=v2)) == {(owner.project_id, "FULL_CONTROL")}
    assert owner.anon_get(f"{b}/k?versionId={v1}").content == b"one"
    assert owner.anon_get(f"{b}/k").status_code == 403  # the current version is still private
    owner.s3.put_object_acl(Bucket=b, Key="k", GrantRead=f'id="{peer.project_id}"')
    assert peer.s3.get_object(Bucket=b, Key="k")["Body"].read() == b"two"
    fails(owner.s3.get_object_acl, "NoSuchVersion", Bucket=b, Key="k", VersionId="0" * 32)


# --- anonymous access and missing keys ------------------------------------------------------------

def test_missing_key_is_404_only_for_callers_who_may_list(owner: Account, peer: Account) -> None:
    b = new_bucket(owner)
    owner.s3.put_object(Bucket=b, Key="private", Body=b"x")
    assert owner.anon_get(f"{b}/missing").status_code == 403
    assert owner.anon_get(f"{b}/private").status_code == 403
    assert fails(owner.s3.get_object, "NoSuchKey", Bucket=b, Key="missing") == 404
    assert fails(peer.s3.get_object, "AccessDenied", Bucket=b, Key="missing") == 403
    with pytest.raises(ClientError) as exc:
        peer.s3.head_object(Bucket=b, Key="missing")
    assert status(exc) == 403
    owner.s3.put_bucket_acl(Bucket=b, GrantRead=f'id="{peer.project_id}"')
    assert fails(peer.s3.get_object, "NoSuchKey", Bucket=b, Key="missing") == 404
    assert fails(peer.s3.get_object, "AccessDenied", Bucket=b, Key="private") == 403  # listing is not reading
    owner.s3.put_bucket_acl(Bucket=b, ACL="public-read")
    r = owner.anon_get(f"{b}/missing")
    assert r.status_code == 404 and b"<Code>NoSuchKey</Code>" in r.content
    assert owner.anon_get(f"{b}/private").status_code == 403
    assert httpx.head(f"{owner.url}/{b}/missing", timeout=30).status_code == 404


# --- policy status --------------------------------------------------------------------------------

def test_policy_status_reflects_public_acls_and_policies(owner: Account) -> None:
    b = new_bucket(owner)

    def public() -> bool:
        return bool(owner.s3.get_bucket_policy_status(Bucket=b)["PolicyStatus"]["IsPublic"])

    assert not public()
    owner.s3.put_bucket_acl(Bucket=b, ACL="public-read")
    assert public()
    owner.s3.put_public_access_block(Bucket=b, PublicAccessBlockConfiguration={
        "BlockPublicAcls": False, "IgnorePublicAcls": True, "BlockPublicPolicy": False,
        "RestrictPublicBuckets": False})
    assert not public()  # the public grant is ignored, hence not in force
    owner.s3.delete_public_access_block(Bucket=b)
    owner.s3.put_bucket_acl(Bucket=b, ACL="authenticated-read")
    assert public()
    owner.s3.put_bucket_acl(Bucket=b, ACL="private")
    assert not public()
    owner.s3.put_bucket_policy(Bucket=b, Policy=(
        '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"s3:GetObject",'
        f'"Resource":"arn:aws:s3:::{b}/*"}}]}}'))
    assert public()


def test_aws_cli_acls(s3server: S3Server, owner: Account) -> None:
    """The aws CLI's ACL commands, against an account whose public access block is off."""
    b = new_bucket(owner)
    owner.s3.put_object(Bucket=b, Key="cli", Body=b"via cli")
    config = s3server.state_dir / "aws-config-acl"
    config.write_text("[default]\ns3 =\n    signature_version = s3v4\n")
    env = dict(os.environ, AWS_ACCESS_KEY_ID=owner.access_key, AWS_SECRET_ACCESS_KEY=owner.secret_key,
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=str(config), AWS_SHARED_CREDENTIALS_FILE="/dev/null",
               AWS_MAX_ATTEMPTS="1")

    def aws(*args: str) -> str:
        out = subprocess.run([AWS, "--endpoint-url", s3server.url, *args], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    aws("s3api", "put-object-acl", "--bucket", b, "--key", "cli", "--acl", "public-read")
    assert ALL_USERS in aws("s3api", "get-object-acl", "--bucket", b, "--key", "cli")
    assert owner.anon_get(f"{b}/cli").content == b"via cli"
    assert owner.name in aws("s3api", "get-bucket-acl", "--bucket", b)
