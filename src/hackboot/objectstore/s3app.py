"""The S3 protocol server: a plain ASGI app (no framework on the hot path).

`create_s3_app()` returns it; `hackboot serve` runs it with uvicorn on `s3_host:s3_port`.
Addressing: path style (`/bucket/key`) and virtual-host style (`bucket.<domain>/key`, domains
from HACKBOOT_S3_DOMAINS, default `s3.localhost,localhost`).

Request flow: parse → authenticate (SigV4 header / presigned query / anonymous) → route by method
and sub-resource → authorize (policy.py) → handler (s3objects.py, s3buckets.py) → response.
Every error is S3's XML with a request id (also in `x-amz-request-id`).
"""

from __future__ import annotations

import datetime as dt
import errno
import functools
import hashlib
import itertools
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from starlette.types import Receive, Scope, Send

from hackboot.core import diskspace
from hackboot.core.config import get_settings
from hackboot.core.errors import ApiError
from hackboot.objectstore import engine, sigv4
from hackboot.objectstore.policy import ANONYMOUS, Requester, authorize
from hackboot.objectstore.s3errors import S3Error, insufficient_storage, invalid_access_key_id
from hackboot.objectstore.s3xml import error_document

log = logging.getLogger("hackboot.objectstore.s3")
_RID_PREFIX = uuid.uuid4().hex[:6].upper()  # request ids: per-process prefix + counter (no syscall per request)
_rid_counter = itertools.count(1)
Body = bytes | AsyncIterator[bytes]


@dataclass
class Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Body = b""


class Req:
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
              object_acl: list[dict[str, str]] | None = None) -> None:
        authorize(req=self.requester, action=action, bucket_name=bucket.name, bucket_owner=bucket.project_id,
                  policy=bucket.policy, bucket_acl=bucket.acl, object_acl=object_acl, key=key,
                  ctx=self.ctx() if bucket.policy else {},
                  ignore_public_policy=bucket.blocks("RestrictPublicBuckets"),
                  ignore_public_acls=bucket.blocks("IgnorePublicAcls"))

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


@functools.lru_cache(maxsize=1)
def _domains() -> tuple[str, ...]:
    return tuple(d.strip().lower() for d in os.environ.get("HACKBOOT_S3_DOMAINS", "s3.localhost,localhost")
                 .split(",") if d.strip())


# --- authentication -------------------------------------------------------------------------------

async def _authenticate_v2(req: Req, access_key: str, signature: str, date_or_expires: str) -> None:
    cred = await engine.blocking(engine.get_credential, access_key)
    if cred is None:
        raise invalid_access_key_id(AWSAccessKeyId=access_key)
    resource = req.raw_path
    if req.bucket_name and not req.raw_path.startswith("/" + req.bucket_name):  # virtual-host style
        resource = "/" + req.bucket_name + req.raw_path
    if req.bucket_name and req.key is None and not resource.endswith("/"):
        resource += "/"  # the bucket's canonical resource is "/bucket/"
    headers = {k: v for k, v in req.headers.items() if k != "authorization"}
    sigv4.verify_v2(cred.secret, signature, sigv4.v2_string_to_sign(req.method, headers, resource, req.query,
                                                                     date_or_expires))
    req.requester = Requester(cred.project_id, cred.user_id, cred.read_only, cred.buckets, cred.access_key)


async def authenticate(req: Req) -> None:
    header = req.headers.get("authorization")
    if header and header.startswith("AWS "):  # Signature Version 2 header
        ak, _, sig = header[4:].partition(":")
        date = "" if "x-amz-date" in req.headers else req.headers.get("date", "")
        when = sigv4._parse_amz_date(req.headers.get("x-amz-date") or date)
        if abs(dt.datetime.now(dt.UTC) - when) > sigv4.MAX_SKEW:
            raise S3Error("RequestTimeTooSkewed", "The difference between the request time and the current time "
                                                  "is too large.")
        await _authenticate_v2(req, ak.strip(), sig.strip(), date)
        return
    if not header and "AWSAccessKeyId" in req.query and "Signature" in req.query:  # SigV2 presigned
        expires = req.query.get("Expires", "")
        if not expires.isdigit():
            raise S3Error("AccessDenied", "Query-string authentication requires the Signature, Expires and "
                                          "AWSAccessKeyId parameters")
        now_s = int(dt.datetime.now(dt.UTC).timestamp())
        if int(expires) < now_s:
            raise S3Error("AccessDenied", "Request has expired", Expires=expires)
        # SigV2 carries an absolute expiry; cap it like SigV4's X-Amz-Expires (a week), so a leaked
        # URL cannot outlive the week a SigV4 one would.
        if int(expires) > now_s + sigv4.MAX_PRESIGN_EXPIRES + int(sigv4.MAX_SKEW.total_seconds()):
            raise S3Error("AccessDenied", "Presigned URLs may not expire more than 7 days (604800 seconds) "
                                          "after they are made", Expires=expires)
        await _authenticate_v2(req, req.query["AWSAccessKeyId"], req.query["Signature"], expires)
        return
    if header:
        auth = sigv4.parse_authorization(header, req.headers)
    elif "X-Amz-Algorithm" in req.query or "X-Amz-Credential" in req.query:
        auth = sigv4.parse_presigned(req.query)
    else:
        return
    sigv4.check_time(auth, dt.datetime.now(dt.UTC))
    cred = engine.get_credential(auth.access_key) if auth.access_key in engine._creds else \
        await engine.blocking(engine.get_credential, auth.access_key)
    if cred is None:
        raise invalid_access_key_id(AWSAccessKeyId=auth.access_key)
    headers = req.headers
    if auth.presigned and "host" not in headers:
        raise S3Error("AccessDenied", "Missing host header")
    req.signing_key = sigv4.verify(auth, cred.secret, req.method, req.raw_path, req.raw_query, headers)
    sigv4.require_signed_amz_headers(auth, headers)
    req.auth = auth
    req.requester = Requester(cred.project_id, cred.user_id, cred.read_only, cred.buckets, cred.access_key)


# --- disk space -----------------------------------------------------------------------------------

def _frees_space(req: Req) -> bool:
    return req.method == "DELETE" or (req.method == "POST" and req.has("delete"))


def prepare_disk(req: Req) -> None:
    """Writes are refused (507) *before* anything is written when the state directory is nearly full;
    deletes must still commit then (the database needs a little room for them): release the reserve."""
    if req.method in ("GET", "HEAD", "OPTIONS"):
        return
    if _frees_space(req):
        # a fresh reading (not the cached one): a delete that cannot commit is what we must avoid
        if diskspace.free_bytes(fresh=True) < get_settings().min_free_bytes:
            diskspace.use_reserve()
        return
    try:
        extra = req.declared_length() or 0
    except S3Error:
        extra = 0
    if diskspace.is_low(extra=extra):
        raise insufficient_storage()


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from a blob write, or SQLite's "database or disk is full", anywhere in the chain."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


# --- ASGI -----------------------------------------------------------------------------------------

Handler = Callable[[Req], Awaitable[Response]]


async def _send(send: Send, req: Req, resp: Response) -> None:
    headers = [(b"x-amz-request-id", req.request_id.encode()), (b"x-amz-id-2", req.request_id.encode()),
               (b"server", b"HackbootS3")]
    body = resp.body
    has_len = any(k.lower() == "content-length" for k in resp.headers)
    if isinstance(body, bytes) and not has_len:
        headers.append((b"content-length", str(len(body)).encode()))
    for k, v in resp.headers.items():
        headers.append((k.lower().encode("latin-1"), str(v).encode("latin-1", "replace")))
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    if req.method == "HEAD":
        if not isinstance(body, bytes):
            await body.aclose()  # type: ignore[attr-defined]
        await send({"type": "http.response.body", "body": b""})
        return
    if isinstance(body, bytes):
        await send({"type": "http.response.body", "body": body})
        return
    try:
        async for piece in body:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
    finally:
        await body.aclose()  # type: ignore[attr-defined]
    await send({"type": "http.response.body", "body": b""})


def error_response(req: Req, err: S3Error) -> Response:
    headers = {"content-type": "application/xml"} | err.headers
    if err.status == 304:
        return Response(304, err.headers, b"")
    body = error_document(err, req.resource, req.request_id) if req.method != "HEAD" else b""
    if req.method == "HEAD":
        headers["content-length"] = "0"
    return Response(err.status, headers, body)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            try:
                from hackboot.objectstore.service import startup

                await engine.blocking(startup)
            except Exception as exc:
                log.exception("object store startup failed")
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


MAX_HEADER_VALUE = 16 * 1024  # per header line; user metadata is capped lower (2 KiB, as S3)
MAX_HEADERS_TOTAL = 64 * 1024


def _headers_fit(scope: Scope) -> bool:
    """The server caps header sizes before the app; this holds the S3 endpoint to the same limits
    whatever server runs it."""
    total = 0
    for k, v in scope["headers"]:
        n = len(k) + len(v)
        if n > MAX_HEADER_VALUE:
            return False
        total += n + 4
    return total <= MAX_HEADERS_TOTAL


async def s3_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    from hackboot.objectstore import cors, s3buckets, s3objects

    try:
        req = Req(scope, receive)
    except Exception:
        await send({"type": "http.response.start", "status": 400, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    if not _headers_fit(scope):
        resp = error_response(req, S3Error("RequestHeaderSectionTooLarge", "Your request header section exceeds "
                                           "the maximum allowed size.", 431, MaxSizeAllowed=str(MAX_HEADERS_TOTAL)))
        resp.headers["connection"] = "close"
        await _send(send, req, resp)
        return
    cors_headers: dict[str, str] = {}
    try:
        if req.method == "OPTIONS":
            resp = await cors.preflight(req)
        else:
            if req.method == "POST" and req.key is None and req.bucket_name and \
                    req.headers.get("content-type", "").startswith("multipart/form-data"):
                prepare_disk(req)
                resp = await s3objects.post_upload(req)
            else:
                await authenticate(req)
                prepare_disk(req)
                if req.bucket_name is None:
                    resp = await s3buckets.service_op(req)
                elif req.key is None:
                    resp = await s3buckets.bucket_op(req)
                else:
                    resp = await s3objects.object_op(req)
            if "origin" in req.headers and req.bucket_name:
                cors_headers = cors.actual_headers(req)
    except S3Error as err:
        resp = error_response(req, err)
        if "origin" in req.headers and req.bucket_name and err.code != "NoSuchBucket":
            try:
                cors_headers = cors.actual_headers(req)
            except Exception:
                cors_headers = {}
    except ApiError as err:  # quotas raise the core error type
        code = "QuotaExceeded" if err.status == 403 and err.code == "quota_exceeded" else "InvalidRequest"
        resp = error_response(req, S3Error(code, err.detail, err.status))
    except Exception as exc:
        if is_disk_full(exc):  # partial blobs were removed by the writer's abort; nothing was committed
            log.warning("S3 request refused, disk full: %s %s", req.method, req.raw_path)
            resp = error_response(req, insufficient_storage())
        else:
            log.exception("S3 request failed: %s %s", req.method, req.raw_path)
            resp = error_response(req, S3Error("InternalError", "We encountered an internal error. "
                                                                "Please try again."))
    if cors_headers:
        resp.headers.update(cors_headers)
    if (not req.body_started and req.method in ("PUT", "POST") and resp.status >= 400) or resp.status == 507:
        resp.headers["connection"] = "close"  # the unread rest of the body is not worth reading
    await _send(send, req, resp)


def create_s3_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The S3 ASGI application (serve it on its own port)."""
    return s3_app
