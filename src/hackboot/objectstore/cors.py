"""CORS for buckets: preflight (OPTIONS) answers and the headers added to actual requests."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from hackboot.objectstore import engine
from hackboot.objectstore.s3errors import S3Error, no_such_bucket
from hackboot.objectstore.s3proto import Req, Response


@lru_cache(maxsize=1024)
def _pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(piece) for piece in pattern.split("*")), re.DOTALL)


def wildcard_match(value: str, pattern: str) -> bool:
    """S3's CORS patterns: `*` stands for any run of characters (e.g. "https://*.example.com"; PutBucketCors
    allows one per origin); nothing else is special (no `?` or `[...]` as in shell globs)."""
    return _pattern(pattern).fullmatch(value) is not None


def _match(rules: list[dict[str, Any]] | None, origin: str, method: str,
           req_headers: list[str]) -> dict[str, Any] | None:
    for r in rules or []:
        if not any(wildcard_match(origin, o) for o in r["origins"]):
            continue
        if method not in r["methods"]:
            continue
        allowed = [h.lower() for h in r["headers"]]
        if all(any(wildcard_match(h, a) for a in allowed) for h in req_headers):
            return r
    return None


def _headers(r: dict[str, Any], origin: str, preflight: bool, method: str, req_headers: list[str]) -> dict[str, str]:
    wildcard = "*" in r["origins"]
    h = {"access-control-allow-origin": "*" if wildcard else origin, "vary": "Origin, Access-Control-Request-Headers, "
                                                                            "Access-Control-Request-Method"}
    if not wildcard:
        h["access-control-allow-credentials"] = "true"
    h["access-control-allow-methods"] = ", ".join(r["methods"])  # S3 sends it on actual requests too
    if preflight:
        if req_headers:
            h["access-control-allow-headers"] = ", ".join(req_headers)
        if r.get("max_age") is not None:
            h["access-control-max-age"] = str(r["max_age"])
    if r["expose"]:
        h["access-control-expose-headers"] = ", ".join(r["expose"])
    return h


async def preflight(req: Req) -> Response:
    origin = req.headers.get("origin")
    method = req.headers.get("access-control-request-method")
    if not req.bucket_name:
        raise S3Error("BadRequest", "CORS preflight needs a bucket")
    if origin is None or method is None:
        raise S3Error("BadRequest", "Insufficient information. Origin request header needed.")
    b = await engine.blocking(engine.get_bucket, req.bucket_name)
    if b is None:
        raise no_such_bucket()
    if not b.cors:
        raise S3Error("CORSForbidden", "CORSResponse: CORS is not enabled for this bucket.", Method=method,
                      ResourceType="OBJECT")
    req_headers = [h.strip().lower() for h in req.headers.get("access-control-request-headers", "").split(",")
                   if h.strip()]
    r = _match(b.cors, origin, method, req_headers)
    if r is None:
        raise S3Error("CORSForbidden", "CORSResponse: This CORS request is not allowed. This is usually because the "
                                       "evalution of Origin, request method / Access-Control-Request-Method or "
                                       "Access-Control-Request-Headers are not whitelisted by the resource's "
                                       "CORS spec.",
                      Method=method, ResourceType="OBJECT")
    return Response(200, _headers(r, origin, True, method, req_headers))


def actual_headers(req: Req) -> dict[str, str]:
    origin = req.headers.get("origin", "")
    b = engine.cached_bucket(req.bucket_name or "")
    if b is None or not b.cors:
        return {}
    method = req.method
    if method == "HEAD" and not _match(b.cors, origin, "HEAD", []):
        method = "GET"
    r = _match(b.cors, origin, method, [])
    return _headers(r, origin, False, method, []) if r is not None else {}
