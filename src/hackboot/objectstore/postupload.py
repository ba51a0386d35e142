"""Browser-based uploads: POST multipart/form-data with a SigV4-signed policy document.

The form fields come before the `file` field; the policy is checked (signature, expiration, every
condition, no unlisted field) before a byte of the file is stored, and the file streams to the
sink like any PUT (the body is parsed incrementally: memory stays flat).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

from hackboot.objectstore import engine, sigv4
from hackboot.objectstore.engine import NewObject
from hackboot.objectstore.policy import Requester, acl_from_headers, is_public_acl
from hackboot.objectstore.s3errors import S3Error, invalid_access_key_id, public_acls_blocked
from hackboot.objectstore.s3objects import Sink, feed, stored_headers, user_metadata, validate_key
from hackboot.objectstore.s3proto import Req, Response, load_bucket
from hackboot.objectstore.s3xml import doc, tag

MAX_FIELDS = 64 * 1024  # all form fields together (the file excepted); S3 allows 20 KiB of fields + policy
MAX_FIELD_COUNT = 100
IGNORED = {"policy", "x-amz-signature", "file", "submit"}


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


def _check_policy(policy: dict[str, Any], fields: dict[str, str], bucket: str) -> tuple[int, int]:
    exp = policy.get("expiration")
    if not isinstance(exp, str):
        raise S3Error("InvalidPolicyDocument", "Invalid Policy: Policy missing expiration.")
    try:
        when = dt.datetime.fromisoformat(exp.replace("Z", "+00:00"))
    except ValueError:
        raise S3Error("InvalidPolicyDocument", "Invalid Policy: Invalid 'expiration' value.") from None
    if when <= dt.datetime.now(dt.UTC):
        raise S3Error("AccessDenied", "Invalid according to Policy: Policy expired.")
    covered = {"bucket"}
    length = (0, 5 * 1024**3)
    values = dict(fields) | {"bucket": bucket}
    for cond in policy.get("conditions", []):
        if isinstance(cond, dict):
            for k, v in cond.items():
                name = k.lower().lstrip("$")
                covered.add(name)
                if values.get(name) != v:
                    raise S3Error("AccessDenied", f"Invalid according to Policy: Policy Condition failed: "
                                                  f"[\"eq\", \"${name}\", \"{v}\"]")
        elif isinstance(cond, list) and len(cond) == 3:
            op = str(cond[0]).lower()
            if op == "content-length-range":
                try:
                    length = (int(cond[1]), int(cond[2]))
                except (TypeError, ValueError):
                    raise S3Error("InvalidPolicyDocument", "Invalid Policy: Invalid content-length-range.") from None
                continue
            name = str(cond[1]).lower().lstrip("$")
            covered.add(name)
            actual = values.get(name, "")
            if op == "eq" and actual != cond[2]:
                raise S3Error("AccessDenied", f"Invalid according to Policy: Policy Condition failed: {cond}")
            if op == "starts-with" and not actual.startswith(str(cond[2])):  # a prefix, not a glob
                raise S3Error("AccessDenied", f"Invalid according to Policy: Policy Condition failed: {cond}")
        else:
            raise S3Error("InvalidPolicyDocument", "Invalid Policy: Invalid condition.")
    extra = [k for k in fields if k not in covered and k not in IGNORED and not k.startswith("x-ignore-")
             and k not in ("x-amz-signature", "policy", "awsaccesskeyid", "signature")]
    if extra:
        raise S3Error("AccessDenied", f"Invalid according to Policy: Extra input fields: {extra[0]}")
    return length


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
    form = _Form(req, boundary.encode())
    fields: dict[str, str] = {}
    filename = ""
    file_ctype = None
    while True:
        part = await form.next_part()
        if part is None:
            raise S3Error("InvalidArgument", "POST requires exactly one file upload per request.",
                          ArgumentName="file")
        disp = _disposition(part.get("content-disposition", ""))
        name = disp.get("name", "").lower()
        if name == "file":
            filename = disp.get("filename", "")
            file_ctype = part.get("content-type")
            break
        # The form is read before its policy can be checked: bound what an anonymous sender makes us keep.
        if len(fields) >= MAX_FIELD_COUNT:
            raise S3Error("MalformedPOSTRequest", "Too many form fields")
        used = sum(len(k) + len(v) for k, v in fields.items())
        value = await form.value(max(0, MAX_FIELDS - used))
        fields[name] = value.decode("utf-8", "replace")
    if "policy" in fields:
        cred = fields.get("x-amz-credential", "").split("/", 1)[0]
        c = await engine.blocking(engine.get_credential, cred)
        if c is None:
            raise invalid_access_key_id()
        policy, _ = sigv4.verify_post_policy(fields, c.secret)
        req.requester = Requester(c.project_id, c.user_id, c.read_only, c.buckets, c.access_key)
        min_len, max_len = _check_policy(policy, fields, b.name)
    else:
        min_len, max_len = 0, 5 * 1024**3
    key = fields.get("key")
    if not key:
        raise S3Error("InvalidArgument", "Bucket POST must contain a field named 'key'.", ArgumentName="key")
    key = key.replace("${filename}", filename)
    validate_key(key)
    req.check("s3:PutObject", b, key)
    headers = {k: v for k, v in fields.items() if k in ("content-type", "cache-control", "content-disposition",
                                                         "content-encoding", "expires")}
    if "content-type" not in headers and file_ctype:
        headers["content-type"] = file_ctype
    acl = acl_from_headers({"x-amz-acl": fields["acl"]} if "acl" in fields else {}, b.project_id)
    if acl is not None:
        req.check("s3:PutObjectAcl", b, key)
    if acl and is_public_acl(acl) and b.blocks("BlockPublicAcls"):
        raise public_acls_blocked()
    meta = user_metadata({k: v for k, v in fields.items() if k.startswith("x-amz-meta-")})
    sink = Sink(None, 0, None, allow_inline=False)
    await feed(sink, form.stream())
    try:
        if not min_len <= sink.size <= max_len:
            raise S3Error("EntityTooLarge" if sink.size > max_len else "EntityTooSmall",
                          "Your proposed upload exceeds the maximum allowed size" if sink.size > max_len else
                          "Your proposed upload is smaller than the minimum allowed size")
        obj = NewObject(key=key, size=sink.size, etag=sink.etag, headers=stored_headers(headers) or None,
                        user_meta=meta or None, segments=[[sink.blob_id, sink.size, 0]], acl=acl,
                        new_blobs=[(sink.blob_id or "", sink.size)])
        result = await engine.write(lambda s: engine.tx_put_object(s, b.id, obj, req.actor))
    except BaseException:
        await engine.blocking(sink.abort)
        raise
    if result.dead_blobs:
        await engine.blocking(engine.delete_blob_data, result.dead_blobs)
    out = {"etag": sink.etag, "location": f"/{b.name}/{key}"}
    if b.versioning:
        out["x-amz-version-id"] = result.version_id
    redirect = fields.get("success_action_redirect")
    if redirect:
        from urllib.parse import quote

        sep = "&" if "?" in redirect else "?"
        out["location"] = f"{redirect}{sep}bucket={quote(b.name)}&key={quote(key)}&etag={quote(sink.etag)}"
        return Response(303, out)
    st = fields.get("success_action_status", "204")
    if st == "201":
        return Response(201, out | {"content-type": "application/xml"}, doc(
            "PostResponse", tag("Location", out["location"]) + tag("Bucket", b.name) + tag("Key", key) +
            tag("ETag", sink.etag)))
    return Response(200 if st == "200" else 204, out)
