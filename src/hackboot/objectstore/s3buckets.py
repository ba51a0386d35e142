"""S3 bucket operations: create/delete/head/list, listings of objects, versions and uploads, and the
bucket sub-resources (versioning, policy, ACL, CORS, lifecycle, tagging, object lock, encryption,
public access block)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import json
import re
from typing import Any
from urllib.parse import quote

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from hackboot.objectstore import engine, lifecycle
from hackboot.objectstore.engine import BucketInfo
from hackboot.objectstore.models import Bucket, ObjectVersion, Upload
from hackboot.objectstore.policy import (
    acl_from_headers,
    grants_to_others,
    is_public_acl,
    is_public_policy,
    stored_acl,
    validate_policy,
)
from hackboot.objectstore.s3errors import (
    S3Error,
    access_denied,
    invalid_version_id,
    method_not_allowed,
)
from hackboot.objectstore.s3proto import (
    XML,
    Req,
    Response,
    acl_response_xml,
    acl_to_set,
    initiator_xml,
    int_param,
    load_bucket,
    owner_xml,
    parse_tagset,
    tagging_xml,
)
from hackboot.objectstore.s3xml import NS, doc, esc, iso, parse, tag

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def validate_bucket_name(name: str) -> None:
    bad = (not _BUCKET_RE.match(name) or ".." in name or ".-" in name or "-." in name
           or name.startswith(("xn--", "sthree-", "amzn-s3-demo-"))
           or name.endswith(("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")))
    if not bad:
        try:
            ipaddress.IPv4Address(name)
            bad = True
        except ValueError:
            pass
    if bad:
        raise S3Error("InvalidBucketName", "The specified bucket is not valid.", BucketName=name[:100])


# --- service --------------------------------------------------------------------------------------

async def service_op(req: Req) -> Response:
    if req.method != "GET":
        raise method_not_allowed()
    if req.requester.anonymous:
        raise access_denied()
    project = req.requester.project_id

    def q(s: Session) -> tuple[list[Bucket], str]:
        rows = list(s.scalars(select(Bucket).where(Bucket.project_id == project).order_by(Bucket.name)))
        return rows, engine.project_display_names(s, [project or ""]).get(project or "", "")

    rows, display_name = await engine.read(q)
    allowed = req.requester.buckets
    prefix = req.query.get("prefix", "")
    region = req.query.get("bucket-region")
    paged = "max-buckets" in req.query or "continuation-token" in req.query
    max_buckets = int_param(req, "max-buckets", 10000, lo=1, hi=10000)
    after = _bucket_token(req.query.get("continuation-token") or "")
    chosen = [b for b in rows if (allowed is None or b.name in allowed) and b.name.startswith(prefix)
              and (region is None or (b.region or "us-east-1") == region) and b.name > after]
    page = chosen[:max_buckets]
    items = "".join(f"<Bucket><Name>{esc(b.name)}</Name><CreationDate>{iso(b.created_at)}</CreationDate>"
                    f"<BucketRegion>{esc(b.region or 'us-east-1')}</BucketRegion></Bucket>" for b in page)
    tail = ""
    if paged and len(chosen) > len(page):  # the token is the last name served, opaque to clients
        tail += tag("ContinuationToken", base64.urlsafe_b64encode(page[-1].name.encode()).decode().rstrip("="))
    if "prefix" in req.query:
        tail += tag("Prefix", prefix)
    return Response(200, XML, doc("ListAllMyBucketsResult",
                                  owner_xml(project or "", display_name) + f"<Buckets>{items}</Buckets>" + tail))


def _bucket_token(token: str) -> str:
    """The bucket name a ListBuckets continuation token stands for ("" for none)."""
    if not token:
        return ""
    try:
        name = base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        name = ""
    if not name or len(name) > 63:
        raise S3Error("InvalidArgument", "The continuation token provided is incorrect",
                      ArgumentName="continuation-token")
    return name


# --- dispatch -------------------------------------------------------------------------------------

async def bucket_op(req: Req) -> Response:
    m = req.method
    if m == "PUT" and not any(req.has(s) for s in _SUBRESOURCES):
        return await create_bucket(req)
    b = await load_bucket(req)
    if m == "HEAD":
        req.check("s3:ListBucket", b)
        return Response(200, {"x-amz-bucket-region": b.region or "us-east-1"})
    for sub in _SUBRESOURCES:
        if req.has(sub):
            table = _HANDLERS.get((m, sub))
            if table is None:
                raise method_not_allowed()
            return await table(req, b)
    if m == "GET":
        if req.query.get("list-type") == "2":
            return await list_objects(req, b, v2=True)
        return await list_objects(req, b, v2=False)
    if m == "DELETE":
        return await delete_bucket(req, b)
    raise method_not_allowed()


# --- create / delete ------------------------------------------------------------------------------

async def create_bucket(req: Req) -> Response:
    name = req.bucket_name or ""
    validate_bucket_name(name)
    if req.requester.anonymous:
        await req.drain()
        raise access_denied()
    if req.requester.read_only or (req.requester.buckets is not None and name not in req.requester.buckets):
        await req.drain()
        raise S3Error("AccessDenied", "This access key may not create this bucket")
    body = await req.read_body(64 * 1024)
    region = ""
    if body.strip():
        node = parse(body, "CreateBucketConfiguration")
        region = node.text_of("LocationConstraint") or ""
        if len(region) > 32:
            raise S3Error("InvalidLocationConstraint", "The specified location constraint is not valid.")
    project = req.requester.project_id or ""
    acl = acl_from_headers(req.headers, project)
    lock = req.headers.get("x-amz-bucket-object-lock-enabled", "").lower() == "true"
    ownership = req.headers.get("x-amz-object-ownership")
    if ownership is not None and ownership not in OWNERSHIPS:
        raise S3Error("InvalidArgument", "Invalid x-amz-object-ownership header", ArgumentName="x-amz-object-ownership",
                      ArgumentValue=ownership[:50])

    def tx(s: Session) -> Bucket:
        grants = acl
        if grants is not None:
            grants = stored_acl(engine.q_resolve_grantees(s, grants, project), project)
        if grants and ownership == "BucketOwnerEnforced":
            raise S3Error("InvalidBucketAclWithObjectOwnership", "Bucket cannot have ACLs set with ObjectOwnership's "
                                                                 "BucketOwnerEnforced setting")
        if grants and is_public_acl(grants) and engine.project_blocks_public(s, project):
            raise S3Error("AccessDenied", "Public ACLs are blocked for this project (block public access)")
        return engine.tx_create_bucket(s, name, project, region, req.actor, lock, grants, ownership)

    await engine.write(tx)
    engine.invalidate_bucket(name)
    return Response(200, {"location": f"/{name}"})


async def delete_bucket(req: Req, b: BucketInfo) -> Response:
    req.check("s3:DeleteBucket", b)
    await engine.write(lambda s: engine.tx_delete_bucket(s, b.id, req.actor))
    engine.invalidate_bucket(b.name)
    return Response(204)


# --- listings -------------------------------------------------------------------------------------

_URL_SAFE = re.compile(r"^[A-Za-z0-9/~._-]*$")


def _enc(value: str, url: bool) -> str:
    if url and _URL_SAFE.match(value) is None:
        return quote(value, safe="/~")
    return esc(value)


def _encoding(req: Req) -> bool:
    e = req.query.get("encoding-type")
    if e is not None and e != "url":
        raise S3Error("InvalidArgument", "Invalid Encoding Method specified in Request", ArgumentName="encoding-type")
    return e == "url"


def _checksum_alg_xml(row: Any) -> str:
    if row.checksum:
        return "".join(tag("ChecksumAlgorithm", k) for k in row.checksum if k != "type") + \
            tag("ChecksumType", row.checksum.get("type", "FULL_OBJECT"))
    return ""


async def owner_elements(b: BucketInfo, rows: list[Any]) -> dict[str | None, str]:
    """The `Owner` element of each listed version, by its `owner` column: the bucket's project (key None)
    unless a writer owns the version (ObjectWriter ownership; ignored under BucketOwnerEnforced)."""
    others = list({r.owner for r in rows if r.owner}) if not b.acls_disabled else []
    names = await engine.read(lambda s: engine.project_display_names(s, others)) if others else {}
    return {None: owner_xml(b.project_id, b.owner_name)} | {o: owner_xml(o, names.get(o)) for o in others}


async def list_objects(req: Req, b: BucketInfo, v2: bool) -> Response:
    req.check("s3:ListBucket", b)
    prefix = req.query.get("prefix", "")
    delimiter = req.query.get("delimiter", "")
    max_keys = int_param(req, "max-keys", 1000)
    url = _encoding(req)
    fetch_owner = not v2 or req.query.get("fetch-owner") == "true"
    if v2:
        token = req.query.get("continuation-token")
        start_after = req.query.get("start-after")
        after = start_after
        if token:  # an empty token (some clients send one on their first page) starts from the beginning
            try:
                after = base64.urlsafe_b64decode(token.encode() + b"==").decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise S3Error("InvalidArgument", "The continuation token provided is incorrect",
                              ArgumentName="continuation-token") from None
            if not after.startswith("1:"):
                raise S3Error("InvalidArgument", "The continuation token provided is incorrect",
                              ArgumentName="continuation-token")
            after = after[2:]
    else:
        after = req.query.get("marker") or None
    listing = await engine.read(lambda s: engine.q_list_objects(s, b.id, prefix, delimiter, after, max_keys))
    owners = await owner_elements(b, listing.contents) if fetch_owner else {}
    parts = [tag("Name", b.name), f"<Prefix>{_enc(prefix, url)}</Prefix>"]
    if v2:
        if req.query.get("continuation-token") is not None:
            parts.append(tag("ContinuationToken", req.query["continuation-token"]))
        if req.query.get("start-after") is not None:
            parts.append(f"<StartAfter>{_enc(req.query['start-after'], url)}</StartAfter>")
        parts.append(tag("KeyCount", len(listing.contents) + len(listing.prefixes)))
    else:
        parts.append(f"<Marker>{_enc(req.query.get('marker', ''), url)}</Marker>")
    parts.append(tag("MaxKeys", max_keys))
    if delimiter:
        parts.append(f"<Delimiter>{_enc(delimiter, url)}</Delimiter>")
    if url:
        parts.append("<EncodingType>url</EncodingType>")
    parts.append(tag("IsTruncated", "true" if listing.truncated else "false"))
    if listing.truncated and listing.next_marker is not None:
        if v2:
            parts.append(tag("NextContinuationToken",
                             base64.urlsafe_b64encode(("1:" + listing.next_marker).encode()).decode().rstrip("=")))
        elif delimiter:
            parts.append(f"<NextMarker>{_enc(listing.next_marker, url)}</NextMarker>")
    for row in listing.contents:
        parts.append(f"<Contents><Key>{_enc(row.key, url)}</Key><LastModified>{iso(row.last_modified)}"
                     f"</LastModified><ETag>{esc(row.etag)}</ETag>{_checksum_alg_xml(row)}<Size>{row.size}</Size>"
                     f"{owners.get(row.owner, owners.get(None, ''))}<StorageClass>{row.storage_class}</StorageClass>"
                     f"</Contents>")
    for cp in listing.prefixes:
        parts.append(f"<CommonPrefixes><Prefix>{_enc(cp, url)}</Prefix></CommonPrefixes>")
    root = "ListBucketResult"
    return Response(200, XML, doc(root, "".join(parts)))


async def list_versions(req: Req, b: BucketInfo) -> Response:
    req.check("s3:ListBucketVersions", b)
    prefix = req.query.get("prefix", "")
    delimiter = req.query.get("delimiter", "")
    max_keys = int_param(req, "max-keys", 1000)
    url = _encoding(req)
    key_marker = req.query.get("key-marker") or None
    vid_marker = req.query.get("version-id-marker") or None
    if vid_marker and not key_marker:
        raise S3Error("InvalidArgument", "A version-id marker cannot be specified without a key marker.",
                      ArgumentName="version-id-marker")

    def q(s: Session) -> engine.Listing:
        row_id = None
        if key_marker and vid_marker:
            row_id = engine.q_version_row_id(s, b.id, key_marker, vid_marker)
            if row_id is None:
                raise invalid_version_id("version-id-marker")
        return engine.q_list_objects(s, b.id, prefix, delimiter, key_marker, max_keys, versions=True,
                                     version_after_id=row_id)

    listing = await engine.read(q)
    parts = [tag("Name", b.name), f"<Prefix>{_enc(prefix, url)}</Prefix>",
             f"<KeyMarker>{_enc(key_marker or '', url)}</KeyMarker>",
             tag("VersionIdMarker", vid_marker or ""), tag("MaxKeys", max_keys)]
    if delimiter:
        parts.append(f"<Delimiter>{_enc(delimiter, url)}</Delimiter>")
    if url:
        parts.append("<EncodingType>url</EncodingType>")
    parts.append(tag("IsTruncated", "true" if listing.truncated else "false"))
    if listing.truncated:
        last_c = listing.contents[-1] if listing.contents else None
        last_p = listing.prefixes[-1] if listing.prefixes else None
        if last_p is not None and (last_c is None or last_p > last_c.key):
            parts.append(f"<NextKeyMarker>{_enc(last_p, url)}</NextKeyMarker>")
        elif last_c is not None:
            parts.append(f"<NextKeyMarker>{_enc(last_c.key, url)}</NextKeyMarker>"
                         f"<NextVersionIdMarker>{esc(last_c.version_id)}</NextVersionIdMarker>")
    owners = await owner_elements(b, listing.contents)
    for row in listing.contents:
        common = (f"<Key>{_enc(row.key, url)}</Key><VersionId>{esc(row.version_id)}</VersionId>"
                  f"<IsLatest>{'true' if row.is_latest else 'false'}</IsLatest>"
                  f"<LastModified>{iso(row.last_modified)}</LastModified>{owners.get(row.owner, owners[None])}")
        if row.delete_marker:
            parts.append(f"<DeleteMarker>{common}</DeleteMarker>")
        else:
            parts.append(f"<Version>{common}<ETag>{esc(row.etag)}</ETag>{_checksum_alg_xml(row)}"
                         f"<Size>{row.size}</Size><StorageClass>{row.storage_class}</StorageClass></Version>")
    for cp in listing.prefixes:
        parts.append(f"<CommonPrefixes><Prefix>{_enc(cp, url)}</Prefix></CommonPrefixes>")
    return Response(200, XML, doc("ListVersionsResult", "".join(parts)))


async def list_uploads(req: Req, b: BucketInfo) -> Response:
    req.check("s3:ListBucketMultipartUploads", b)
    prefix = req.query.get("prefix", "")
    delimiter = req.query.get("delimiter", "")
    max_uploads = int_param(req, "max-uploads", 1000)
    url = _encoding(req)
    key_marker = req.query.get("key-marker", "")
    id_marker = req.query.get("upload-id-marker", "")

    def q(s: Session) -> list[Upload]:
        stmt = select(Upload).where(Upload.bucket_id == b.id)
        if prefix:
            stmt = stmt.where(Upload.key >= prefix)
            upper = engine.next_after(prefix)
            if upper:
                stmt = stmt.where(Upload.key < upper)
        if key_marker:
            if id_marker:
                stmt = stmt.where((Upload.key > key_marker) | ((Upload.key == key_marker) & (Upload.id > id_marker)))
            else:
                stmt = stmt.where(Upload.key > key_marker)
        return list(s.scalars(stmt.order_by(Upload.key, Upload.created_at, Upload.id).limit(10 * max_uploads + 1)))

    rows = await engine.read(q)
    uploads: list[Upload] = []
    prefixes: list[str] = []
    truncated = False
    for up in rows:
        rest = up.key[len(prefix):]
        if delimiter and delimiter in rest:
            cp = prefix + rest[:rest.index(delimiter) + len(delimiter)]
            if prefixes and prefixes[-1] == cp:
                continue
            if len(uploads) + len(prefixes) >= max_uploads:
                truncated = max_uploads > 0
                break
            prefixes.append(cp)
            continue
        if len(uploads) + len(prefixes) >= max_uploads:
            truncated = max_uploads > 0  # max-uploads=0: an empty page with nothing to go on from
            break
        uploads.append(up)
    parts = [tag("Bucket", b.name), f"<KeyMarker>{_enc(key_marker, url)}</KeyMarker>",
             tag("UploadIdMarker", id_marker), f"<Prefix>{_enc(prefix, url)}</Prefix>"]
    if delimiter:
        parts.append(f"<Delimiter>{_enc(delimiter, url)}</Delimiter>")
    if truncated and uploads:
        parts.append(f"<NextKeyMarker>{_enc(uploads[-1].key, url)}</NextKeyMarker>"
                     f"<NextUploadIdMarker>{esc(uploads[-1].id)}</NextUploadIdMarker>")
    parts.append(tag("MaxUploads", max_uploads))
    if url:
        parts.append("<EncodingType>url</EncodingType>")
    parts.append(tag("IsTruncated", "true" if truncated else "false"))
    owners = await owner_elements(b, uploads)  # the completed object's owner (a writer under ObjectWriter)
    for up in uploads:
        owner = owners.get(up.owner, owners[None])
        parts.append(f"<Upload><Key>{_enc(up.key, url)}</Key><UploadId>{esc(up.id)}</UploadId>"
                     f"{initiator_xml(up.initiator, b)}{owner}<StorageClass>{up.storage_class}</StorageClass>"
                     f"<Initiated>{iso(up.created_at)}</Initiated></Upload>")
    for cp in prefixes:
        parts.append(f"<CommonPrefixes><Prefix>{_enc(cp, url)}</Prefix></CommonPrefixes>")
    return Response(200, XML, doc("ListMultipartUploadsResult", "".join(parts)))


# --- simple sub-resources -------------------------------------------------------------------------

async def _update(b: BucketInfo, **values: Any) -> None:
    await engine.write(lambda s: engine.tx_update_bucket(s, b.id, **values))
    engine.invalidate_bucket(b.name)


async def get_location(req: Req, b: BucketInfo) -> Response:
    req.check("s3:GetBucketLocation", b)
    return Response(200, XML, f'<?xml version="1.0" encoding="UTF-8"?>\n<LocationConstraint xmlns="{NS}">'
                              f'{esc(b.region)}</LocationConstraint>'.encode())


async def get_versioning(req: Req, b: BucketInfo) -> Response:
    req.check("s3:GetBucketVersioning", b)
    inner = tag("Status", b.versioning) if b.versioning else ""
    return Response(200, XML, doc("VersioningConfiguration", inner))


async def put_versioning(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutBucketVersioning", b)
    node = parse(await req.read_body(), "VersioningConfiguration")
    status = node.text_of("Status")
    if status not in ("Enabled", "Suspended"):
        raise S3Error("IllegalVersioningConfigurationException",
                      "The Versioning element must be specified and must be Enabled or Suspended")
    if status == "Suspended" and b.object_lock:
        raise S3Error("InvalidBucketState", "An Object Lock configuration is present on this bucket, so the "
                                            "versioning state cannot be changed.")
    await _update(b, versioning=status)
    return Response(200)


async def get_policy(req: Req, b: BucketInfo) -> Response:
    req.check("s3:GetBucketPolicy", b)
    if not b.policy_raw:
        raise S3Error("NoSuchBucketPolicy", "The bucket policy does not exist", BucketName=b.name)
    return Response(200, {"content-type": "application/json"}, b.policy_raw.encode())


async def put_policy(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutBucketPolicy", b)
    raw = await req.read_body(20 * 1024)
    policy = validate_policy(raw, b.name)
    if is_public_policy(policy) and b.blocks("BlockPublicPolicy"):
        raise S3Error("AccessDenied", "Access Denied: public policies are blocked (block public access)")
    await _update(b, policy=json.dumps(policy))
    return Response(204)


async def delete_policy(req: Req, b: BucketInfo) -> Response:
    req.check("s3:DeleteBucketPolicy", b)
    await _update(b, policy=None)
    return Response(204)


async def get_policy_status(req: Req, b: BucketInfo) -> Response:
    """Public when a public policy statement or a public bucket ACL is in force (not ignored by a block)."""
    req.check("s3:GetBucketPolicyStatus", b)
    public = is_public_policy(b.policy) and not b.blocks("RestrictPublicBuckets")
    public = public or (is_public_acl(b.acl) and not b.acls_disabled and not b.blocks("IgnorePublicAcls"))
    return Response(200, XML, doc("PolicyStatus", tag("IsPublic", "true" if public else "false")))


async def get_acl(req: Req, b: BucketInfo) -> Response:
    req.check("s3:GetBucketAcl", b)
    return Response(200, XML, await acl_response_xml(b, b.acl))


async def put_acl(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutBucketAcl", b)
    grants = await acl_to_set(req, b)
    await _update(b, acl=grants)
    return Response(200)


async def get_bucket_tagging(req: Req, b: BucketInfo) -> Response:
    req.check("s3:GetBucketTagging", b)
    if not b.tags:
        raise S3Error("NoSuchTagSet", "The TagSet does not exist")
    return Response(200, XML, tagging_xml(b.tags))


async def put_bucket_tagging(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutBucketTagging", b)
    await _update(b, tags=parse_tagset(await req.read_body(), 50))
    return Response(204)


async def delete_bucket_tagging(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutBucketTagging", b)
    await _update(b, tags=None)
    return Response(204)


async def get_cors(req: Req, b: BucketInfo) -> Response:
    req.check("s3:GetBucketCORS", b)
    if not b.cors:
        raise S3Error("NoSuchCORSConfiguration", "The CORS configuration does not exist", BucketName=b.name)
    rules = []
    for r in b.cors:
        inner = tag("ID", r["id"]) if r.get("id") else ""
        inner += "".join(tag("AllowedOrigin", o) for o in r["origins"])
        inner += "".join(tag("AllowedMethod", m) for m in r["methods"])
        inner += "".join(tag("AllowedHeader", h) for h in r["headers"])
        inner += "".join(tag("ExposeHeader", h) for h in r["expose"])
        if r.get("max_age") is not None:
            inner += tag("MaxAgeSeconds", r["max_age"])
        rules.append(f"<CORSRule>{inner}</CORSRule>")
    return Response(200, XML, doc("CORSConfiguration", "".join(rules)))


async def put_cors(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutBucketCORS", b)
    node = parse(await req.read_body(), "CORSConfiguration")
    rules = []
    for r in node.children("CORSRule"):
        methods = [m.text for m in r.children("AllowedMethod")]
        origins = [o.text for o in r.children("AllowedOrigin")]
        if not methods or not origins:
            raise S3Error("MalformedXML", "A CORSRule needs AllowedOrigin and AllowedMethod")
        for m in methods:
            if m not in ("GET", "PUT", "POST", "DELETE", "HEAD"):
                raise S3Error("InvalidRequest", f"Found unsupported HTTP method in CORS config. Unsupported "
                                                f"method is {m}")
        for o in origins:
            if (o or "").count("*") > 1:
                raise S3Error("InvalidRequest", f'AllowedOrigin "{o}" can not have more than one wildcard.')
        max_age = r.text_of("MaxAgeSeconds")
        rules.append({"id": r.text_of("ID"), "origins": origins, "methods": methods,
                      "headers": [h.text for h in r.children("AllowedHeader")],
                      "expose": [h.text for h in r.children("ExposeHeader")],
                      "max_age": int(max_age) if max_age and max_age.isdigit() else None})
    if not rules or len(rules) > 100:
        raise S3Error("MalformedXML", "A CORS configuration needs 1 to 100 rules")
    await _update(b, cors=rules)
    return Response(200)


async def delete_cors(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutBucketCORS", b)
    await _update(b, cors=None)
    return Response(204)


async def get_lifecycle(req: Req, b: BucketInfo) -> Response:
    req.check("s3:GetLifecycleConfiguration", b)
    if not b.lifecycle:
        raise S3Error("NoSuchLifecycleConfiguration", "The lifecycle configuration does not exist",
                      BucketName=b.name)
    return Response(200, XML, lifecycle.to_xml(b.lifecycle))


async def put_lifecycle(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutLifecycleConfiguration", b)
    rules = lifecycle.parse_xml(await req.read_body())
    await _update(b, lifecycle=rules)
    return Response(200)


async def delete_lifecycle(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutLifecycleConfiguration", b)
    await _update(b, lifecycle=None)
    return Response(204)


async def get_object_lock(req: Req, b: BucketInfo) -> Response:
    req.check("s3:GetBucketObjectLockConfiguration", b)
    if not b.object_lock:
        raise S3Error("ObjectLockConfigurationNotFoundError", "Object Lock configuration does not exist for "
                                                              "this bucket", BucketName=b.name)
    inner = tag("ObjectLockEnabled", "Enabled")
    d = b.lock_default
    if d:
        period = tag("Days", d["days"]) if d.get("days") else tag("Years", d["years"])
        inner += f"<Rule><DefaultRetention>{tag('Mode', d['mode'])}{period}</DefaultRetention></Rule>"
    return Response(200, XML, doc("ObjectLockConfiguration", inner))


async def put_object_lock(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutBucketObjectLockConfiguration", b)
    node = parse(await req.read_body(), "ObjectLockConfiguration")
    if node.text_of("ObjectLockEnabled") != "Enabled":
        raise S3Error("MalformedXML", "ObjectLockEnabled must be Enabled")
    if not b.object_lock and b.versioning != "Enabled":
        raise S3Error("InvalidBucketState", "Versioning must be 'Enabled' on the bucket to apply a Object Lock "
                                            "configuration")
    default = None
    rule = node.find("Rule")
    if rule is not None:
        dr = rule.find("DefaultRetention")
        if dr is None:
            raise S3Error("MalformedXML", "Rule needs DefaultRetention")
        mode = dr.text_of("Mode")
        days, years = dr.text_of("Days"), dr.text_of("Years")
        if mode not in ("GOVERNANCE", "COMPLIANCE") or (days is None) == (years is None):
            raise S3Error("MalformedXML", "DefaultRetention needs a Mode and exactly one of Days or Years")
        try:
            n = int(days or years or "")
        except ValueError:
            raise S3Error("MalformedXML", "Days/Years must be an integer") from None
        if n <= 0:
            raise S3Error("InvalidArgument", "Default retention period must be a positive integer value",
                          ArgumentName="DefaultRetention")
        default = {"mode": mode, "days" if days else "years": n}
    await _update(b, object_lock=True, versioning="Enabled", lock_default=default)
    return Response(200)


async def get_encryption(req: Req, b: BucketInfo) -> Response:
    req.check("s3:GetEncryptionConfiguration", b)
    if not b.encryption:
        raise S3Error("ServerSideEncryptionConfigurationNotFoundError",
                      "The server side encryption configuration was not found", BucketName=b.name)
    inner = (f"<Rule><ApplyServerSideEncryptionByDefault>{tag('SSEAlgorithm', b.encryption)}"
             f"</ApplyServerSideEncryptionByDefault><BucketKeyEnabled>false</BucketKeyEnabled></Rule>")
    return Response(200, XML, doc("ServerSideEncryptionConfiguration", inner))


async def put_encryption(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutEncryptionConfiguration", b)
    node = parse(await req.read_body(), "ServerSideEncryptionConfiguration")
    rule = node.find("Rule")
    apply = rule.find("ApplyServerSideEncryptionByDefault") if rule is not None else None
    alg = apply.text_of("SSEAlgorithm") if apply is not None else None
    if alg not in ("AES256", "aws:kms", "aws:kms:dsse"):
        raise S3Error("MalformedXML", "SSEAlgorithm must be AES256")
    await _update(b, encryption="AES256")
    return Response(200)


async def delete_encryption(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutEncryptionConfiguration", b)
    await _update(b, encryption=None)
    return Response(204)


_PAB = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")


async def get_pab(req: Req, b: BucketInfo) -> Response:
    req.check("s3:GetBucketPublicAccessBlock", b)
    if b.public_access_block is None:
        raise S3Error("NoSuchPublicAccessBlockConfiguration", "The public access block configuration was not found",
                      BucketName=b.name)
    inner = "".join(tag(k, "true" if b.public_access_block.get(k) else "false") for k in _PAB)
    return Response(200, XML, doc("PublicAccessBlockConfiguration", inner))


async def put_pab(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutBucketPublicAccessBlock", b)
    node = parse(await req.read_body(), "PublicAccessBlockConfiguration")
    await _update(b, public_access_block={k: (node.text_of(k) or "").lower() == "true" for k in _PAB})
    return Response(200)


async def delete_pab(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutBucketPublicAccessBlock", b)
    await _update(b, public_access_block=None)
    return Response(204)


OWNERSHIPS = ("BucketOwnerEnforced", "BucketOwnerPreferred", "ObjectWriter")


async def get_ownership(req: Req, b: BucketInfo) -> Response:
    req.check("s3:GetBucketOwnershipControls", b)
    if b.object_ownership is None:
        raise S3Error("OwnershipControlsNotFoundError", "The bucket ownership controls were not found",
                      BucketName=b.name)
    return Response(200, XML, doc("OwnershipControls", f"<Rule>{tag('ObjectOwnership', b.object_ownership)}</Rule>"))


async def put_ownership(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutBucketOwnershipControls", b)
    node = parse(await req.read_body(64 * 1024), "OwnershipControls")
    rules = node.children("Rule")
    value = rules[0].text_of("ObjectOwnership") if len(rules) == 1 else None
    if value not in OWNERSHIPS:
        raise S3Error("MalformedXML", "The XML you provided was not well-formed or did not validate against our "
                                      "published schema")

    def tx(s: Session) -> None:
        bucket = engine.tx_bucket(s, b.id)
        if value == "BucketOwnerEnforced" and grants_to_others(bucket.acl, bucket.project_id):
            # S3 wants such grants moved to a bucket policy first
            raise S3Error("InvalidBucketAclWithObjectOwnership", "Bucket cannot have ACLs set with ObjectOwnership's "
                                                                 "BucketOwnerEnforced setting")
        bucket.object_ownership = value
        if value == "BucketOwnerEnforced":  # as S3: the bucket's owner now owns every object in it
            s.execute(update(ObjectVersion).where(ObjectVersion.bucket_id == b.id, ObjectVersion.owner.is_not(None))
                      .values(owner=None).execution_options(synchronize_session=False))
            s.execute(update(Upload).where(Upload.bucket_id == b.id, Upload.owner.is_not(None))
                      .values(owner=None).execution_options(synchronize_session=False))

    await engine.write(tx)
    engine.invalidate_bucket(b.name)
    return Response(200)


async def delete_ownership(req: Req, b: BucketInfo) -> Response:
    req.check("s3:PutBucketOwnershipControls", b)
    await _update(b, object_ownership=None)
    return Response(204)


async def not_implemented(req: Req, b: BucketInfo) -> Response:
    raise S3Error("NotImplemented", "A header or query you provided implies functionality that is not "
                                    "implemented")


_HANDLERS = {
    ("GET", "location"): get_location,
    ("GET", "versioning"): get_versioning, ("PUT", "versioning"): put_versioning,
    ("GET", "policy"): get_policy, ("PUT", "policy"): put_policy, ("DELETE", "policy"): delete_policy,
    ("GET", "policyStatus"): get_policy_status,
    ("GET", "acl"): get_acl, ("PUT", "acl"): put_acl,
    ("GET", "tagging"): get_bucket_tagging, ("PUT", "tagging"): put_bucket_tagging,
    ("DELETE", "tagging"): delete_bucket_tagging,
    ("GET", "cors"): get_cors, ("PUT", "cors"): put_cors, ("DELETE", "cors"): delete_cors,
    ("GET", "lifecycle"): get_lifecycle, ("PUT", "lifecycle"): put_lifecycle, ("DELETE", "lifecycle"): delete_lifecycle,
    ("GET", "object-lock"): get_object_lock, ("PUT", "object-lock"): put_object_lock,
    ("GET", "encryption"): get_encryption, ("PUT", "encryption"): put_encryption,
    ("DELETE", "encryption"): delete_encryption,
    ("GET", "publicAccessBlock"): get_pab, ("PUT", "publicAccessBlock"): put_pab, ("DELETE", "publicAccessBlock"):
        delete_pab,
    ("GET", "ownershipControls"): get_ownership, ("PUT", "ownershipControls"): put_ownership,
    ("DELETE", "ownershipControls"): delete_ownership,
    ("GET", "versions"): list_versions, ("GET", "uploads"): list_uploads,
    ("GET", "website"): not_implemented, ("PUT", "website"): not_implemented,
    ("GET", "logging"): not_implemented, ("PUT", "logging"): not_implemented,
    ("GET", "notification"): not_implemented, ("PUT", "notification"): not_implemented,
    ("GET", "replication"): not_implemented, ("PUT", "replication"): not_implemented,
    ("GET", "accelerate"): not_implemented, ("PUT", "accelerate"): not_implemented,
    ("GET", "requestPayment"): not_implemented, ("PUT", "requestPayment"): not_implemented,
}
_SUBRESOURCES = sorted({sub for _, sub in _HANDLERS} | {"delete"})

__all__ = ["bucket_op", "dt", "load_bucket", "service_op", "validate_bucket_name"]
