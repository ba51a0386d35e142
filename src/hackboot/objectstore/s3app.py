"""The S3 protocol server: a plain ASGI app (no framework on the hot path).

`create_s3_app()` returns it; `hackboot serve` runs it with uvicorn on `s3_host:s3_port`.
Addressing: path style (`/bucket/key`) and virtual-host style (`bucket.<domain>/key`, domains
from HACKBOOT_S3_DOMAINS, default `s3.localhost,localhost`).

Request flow: parse (`s3proto.Req`) → authenticate (SigV4 header / presigned query / anonymous) → route by method
and sub-resource → authorize (policy.py) → handler (s3objects.py, s3buckets.py) → response.
Every error is S3's XML with a request id (also in `x-amz-request-id`).
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
from collections.abc import Awaitable, Callable

from starlette.types import Receive, Scope, Send

from hackboot.core import diskspace
from hackboot.core.config import get_settings
from hackboot.core.errors import ApiError
from hackboot.objectstore import cors, engine, postupload, s3buckets, s3objects, sigv4
from hackboot.objectstore.policy import Requester
from hackboot.objectstore.s3errors import S3Error, insufficient_storage, invalid_access_key_id
from hackboot.objectstore.s3proto import Req, Response, load_bucket
from hackboot.objectstore.s3xml import error_document

log = logging.getLogger("hackboot.objectstore.s3")


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
        when = sigv4.parse_amz_date(req.headers.get("x-amz-date") or date)
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
    cred = await engine.load_credential(auth.access_key)
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
            await body.aclose()
        await send({"type": "http.response.body", "body": b""})
        return
    if isinstance(body, bytes):
        await send({"type": "http.response.body", "body": body})
        return
    try:
        async for piece in body:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
    finally:
        await body.aclose()
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
                resp = await postupload.post_object(req)
            else:
                await authenticate(req)
                prepare_disk(req)
                if req.bucket_name is None:
                    resp = await s3buckets.service_op(req)
                elif req.key is None and req.method == "POST" and req.has("delete"):
                    # DeleteObjects is addressed to the bucket but is object work
                    resp = await s3objects.delete_objects(req, await load_bucket(req))
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
