"""Bucket-level ownership settings: S3 Object Ownership (`x-amz-object-ownership` at CreateBucket,
Put/Get/DeleteBucketOwnershipControls, ACLs disabled under BucketOwnerEnforced) and ExpectedBucketOwner
(`x-amz-expected-bucket-owner`, `x-amz-source-expected-bucket-owner`) on every kind of operation."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.objectstore.conftest import S3Server, new_name
from tests.integration.objectstore.test_s3acl_grants import ALL_USERS, Account, fails, grants, make_account


@pytest.fixture(scope="module")
def owner(s3server: S3Server) -> Account:
    return make_account(s3server, "own-owner")


@pytest.fixture(scope="module")
def peer(s3server: S3Server) -> Account:
    return make_account(s3server, "own-peer")


def ownership(acc: Account, bucket: str) -> str:
    rules = acc.s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"]
    assert len(rules) == 1
    return str(rules[0]["ObjectOwnership"])


def controls(value: str) -> dict[str, Any]:
    return {"Rules": [{"ObjectOwnership": value}]}


def test_ownership_controls_round_trip(owner: Account) -> None:
    b = new_name("own")
    owner.s3.create_bucket(Bucket=b)
    assert fails(owner.s3.get_bucket_ownership_controls, "OwnershipControlsNotFoundError", Bucket=b) == 404
    for value in ("BucketOwnerPreferred", "ObjectWriter", "BucketOwnerEnforced"):
        owner.s3.put_bucket_ownership_controls(Bucket=b, OwnershipControls=controls(value))
        assert ownership(owner, b) == value
    owner.s3.delete_bucket_ownership_controls(Bucket=b)
    fails(owner.s3.get_bucket_ownership_controls, "OwnershipControlsNotFoundError", Bucket=b)
    fails(owner.s3.put_bucket_ownership_controls, "MalformedXML", Bucket=b, OwnershipControls=controls("Nobody"))
    fails(owner.s3.put_bucket_ownership_controls, "MalformedXML", Bucket=b, OwnershipControls={"Rules": []})
    for value in ("BucketOwnerEnforced", "ObjectWriter"):
        created = new_name("own")
        owner.s3.create_bucket(Bucket=created, ObjectOwnership=value)
        assert ownership(owner, created) == value
    fails(owner.s3.create_bucket, "InvalidArgument", Bucket=new_name("own"), ObjectOwnership="Everyone")


def test_ownership_controls_are_the_owners_business(owner: Account, peer: Account) -> None:
    b = new_name("own")
    owner.s3.create_bucket(Bucket=b, ACL="public-read-write", ObjectOwnership="ObjectWriter")
    fails(peer.s3.get_bucket_ownership_controls, "AccessDenied", Bucket=b)
    fails(peer.s3.put_bucket_ownership_controls, "AccessDenied", Bucket=b,
          OwnershipControls=controls("BucketOwnerPreferred"))
    fails(peer.s3.delete_bucket_ownership_controls, "AccessDenied", Bucket=b)
    assert ownership(owner, b) == "ObjectWriter"


def test_bucket_owner_enforced_disables_acls(owner: Account, peer: Account) -> None:
    b = new_name("own")
    owner.s3.create_bucket(Bucket=b, ObjectOwnership="BucketOwnerEnforced")
    me = {(owner.project_id, "FULL_CONTROL")}
    # only ACLs that amount to the owner's full control are accepted
    owner.s3.put_object(Bucket=b, Key="bofc", Body=b"x", ACL="bucket-owner-full-control")
    owner.s3.put_object(Bucket=b, Key="private", Body=b"x", ACL="private")
    owner.s3.put_object(Bucket=b, Key="plain", Body=b"x")
    owner.s3.put_object(Bucket=b, Key="explicit", Body=b"x", GrantFullControl=f'id="{owner.project_id}"')
    owner.s3.put_bucket_acl(Bucket=b, ACL="private")
    refused = [
        (owner.s3.put_object, {"Key": "pub", "Body": b"x", "ACL": "public-read"}),
        (owner.s3.put_object, {"Key": "grant", "Body": b"x", "GrantRead": f'id="{peer.project_id}"'}),
        (owner.s3.put_object_acl, {"Key": "plain", "ACL": "authenticated-read"}),
        (owner.s3.put_bucket_acl, {"ACL": "public-read"}),
        (owner.s3.put_bucket_acl, {"GrantRead": f'id="{peer.project_id}"'}),
        (owner.s3.create_multipart_upload, {"Key": "mp", "ACL": "public-read"}),
        (owner.s3.copy_object, {"Key": "copy", "CopySource": {"Bucket": b, "Key": "plain"}, "ACL": "public-read"}),
    ]
    for call, kwargs in refused:
        assert fails(call, "AccessControlListNotSupported", Bucket=b, **kwargs) == 400, kwargs
    assert owner.s3.list_multipart_uploads(Bucket=b).get("Uploads", []) == []
    keys = {o["Key"] for o in owner.s3.list_objects_v2(Bucket=b)["Contents"]}
    assert keys == {"bofc", "private", "plain", "explicit"}
    assert grants(owner.s3.get_bucket_acl(Bucket=b)) == me  # reading ACLs still works
    assert grants(owner.s3.get_object_acl(Bucket=b, Key="plain")) == me
    fails(owner.s3.create_bucket, "InvalidBucketAclWithObjectOwnership", Bucket=new_name("own"), ACL="public-read",
          ObjectOwnership="BucketOwnerEnforced")


def test_enforcing_ownership_needs_a_private_bucket_acl_and_silences_object_acls(owner: Account,
                                                                                  peer: Account) -> None:
    b = new_name("own")
    owner.s3.create_bucket(Bucket=b, GrantRead=f'id="{peer.project_id}"')
    owner.s3.put_object(Bucket=b, Key="k", Body=b"shared", ACL="public-read")
    assert peer.s3.get_object(Bucket=b, Key="k")["Body"].read() == b"shared"
    assert owner.anon_get(f"{b}/k").status_code == 200
    fails(owner.s3.put_bucket_ownership_controls, "InvalidBucketAclWithObjectOwnership", Bucket=b,
          OwnershipControls=controls("BucketOwnerEnforced"))
    owner.s3.put_bucket_acl(Bucket=b, ACL="private")
    owner.s3.put_bucket_ownership_controls(Bucket=b, OwnershipControls=controls("BucketOwnerEnforced"))
    # the object's stored public grant no longer applies, and is not shown
    assert owner.anon_get(f"{b}/k").status_code == 403
    fails(peer.s3.get_object, "AccessDenied", Bucket=b, Key="k")
    assert ALL_USERS not in str(owner.s3.get_object_acl(Bucket=b, Key="k"))
    assert not owner.s3.get_bucket_policy_status(Bucket=b)["PolicyStatus"]["IsPublic"]
    # back to ObjectWriter: ACLs are in force again
    owner.s3.put_bucket_ownership_controls(Bucket=b, OwnershipControls=controls("ObjectWriter"))
    assert owner.anon_get(f"{b}/k").status_code == 200


# --- ExpectedBucketOwner --------------------------------------------------------------------------

def test_expected_bucket_owner_on_every_operation(owner: Account) -> None:
    b = new_name("exp")
    owner.s3.create_bucket(Bucket=b)
    owner.s3.put_object(Bucket=b, Key="src", Body=b"source")
    up = owner.s3.create_multipart_upload(Bucket=b, Key="mp")
    calls: list[tuple[Any, dict[str, Any]]] = [
        (owner.s3.head_bucket, {}),
        (owner.s3.list_objects_v2, {}),
        (owner.s3.list_objects, {}),
        (owner.s3.list_object_versions, {}),
        (owner.s3.list_multipart_uploads, {}),
        (owner.s3.get_bucket_acl, {}),
        (owner.s3.get_bucket_location, {}),
        (owner.s3.get_bucket_versioning, {}),
        (owner.s3.get_bucket_policy_status, {}),
        (owner.s3.put_bucket_acl, {"ACL": "private"}),
        (owner.s3.put_object, {"Key": "k", "Body": b"x"}),
        (owner.s3.get_object, {"Key": "src"}),
        (owner.s3.head_object, {"Key": "src"}),
        (owner.s3.get_object_acl, {"Key": "src"}),
        (owner.s3.put_object_acl, {"Key": "src", "ACL": "private"}),
        (owner.s3.get_object_tagging, {"Key": "src"}),
        (owner.s3.upload_part, {"Key": "mp", "UploadId": up["UploadId"], "PartNumber": 1, "Body": b"p"}),
        (owner.s3.list_parts, {"Key": "mp", "UploadId": up["UploadId"]}),
        (owner.s3.copy_object, {"Key": "copy", "CopySource": {"Bucket": b, "Key": "src"}}),
        (owner.s3.delete_objects, {"Delete": {"Objects": [{"Key": "k"}]}}),
        (owner.s3.delete_object, {"Key": "k"}),
    ]
    for call, kwargs in calls:
        with pytest.raises(ClientError) as exc:
            call(Bucket=b, ExpectedBucketOwner="prj-someoneelse", **kwargs)
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403, call
        assert exc.value.response["Error"]["Code"] in ("AccessDenied", "403"), call  # HEAD answers carry no body
        call(Bucket=b, ExpectedBucketOwner=owner.project_id, **kwargs)
    # the copy source's owner is checked with its own header
    fails(owner.s3.copy_object, "AccessDenied", Bucket=b, Key="copy", CopySource={"Bucket": b, "Key": "src"},
          ExpectedSourceBucketOwner="prj-someoneelse")
    fails(owner.s3.upload_part_copy, "AccessDenied", Bucket=b, Key="mp", UploadId=up["UploadId"], PartNumber=2,
          CopySource={"Bucket": b, "Key": "src"}, ExpectedSourceBucketOwner="prj-someoneelse")
    owner.s3.copy_object(Bucket=b, Key="copy", CopySource={"Bucket": b, "Key": "src"},
                         ExpectedSourceBucketOwner=owner.project_id, ExpectedBucketOwner=owner.project_id)
    owner.s3.abort_multipart_upload(Bucket=b, Key="mp", UploadId=up["UploadId"], ExpectedBucketOwner=owner.project_id)
    # a missing bucket is still NoSuchBucket
    fails(owner.s3.list_objects_v2, "NoSuchBucket", Bucket=new_name("exp"), ExpectedBucketOwner="prj-someoneelse")


def test_expected_bucket_owner_raw_header(owner: Account) -> None:
    b = new_name("exp")
    owner.s3.create_bucket(Bucket=b)
    r = owner.signed("GET", b, headers={"x-amz-expected-bucket-owner": "prj-someoneelse"})
    assert r.status_code == 403 and b"<Code>AccessDenied</Code>" in r.content
    r = owner.signed("GET", b, headers={"x-amz-expected-bucket-owner": owner.project_id})
    assert r.status_code == 200, r.text


# --- who owns what a writer from another project puts --------------------------------------------

def _owner_of(acc: Account, bucket: str, key: str) -> str:
    return str(acc.s3.get_object_acl(Bucket=bucket, Key=key)["Owner"]["ID"])


def test_object_writer_owns_what_it_writes(owner: Account, peer: Account) -> None:
    b = new_name("own")
    owner.s3.create_bucket(Bucket=b, ObjectOwnership="ObjectWriter")
    owner.s3.put_bucket_acl(Bucket=b, GrantWrite=f'id="{peer.project_id}"', GrantFullControl=f'id="{owner.project_id}"')
    peer.s3.put_object(Bucket=b, Key="mine", Body=b"peer data")
    peer.s3.put_object(Bucket=b, Key="shared", Body=b"for the owner", ACL="bucket-owner-read")
    acl = peer.s3.get_object_acl(Bucket=b, Key="shared")  # the writer reads its object's ACL…
    assert acl["Owner"] == {"ID": peer.project_id, "DisplayName": peer.name}
    assert grants(acl) == {(peer.project_id, "FULL_CONTROL"), (owner.project_id, "READ")}
    assert grants(peer.s3.get_object_acl(Bucket=b, Key="mine")) == {(peer.project_id, "FULL_CONTROL")}
    assert peer.s3.get_object(Bucket=b, Key="mine")["Body"].read() == b"peer data"  # …and its data
    peer.s3.put_object_acl(Bucket=b, Key="mine", ACL="bucket-owner-full-control")
    assert grants(owner.s3.get_object_acl(Bucket=b, Key="mine")) == {(peer.project_id, "FULL_CONTROL"),
                                                                       (owner.project_id, "FULL_CONTROL")}
    listed = {o["Key"]: o["Owner"] for o in owner.s3.list_objects_v2(Bucket=b, FetchOwner=True)["Contents"]}
    assert listed["mine"] == {"ID": peer.project_id, "DisplayName": peer.name}
    versions = owner.s3.list_object_versions(Bucket=b)["Versions"]
    assert {v["Owner"]["ID"] for v in versions} == {peer.project_id}
    # an object the bucket's owner writes stays its own, out of the writer's reach
    owner.s3.put_object(Bucket=b, Key="owners", Body=b"x")
    assert _owner_of(owner, b, "owners") == owner.project_id
    fails(peer.s3.get_object, "AccessDenied", Bucket=b, Key="owners")
    fails(peer.s3.get_object_acl, "AccessDenied", Bucket=b, Key="owners")
    # a copy and a multipart upload belong to their writer too
    peer.s3.copy_object(Bucket=b, Key="copied", CopySource={"Bucket": b, "Key": "mine"})
    up = peer.s3.create_multipart_upload(Bucket=b, Key="multi")
    listed_up = owner.s3.list_multipart_uploads(Bucket=b)["Uploads"][0]
    assert listed_up["Owner"] == {"ID": peer.project_id, "DisplayName": peer.name}
    assert listed_up["Initiator"]["ID"] == peer.project_id
    etag = peer.s3.upload_part(Bucket=b, Key="multi", UploadId=up["UploadId"], PartNumber=1, Body=b"m")["ETag"]
    peer.s3.complete_multipart_upload(Bucket=b, Key="multi", UploadId=up["UploadId"],
                                      MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    assert _owner_of(owner, b, "copied") == _owner_of(owner, b, "multi") == peer.project_id
    # BucketOwnerEnforced takes every object over, for good
    owner.s3.put_bucket_acl(Bucket=b, ACL="private")
    owner.s3.put_bucket_ownership_controls(Bucket=b, OwnershipControls=controls("BucketOwnerEnforced"))
    assert _owner_of(owner, b, "mine") == owner.project_id
    fails(peer.s3.get_object, "AccessDenied", Bucket=b, Key="mine")
    owner.s3.put_bucket_ownership_controls(Bucket=b, OwnershipControls=controls("ObjectWriter"))
    assert _owner_of(owner, b, "mine") == owner.project_id


def test_bucket_owner_preferred_and_default_ownership(owner: Account, peer: Account) -> None:
    preferred, default = new_name("own"), new_name("own")
    owner.s3.create_bucket(Bucket=preferred, ObjectOwnership="BucketOwnerPreferred")
    owner.s3.create_bucket(Bucket=default)
    for b in (preferred, default):
        owner.s3.put_bucket_acl(Bucket=b, GrantWrite=f'id="{peer.project_id}"')
        peer.s3.put_object(Bucket=b, Key="bofc", Body=b"x", ACL="bucket-owner-full-control")
        peer.s3.put_object(Bucket=b, Key="plain", Body=b"x")
    assert _owner_of(owner, preferred, "bofc") == owner.project_id
    assert _owner_of(owner, preferred, "plain") == peer.project_id
    # without ownership controls the bucket's project owns whatever others write (no implicit rights)
    assert _owner_of(owner, default, "bofc") == _owner_of(owner, default, "plain") == owner.project_id
    fails(peer.s3.get_object, "AccessDenied", Bucket=default, Key="plain")
    fails(peer.s3.put_object_acl, "AccessDenied", Bucket=default, Key="plain", ACL="public-read")
