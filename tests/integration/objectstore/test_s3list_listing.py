"""Listings: keys with special characters with and without EncodingType=url (raw XML, since boto3 asks for
and decodes url encoding by itself), max-keys=0, empty continuation tokens, ListObjectVersions markers,
ListBuckets pagination and ListMultipartUploads owner/initiator fields."""

from __future__ import annotations

import hashlib
import json
import uuid
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import quote, unquote_plus

import httpx
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.integration.objectstore.conftest import S3Server

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
SPECIAL = ["a b/c d", "a+b/x", "a%b/x", "a%2Fb", "plain/one", "plain/two", "ünïcødé/ключ", "amp&lt<gt>/q\"'",
           "sp ace", "tilde~/x", "star*?=#;/x"]


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def get_xml(srv: S3Server, path: str, params: dict[str, str]) -> ET.Element:
    """A raw signed GET; the query is encoded here exactly as SDKs do (RFC 3986)."""
    qs = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items()))
    url = f"{srv.url}{path}" + (f"?{qs}" if qs else "")
    req = AWSRequest(method="GET", url=url, headers={"x-amz-content-sha256": hashlib.sha256(b"").hexdigest()})
    S3SigV4Auth(Credentials(srv.creds["ak"], srv.creds["sk"]), "s3", "us-east-1").add_auth(req)
    r = httpx.get(url, headers=dict(req.headers.items()), timeout=30)
    assert r.status_code == 200, r.text
    return ET.fromstring(r.content)


def texts(root: ET.Element, path: str) -> list[str]:
    return [e.text or "" for e in root.iterfind("/".join(NS + p for p in path.split("/")))]


@pytest.fixture()
def special(s3: Any, bucket: str) -> str:
    for k in SPECIAL:
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    return bucket


@pytest.mark.parametrize("v2", [False, True])
def test_special_keys_without_encoding(s3server: S3Server, special: str, v2: bool) -> None:
    params = {"list-type": "2"} if v2 else {}
    root = get_xml(s3server, f"/{special}", params)
    assert texts(root, "Contents/Key") == sorted(SPECIAL, key=lambda k: k.encode())
    root = get_xml(s3server, f"/{special}", params | {"delimiter": "/"})
    assert texts(root, "CommonPrefixes/Prefix") == sorted(
        {k[:k.index("/") + 1] for k in SPECIAL if "/" in k}, key=lambda k: k.encode())
    assert texts(root, "Contents/Key") == sorted((k for k in SPECIAL if "/" not in k), key=lambda k: k.encode())
    root = get_xml(s3server, f"/{special}", params | {"prefix": "a b/", "delimiter": " "})
    assert texts(root, "Prefix") == ["a b/"] and texts(root, "Delimiter") == [" "]
    assert texts(root, "CommonPrefixes/Prefix") == ["a b/c "]


@pytest.mark.parametrize("v2", [False, True])
def test_special_keys_with_url_encoding(s3server: S3Server, special: str, v2: bool) -> None:
    params = {"encoding-type": "url"} | ({"list-type": "2", "start-after": "a b/"} if v2 else {"marker": "a b/"})
    root = get_xml(s3server, f"/{special}", params | {"delimiter": "/"})
    assert texts(root, "EncodingType") == ["url"]
    keys = texts(root, "Contents/Key")
    prefixes = texts(root, "CommonPrefixes/Prefix")
    for value in keys + prefixes:  # every byte outside the unreserved set is escaped
        assert all(ch.isascii() and (ch.isalnum() or ch in "%-_.~/") for ch in value), value
    assert [unquote_plus(k) for k in keys] == sorted((k for k in SPECIAL if "/" not in k), key=lambda k: k.encode())
    assert "sp%20ace" in keys and "a%252Fb" in keys
    assert [unquote_plus(p) for p in prefixes] == sorted(
        {k[:k.index("/") + 1] for k in SPECIAL if "/" in k and k[:k.index("/") + 1] > "a b/"},
        key=lambda k: k.encode())
    assert "a%2Bb/" in prefixes and "a%25b/" in prefixes
    marker = texts(root, "StartAfter" if v2 else "Marker")
    assert marker == ["a%20b/"]
    # prefix and delimiter come back encoded too
    root = get_xml(s3server, f"/{special}", params | {"prefix": "ünïcødé/", "delimiter": "ю"})
    assert texts(root, "Prefix") == [quote("ünïcødé/", safe="/")]
    assert texts(root, "Delimiter") == [quote("ю")]
    assert texts(root, "Contents/Key") == [] and texts(root, "CommonPrefixes/Prefix") == [quote("ünïcødé/клю")]


def test_next_marker_is_encoded(s3server: S3Server, special: str) -> None:
    root = get_xml(s3server, f"/{special}", {"encoding-type": "url", "delimiter": "/", "max-keys": "1"})
    assert texts(root, "IsTruncated") == ["true"]
    assert texts(root, "NextMarker") == ["a%20b/"]


def test_boto3_round_trips_special_keys(s3: Any, special: str) -> None:
    """boto3 (url encoding, decoded by botocore) and paginators see every key exactly."""
    seen = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=special, PaginationConfig={"PageSize": 2}):
        seen += [o["Key"] for o in page.get("Contents", [])]
    assert seen == sorted(SPECIAL, key=lambda k: k.encode())
    r = s3.list_objects(Bucket=special, Prefix="a+b/", Delimiter="/")
    assert [o["Key"] for o in r["Contents"]] == ["a+b/x"]
    r = s3.list_object_versions(Bucket=special, Prefix="a%b/")
    assert [v["Key"] for v in r["Versions"]] == ["a%b/x"]


def test_control_characters_in_keys(s3server: S3Server, s3: Any, bucket: str) -> None:
    """Characters XML 1.0 cannot carry are refused in keys (by design, see the objectstore README), with an
    error document clients can parse; tab, line feed and carriage return are valid and list exactly."""
    for key in ("a\x01b", "nul\x00", "esc\x1b["):
        with pytest.raises(ClientError) as e:
            s3.put_object(Bucket=bucket, Key=key, Body=b"x")
        assert code(e) == "InvalidArgument"
    allowed = ["cr\rx", "nl\nx", "tab\tx"]
    for key in allowed:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == allowed  # url-encoded
    assert texts(get_xml(s3server, f"/{bucket}", {}), "Contents/Key") == allowed  # raw XML
    # a prefix no key can have still answers a well-formed document
    root = get_xml(s3server, f"/{bucket}", {"prefix": "a\x01"})
    assert texts(root, "Prefix") == ["a\ufffd"] and texts(root, "Contents/Key") == []


# --- max-keys=0, empty tokens ---------------------------------------------------------------------

def test_max_keys_zero(s3: Any, bucket: str) -> None:
    for k in ("a", "b"):
        s3.put_object(Bucket=bucket, Key=k, Body=b"x")
    for r in (s3.list_objects(Bucket=bucket, MaxKeys=0), s3.list_objects_v2(Bucket=bucket, MaxKeys=0)):
        assert r["IsTruncated"] is False and "Contents" not in r and r["MaxKeys"] == 0
    r = s3.list_object_versions(Bucket=bucket, MaxKeys=0)
    assert r["IsTruncated"] is False and "Versions" not in r


def test_empty_continuation_token_lists_from_the_start(s3: Any, bucket: str) -> None:
    for k in ("bar", "baz", "foo"):
        s3.put_object(Bucket=bucket, Key=k, Body=b"x")
    r = s3.list_objects_v2(Bucket=bucket, ContinuationToken="")
    assert r["ContinuationToken"] == "" and r["IsTruncated"] is False
    assert [o["Key"] for o in r["Contents"]] == ["bar", "baz", "foo"]
    with pytest.raises(ClientError) as e:
        s3.list_objects_v2(Bucket=bucket, ContinuationToken="not-a-token")
    assert code(e) == "InvalidArgument"


# --- ListObjectVersions markers -------------------------------------------------------------------

def test_version_markers(s3server: S3Server, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"null version")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    v1 = s3.put_object(Bucket=bucket, Key="k", Body=b"1")["VersionId"]
    v2 = s3.put_object(Bucket=bucket, Key="k", Body=b"2")["VersionId"]
    s3.put_object(Bucket=bucket, Key="l", Body=b"l")
    expected = [("k", v2), ("k", v1), ("k", "null")]
    pages = []
    kw: dict[str, str] = {}
    while True:  # one version per page, following the markers
        r = s3.list_object_versions(Bucket=bucket, MaxKeys=1, **kw)
        pages += [(v["Key"], v["VersionId"]) for v in r.get("Versions", [])]
        if not r["IsTruncated"]:
            break
        kw = {"KeyMarker": r["NextKeyMarker"], "VersionIdMarker": r["NextVersionIdMarker"]}
    assert pages[:3] == expected and pages[3][0] == "l" and len(pages) == 4
    # "null" as a version-id marker continues after the null version
    r = s3.list_object_versions(Bucket=bucket, KeyMarker="k", VersionIdMarker="null")
    assert [v["Key"] for v in r["Versions"]] == ["l"]
    r = s3.list_object_versions(Bucket=bucket, KeyMarker="k", VersionIdMarker=v1)
    assert [(v["Key"], v["VersionId"]) for v in r["Versions"]] == [("k", "null"), ("l", r["Versions"][1]["VersionId"])]
    # a key marker alone skips that key's versions; an empty version marker is no marker
    r = s3.list_object_versions(Bucket=bucket, KeyMarker="k", VersionIdMarker="")
    assert [v["Key"] for v in r["Versions"]] == ["l"]
    with pytest.raises(ClientError) as e:
        s3.list_object_versions(Bucket=bucket, VersionIdMarker=v1)
    assert code(e) == "InvalidArgument"
    root = get_xml(s3server, f"/{bucket}", {"versions": "", "encoding-type": "url", "key-marker": "a b",
                                            "max-keys": "1"})
    assert texts(root, "KeyMarker") == ["a%20b"] and texts(root, "NextKeyMarker") == ["k"]


# --- ListBuckets ----------------------------------------------------------------------------------

def test_list_buckets_pagination(s3: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    names = [f"lb-{tag}-{i}" for i in range(3)]
    for n in names[:2]:
        s3.create_bucket(Bucket=n)
    s3.create_bucket(Bucket=names[2], CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    seen = []
    kw: dict[str, Any] = {}
    while True:
        r = s3.list_buckets(Prefix=f"lb-{tag}-", MaxBuckets=1, **kw)
        assert r["Prefix"] == f"lb-{tag}-" and len(r["Buckets"]) <= 1
        seen += [b["Name"] for b in r["Buckets"]]
        if "ContinuationToken" not in r:
            break
        kw = {"ContinuationToken": r["ContinuationToken"]}
    assert seen == names
    r = s3.list_buckets(Prefix=f"lb-{tag}-", BucketRegion="eu-west-1")
    assert [(b["Name"], b["BucketRegion"]) for b in r["Buckets"]] == [(names[2], "eu-west-1")]
    r = s3.list_buckets(Prefix=f"lb-{tag}-")
    assert [b["Name"] for b in r["Buckets"]] == names and "ContinuationToken" not in r
    paginated = [b["Name"] for page in s3.get_paginator("list_buckets").paginate(
        Prefix=f"lb-{tag}-", PaginationConfig={"PageSize": 2}) for b in page["Buckets"]]
    assert paginated == names
    with pytest.raises(ClientError) as e:
        s3.list_buckets(ContinuationToken="%%%")
    assert code(e) == "InvalidArgument"


def test_list_buckets_max_buckets_out_of_range(s3server: S3Server) -> None:
    for bad in ("0", "-1", "x"):
        with pytest.raises(AssertionError, match="InvalidArgument"):
            get_xml(s3server, "/", {"max-buckets": bad})


def test_list_buckets_of_another_project_stay_hidden(s3server: S3Server, s3: Any) -> None:
    mine = f"lb-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=mine)
    other = s3server.client(who="2")
    names = [b["Name"] for page in other.get_paginator("list_buckets").paginate(PaginationConfig={"PageSize": 1})
             for b in page["Buckets"]]
    assert mine not in names


# --- ListMultipartUploads -------------------------------------------------------------------------

def test_list_uploads_owner_initiator_and_encoding(s3server: S3Server, s3: Any, bucket: str) -> None:
    for k in ("up/a b", "up/c+d", "up/e%f"):
        s3.create_multipart_upload(Bucket=bucket, Key=k)
    r = s3.list_multipart_uploads(Bucket=bucket, Prefix="up/")
    owner = s3.list_buckets()["Owner"]
    assert [u["Key"] for u in r["Uploads"]] == ["up/a b", "up/c+d", "up/e%f"]
    for u in r["Uploads"]:
        assert u["Owner"]["ID"] == owner["ID"] and u["Owner"].get("DisplayName")
        assert u["Initiator"]["ID"] and u["Initiator"].get("DisplayName")
    root = get_xml(s3server, f"/{bucket}", {"uploads": "", "encoding-type": "url", "max-uploads": "1",
                                            "key-marker": "up/"})
    assert texts(root, "Upload/Key") == ["up/a%20b"] and texts(root, "NextKeyMarker") == ["up/a%20b"]
    assert texts(root, "KeyMarker") == ["up/"] and texts(root, "IsTruncated") == ["true"]


def test_aws_cli_lists_special_keys_and_reads_attributes(s3server: S3Server, special: str) -> None:
    out = json.loads(s3server.aws("s3api", "list-objects-v2", "--bucket", special, "--prefix", "a b/",
                                  "--delimiter", " ").stdout)
    assert [p["Prefix"] for p in out["CommonPrefixes"]] == ["a b/c "]
    listed = s3server.aws("s3", "ls", f"s3://{special}/", "--recursive").stdout
    for key in SPECIAL:
        assert key in listed
    out = json.loads(s3server.aws("s3api", "list-buckets", "--prefix", special, "--max-buckets", "1").stdout)
    assert [b["Name"] for b in out["Buckets"]] == [special]
    out = json.loads(s3server.aws("s3api", "get-object-attributes", "--bucket", special, "--key", "a+b/x",
                                  "--object-attributes", "ObjectSize", "ETag").stdout)
    assert out["ObjectSize"] == len(b"a+b/x")
    out = json.loads(s3server.aws("s3api", "create-multipart-upload", "--bucket", special, "--key", "m",
                                  "--checksum-algorithm", "CRC32", "--checksum-type", "FULL_OBJECT").stdout)
    assert out["ChecksumAlgorithm"] == "CRC32" and out["ChecksumType"] == "FULL_OBJECT"
