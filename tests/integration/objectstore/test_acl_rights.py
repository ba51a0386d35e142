"""An ACL sent along with new data (PUT, copy, multipart create) needs s3:PutObjectAcl besides s3:PutObject,
as in S3: another project granted only s3:PutObject must not choose who may read what it writes. Canned
"private" and a grant to a named project are used, so the public access block plays no part."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.objectstore.conftest import S3Server, new_name


def _policy(bucket: str, account: str, actions: list[str]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": account}, "Action": actions,
        "Resource": f"arn:aws:s3:::{bucket}/*"}]})


def _denied(call: Any, **kwargs: Any) -> None:
    with pytest.raises(ClientError) as exc:
        call(**kwargs)
    assert exc.value.response["Error"]["Code"] == "AccessDenied", kwargs


def test_acl_headers_with_new_data_need_put_object_acl(s3server: S3Server, s3: Any) -> None:
    other = s3server.client("2")
    other_project = s3server.creds["other_project_id"]
    name = new_name("aclr")
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="src", Body=b"source")
    s3.put_bucket_policy(Bucket=name, Policy=_policy(name, other_project, ["s3:PutObject", "s3:GetObject"]))
    source = {"Bucket": name, "Key": "src"}
    for acl in ({"ACL": "private"}, {"GrantRead": f'id="{other_project}"'}):
        _denied(other.create_multipart_upload, Bucket=name, Key="mp", **acl)
        _denied(other.put_object, Bucket=name, Key="put", Body=b"x", **acl)
        _denied(other.copy_object, Bucket=name, Key="copy", CopySource=source, **acl)
    assert s3.list_multipart_uploads(Bucket=name).get("Uploads", []) == []
    # the grant itself works without ACL headers
    up = other.create_multipart_upload(Bucket=name, Key="mp")
    s3.abort_multipart_upload(Bucket=name, Key="mp", UploadId=up["UploadId"])
    other.copy_object(Bucket=name, Key="copy", CopySource=source)
    # and with s3:PutObjectAcl granted too, the ACL headers are accepted
    s3.put_bucket_policy(Bucket=name, Policy=_policy(name, other_project,
                                                     ["s3:PutObject", "s3:GetObject", "s3:PutObjectAcl"]))
    up = other.create_multipart_upload(Bucket=name, Key="mp", GrantRead=f'id="{other_project}"')
    s3.abort_multipart_upload(Bucket=name, Key="mp", UploadId=up["UploadId"])
