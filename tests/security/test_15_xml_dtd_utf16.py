"""Finding 15: an S3 XML body in UTF-16 with a DOCTYPE and an internal entity was parsed and the entity
expanded (the DTD check looked for the ASCII bytes "<!DOCTYPE"). Any DTD is refused whatever the encoding."""

from __future__ import annotations

from collections.abc import Callable

from tests.security._s3 import boto, bucket_name, error_code, s3_key, send, sign
from tests.security.conftest import Tenant
from tests.support import Cloud

ENTITY_DOC = ('<?xml version="1.0" encoding="UTF-16"?>\n'
              '<!DOCTYPE Tagging [<!ENTITY boom "expanded-by-the-server">]>\n'
              '<Tagging xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><TagSet>'
              '<Tag><Key>k</Key><Value>&boom;</Value></Tag></TagSet></Tagging>')


def test_utf16_dtd_is_refused(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    tenant = tenant_factory()
    key = s3_key(tenant)
    s3 = boto(cloud, key)
    bucket = bucket_name("dtd")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="obj", Body=b"x")

    for encoding in ("utf-16", "utf-16-be", "utf-8"):
        body = ENTITY_DOC.replace("UTF-16", encoding.upper()).encode(encoding)
        url, headers = sign(cloud, key, "PUT", f"/{bucket}/obj?tagging", body=body,
                            headers={"content-type": "application/xml"})
        resp = send("PUT", url, headers=headers, body=body)
        assert resp.status_code == 400, (encoding, resp.status_code, resp.text)
        assert error_code(resp) == "MalformedXML"
        assert s3.get_object_tagging(Bucket=bucket, Key="obj")["TagSet"] == []

    # the same document without its DTD, still in UTF-16, is accepted (refusal is about the DTD only)
    plain = ENTITY_DOC.split("\n", 2)[2].replace("&boom;", "v").encode("utf-16")
    url, headers = sign(cloud, key, "PUT", f"/{bucket}/obj?tagging", body=plain)
    assert send("PUT", url, headers=headers, body=plain).status_code == 200
    assert s3.get_object_tagging(Bucket=bucket, Key="obj")["TagSet"] == [{"Key": "k", "Value": "v"}]
