"""Browser-based uploads: POST multipart/form-data with a SigV4-signed policy document.

The form fields come before the `file` field; the policy is checked (signature, expiration, every
condition, no unlisted field) before a byte of the file is stored, and the file streams to the
sink like any PUT (the body is parsed incrementally: memory stays flat).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

from hackboot.objectstore import engine, sigv4, sse
from hackboot.objectstore.engine import NewObject
from hackboot.objectstore.policy import Requester
from hackboot.objectstore.s3errors import S3Error, invalid_access_key_id
from hackboot.objectstore.s3objects import (
    Sink,
    check_attribute_rights,
    feed,
    new_object_attributes,
    requested_checksum,
    sse_for_write,
    sse_headers,
    validate_key,
    verify_checksums,
)
from hackboot.objectstore.s3proto import Req, Response, load_bucket, new_object_owner, parse_tagset
from hackboot.objectstore.s3xml import doc, tag

MAX_FIELDS = 64 * 1024  # all form fields together (the file excepted); S3 allows 20 KiB of fields + policy
MAX_FIELD_COUNT = 100
# Fields the policy need not name: the signature and what it is made of (S3 also lets x-ignore-* through).
NOT_CONDITIONED = {"policy", "x-amz-signature", "file", "submit", "awsaccesskeyid", "signature"}
# Form fields that act as the request headers of a PUT (the others are POST's own or x-amz-* headers).
HEADER_FIELDS = {"content-type", "cache-control", "content-disposition", "content-encoding", "content-language",
                 "expires", "x-amz-website-redirect-location"}
_EXPIRATION = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
MAX_POST_SIZE = 5 * 1024**3


class _Form:
    def __init__(self, req: Req, boundary: bytes) -> None:
        self.req = req
        self.delim = b"\r\n--" + boundary
        self.buf = bytearray(b"\r\n")  # so the first boundary looks like the others
        self.source = self._raw()
        self.done = False

    async def _raw(self) -> AsyncIterator[bytes]:
        self.req.body_started = True
        while True:
            msg = await self.req.receive()
            if msg["type"] == "http.disconnect":
                raise S3Error("IncompleteBody", "The client closed the connection")
            if msg.get("body"):
                yield msg["body"]
            if not msg.get("more_body"):
                return

    async def _fill(self) -> bool:
        try:
            self.buf += await self.source.__anext__()
            return True
        except StopAsyncIteration:
            return False

    async def next_part(self) -> dict[str, str] | None:
        """Advance to the next part; return its headers (None at the end)."""
        while True:
            idx = self.buf.find(self.delim)
            if idx >= 0:
                after = idx + len(self.delim)
                while len(self.buf) < after + 2:
                    if not await self._fill():
                        raise S3Error("MalformedPOSTRequest", "The body of your POST request is not well-formed "
                                                              "multipart/form-data.")
                if self.buf[after:after + 2] == b"--":
                    self.done = True
                    return None
                del self.buf[:after]
                break
            if len(self.buf) > MAX_FIELDS:
                raise S3Error("MalformedPOSTRequest", "Form fields too large")
            if not await self._fill():
                raise S3Error("MalformedPOSTRequest", "The body of your POST request is not well-formed "
                                                      "multipart/form-data.")
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > 16384 or not await self._fill():
                raise S3Error("MalformedPOSTRequest", "Malformed part headers")
        head, _, _ = bytes(self.buf).partition(b"\r\n\r\n")
        del self.buf[:len(head) + 4]
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        return headers

    async def value(self, limit: int = MAX_FIELDS) -> bytes:
        out = bytearray()
        async for piece in self.stream():
            out += piece
            if len(out) > limit:
                raise S3Error("MalformedPOSTRequest", "Form field too large")
        return bytes(out)

    async def stream(self) -> AsyncIterator[bytes]:
        """The current part's content, up to (not including) the next delimiter."""
        keep = len(self.delim) + 2
        while True:
            idx = self.buf.find(self.delim)
            if idx >= 0:
                if idx:
                    yield bytes(self.buf[:idx])
                del self.buf[:idx]
                return
            if len(self.buf) > keep:
                cut = len(self.buf) - keep
                yield bytes(self.buf[:cut])
                del self.buf[:cut]
            if not await self._fill():
                raise S3Error("MalformedPOSTRequest", "The body of your POST request is not well-formed "
                                                      "multipart/form-data.")


def _disposition(value: str) -> dict[str, str]:
    out = {}
    for item in value.split(";")[1:]:
        k, _, v = item.strip().partition("=")
        out[k.lower()] = v.strip().strip('"')
    return out


def _invalid_policy(why: str) -> S3Error:
    return S3Error("InvalidPolicyDocument", f"Invalid Policy: {why}")


def _condition_failed(cond: list[Any]) -> S3Error:
    return S3Error("AccessDenied", f"Invalid according to Policy: Policy Condition failed: {json.dumps(cond)}")


def _length_bound(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise _invalid_policy("Invalid content-length-range: bounds must be non-negative integers.")
    return int(value)


def check_policy(policy: dict[str, Any], fields: dict[str, str], bucket: str,
                 now: dt.datetime | None = None) -> tuple[int, int]:
    """Check a decoded POST policy against the form (field names lower-cased, `key` with `${filename}`
    already substituted); return the allowed (min, max) file size.

    As S3: a malformed policy is `InvalidPolicyDocument` (400); a well-formed one the form does not
    satisfy (expired, a condition failed, a field no condition names) is `AccessDenied` (403). Condition
    names are case-insensitive, values case-sensitive; `starts-with` is a plain prefix ("" = anything)."""
    exp = policy.get("expiration")
    if exp is None:
        raise _invalid_policy("Policy missing expiration.")
    if not isinstance(exp, str) or not _EXPIRATION.match(exp):
        raise _invalid_policy(f"Invalid 'expiration' value: '{exp}'")
    try:
        when = dt.datetime.fromisoformat(exp[:-1] + "+00:00")
    except ValueError:
        raise _invalid_policy(f"Invalid 'expiration' value: '{exp}'") from None
    conditions = policy.get("conditions")
    if not isinstance(conditions, list):
        raise _invalid_policy("Policy missing conditions.")
    values = dict(fields) | {"bucket": bucket}
    covered: set[str] = set()
    length = (0, MAX_POST_SIZE)
    checks: list[tuple[str, str, str, list[Any]]] = []  # (op, field, expected, condition as written)
    for cond in conditions:
        if isinstance(cond, dict):
            if len(cond) != 1:
                raise _invalid_policy("Invalid Simple-Condition: Simple-Conditions must have exactly one "
                                      "property specified.")
            name, expected = next(iter(cond.items()))
            if not isinstance(expected, str):
                raise _invalid_policy(f"Invalid Simple-Condition: value of '{name}' must be a string.")
            checks.append(("eq", name.lower().removeprefix("$"), expected, ["eq", f"${name}", expected]))
            continue
        if not isinstance(cond, list) or not cond or not isinstance(cond[0], str):
            raise _invalid_policy("Invalid Condition: conditions must be objects or arrays.")
        op = cond[0].lower()
        if op == "content-length-range":
            if len(cond) != 3:
                raise _invalid_policy("Invalid content-length-range: expected [\"content-length-range\", min, max].")
            length = (_length_bound(cond[1]), _length_bound(cond[2]))
            continue
        if op not in ("eq", "starts-with"):
            raise _invalid_policy(f"Invalid Condition: unknown operation '{cond[0]}'.")
        if len(cond) != 3 or not isinstance(cond[1], str) or not cond[1].startswith("$") \
                or not isinstance(cond[2], str):
            raise _invalid_policy(f"Invalid Condition: '{cond[0]}' takes a \"$field\" name and a string value.")
        checks.append((op, cond[1][1:].lower(), cond[2], cond))
    if when <= (now or dt.datetime.now(dt.UTC)):
        raise S3Error("AccessDenied", "Invalid according to Policy: Policy expired.")
    for op, name, expected, cond in checks:
        covered.add(name)
        actual = values.get(name)
        if op == "eq":
            if actual != expected:
                raise _condition_failed(cond)
        elif name == "content-type" and actual is not None:
            # a comma-separated Content-Type list matches when each of its types starts with the prefix
            if not all(t.strip().startswith(expected) for t in actual.split(",")):
                raise _condition_failed(cond)
        elif not (actual or "").startswith(expected):
            raise _condition_failed(cond)
    if "bucket" not in covered:  # S3 wants the bucket named: a policy must not be replayable on any bucket
        raise S3Error("AccessDenied", "Invalid according to Policy: Extra input fields: bucket")
    for name in fields:
        if name not in covered and name not in NOT_CONDITIONED and not name.startswith("x-ignore-"):
            raise S3Error("AccessDenied", f"Invalid according to Policy: Extra input fields: {name}")
    return length


def _redirect_target(url: str) -> str | None:
    """An http(s) URL to send the browser to, else None (S3 ignores a redirect it cannot interpret). The
    server never fetches it: it only goes back in the Location header, so it must not break the header."""
    if not url or len(url) > 2048 or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return quote(url, safe="/:?&=%#+;,@!$'()*[]~")  # non-ASCII percent-encoded (headers are latin-1)


async def _limited(source: AsyncIterator[bytes], max_len: int) -> AsyncIterator[bytes]:
    """Stop a file larger than the policy allows as soon as it is, not after storing it."""
    seen = 0
    async for piece in source:
        seen += len(piece)
        if seen > max_len:
            raise S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size",
                          MaxSizeAllowed=str(max_len))
        yield piece


def _request_headers(req: Req, fields: dict[str, str]) -> dict[str, str]:
    """The form's fields as the headers a PUT would carry, so the PUT rules (metadata, SSE incl. SSE-C and
    whatever modes sse.py supports, ACLs, checksums, bucket policy conditions) apply to POST unchanged.
    The POST request's own x-amz-*/content-* headers are not signed by the policy: they are dropped."""
    headers = {k: v for k, v in req.headers.items() if not k.startswith(("x-amz-", "content-"))}
    for name, value in fields.items():
        if name in HEADER_FIELDS or (name.startswith("x-amz-") and name not in (
                "x-amz-signature", "x-amz-credential", "x-amz-algorithm", "x-amz-date", "x-amz-security-token")):
            headers[name] = value
    if "acl" in fields:
        headers["x-amz-acl"] = fields["acl"]
    return headers


async def _read_form(req: Req, boundary: str) -> tuple[_Form, dict[str, str], str, str | None]:
    """Read the fields up to the file part: (form positioned at the file, fields, file name, file type)."""
    form = _Form(req, boundary.encode())
    fields: dict[str, str] = {}
    while True:
        part = await form.next_part()
        if part is None:
            raise S3Error("InvalidArgument", "POST requires exactly one file upload per request.",
                          ArgumentName="file", ArgumentValue="0")
        disp = _disposition(part.get("content-disposition", ""))
        name = disp.get("name", "").lower()
        if name == "file":
            return form, fields, disp.get("filename", ""), part.get("content-type")
        # The form is read before its policy can be checked: bound what an anonymous sender makes us keep.
        if len(fields) >= MAX_FIELD_COUNT:
            raise S3Error("MalformedPOSTRequest", "Too many form fields")
        used = sum(len(k) + len(v) for k, v in fields.items())
        value = await form.value(max(0, MAX_FIELDS - used))
        fields[name] = value.decode("utf-8", "replace")


def _location(req: Req, bucket: str, key: str) -> str:
    scheme = req.scope.get("scheme", "http")
    host = req.headers.get("host", "")
    if req.raw_path.strip("/") != bucket:  # virtual-host style: the bucket is in the host name
        return f"{scheme}://{host}/{quote(key)}"
    return f"{scheme}://{host}/{quote(bucket)}/{quote(key)}"


async def post_object(req: Req) -> Response:
    ctype = req.headers.get("content-type", "")
    boundary = None
    for item in ctype.split(";")[1:]:
        k, _, v = item.strip().partition("=")
        if k.lower() == "boundary":
            boundary = v.strip().strip('"')
    if not boundary:
        raise S3Error("MalformedPOSTRequest", "The body of your POST request is not well-formed multipart/form-data.")
    b = await load_bucket(req)
    form, fields, filename, file_ctype = await _read_form(req, boundary)
    key = fields.get("key")
    if key is None:
        raise S3Error("InvalidArgument", "Bucket POST must contain a field named 'key'.  If it is specified, "
                                         "please check the order of the fields.", ArgumentName="key")
    # ${filename} is replaced before the policy is checked (a ["starts-with", "$key", "uploads/"] admits
    # "uploads/${filename}"); only the name's last path segment counts (old browsers send full paths).
    fields["key"] = key = key.replace("${filename}", re.split(r"[\\/]", filename)[-1])
    signed = "policy" in fields or any(f in fields for f in ("x-amz-signature", "x-amz-credential",
                                                             "awsaccesskeyid", "signature"))
    if signed:
        if "policy" not in fields:
            raise S3Error("InvalidArgument", "Bucket POST must contain a field named 'policy'.  If it is "
                                             "specified, please check the order of the fields.",
                          ArgumentName="policy")
        access_key = sigv4.post_policy_access_key(fields)
        c = await engine.blocking(engine.get_credential, access_key) if access_key else None
        if c is None:
            raise invalid_access_key_id(AWSAccessKeyId=access_key)
        policy, _ = sigv4.verify_post_policy(fields, c.secret)
        req.requester = Requester(c.project_id, c.user_id, c.read_only, c.buckets, c.access_key)
        min_len, max_len = check_policy(policy, fields, b.name)
    else:
        min_len, max_len = 0, MAX_POST_SIZE
    if not key:
        raise S3Error("InvalidArgument", "User key must have a length greater than 0.", ArgumentName="key")
    validate_key(key)
    req.headers = _request_headers(req, fields)
    if "content-type" not in req.headers and file_ctype:
        req.headers["content-type"] = file_ctype
    req.check("s3:PutObject", b, key)
    meta, headers, sc, _, acl = new_object_attributes(req, b)
    tags = parse_tagset(fields["tagging"].encode(), 10) if "tagging" in fields else None
    check_attribute_rights(req, b, key, acl, tags)
    sse_info, data_key, _ = sse_for_write(req, b)
    alg, expected, _ = requested_checksum(req)
    sink = Sink(data_key, 0, alg, allow_inline=False)
    await feed(sink, _limited(form.stream(), max_len))
    try:
        if sink.size < min_len:
            raise S3Error("EntityTooSmall", "Your proposed upload is smaller than the minimum allowed size",
                          MinSizeAllowed=str(min_len), ProposedSize=str(sink.size))
        checksum = verify_checksums(req, sink, None, alg, expected, False)
        obj = NewObject(key=key, size=sink.size, etag=sink.etag, storage_class=sc, headers=headers or None,
                        user_meta=meta or None, segments=[[sink.blob_id, sink.size, 0]], acl=acl, tags=tags or None,
                        owner=new_object_owner(req, b),
                        sse=sse_info, checksum=checksum,
                        new_blobs=[(sink.blob_id or "", sse.cipher_size(sink.size) if data_key else sink.size)])
        result = await engine.write(lambda s: engine.tx_put_object(s, b.id, obj, req.actor))
    except BaseException:
        await engine.blocking(sink.abort)
        raise
    if result.dead_blobs:
        await engine.blocking(engine.delete_blob_data, result.dead_blobs)
    out = {"etag": sink.etag, "location": _location(req, b.name, key)} | sse_headers(sse_info)
    if b.versioning:
        out["x-amz-version-id"] = result.version_id
    if checksum and alg is not None:
        out[f"x-amz-checksum-{alg.lower()}"] = checksum[alg]
    redirect = _redirect_target(fields.get("success_action_redirect") or fields.get("redirect") or "")
    if redirect:
        sep = "&" if "?" in redirect else "?"
        out["location"] = f"{redirect}{sep}bucket={quote(b.name, safe='')}&key={quote(key, safe='')}" \
                          f"&etag={quote(sink.etag, safe='')}"
        return Response(303, out)
    status = fields.get("success_action_status")
    if status == "201":
        return Response(201, out | {"content-type": "application/xml"}, doc(
            "PostResponse", tag("Location", out["location"]) + tag("Bucket", b.name) + tag("Key", key) +
            tag("ETag", sink.etag)))
    return Response(200 if status == "200" else 204, out)
