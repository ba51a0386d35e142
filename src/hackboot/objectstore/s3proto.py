"""What every S3 protocol module shares: the request (`Req`: parsing, addressing, authorisation
checks, body decoding) and response types, the content-type of XML answers, and the parameter and
document helpers used by bucket and object operations alike (query integers, ACLs, tag sets).

A leaf of the protocol layer: `s3app` (routing), `s3buckets`, `s3objects`, `postupload` and `cors`
import it, and it imports none of them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from starlette.types import Receive, Scope

from hackboot.core.config import get_settings
from hackboot.objectstore import engine, sigv4
from hackboot.objectstore.engine import BucketInfo
from hackboot.objectstore.policy import (
    ANONYMOUS,
    GROUPS,
    PERMISSIONS,
    Requester,
    acl_from_headers,
    authorize,
    displayed_acl,
    is_public_acl,
    stored_acl,
)
from hackboot.objectstore.s3errors import S3Error, access_denied, no_such_bucket, public_acls_blocked
from hackboot.objectstore.s3xml import doc, esc, parse, tag

XML = {"content-type": "application/xml"}
_RID_PREFIX = uuid.uuid4().hex[:6].upper()  # request ids: per-process prefix + counter (no syscall per request)
_rid_counter = itertools.count(1)
# A streamed body is an async generator: the sender closes it (aclose) when the client goes or on HEAD.
Body = bytes | AsyncGenerator[bytes, None]


@dataclass
class Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Body = b""


class Req:
    """One S3 request: method, path-style or virtual-host-style bucket and key, query, headers (repeated
    ones joined by commas), the authenticated requester, and its body read on demand."""

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.request_id = f"{_RID_PREFIX}{next(_rid_counter):010X}"
        raw_path = scope.get("raw_path") or scope["path"].encode()
        self.raw_path = raw_path.decode("latin-1").split("?", 1)[0]
        self.raw_query: str = scope.get("query_string", b"").decode("latin-1")
        self.query: dict[str, str] = {}
        if self.raw_query:
            for item in self.raw_query.split("&"):
                if item:
                    k, _, v = item.partition("=")
                    self.query.setdefault(unquote(k.replace("+", " ")), unquote(v.replace("+", " ")))
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            name = k.decode("latin-1").lower()
            value = v.decode("latin-1")
            headers[name] = headers[name] + "," + value if name in headers else value
        self.headers = headers
        self.client_ip = (scope.get("client") or ("", 0))[0]
        self.requester: Requester = ANONYMOUS
        self.auth: sigv4.AuthRequest | None = None
        self.signing_key: bytes | None = None
        self.trailers: dict[str, str] = {}
        self.bucket_name: str | None = None
        self.key: str | None = None
        self.body_started = False
        self.deferred_sha: Any = None
        self._route()

    def _route(self) -> None:
        path = self.raw_path
        host = self.headers.get("host", "").rsplit(":", 1)[0].lower() if not self.headers.get("host", "").startswith(
            "[") else ""
        vhost_bucket = None
        for domain in _domains():
            if host.endswith("." + domain):
                vhost_bucket = host[: -len(domain) - 1]
                break
        if vhost_bucket:
            self.bucket_name = vhost_bucket
            key = path.removeprefix("/")
            self.key = unquote(key) if key else None
            return
        stripped = path.removeprefix("/")
        if not stripped:
            return
        bucket, sep, key = stripped.partition("/")
        self.bucket_name = unquote(bucket)
        self.key = unquote(key) if sep and key else None

    @property
    def resource(self) -> str:
        if self.bucket_name is None:
            return "/"
        return f"/{self.bucket_name}" + (f"/{self.key}" if self.key else "")

    def has(self, name: str) -> bool:
        return name in self.query

    def ctx(self) -> dict[str, Any]:
        """Condition keys for bucket policies."""
        ctx: dict[str, Any] = {
            "aws:sourceip": self.client_ip,
            "aws:securetransport": "true" if self.scope.get("scheme") == "https" else "false",
            "aws:currenttime": dt.datetime.now(dt.UTC).isoformat(),
            "aws:epochtime": str(int(dt.datetime.now(dt.UTC).timestamp())),
            "aws:useragent": self.headers.get("user-agent"),
            "aws:referer": self.headers.get("referer"),
            "s3:prefix": self.query.get("prefix"),
            "s3:delimiter": self.query.get("delimiter"),
            "s3:max-keys": self.query.get("max-keys"),
            "s3:versionid": self.query.get("versionId"),
            "s3:x-amz-acl": self.headers.get("x-amz-acl"),
            "s3:x-amz-server-side-encryption": self.headers.get("x-amz-server-side-encryption"),
            "s3:x-amz-storage-class": self.headers.get("x-amz-storage-class"),
            "s3:x-amz-copy-source": self.headers.get("x-amz-copy-source"),
            "s3:signatureversion": "AWS4-HMAC-SHA256" if self.auth else None,
            "s3:authtype": ("REST-QUERY-STRING" if self.auth.presigned else "REST-HEADER") if self.auth else None,
        }
        if self.requester.project_id:
            ctx["aws:principalaccount"] = self.requester.project_id
            ctx["aws:userid"] = self.requester.user_id
        return {k: v for k, v in ctx.items() if v is not None}

    def check(self, action: str, bucket: engine.BucketInfo, key: str | None = None,
              object_acl: list[dict[str, str]] | None = None, object_owner: str | None = None) -> None:
        if bucket.acls_disabled:  # BucketOwnerEnforced: ACLs no longer affect permissions
            bucket_acl, object_acl, object_owner = None, None, None
        else:
            bucket_acl = bucket.acl
        authorize(req=self.requester, action=action, bucket_name=bucket.name, bucket_owner=bucket.project_id,
                  policy=bucket.policy, bucket_acl=bucket_acl, object_acl=object_acl, key=key,
                  ctx=self.ctx() if bucket.policy else {},
                  ignore_public_policy=bucket.blocks("RestrictPublicBuckets"),
                  ignore_public_acls=bucket.blocks("IgnorePublicAcls"), object_owner=object_owner)

    @property
    def actor(self) -> str:
        return self.requester.user_id or self.requester.access_key or "anonymous"

    # --- body ---------------------------------------------------------------------------------

    def payload_mode(self) -> str:
        return self.auth.payload_hash if self.auth else sigv4.UNSIGNED

    def declared_length(self) -> int | None:
        mode = self.payload_mode()
        value = self.headers.get("x-amz-decoded-content-length") if mode in sigv4.STREAMING or \
            "aws-chunked" in self.headers.get("content-encoding", "") else self.headers.get("content-length")
        if value is None:
            return None
        try:
            n = int(value)
        except ValueError:
            raise S3Error("InvalidArgument", "Invalid content length") from None
        if n < 0:
            raise S3Error("InvalidArgument", "Invalid content length")
        return n

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The decoded payload, verified: signatures of chunks, x-amz-content-sha256, length."""
        self.body_started = True
        mode = self.payload_mode()
        chunked = mode in sigv4.STREAMING or "aws-chunked" in self.headers.get("content-encoding", "")
        decoder = sigv4.ChunkedDecoder(self.auth, self.signing_key, mode) if chunked else None
        sha = hashlib.sha256() if len(mode) == 64 and self.deferred_sha is None else None
        expected = self.declared_length()
        total = 0
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                raise S3Error("IncompleteBody", "The client closed the connection before the body was complete")
            data = msg.get("body", b"")
            if data:
                pieces = decoder.feed(data) if decoder is not None else [data]
                for piece in pieces:
                    if sha is not None:
                        if len(piece) <= 65536:  # see Sink.write: keep the GIL for small inputs
                            view = memoryview(piece)
                            for i in range(0, len(piece), 2047):
                                sha.update(view[i:i + 2047])
                        else:
                            sha.update(piece)
                    total += len(piece)
                    if expected is not None and total > expected:
                        raise S3Error("IncompleteBody", "The body is longer than its declared length")
                    yield piece
            if not msg.get("more_body", False):
                break
        if decoder is not None:
            self.trailers = decoder.close()
        if expected is not None and total != expected:
            raise S3Error("IncompleteBody", "You did not provide the number of bytes specified by the "
                                            "Content-Length HTTP header")
        if sha is not None:
            self.check_payload_sha(sha.hexdigest())

    def defer_payload_hash(self) -> Any:
        """Let the consumer hash the payload (in its worker thread) instead of the event loop."""
        if len(self.payload_mode()) == 64:
            self.deferred_sha = hashlib.sha256()
        return self.deferred_sha

    def check_payload_sha(self, actual: str) -> None:
        mode = self.payload_mode()
        if actual != mode:
            raise S3Error("XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' header does not "
                                                      "match what was computed.", ClientComputedContentSHA256=mode,
                          S3ComputedContentSHA256=actual)

    async def read_body(self, limit: int = 1024 * 1024) -> bytes:
        """A small request body (XML configuration, multi-delete…), at most `limit` bytes. A declared
        length over the limit is refused before a byte is read (S3 answers MaxMessageLengthExceeded)."""
        declared = self.declared_length()
        if declared is not None and declared > limit:
            raise S3Error("MaxMessageLengthExceeded", "Your request was too big.", MaxMessageLength=str(limit))
        parts = []
        n = 0
        async for piece in self.iter_body():
            n += len(piece)
            if n > limit:
                raise S3Error("MaxMessageLengthExceeded", "Your request was too big.")
            parts.append(piece)
        body = b"".join(parts)
        md5 = self.headers.get("content-md5")
        if md5 is not None:
            import base64

            if base64.b64encode(hashlib.md5(body).digest()).decode() != md5.strip():
                raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.")
        return body

    async def drain(self) -> None:
        if self.body_started:
            return
        self.body_started = True
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
                return


def _domains() -> tuple[str, ...]:
    return tuple(d.strip().lower() for d in get_settings().s3_domains.split(",") if d.strip())


# --- shared helpers ------------------------------------------------------------------------------

async def load_bucket(req: Req) -> BucketInfo:
    name = req.bucket_name or ""
    info = await engine.load_bucket_info(name)
    if info is None:
        raise no_such_bucket(BucketName=name[:100])
    check_expected_owner(req, info, "x-amz-expected-bucket-owner")
    return info


def check_expected_owner(req: Req, b: BucketInfo, header: str) -> None:
    """`x-amz-expected-bucket-owner` (or `x-amz-source-expected-bucket-owner` for a copy source): the
    request fails unless the bucket's owner is that account. The answer is the plain AccessDenied every
    refused request gets, so a wrong guess of another project's id tells nothing a right one would not."""
    expected = req.headers.get(header)
    if expected is not None and expected.strip() != b.project_id:
        raise access_denied()


def owner_xml(project_id: str, display_name: str | None = None) -> str:
    name = display_name or project_id
    return f"<Owner><ID>{esc(project_id)}</ID><DisplayName>{esc(name)}</DisplayName></Owner>"


def initiator_xml(initiator: str, b: BucketInfo) -> str:
    """A multipart upload's Initiator: the project that created it (named when it is the bucket's owner)."""
    name = b.owner_name if initiator == b.project_id else initiator
    return f"<Initiator><ID>{esc(initiator)}</ID><DisplayName>{esc(name)}</DisplayName></Initiator>"


def int_param(req: Req, name: str, default: int, lo: int = 0, hi: int = 1000) -> int:
    raw = req.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise S3Error("InvalidArgument", f"Provided {name} not an integer or within integer range",
                      ArgumentName=name, ArgumentValue=raw[:50]) from None
    if v < lo:
        raise S3Error("InvalidArgument", f"Argument {name} must be an integer between {lo} and 2147483647",
                      ArgumentName=name, ArgumentValue=raw[:50])
    return min(v, hi)


def acl_xml(owner: str, grants: list[dict[str, str]], names: dict[str, str] | None = None) -> bytes:
    """An AccessControlPolicy of a stored ACL (see policy.stored_acl); `names` maps canonical IDs (project
    ids) to display names (project names)."""
    names = names or {}
    xsi = "http://www.w3.org/2001/XMLSchema-instance"
    items = []
    for g in displayed_acl(grants, owner):
        who = g["grantee"]
        if who in GROUPS:
            grantee = f'<Grantee xmlns:xsi="{xsi}" xsi:type="Group"><URI>{esc(who)}</URI></Grantee>'
        else:
            grantee = (f'<Grantee xmlns:xsi="{xsi}" xsi:type="CanonicalUser"><ID>{esc(who)}</ID>'
                       f"<DisplayName>{esc(names.get(who, who))}</DisplayName></Grantee>")
        items.append(f"<Grant>{grantee}<Permission>{g['permission']}</Permission></Grant>")
    return doc("AccessControlPolicy", owner_xml(owner, names.get(owner))
               + f"<AccessControlList>{''.join(items)}</AccessControlList>")


async def acl_response_xml(b: BucketInfo, grants: list[dict[str, str]], object_owner: str | None = None) -> bytes:
    """GetBucketAcl / GetObjectAcl: with ACLs disabled (BucketOwnerEnforced) only the bucket owner's
    FULL_CONTROL, which is all that applies then; grantees carry their projects' names as display names."""
    shown = [] if b.acls_disabled else grants
    owner = b.project_id if b.acls_disabled else object_owner or b.project_id
    ids = [owner] + [g["grantee"] for g in shown if g["grantee"] not in GROUPS]
    names = await engine.read(lambda s: engine.project_display_names(s, ids))
    return acl_xml(owner, shown, names)


def new_object_owner(req: Req, b: BucketInfo) -> str | None:
    """The owner of an object this request writes, None meaning the bucket's project. Writers from other
    projects own what they write only where the bucket's owner chose it (as S3 defines the settings):
    ObjectWriter, or BucketOwnerPreferred without the `bucket-owner-full-control` canned ACL. Without
    ownership controls the bucket's project owns everything (S3's default for new buckets)."""
    writer = req.requester.project_id
    if writer is None or writer == b.project_id:
        return None
    if b.object_ownership == "ObjectWriter":
        return writer
    if b.object_ownership == "BucketOwnerPreferred" and req.headers.get("x-amz-acl") != "bucket-owner-full-control":
        return writer
    return None


def _needs_resolution(grants: list[dict[str, str]], owner: str) -> bool:
    return any("email" in g or (g["grantee"] not in GROUPS and g["grantee"] != owner) for g in grants)


def check_settable_acl(b: BucketInfo, grants: list[dict[str, str]]) -> None:
    """Under BucketOwnerEnforced only ACLs equivalent to the owner's full control are accepted (`private`,
    `bucket-owner-full-control`, an explicit owner FULL_CONTROL); public ACLs are refused while blocked."""
    if grants and b.acls_disabled:
        raise S3Error("AccessControlListNotSupported", "The bucket does not allow ACLs")
    if is_public_acl(grants) and b.blocks("BlockPublicAcls"):
        raise public_acls_blocked()


def new_object_acl(headers: dict[str, str], b: BucketInfo, owner: str | None = None) -> list[dict[str, str]] | None:
    """The ACL sent with new data (`x-amz-acl` / `x-amz-grant-*`, or a POST form's `acl`), resolved and
    checked against the bucket's settings; None when the request sets none. `owner`: the new object's
    owner when not the bucket's (see new_object_owner)."""
    owner = owner or b.project_id
    acl = acl_from_headers(headers, owner, b.project_id)
    if acl is None:
        return None
    if _needs_resolution(acl, owner):  # rare: a tiny indexed read on the loop is cheaper than a hop
        acl = engine.resolve_grantees(acl, b.project_id)
    acl = stored_acl(acl, owner)
    check_settable_acl(b, acl)
    return acl


async def acl_to_set(req: Req, b: BucketInfo, object_owner: str | None = None) -> list[dict[str, str]]:
    """PutBucketAcl / PutObjectAcl: the headers or the AccessControlPolicy body, resolved and checked.
    `object_owner`: the object's owner when not the bucket's."""
    owner = object_owner or b.project_id
    grants = await parse_acl_request(req, owner, b.project_id)
    if _needs_resolution(grants, owner):
        grants = await engine.read(lambda s: engine.q_resolve_grantees(s, grants, b.project_id))
    grants = stored_acl(grants, owner)
    check_settable_acl(b, grants)
    return grants


async def parse_acl_request(req: Req, owner: str, bucket_owner: str | None = None) -> list[dict[str, str]]:
    from_headers = acl_from_headers(req.headers, owner, bucket_owner)
    body = await req.read_body(64 * 1024)
    if from_headers is not None:
        if body.strip():
            raise S3Error("UnexpectedContent", "This request does not support content")
        return from_headers
    if not body.strip():
        raise S3Error("MissingSecurityHeader", "Your request was missing a required header",
                      MissingHeaderName="x-amz-acl")
    node = parse(body, "AccessControlPolicy")
    stated_owner = node.find("Owner")
    if stated_owner is None or not stated_owner.text_of("ID"):
        raise S3Error("MalformedACLError", "The XML you provided was not well-formed or did not validate "
                                           "against our published schema")
    acl = node.find("AccessControlList")
    grants: list[dict[str, str]] = []
    for g in acl.children("Grant") if acl is not None else []:
        grantee = g.find("Grantee")
        perm = g.text_of("Permission")
        if grantee is None or perm not in PERMISSIONS:
            raise S3Error("MalformedACLError", "The XML you provided was not well-formed or did not validate "
                                               "against our published schema")
        who = grantee.text_of("ID") or grantee.text_of("URI")
        if not who:
            email = grantee.text_of("EmailAddress")
            if email:
                grants.append({"grantee": "", "email": email, "permission": perm})
                continue
            raise S3Error("MalformedACLError", "The XML you provided was not well-formed or did not validate "
                                               "against our published schema")
        if (grantee.text_of("URI") is not None or who.startswith("http")) and who not in GROUPS:
            raise S3Error("InvalidArgument", "Invalid group uri", ArgumentName="Group/URI")
        grants.append({"grantee": who, "permission": perm})
    return grants


def parse_tagset(body: bytes, limit: int) -> dict[str, str]:
    node = parse(body, "Tagging")
    tagset = node.find("TagSet")
    tags: dict[str, str] = {}
    for t in tagset.children("Tag") if tagset is not None else []:
        k, v = t.text_of("Key"), t.text_of("Value", "")
        if k is None or k == "" or len(k) > 128 or len(v or "") > 256:
            raise S3Error("InvalidTag", "The TagKey you have provided is invalid")
        if k in tags:
            raise S3Error("InvalidTag", "Cannot provide multiple Tags with the same key")
        tags[k] = v or ""
    if len(tags) > limit:
        raise S3Error("BadRequest", f"Object tags cannot be greater than {limit}")
    return tags


def tagging_xml(tags: dict[str, str]) -> bytes:
    items = "".join(f"<Tag>{tag('Key', k)}{tag('Value', v)}</Tag>" for k, v in tags.items())
    return doc("Tagging", f"<TagSet>{items}</TagSet>")
