"""Finding 4: a user removed from a project kept working S3 keys for its buckets. A key's rights are now
capped by its user's current membership, like API tokens: removed → refused, viewer → read-only, at once
(the REST API runs in other processes than the S3 endpoint; the shared auth epoch carries the change)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from botocore.exceptions import ClientError

from hackboot.sdk import ApiError
from tests.security._s3 import boto, bucket_name, s3_key
from tests.security.conftest import Tenant
from tests.support import Cloud


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def test_s3_key_follows_membership(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    owner = tenant_factory("admin")
    insider = tenant_factory("member")  # a second user, made a member of the owner's project below
    owner.client.projects.set_member(owner.project_id, insider.user_id, "member")  # type: ignore[attr-defined]
    admin = cloud.admin_client_unscoped()
    insider_token = admin.tokens.create(project_id=owner.project_id, role="member",  # type: ignore[attr-defined]
                                        user_id=insider.user_id, name="insider")["token"]
    insider_in_owner = Tenant(owner.project_id, insider.user_id, insider.username, insider.password,
                              insider_token, "member", cloud.client(insider_token))

    s3_owner = boto(cloud, s3_key(owner))
    bucket = bucket_name("mem")
    s3_owner.create_bucket(Bucket=bucket)
    s3_owner.put_object(Bucket=bucket, Key="data.txt", Body=b"project data")

    key = s3_key(insider_in_owner)
    s3 = boto(cloud, key)
    s3.put_object(Bucket=bucket, Key="mine.txt", Body=b"written while a member")
    assert s3.get_object(Bucket=bucket, Key="data.txt")["Body"].read() == b"project data"

    # Demoted to viewer: the key only reads, from the next request on.
    owner.client.projects.set_member(owner.project_id, insider.user_id, "viewer")  # type: ignore[attr-defined]
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=bucket, Key="after-demotion.txt", Body=b"x")
    assert code(exc) == "AccessDenied"
    with pytest.raises(ClientError) as exc:
        s3.delete_object(Bucket=bucket, Key="data.txt")
    assert code(exc) == "AccessDenied"
    assert s3.get_object(Bucket=bucket, Key="data.txt")["Body"].read() == b"project data"
    # and a viewer cannot mint itself a new, stronger key
    with pytest.raises(ApiError) as api_exc:
        insider_in_owner.client.s3_credentials.create(name="stronger")  # type: ignore[attr-defined]
    assert api_exc.value.status == 403

    # Removed from the project: the key is refused at once, for reads too.
    owner.client.projects.remove_member(owner.project_id, insider.user_id)  # type: ignore[attr-defined]
    for call in (lambda: s3.get_object(Bucket=bucket, Key="data.txt"),
                 lambda: s3.list_objects_v2(Bucket=bucket),
                 lambda: s3.put_object(Bucket=bucket, Key="after-removal.txt", Body=b"x")):
        with pytest.raises(ClientError) as exc:
            call()
        assert code(exc) in ("InvalidAccessKeyId", "AccessDenied")
    with pytest.raises(ClientError):
        s3_owner.head_object(Bucket=bucket, Key="after-removal.txt")

    # Added back as a member, the same key works again (its rights always follow the membership).
    owner.client.projects.set_member(owner.project_id, insider.user_id, "member")  # type: ignore[attr-defined]
    s3.put_object(Bucket=bucket, Key="back.txt", Body=b"x")

    # A revoked key is refused at once too.
    insider_in_owner.client.s3_credentials.revoke(key.id)  # type: ignore[attr-defined]
    with pytest.raises(ClientError) as exc:
        s3.get_object(Bucket=bucket, Key="data.txt")
    assert code(exc) == "InvalidAccessKeyId"
