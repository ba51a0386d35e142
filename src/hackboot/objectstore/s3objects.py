"""S3 object operations: Put/Get/Head/Delete, DeleteObjects, Copy, multipart uploads, tagging, ACLs,
retention and legal hold, browser POST uploads.

Data path: the request body is decoded (aws-chunked, signatures) and fed to a `Sink` that hashes it
(MD5 for the ETag, the requested checksum), keeps it in memory while it is small (inline objects)
or streams it to a blob in the backend (optionally encrypted chunk by chunk). Nothing is visible
before the blob is fsynced and the metadata transaction committed.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import hashlib
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from sqlalchemy.orm import Session

from hackboot.core.db import utcnow
from hackboot.objectstore import checksums, engine, sse
from hackboot.objectstore.engine import INLINE_MAX, BucketInfo, NewObject
from hackboot.objectstore.models import ObjectVersion, Upload
from hackboot.objectstore.s3errors import (
    S3Error,
    access_denied,
    invalid_part_number,
    invalid_version_id,
    method_not_allowed,
    no_lock_configuration,
    no_such_bucket,
    no_such_key,
    no_such_version,
    precondition_failed,
)
from hackboot.objectstore.s3proto import (
    XML,
    Req,
    Response,
    acl_response_xml,
    acl_to_set,
    check_expected_owner,
    initiator_xml,
    int_param,
    load_bucket,
    new_object_acl,
    new_object_owner,
    owner_xml,
    parse_tagset,
    tagging_xml,
)
from hackboot.objectstore.s3xml import doc, http_date, iso, parse, tag

MAX_KEY_BYTES = 1024
MAX_META_BYTES = 2048
MAX_PART_NUMBER = 10000
MAX_OBJECT_SIZE = 5 * 1024**4
MAX_PUT_SIZE = 5 * 1024**3
READ_CHUNK = 1024 * 1024
FEED_BATCH = 1024 * 1024
SMALL_HASH = 64 * 1024
STORAGE_CLASSES = {"STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER",
                   "DEEP_ARCHIVE", "GLACIER_IR"}
ARCHIVED = {"GLACIER", "DEEP_ARCHIVE"}
STORED_HEADERS = ("content-type", "content-encoding", "content-disposition", "cache-control", "content-language",
                  "expires", "x-amz-website-redirect-location")
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


# --- validation -----------------------------------------------------------------------------------

def validate_key(key: str) -> None:
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise S3Error("KeyTooLongError", "Your key is too long", MaxSizeAllowed=str(MAX_KEY_BYTES),
                      Size=str(len(key.encode("utf-8", "surrogatepass"))))
    if _XML_BAD.search(key) or any(0xD800 <= ord(c) <= 0xDFFF for c in key):
        raise S3Error("InvalidArgument", "Object key contains control characters (NUL and others are not "
                                         "allowed: they cannot be listed in XML)", ArgumentName="key")
    # Keys are never file paths here, but "." and ".." segments and leading "/" are rejected so keys
    # stay portable to tools that do map them to files (aws s3 sync, s5cmd, rclone).
    if key.startswith("/") or any(seg in (".", "..") for seg in key.split("/")):
        raise S3Error("InvalidArgument", "Object key must not start with '/' nor contain '.' or '..' path "
                                         "segments", ArgumentName="key")


def _header_text(value: str) -> str:
    """A header value arrives as latin-1 text of its bytes; UTF-8 bytes (what SDKs send for non-ASCII
    metadata) become the text they encode. S3 keeps metadata as Unicode and answers it RFC 2047-encoded."""
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def metadata_header_value(value: str) -> str:
    """A metadata value as S3 sends it back: as is when ASCII, else an RFC 2047 encoded word."""
    if value.isascii():
        return value
    return "=?UTF-8?B?" + base64.b64encode(value.encode("utf-8", "replace")).decode() + "?="


def user_metadata(headers: dict[str, str]) -> dict[str, str]:
    meta = {k[len("x-amz-meta-"):]: _header_text(v) for k, v in headers.items() if k.startswith("x-amz-meta-")}
    size = sum(len(k.encode()) + len(v.encode("utf-8", "replace")) for k, v in meta.items())
    if size > MAX_META_BYTES:
        raise S3Error("MetadataTooLarge", "Your metadata headers exceed the maximum allowed metadata size.",
                      Size=str(size), MaxSizeAllowed=str(MAX_META_BYTES))
    return meta


def stored_headers(headers: dict[str, str]) -> dict[str, str]:
    out = {h: headers[h] for h in STORED_HEADERS if h in headers}
    if "content-encoding" in out:
        # aws-chunked describes this request's framing, not the object: drop it, keep the rest as sent
        # ("aws-chunked,gzip" → "gzip", "deflate, gzip" stays "deflate, gzip")
        codings = out["content-encoding"].split(",")
        if any(c.strip().lower() == "aws-chunked" for c in codings):
            enc = ",".join(c for c in codings if c.strip().lower() != "aws-chunked").strip()
            if enc:
                out["content-encoding"] = enc
            else:
                del out["content-encoding"]
    return out


def storage_class(headers: dict[str, str]) -> str:
    sc = headers.get("x-amz-storage-class", "STANDARD")
    if sc not in STORAGE_CLASSES:
        raise S3Error("InvalidStorageClass", "The storage class you specified is not valid", StorageClassRequested=sc)
    return sc


def parse_tagging_header(value: str | None) -> dict[str, str] | None:
    if value is None:
        return None
    tags: dict[str, str] = {}
    for k, v in parse_qsl(value, keep_blank_values=True):
        if not k or len(k) > 128 or len(v) > 256 or k in tags:
            raise S3Error("InvalidTag", "The TagKey you have provided is invalid")
        tags[k] = v
    if len(tags) > 10:
        raise S3Error("BadRequest", "Object tags cannot be greater than 10")
    return tags


def _parse_http_date(value: str) -> dt.datetime | None:
    try:
        d = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        try:
            d = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return d if d.tzinfo else d.replace(tzinfo=dt.UTC)


def _parse_iso(value: str, arg: str) -> dt.datetime:
    try:
        d = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise S3Error("InvalidArgument", f"The {arg} is not a valid ISO 8601 date", ArgumentName=arg) from None
    return d if d.tzinfo else d.replace(tzinfo=dt.UTC)


def lock_from_headers(req: Req, b: BucketInfo) -> tuple[str | None, dt.datetime | None, bool]:
    mode = req.headers.get("x-amz-object-lock-mode")
    until_s = req.headers.get("x-amz-object-lock-retain-until-date")
    hold_s = req.headers.get("x-amz-object-lock-legal-hold")
    if (mode or until_s or hold_s) and not b.object_lock:
        raise no_lock_configuration()
    if (mode is None) != (until_s is None):
        raise S3Error("InvalidArgument", "x-amz-object-lock-retain-until-date and x-amz-object-lock-mode must "
                                         "both be supplied")
    until = None
    if mode is not None:
        if mode not in ("GOVERNANCE", "COMPLIANCE"):
            raise S3Error("InvalidArgument", "Unknown wormMode directive.", ArgumentName="x-amz-object-lock-mode")
        until = _parse_iso(until_s or "", "x-amz-object-lock-retain-until-date")
        if until <= utcnow():
            raise S3Error("InvalidArgument", "The retain until date must be in the future!")
    elif b.object_lock and b.lock_default:
        d = b.lock_default
        mode = d["mode"]
        until = utcnow() + dt.timedelta(days=d.get("days") or 365 * d.get("years", 0))
    if hold_s is not None and hold_s not in ("ON", "OFF"):
        raise S3Error("InvalidArgument", "Legal Hold must be either of 'ON' or 'OFF'")
    return mode, until, hold_s == "ON"


def sse_for_write(req: Req, b: BucketInfo, prefix: str = "x-amz-server-side-encryption") \
        -> tuple[dict[str, str] | None, bytes | None, tuple[bytes, str] | None]:
    """(stored sse dict, data key, customer key) for a new object."""
    ckey = sse.customer_key(req.headers)
    mode = req.headers.get(prefix)
    if ckey is not None:
        if mode is not None:
            raise S3Error("InvalidArgument", "Server Side Encryption with Customer provided key is incompatible "
                                             "with the encryption method specified")
        info, key = sse.new_sse_c(*ckey)
        return info, key, ckey
    if mode is not None and mode not in ("AES256", "aws:kms", "aws:kms:dsse"):
        raise S3Error("InvalidArgument", "The encryption method specified is not supported",
                      ArgumentName="x-amz-server-side-encryption")
    if mode is not None or b.encryption:
        info, key = sse.new_sse_s3()
        return info, key, None
    return None, None, None


def sse_headers(info: dict[str, str] | None) -> dict[str, str]:
    if not info:
        return {}
    if info["mode"] == "SSE-C":
        return {"x-amz-server-side-encryption-customer-algorithm": "AES256",
                "x-amz-server-side-encryption-customer-key-md5": info["key_md5"]}
    return {"x-amz-server-side-encryption": "AES256"}


# --- checksums ------------------------------------------------------------------------------------

def requested_checksum(req: Req) -> tuple[str | None, str | None, bool]:
    """(algorithm, expected base64 value or None when it comes in a trailer, from_trailer)."""
    found = None
    for alg in checksums.ALGORITHMS:
        v = req.headers.get("x-amz-checksum-" + alg.lower())
        if v is not None:
            if found is not None:
                raise S3Error("InvalidRequest", "Expecting a single x-amz-checksum- header. Multiple checksum Types "
                                                "are not allowed.")
            found = (alg, v)
    if found is not None:
        return found[0], found[1], False
    trailer = req.headers.get("x-amz-trailer", "").strip().lower()
    if trailer.startswith("x-amz-checksum-"):
        alg = trailer[len("x-amz-checksum-"):].upper()
        if alg not in checksums.ALGORITHMS:
            raise S3Error("InvalidRequest", f"The value specified in the x-amz-trailer header is not supported: "
                                            f"{trailer}")
        return alg, None, True
    named = req.headers.get("x-amz-sdk-checksum-algorithm") or req.headers.get("x-amz-checksum-algorithm")
    if named:
        if named.upper() not in checksums.ALGORITHMS:
            raise S3Error("InvalidRequest", "Checksum algorithm provided is unsupported. Please try again with any "
                                            "of the valid types: [CRC32, CRC32C, CRC64NVME, SHA1, SHA256]")
        return named.upper(), None, False
    return None, None, False


def _content_md5(req: Req) -> bytes | None:
    v = req.headers.get("content-md5")
    if v is None:
        return None
    try:
        raw = base64.b64decode(v.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.", Content_MD5=v[:64])
    return raw


class Sink:
    """Receives plaintext; hashes it; keeps it inline while small, else streams it to a blob."""

    def __init__(self, key: bytes | None, segment: int, checksum_alg: str | None, allow_inline: bool) -> None:
        self.md5 = hashlib.md5()
        self.checksum = checksums.new(checksum_alg) if checksum_alg else None
        self.checksum_alg = checksum_alg
        self.size = 0
        self.mem = bytearray()
        self.writer: Any = None
        self.enc = sse.Encryptor(key, segment) if key is not None else None
        self.allow_inline = allow_inline
        self.blob_id: str | None = None
        self.inline: bytes | None = None
        self.extra: list[Any] = []  # e.g. the payload's SHA-256 (x-amz-content-sha256), hashed off the loop

    def write(self, data: bytes) -> None:
        hashers = [self.md5, *self.extra]
        if len(data) <= SMALL_HASH:
            # hashlib drops the GIL for inputs of 2 KiB and more; for small bodies handing the GIL to
            # another thread and waiting to get it back costs far more than the hashing itself
            view = memoryview(data)
            for i in range(0, len(data), 2047):
                for h in hashers:
                    h.update(view[i:i + 2047])
        else:
            for h in hashers:
                h.update(data)
        if self.checksum is not None:
            self.checksum.update(data)
        self.size += len(data)
        if self.writer is None:
            if self.allow_inline and len(self.mem) + len(data) <= INLINE_MAX:
                self.mem += data
                return
            self.writer = engine.backend().writer()
            if self.mem:
                self._out(bytes(self.mem))
                self.mem = bytearray()
        self._out(data)

    def _out(self, data: bytes) -> None:
        if self.enc is not None:
            data = self.enc.feed(data)
        if data:
            self.writer.write(data)

    @property
    def needs_thread(self) -> bool:
        return self.writer is not None

    def finish(self) -> None:
        """Inline data is ready; a blob is flushed, fsynced and renamed (call in a thread then)."""
        if self.writer is None and self.allow_inline:
            data = bytes(self.mem)
            self.inline = (self.enc.feed(data) + self.enc.finish()) if self.enc is not None else data
            return
        if self.writer is None:
            self.writer = engine.backend().writer()
            if self.mem:
                self._out(bytes(self.mem))
        if self.enc is not None:
            self.writer.write(self.enc.finish())
        self.blob_id = self.writer.commit()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        if self.blob_id is not None:
            engine.backend().delete(self.blob_id)

    @property
    def etag(self) -> str:
        return f'"{self.md5.hexdigest()}"'


async def feed(sink: Sink, source: AsyncIterator[bytes]) -> None:
    buf = bytearray()
    try:
        async for piece in source:
            buf += piece
            if len(buf) >= FEED_BATCH:
                data = bytes(buf)
                buf.clear()
                await engine.blocking(sink.write, data)
        if buf:
            if len(buf) > 256 * 1024 or sink.needs_thread:
                await engine.blocking(sink.write, bytes(buf))
            else:
                sink.write(bytes(buf))
        if sink.needs_thread or not sink.allow_inline:
            await engine.blocking(sink.finish)
        else:
            sink.finish()
    except BaseException:
        await engine.blocking(sink.abort)
        raise


def verify_checksums(req: Req, sink: Sink, md5: bytes | None, alg: str | None, expected: str | None,
                     trailer: bool) -> dict[str, str] | None:
    if md5 is not None and sink.md5.digest() != md5:
        raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.")
    if alg is None or sink.checksum is None:
        return None
    actual = checksums.b64(sink.checksum.digest())
    if trailer:
        expected = req.trailers.get("x-amz-checksum-" + alg.lower())
        if expected is None:
            raise S3Error("InvalidRequest", "The x-amz-trailer header names a checksum the body did not send")
    if expected is not None and expected != actual:
        raise S3Error("BadDigest", f"The {alg} you specified did not match the calculated checksum.")
    return {alg: actual, "type": "FULL_OBJECT"}


# --- dispatch -------------------------------------------------------------------------------------

async def object_op(req: Req) -> Response:
    key = req.key or ""
    validate_key(key)
    b = await load_bucket(req)
    m = req.method
    q = req.query
    if "uploadId" in q:
        if m == "PUT":
            if "x-amz-copy-source" in req.headers:
                return await upload_part_copy(req, b, key)
            return await upload_part(req, b, key)
        if m == "POST":
            return await complete_upload(req, b, key)
        if m == "DELETE":
            return await abort_upload(req, b, key)
        if m == "GET":
            return await list_parts(req, b, key)
    if m == "POST" and "uploads" in q:
        return await create_upload(req, b, key)
    for sub, handlers in _SUB.items():
        if sub in q:
            h = handlers.get(m)
            if h is None:
                raise method_not_allowed()
            return await h(req, b, key)
    if m == "PUT":
        if "x-amz-copy-source" in req.headers:
            return await copy_object(req, b, key)
        return await put_object(req, b, key)
    if m in ("GET", "HEAD"):
        return await get_object(req, b, key)
    if m == "DELETE":
        return await delete_object(req, b, key)
    if m == "POST" and "restore" in q:
        raise S3Error("NotImplemented", "RestoreObject is not implemented")
    raise method_not_allowed()


# --- put ------------------------------------------------------------------------------------------

def new_object_attributes(req: Req, b: BucketInfo) -> tuple[Any, Any, str, Any, Any]:
    """What a new object (PUT or multipart create) takes from the request headers:
    user metadata, stored content headers, storage class, tags and canned/granted ACL."""
    meta = user_metadata(req.headers)
    headers = stored_headers(req.headers)
    sc = storage_class(req.headers)
    tags = parse_tagging_header(req.headers.get("x-amz-tagging"))
    acl = new_object_acl(req.headers, b, new_object_owner(req, b))
    return meta, headers, sc, tags, acl

def check_attribute_rights(req: Req, b: BucketInfo, key: str, acl: Any, tags: Any) -> None:
    """Setting an ACL, tags, a retention or a legal hold along with a new object needs those permissions
    too (as S3): another project granted only s3:PutObject must not make objects public or undeletable.
    Not for an ACL a writer sets on an object it will own (ObjectWriter ownership: its own business, as in
    S3), nor for `bucket-owner-full-control`, which grants nothing beyond the bucket owner's rights."""
    own_object = new_object_owner(req, b) is not None
    if acl is not None and not own_object and req.headers.get("x-amz-acl") != "bucket-owner-full-control":
        req.check("s3:PutObjectAcl", b, key)
    if tags:
        req.check("s3:PutObjectTagging", b, key)
    if "x-amz-object-lock-mode" in req.headers or "x-amz-object-lock-retain-until-date" in req.headers:
        req.check("s3:PutObjectRetention", b, key)
    if "x-amz-object-lock-legal-hold" in req.headers:
        req.check("s3:PutObjectLegalHold", b, key)


async def precheck_write_conditions(req: Req, b: BucketInfo, key: str) -> tuple[str | None, str | None]:
    """Conditional writes (If-Match, If-None-Match: *): checked before the body is read (412 without
    uploading it) and again in the commit transaction, where `conflict_if_changed` tells a condition
    that held at the start apart from one that failed from the start."""
    if_match = req.headers.get("if-match")
    if_none_match = req.headers.get("if-none-match")
    if if_match is not None or if_none_match is not None:
        engine.check_write_conditions(await engine.get_version_row(b.id, key, None), if_match, if_none_match)
    return if_match, if_none_match


@contextmanager
def conflict_if_changed(if_match: str | None, if_none_match: str | None) -> Iterator[None]:
    """A condition that held when the request started but not at commit: another write or delete of the
    key finished meanwhile. As S3, that is 409 ConditionalRequestConflict (the client should retry)."""
    try:
        yield
    except S3Error as err:
        if (if_match is not None or if_none_match is not None) and (
                err.code == "PreconditionFailed" or (err.code == "NoSuchKey" and if_match is not None)):
            raise S3Error("ConditionalRequestConflict", "A conflicting operation occurred. If using PutObject you "
                                                        "can retry the request. If using multipart upload you "
                                                        "should initiate another CreateMultipartUpload request "
                                                        "and re-upload each part.") from None
        raise


async def put_object(req: Req, b: BucketInfo, key: str) -> Response:
    req.check("s3:PutObject", b, key)
    meta, headers, sc, tags, acl = new_object_attributes(req, b)
    check_attribute_rights(req, b, key, acl, tags)
    lock_mode, lock_until, hold = lock_from_headers(req, b)
    sse_info, data_key, _ = sse_for_write(req, b)
    md5 = _content_md5(req)
    alg, expected, trailer = requested_checksum(req)
    length = req.declared_length()
    if length is None and "chunked" not in req.headers.get("transfer-encoding", "") and \
            req.payload_mode() not in ("STREAMING-UNSIGNED-PAYLOAD-TRAILER",):
        raise S3Error("MissingContentLength", "You must provide the Content-Length HTTP header.")
    if length is not None and length > MAX_PUT_SIZE:
        raise S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size",
                      ProposedSize=str(length), MaxSizeAllowed=str(MAX_PUT_SIZE))
    if_match, if_none_match = await precheck_write_conditions(req, b, key)
    sink = Sink(data_key, 0, alg, allow_inline=length is None or length <= INLINE_MAX)
    payload_sha = req.defer_payload_hash()
    if payload_sha is not None:
        sink.extra.append(payload_sha)
    await feed(sink, req.iter_body())
    try:
        if payload_sha is not None:
            req.check_payload_sha(payload_sha.hexdigest())
        checksum = verify_checksums(req, sink, md5, alg, expected, trailer)
        obj = NewObject(key=key, size=sink.size, etag=sink.etag, storage_class=sc, headers=headers or None,
                        user_meta=meta or None, data=sink.inline, parts_count=0, checksum=checksum, sse=sse_info,
                        lock_mode=lock_mode, lock_until=lock_until, legal_hold=hold, tags=tags, acl=acl,
                        owner=new_object_owner(req, b))
        if sink.blob_id is not None:
            obj.segments = [[sink.blob_id, sink.size, 0]]
            obj.new_blobs = [(sink.blob_id, sse.cipher_size(sink.size) if data_key else sink.size)]
        with conflict_if_changed(if_match, if_none_match):
            result = await engine.write(lambda s: engine.tx_put_object(s, b.id, obj, req.actor, if_match=if_match,
                                                                         if_none_match=if_none_match))
    except BaseException:
        await engine.blocking(sink.abort)
        raise
    if result.dead_blobs:
        await engine.blocking(engine.delete_blob_data, result.dead_blobs)
    out = {"etag": sink.etag} | sse_headers(sse_info)
    if b.versioning:
        out["x-amz-version-id"] = result.version_id
    if checksum and alg is not None:  # a checksum is only ever computed for an algorithm
        out[f"x-amz-checksum-{alg.lower()}"] = checksum[alg]
        out["x-amz-checksum-type"] = "FULL_OBJECT"
    return Response(200, out)


# --- get / head -----------------------------------------------------------------------------------

def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """(start, end exclusive), None to serve everything; raises InvalidRange when unsatisfiable."""
    value = value.strip()
    if not value.startswith("bytes=") or "," in value:
        return None
    spec = value[6:].strip()
    first, sep, last = spec.partition("-")
    if not sep:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                raise S3Error("InvalidRange", "The requested range is not satisfiable", RangeRequested=value,
                              ActualObjectSize=str(size))
            return max(0, size - n), size
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    if start < 0 or (last and end <= start):
        return None
    if start >= size:
        raise S3Error("InvalidRange", "The requested range is not satisfiable", RangeRequested=value,
                      ActualObjectSize=str(size), headers={"content-range": f"bytes */{size}"})
    return start, min(end, size)


def check_read_conditions(h: dict[str, str], etag: str, last_modified: dt.datetime, prefix: str = "",
                          copy: bool = False) -> None:
    lm = last_modified.replace(microsecond=0)
    im = h.get(prefix + "if-match")
    ius = h.get(prefix + "if-unmodified-since")
    inm = h.get(prefix + "if-none-match")
    ims = h.get(prefix + "if-modified-since")
    if im is not None and not engine.etag_matches(im, etag):
        raise precondition_failed(Condition=prefix + "If-Match")
    if im is None and ius is not None:
        d = _parse_http_date(ius)
        if d is not None and lm > d:
            raise precondition_failed(Condition=prefix + "If-Unmodified-Since")
    not_modified = S3Error("PreconditionFailed" if copy else "NotModified", "Not Modified",
                           headers={"etag": etag, "last-modified": http_date(last_modified)})
    if inm is not None:
        if any(t.strip() == "*" or t.strip().strip('"') == etag.strip('"') for t in inm.split(",")):
            raise not_modified
    elif ims is not None:
        d = _parse_http_date(ims)
        if d is not None and lm <= d:
            raise not_modified


async def load_version(req: Req, b: BucketInfo, key: str, version_id: str | None, action: str) -> ObjectVersion:
    v = await engine.get_version_row(b.id, key, version_id)
    if v is None and version_id is None:
        # As S3: whether a missing key is a 404 or a 403 depends on the caller's right to list the bucket
        # (anonymous callers included), so no one learns which keys exist in a bucket they cannot list.
        req.check("s3:ListBucket", b)
    else:
        req.check(action, b, key, v.acl if v is not None else None, v.owner if v is not None else None)
    if v is None:
        if version_id is not None:
            if version_id != "null" and not engine.valid_version_id(version_id):
                raise invalid_version_id("versionId")
            raise no_such_version(key, version_id)
        raise no_such_key(Key=key)
    if v.delete_marker:
        hdrs = {"x-amz-delete-marker": "true", "x-amz-version-id": v.version_id}
        if version_id is None:
            raise no_such_key(hdrs, Key=key)
        raise method_not_allowed(hdrs | {"allow": "DELETE"})
    return v


def object_headers(v: ObjectVersion, b: BucketInfo) -> dict[str, str]:
    h: dict[str, str] = {"etag": v.etag, "last-modified": http_date(v.last_modified), "accept-ranges": "bytes"}
    stored = v.headers or {}
    h["content-type"] = stored.get("content-type", "binary/octet-stream")
    for name in STORED_HEADERS[1:]:
        if name in stored:
            h[name] = stored[name]
    for k, val in (v.user_meta or {}).items():
        h["x-amz-meta-" + k] = metadata_header_value(val)
    if b.versioning:
        h["x-amz-version-id"] = v.version_id
    if v.storage_class != "STANDARD":
        h["x-amz-storage-class"] = v.storage_class
    h.update(sse_headers(v.sse))
    if v.tags:
        h["x-amz-tagging-count"] = str(len(v.tags))
    if v.lock_mode and v.lock_until:
        h["x-amz-object-lock-mode"] = v.lock_mode
        h["x-amz-object-lock-retain-until-date"] = iso(v.lock_until)
    if b.object_lock:
        h["x-amz-object-lock-legal-hold"] = "ON" if v.legal_hold else "OFF"
    if v.parts_count:
        h["x-amz-mp-parts-count"] = str(v.parts_count)
    return h


def _part_range(v: ObjectVersion, number: int) -> tuple[int, int]:
    if not v.segments or not v.parts_count:
        if number == 1:
            return 0, v.size
        raise S3Error("InvalidPartNumber", "The requested partnumber is not satisfiable", status=416)
    off = 0
    for i, seg in enumerate(v.segments, 1):
        if i == number:
            return off, off + seg[1]
        off += seg[1]
    raise S3Error("InvalidPartNumber", "The requested partnumber is not satisfiable", status=416)


def _part_checksum(v: ObjectVersion, number: int) -> tuple[str, str] | None:
    """(algorithm, base64) of part `number` of a multipart object whose parts were checksummed."""
    alg = next((k for k in v.checksum or {} if k != "type"), None)
    if alg is None or not v.parts_count or not v.segments or number > len(v.segments):
        return None
    seg = v.segments[number - 1]
    return (alg, seg[3]) if len(seg) > 3 else None


async def stream_object(v: ObjectVersion, start: int, end: int, key: bytes | None) -> AsyncGenerator[bytes, None]:
    """Plaintext bytes [start, end) of a version, read chunk by chunk (memory stays flat)."""
    if v.data is not None:
        data = v.data
        if key is not None:
            data = b"".join(sse.decrypt_range(lambda o, n: data[o:o + n], key, 0, v.size, 0, v.size))
        yield data[start:end]
        return
    be = engine.backend()
    offset = 0
    for seg in v.segments or []:
        blob_id, size, segno = seg[0], seg[1], (seg[2] if len(seg) > 2 else 0)
        lo, hi = max(start, offset), min(end, offset + size)
        if lo < hi:
            if key is not None:
                gen = sse.decrypt_range(partial(be.read, blob_id), key, segno, size, lo - offset, hi - offset)
                async for piece in _iter_in_threads(gen):
                    yield piece
            else:
                path = be.path(blob_id)
                if path is not None:
                    fd = await engine.blocking(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        pos, stop = lo - offset, hi - offset
                        while pos < stop:
                            data = await engine.blocking(os.pread, fd, min(READ_CHUNK, stop - pos), pos)
                            if not data:
                                raise S3Error("InternalError", "Stored data is shorter than its metadata")
                            pos += len(data)
                            yield data
                    finally:
                        os.close(fd)
                else:
                    pos, stop = lo - offset, hi - offset
                    while pos < stop:
                        data = await engine.blocking(be.read, blob_id, pos, min(READ_CHUNK, stop - pos))
                        pos += len(data)
                        yield data
        offset += size
        if offset >= end:
            break


async def _iter_in_threads(gen: Iterator[bytes]) -> AsyncIterator[bytes]:
    batch_target = READ_CHUNK

    def next_batch() -> bytes | None:
        out = []
        n = 0
        for piece in gen:
            out.append(piece)
            n += len(piece)
            if n >= batch_target:
                break
        return b"".join(out) if out else None

    while True:
        data = await engine.blocking(next_batch)
        if data is None:
            return
        yield data


def read_key(req: Req, v: ObjectVersion, prefix: str = "x-amz-server-side-encryption-customer-") -> bytes | None:
    if not v.sse:
        if sse.customer_key(req.headers, prefix) is not None:
            raise S3Error("InvalidRequest", "The encryption parameters are not applicable to this object.")
        return None
    ckey = sse.customer_key(req.headers, prefix) if v.sse["mode"] == "SSE-C" else None
    return sse.data_key(v.sse, ckey)


async def get_object(req: Req, b: BucketInfo, key: str) -> Response:
    version_id = req.query.get("versionId")
    v = await load_version(req, b, key, version_id, "s3:GetObjectVersion" if version_id else "s3:GetObject")
    check_read_conditions(req.headers, v.etag, v.last_modified)
    dkey = read_key(req, v)
    headers = object_headers(v, b)
    if req.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED" and v.checksum:
        for alg, value in v.checksum.items():
            if alg != "type":
                headers["x-amz-checksum-" + alg.lower()] = value
                headers["x-amz-checksum-type"] = v.checksum.get("type", "FULL_OBJECT")
    if v.storage_class in ARCHIVED and req.method == "GET":
        raise S3Error("InvalidObjectState", "The operation is not valid for the object's storage class",
                      StorageClass=v.storage_class)
    if True:  # response-* overrides (S3 ignores them for anonymous requests only on non-public objects)
        for q, h in (("response-content-type", "content-type"), ("response-content-language", "content-language"),
                     ("response-expires", "expires"), ("response-cache-control", "cache-control"),
                     ("response-content-disposition", "content-disposition"),
                     ("response-content-encoding", "content-encoding")):
            if q in req.query:
                headers[h] = req.query[q]
    status = 200
    start, end = 0, v.size
    part = req.query.get("partNumber")
    part_checksum = None
    if part is not None:
        try:
            n = int(part)
        except ValueError:
            raise invalid_part_number() from None
        if not 1 <= n <= MAX_PART_NUMBER:
            raise invalid_part_number()
        if "range" in req.headers:
            raise S3Error("InvalidRequest", "Cannot specify both Range header and partNumber query parameter")
        start, end = _part_range(v, n)
        part_checksum = _part_checksum(v, n)
        status = 206
        headers["content-range"] = f"bytes {start}-{end - 1}/{v.size}" if end > start else f"bytes */{v.size}"
    elif "range" in req.headers and v.size > 0:
        rng = _parse_range(req.headers["range"], v.size)
        if rng is not None:
            start, end = rng
            status = 206
            headers["content-range"] = f"bytes {start}-{end - 1}/{v.size}"
    elif "range" in req.headers and v.size == 0 and _parse_range_zero(req.headers["range"]):
        raise S3Error("InvalidRange", "The requested range is not satisfiable", RangeRequested=req.headers["range"],
                      ActualObjectSize="0")
    headers["content-length"] = str(end - start)
    if status == 206:  # the stored checksum covers the whole object only
        for h in [h for h in headers if h.startswith("x-amz-checksum-")]:
            del headers[h]
        if part_checksum is not None and req.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED":
            headers["x-amz-checksum-" + part_checksum[0].lower()] = part_checksum[1]
            headers["x-amz-checksum-type"] = "COMPOSITE"
    if req.method == "HEAD":
        return Response(status, headers, b"")
    if v.data is not None and dkey is None:
        return Response(status, headers, v.data[start:end])
    return Response(status, headers, stream_object(v, start, end, dkey))


def _parse_range_zero(value: str) -> bool:
    v = value.strip()
    return v.startswith("bytes=") and not v.startswith("bytes=-") and "," not in v


# --- delete ---------------------------------------------------------------------------------------

def _bypass(req: Req, b: BucketInfo, key: str) -> bool:
    if req.headers.get("x-amz-bypass-governance-retention", "").lower() != "true":
        return False
    try:
        req.check("s3:BypassGovernanceRetention", b, key)
    except S3Error:
        return False
    return True


async def delete_object(req: Req, b: BucketInfo, key: str) -> Response:
    version_id = req.query.get("versionId")
    req.check("s3:DeleteObjectVersion" if version_id else "s3:DeleteObject", b, key)
    bypass = _bypass(req, b, key)
    if_match = req.headers.get("if-match")
    result = await engine.write(lambda s: engine.tx_delete_object(s, b.id, key, version_id, req.actor,
                                                                    bypass_governance=bypass, if_match=if_match))
    if result.dead_blobs:
        await engine.blocking(engine.delete_blob_data, result.dead_blobs)
    h = {}
    if result.delete_marker:
        h["x-amz-delete-marker"] = "true"
    if result.version_id is not None and (b.versioning or version_id):
        h["x-amz-version-id"] = result.version_id
    return Response(204, h)


async def delete_objects(req: Req, b: BucketInfo) -> Response:
    # Keys are in the body, so each is authorised after reading it; an anonymous caller can only be
    # allowed by a bucket policy or ACL: without either, refuse before reading anything.
    if req.requester.anonymous and not b.policy and not b.acl:
        raise access_denied()
    body = await req.read_body(2 * 1024 * 1024)
    node = parse(body, "Delete")
    quiet = (node.text_of("Quiet") or "").lower() == "true"
    items = []
    for o in node.children("Object"):
        k = o.text_of("Key")
        if k is None:
            raise S3Error("MalformedXML", "Each Object needs a Key")
        items.append((k, o.text_of("VersionId") or None))
    if not items or len(items) > 1000:
        raise S3Error("MalformedXML", "The XML you provided was not well-formed or did not validate against our "
                                      "published schema (1 to 1000 objects)")
    errors: dict[int, S3Error] = {}
    allowed: list[tuple[int, str, str | None, bool]] = []
    for i, (k, vid) in enumerate(items):
        try:
            validate_key(k)
            req.check("s3:DeleteObjectVersion" if vid else "s3:DeleteObject", b, k)
            allowed.append((i, k, vid, _bypass(req, b, k)))
        except S3Error as e:
            errors[i] = e

    def tx(s: Session) -> tuple[dict[int, engine.DeleteResult], dict[int, S3Error], list[str]]:
        results: dict[int, engine.DeleteResult] = {}
        errs: dict[int, S3Error] = {}
        dead: list[str] = []
        for i, k, vid, bypass in allowed:
            sp = s.begin_nested()
            try:
                r = engine.tx_delete_object(s, b.id, k, vid, req.actor, bypass_governance=bypass)
                s.flush()
                sp.commit()
                results[i] = r
                dead += r.dead_blobs
            except S3Error as e:
                sp.rollback()
                errs[i] = e
            for obj in list(s.identity_map.values()):  # never another operation's stale objects
                s.expunge(obj)
        return results, errs, dead

    results, tx_errors, dead = await engine.write(tx)
    if dead:
        await engine.blocking(engine.delete_blob_data, dead)
    errors.update(tx_errors)
    out = []
    for i, (k, vid) in enumerate(items):
        if i in errors:
            err = errors[i]
            out.append(f"<Error>{tag('Key', k)}{tag('VersionId', vid) if vid else ''}{tag('Code', err.code)}"
                       f"{tag('Message', err.message)}</Error>")
        elif not quiet:
            r = results[i]
            extra = ""
            if r.delete_marker:
                extra += "<DeleteMarker>true</DeleteMarker>"
                if r.version_id and not vid:
                    extra += tag("DeleteMarkerVersionId", r.version_id)
            out.append(f"<Deleted>{tag('Key', k)}{tag('VersionId', vid) if vid else ''}{extra}</Deleted>")
    return Response(200, XML, doc("DeleteResult", "".join(out)))


# --- copy -----------------------------------------------------------------------------------------

def parse_copy_source(value: str) -> tuple[str, str, str | None]:
    raw, _, qs = value.partition("?")
    src = unquote(raw)
    src = src.removeprefix("/")
    bucket, sep, key = src.partition("/")
    if not sep or not bucket or not key:
        raise S3Error("InvalidArgument", "Copy Source must mention the source bucket and key: "
                                         "sourcebucket/sourcekey", ArgumentName="x-amz-copy-source")
    version = None
    if qs:
        for k, v in parse_qsl(qs, keep_blank_values=True):
            if k == "versionId":
                version = v
    return bucket, key, version


async def _load_source(req: Req) -> tuple[BucketInfo, ObjectVersion, bytes | None]:
    sb_name, skey, svid = parse_copy_source(req.headers["x-amz-copy-source"])
    validate_key(skey)
    sb = await engine.load_bucket_info(sb_name)
    if sb is None:
        raise no_such_bucket(BucketName=sb_name)
    check_expected_owner(req, sb, "x-amz-source-expected-bucket-owner")
    src = await load_version(req, sb, skey, svid, "s3:GetObjectVersion" if svid else "s3:GetObject")
    check_read_conditions(req.headers, src.etag, src.last_modified, prefix="x-amz-copy-source-", copy=True)
    if src.storage_class in ARCHIVED:
        raise S3Error("InvalidObjectState", "The source object of the COPY action is not in the active tier")
    skey_bytes = read_key(req, src, "x-amz-copy-source-server-side-encryption-customer-")
    return sb, src, skey_bytes


async def copy_object(req: Req, b: BucketInfo, key: str) -> Response:
    req.check("s3:PutObject", b, key)
    sb, src, src_key = await _load_source(req)
    directive = req.headers.get("x-amz-metadata-directive", "COPY").upper()
    tag_directive = req.headers.get("x-amz-tagging-directive", "COPY").upper()
    if directive not in ("COPY", "REPLACE") or tag_directive not in ("COPY", "REPLACE"):
        raise S3Error("InvalidArgument", "Unknown metadata directive.")
    sc = storage_class(req.headers) if "x-amz-storage-class" in req.headers else "STANDARD"
    sse_info, dest_key, _ = sse_for_write(req, b)
    same = sb.id == b.id and src.key == key and (req.query.get("versionId") is None)
    if same and directive == "COPY" and sse_info is None and not src.sse and sc == src.storage_class and \
            "x-amz-website-redirect-location" not in req.headers:
        raise S3Error("InvalidRequest", "This copy request is illegal because it is trying to copy an object to "
                                        "itself without changing the object's metadata, storage class, website "
                                        "redirect location or encryption attributes.")
    if directive == "REPLACE":
        meta, headers = user_metadata(req.headers), stored_headers(req.headers)
    else:
        meta, headers = dict(src.user_meta or {}), dict(src.headers or {})
    tags = parse_tagging_header(req.headers.get("x-amz-tagging")) if tag_directive == "REPLACE" else src.tags
    acl = new_object_acl(req.headers, b, new_object_owner(req, b))
    check_attribute_rights(req, b, key, acl, tags if tag_directive == "REPLACE" else None)
    lock_mode, lock_until, hold = lock_from_headers(req, b)
    await req.drain()
    obj = NewObject(key=key, size=src.size, etag=src.etag, storage_class=sc, headers=headers or None,
                    user_meta=meta or None, parts_count=src.parts_count, checksum=src.checksum, sse=sse_info,
                    lock_mode=lock_mode, lock_until=lock_until, legal_hold=hold, tags=tags, acl=acl,
                    owner=new_object_owner(req, b))
    sink = None
    shareable = (not src.sse and sse_info is None) or (src.sse and src.sse["mode"] == "AES256" and sse_info
                                                       and sse_info["mode"] == "AES256")
    if shareable:
        obj.sse = src.sse
        obj.data = src.data
        obj.segments = src.segments
        obj.shared_blobs = [seg[0] for seg in src.segments or []]
    else:
        alg = next((k for k in (src.checksum or {}) if k != "type"), None)
        sink = Sink(dest_key, 0, alg, allow_inline=src.size <= INLINE_MAX)
        await feed(sink, stream_object(src, 0, src.size, src_key))
        obj.data = sink.inline
        obj.etag = sink.etag if not src.parts_count else src.etag
        if sink.blob_id is not None:
            obj.segments = [[sink.blob_id, sink.size, 0]]
            obj.new_blobs = [(sink.blob_id, sse.cipher_size(sink.size) if dest_key else sink.size)]
        obj.parts_count = 0
        if alg and sink.checksum is not None:  # the copy is one piece: its checksum covers all of it
            obj.checksum = {alg: checksums.b64(sink.checksum.digest()), "type": "FULL_OBJECT"}
    try:
        result = await engine.write(lambda s: engine.tx_put_object(s, b.id, obj, req.actor))
    except BaseException:
        if sink is not None:
            await engine.blocking(sink.abort)
        raise
    if result.dead_blobs:
        await engine.blocking(engine.delete_blob_data, result.dead_blobs)
    h = sse_headers(obj.sse)
    if b.versioning:
        h["x-amz-version-id"] = result.version_id
    if sb.versioning:
        h["x-amz-copy-source-version-id"] = src.version_id
    ck = "".join(tag("Checksum" + k, v) for k, v in (obj.checksum or {}).items() if k != "type")
    if obj.checksum:
        ck += tag("ChecksumType", obj.checksum.get("type", "FULL_OBJECT"))
    return Response(200, XML | h, doc("CopyObjectResult", f"<LastModified>{iso(result.last_modified)}"
                                                          f"</LastModified>{tag('ETag', obj.etag)}{ck}"))


# --- multipart ------------------------------------------------------------------------------------

async def create_upload(req: Req, b: BucketInfo, key: str) -> Response:
    req.check("s3:PutObject", b, key)
    meta, headers, sc, tags, acl = new_object_attributes(req, b)
    check_attribute_rights(req, b, key, acl, tags)
    lock_mode, lock_until, hold = lock_from_headers(req, b)
    sse_info, _, _ = sse_for_write(req, b)
    alg = req.headers.get("x-amz-checksum-algorithm")
    if alg is not None and alg.upper() not in checksums.ALGORITHMS:
        raise S3Error("InvalidRequest", "Checksum algorithm provided is unsupported.")
    ck_type = upload_checksum_type(alg, req.headers.get("x-amz-checksum-type"))
    await req.drain()
    upload_id = engine.new_upload_id()

    def tx(s: Session) -> None:
        engine.tx_bucket(s, b.id)
        s.add(Upload(id=upload_id, bucket_id=b.id, key=key, storage_class=sc, headers=headers or None,
                     user_meta=meta or None, sse=sse_info, checksum_algorithm=alg.upper() if alg else None,
                     checksum_type=ck_type,
                     tags=tags, acl=acl, lock_mode=lock_mode, lock_until=lock_until, legal_hold=hold,
                     initiator=req.requester.project_id or "", owner=new_object_owner(req, b)))

    await engine.write(tx)
    h = XML | sse_headers(sse_info)
    if alg and ck_type:
        h["x-amz-checksum-algorithm"] = alg.upper()
        h["x-amz-checksum-type"] = ck_type
    return Response(200, h, doc("InitiateMultipartUploadResult", tag("Bucket", b.name) + tag("Key", key) +
                                tag("UploadId", upload_id)))


def upload_checksum_type(algorithm: str | None, requested: str | None) -> str | None:
    """The checksum type of a new multipart upload: as asked (x-amz-checksum-type) if the algorithm allows it,
    else the algorithm's default (CRC64NVME: FULL_OBJECT only; SHA1/SHA256: COMPOSITE only)."""
    if requested is None:
        return checksums.default_checksum_type(algorithm) if algorithm else None
    wanted = requested.strip().upper()
    if wanted not in ("COMPOSITE", "FULL_OBJECT"):
        raise S3Error("InvalidRequest", "Value for x-amz-checksum-type header is invalid.")
    if algorithm is None:
        raise S3Error("InvalidRequest", "The x-amz-checksum-type header can only be used with the "
                                        "x-amz-checksum-algorithm header.")
    allowed = checksums.FULL_OBJECT_ALGORITHMS if wanted == "FULL_OBJECT" else checksums.COMPOSITE_ALGORITHMS
    if algorithm.upper() not in allowed:
        raise S3Error("InvalidRequest", f"The {wanted} checksum type cannot be used with the "
                                        f"{algorithm.lower()} checksum algorithm.")
    return wanted


def _part_number(req: Req) -> int:
    raw = req.query.get("partNumber", "")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_PART_NUMBER:
        raise invalid_part_number(ArgumentValue=raw[:20])
    return n


async def _load_upload(b: BucketInfo, key: str, upload_id: str) -> Upload:
    return await engine.read(lambda s: engine.tx_get_upload(s, b.id, upload_id, key))


def _upload_key(req: Req, up: Upload) -> bytes | None:
    if not up.sse:
        return None
    if up.sse["mode"] == "SSE-C":
        return sse.data_key(up.sse, sse.customer_key(req.headers))
    return sse.data_key(up.sse, None)


async def upload_part(req: Req, b: BucketInfo, key: str) -> Response:
    req.check("s3:PutObject", b, key)
    number = _part_number(req)
    upload_id = req.query["uploadId"]
    up = await _load_upload(b, key, upload_id)
    dkey = _upload_key(req, up)
    md5 = _content_md5(req)
    alg, expected, trailer = requested_checksum(req)
    length = req.declared_length()
    if length is not None and length > MAX_PUT_SIZE:
        raise S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
    if alg is not None and up.checksum_algorithm and alg != up.checksum_algorithm:
        raise S3Error("InvalidRequest", f"Checksum Type mismatch occurred, expected checksum Type: "
                                        f"{up.checksum_algorithm.lower()}, actual checksum Type: {alg.lower()}")
    # a part without a checksum of its own still gets the upload's (computed here): completion needs it
    sink = Sink(dkey, number, alg or up.checksum_algorithm, allow_inline=False)
    payload_sha = req.defer_payload_hash()
    if payload_sha is not None:
        sink.extra.append(payload_sha)
    await feed(sink, req.iter_body())
    try:
        if payload_sha is not None:
            req.check_payload_sha(payload_sha.hexdigest())
        checksum = verify_checksums(req, sink, md5, alg, expected, trailer)
        if alg is None and up.checksum_algorithm and sink.checksum is not None:
            alg = up.checksum_algorithm
            checksum = {alg: checksums.b64(sink.checksum.digest()), "type": "FULL_OBJECT"}
        assert sink.blob_id is not None
        blob_id = sink.blob_id
        size = sse.cipher_size(sink.size) if dkey else sink.size
        dead = await engine.write(lambda s: engine.tx_put_part(s, b.id, upload_id, key, number, sink.size, sink.etag,
                                                                 blob_id, checksum, size))
    except BaseException:
        await engine.blocking(sink.abort)
        raise
    if dead:
        await engine.blocking(engine.delete_blob_data, dead)
    h = {"etag": sink.etag} | sse_headers(up.sse)
    if checksum and alg is not None:  # a checksum is only ever computed for an algorithm
        h[f"x-amz-checksum-{alg.lower()}"] = checksum[alg]
    return Response(200, h)


async def upload_part_copy(req: Req, b: BucketInfo, key: str) -> Response:
    req.check("s3:PutObject", b, key)
    number = _part_number(req)
    upload_id = req.query["uploadId"]
    up = await _load_upload(b, key, upload_id)
    dkey = _upload_key(req, up)
    _, src, src_key = await _load_source(req)
    start, end = 0, src.size
    rng = req.headers.get("x-amz-copy-source-range")
    if rng is not None:
        start, end = copy_source_range(rng, src.size)
    await req.drain()
    sink = Sink(dkey, number, up.checksum_algorithm, allow_inline=False)
    await feed(sink, stream_object(src, start, end, src_key))
    checksum = None
    if sink.checksum is not None and up.checksum_algorithm:
        checksum = {up.checksum_algorithm: checksums.b64(sink.checksum.digest()), "type": "FULL_OBJECT"}
    assert sink.blob_id is not None
    blob_id = sink.blob_id
    size = sse.cipher_size(sink.size) if dkey else sink.size
    try:
        dead = await engine.write(lambda s: engine.tx_put_part(s, b.id, upload_id, key, number, sink.size, sink.etag,
                                                                 blob_id, checksum, size))
    except BaseException:
        await engine.blocking(sink.abort)
        raise
    if dead:
        await engine.blocking(engine.delete_blob_data, dead)
    ck = "".join(tag("Checksum" + k, v) for k, v in (checksum or {}).items() if k != "type")
    h = XML | sse_headers(up.sse)
    return Response(200, h, doc("CopyPartResult", f"<LastModified>{iso(utcnow())}</LastModified>"
                                                  f"{tag('ETag', sink.etag)}{ck}"))


async def complete_upload(req: Req, b: BucketInfo, key: str) -> Response:
    req.check("s3:PutObject", b, key)
    upload_id = req.query["uploadId"]
    body = await req.read_body(2 * 1024 * 1024)
    node = parse(body, "CompleteMultipartUpload")
    wanted: list[engine.PartRef] = []
    for p in node.children("Part"):
        try:
            n = int(p.text_of("PartNumber") or "")
        except ValueError:
            raise S3Error("MalformedXML", "PartNumber must be an integer") from None
        etag = (p.text_of("ETag") or "").strip()
        cks = {alg: p.text_of("Checksum" + alg) or "" for alg in checksums.ALGORITHMS
               if p.find("Checksum" + alg) is not None}
        wanted.append(engine.PartRef(n, etag, cks))
    engine.check_part_list(wanted)
    if_match, if_none_match = await precheck_write_conditions(req, b, key)
    checks = completion_checks(req)
    with conflict_if_changed(if_match, if_none_match):
        result, obj = await engine.write(lambda s: engine.tx_complete_upload(
            s, b.id, upload_id, key, wanted, req.actor, if_match=if_match, if_none_match=if_none_match,
            checks=checks))
    if result.dead_blobs:
        await engine.blocking(engine.delete_blob_data, result.dead_blobs)
    h = XML | sse_headers(obj.sse)
    if b.versioning:
        h["x-amz-version-id"] = result.version_id
    ck = "".join(tag("Checksum" + k, v) for k, v in (obj.checksum or {}).items() if k != "type")
    if obj.checksum:
        ck += tag("ChecksumType", obj.checksum["type"])
        h["x-amz-checksum-type"] = obj.checksum["type"]
    location = f"/{b.name}/{quote(key)}"
    return Response(200, h, doc("CompleteMultipartUploadResult", tag("Location", location) + tag("Bucket", b.name) +
                                tag("Key", key) + tag("ETag", obj.etag) + ck))


def copy_source_range(value: str, size: int) -> tuple[int, int]:
    """[start, end) of an UploadPartCopy x-amz-copy-source-range: a malformed value (not bytes=first-last,
    last before first) is InvalidArgument, a well-formed one outside the source InvalidRange (416), as S3."""
    m = re.fullmatch(r"bytes=(\d{1,19})-(\d{1,19})", value.strip())
    if not m or int(m.group(2)) < int(m.group(1)):
        raise S3Error("InvalidArgument", "The x-amz-copy-source-range value must be of the form bytes=first-last "
                                         "where first and last are the zero-based offsets of the first and last "
                                         "bytes to copy", ArgumentName="x-amz-copy-source-range",
                      ArgumentValue=value[:100])
    first, last = int(m.group(1)), int(m.group(2))
    if last >= size:
        raise S3Error("InvalidRange", "The requested range is not satisfiable", RangeRequested=value[:100],
                      ActualObjectSize=str(size))
    return first, last + 1


def completion_checks(req: Req) -> engine.CompletionChecks:
    """The whole-object checksum, checksum type and size a CompleteMultipartUpload request asserts."""
    sent = [(alg, req.headers["x-amz-checksum-" + alg.lower()]) for alg in checksums.ALGORITHMS
            if "x-amz-checksum-" + alg.lower() in req.headers]
    if len(sent) > 1:
        raise S3Error("InvalidRequest", "Expecting a single x-amz-checksum- header. Multiple checksum Types are not "
                                        "allowed.")
    ck_type = req.headers.get("x-amz-checksum-type")
    if ck_type is not None and ck_type.strip().upper() not in ("COMPOSITE", "FULL_OBJECT"):
        raise S3Error("InvalidRequest", "Value for x-amz-checksum-type header is invalid.")
    size = None
    raw_size = req.headers.get("x-amz-mp-object-size")
    if raw_size is not None:
        if not raw_size.strip().isdigit():
            raise S3Error("InvalidArgument", "Value for x-amz-mp-object-size header is invalid.",
                          ArgumentName="x-amz-mp-object-size")
        size = int(raw_size)
    return engine.CompletionChecks(checksum=sent[0] if sent else None,
                                   checksum_type=ck_type.strip().upper() if ck_type else None, size=size)


async def abort_upload(req: Req, b: BucketInfo, key: str) -> Response:
    req.check("s3:AbortMultipartUpload", b, key)
    upload_id = req.query["uploadId"]
    dead = await engine.write(lambda s: engine.tx_abort_upload(s, b.id, upload_id, key))
    if dead:
        await engine.blocking(engine.delete_blob_data, dead)
    return Response(204)


async def list_parts(req: Req, b: BucketInfo, key: str) -> Response:
    req.check("s3:ListMultipartUploadParts", b, key)
    upload_id = req.query["uploadId"]
    max_parts = int_param(req, "max-parts", 1000)
    marker = int_param(req, "part-number-marker", 0, 0, 10**9)

    def q(s: Session) -> tuple[Upload, list[Any]]:
        return engine.tx_get_upload(s, b.id, upload_id, key), engine.q_parts(s, upload_id)

    up, parts = await engine.read(q)
    parts = [p for p in parts if p.part_number > marker]
    truncated = len(parts) > max_parts > 0  # max-parts=0: an empty page, not one to go on from
    parts = parts[:max_parts]
    items = []
    for p in parts:
        ck = "".join(tag("Checksum" + k, v) for k, v in (p.checksum or {}).items() if k != "type")
        items.append(f"<Part>{tag('PartNumber', p.part_number)}<LastModified>{iso(p.last_modified)}</LastModified>"
                     f"{tag('ETag', p.etag)}{tag('Size', p.size)}{ck}</Part>")
    inner = (tag("Bucket", b.name) + tag("Key", key) + tag("UploadId", upload_id) +
             initiator_xml(up.initiator, b) +
             owner_xml(b.project_id, b.owner_name) + tag("StorageClass", up.storage_class) +
             tag("PartNumberMarker", marker) +
             tag("NextPartNumberMarker", parts[-1].part_number if parts else 0) + tag("MaxParts", max_parts) +
             tag("IsTruncated", "true" if truncated else "false") +
             (tag("ChecksumAlgorithm", up.checksum_algorithm) if up.checksum_algorithm else "") +
             (tag("ChecksumType", up.checksum_type) if up.checksum_type else "") + "".join(items))
    return Response(200, XML, doc("ListPartsResult", inner))


# --- object sub-resources -------------------------------------------------------------------------

async def _version_for(req: Req, b: BucketInfo, key: str, action: str) -> ObjectVersion:
    return await load_version(req, b, key, req.query.get("versionId"), action)


async def _update_version(req: Req, b: BucketInfo, key: str, fn: Any) -> ObjectVersion:
    vid = req.query.get("versionId")
    return await engine.write(lambda s: engine.tx_update_version(s, b.id, key, vid, fn))


def _vid_header(b: BucketInfo, v: ObjectVersion) -> dict[str, str]:
    return {"x-amz-version-id": v.version_id} if b.versioning else {}


async def get_object_tagging(req: Req, b: BucketInfo, key: str) -> Response:
    v = await _version_for(req, b, key, "s3:GetObjectTagging")
    return Response(200, XML | _vid_header(b, v), tagging_xml(v.tags or {}))


async def put_object_tagging(req: Req, b: BucketInfo, key: str) -> Response:
    req.check("s3:PutObjectTagging", b, key)
    tags = parse_tagset(await req.read_body(), 10)
    v = await _update_version(req, b, key, lambda _v: {"tags": tags or None})
    return Response(200, _vid_header(b, v))


async def delete_object_tagging(req: Req, b: BucketInfo, key: str) -> Response:
    req.check("s3:DeleteObjectTagging", b, key)
    v = await _update_version(req, b, key, lambda _v: {"tags": None})
    return Response(204, _vid_header(b, v))


async def get_object_acl(req: Req, b: BucketInfo, key: str) -> Response:
    v = await _version_for(req, b, key, "s3:GetObjectVersionAcl" if "versionId" in req.query else "s3:GetObjectAcl")
    return Response(200, XML | _vid_header(b, v), await acl_response_xml(b, v.acl or [], v.owner))


async def put_object_acl(req: Req, b: BucketInfo, key: str) -> Response:
    v0 = await engine.read(lambda s: engine.q_get_version(s, b.id, key, req.query.get("versionId")))
    action = "s3:PutObjectVersionAcl" if "versionId" in req.query else "s3:PutObjectAcl"
    req.check(action, b, key, v0.acl if v0 is not None else None, v0.owner if v0 is not None else None)
    grants = await acl_to_set(req, b, v0.owner if v0 is not None and not b.acls_disabled else None)
    v = await _update_version(req, b, key, lambda _v: {"acl": grants})
    return Response(200, _vid_header(b, v))


async def get_retention(req: Req, b: BucketInfo, key: str) -> Response:
    v = await _version_for(req, b, key, "s3:GetObjectRetention")
    if not b.object_lock:
        raise no_lock_configuration()
    if not v.lock_mode or v.lock_until is None:
        raise S3Error("NoSuchObjectLockConfiguration", "The specified object does not have a ObjectLock "
                                                       "configuration")
    return Response(200, XML, doc("Retention", tag("Mode", v.lock_mode) + tag("RetainUntilDate", iso(v.lock_until))))


async def put_retention(req: Req, b: BucketInfo, key: str) -> Response:
    req.check("s3:PutObjectRetention", b, key)
    if not b.object_lock:
        raise no_lock_configuration()
    node = parse(await req.read_body(), "Retention")
    mode = node.text_of("Mode")
    until_s = node.text_of("RetainUntilDate")
    if mode is None and until_s is None:
        new_mode, new_until = None, None
    else:
        if mode not in ("GOVERNANCE", "COMPLIANCE") or not until_s:
            raise S3Error("MalformedXML", "Retention needs a Mode (GOVERNANCE or COMPLIANCE) and a RetainUntilDate")
        new_mode, new_until = mode, _parse_iso(until_s, "RetainUntilDate")
        if new_until <= utcnow():
            raise S3Error("InvalidArgument", "The retain until date must be in the future!")
    bypass = _bypass(req, b, key)

    def change(v: ObjectVersion) -> dict[str, Any]:
        now = utcnow()
        lock_until = v.lock_until
        if v.lock_mode is not None and lock_until is not None and lock_until > now:  # an active retention
            weaker = new_mode is None or new_until is None or new_until < lock_until
            if v.lock_mode == "COMPLIANCE" and (weaker or new_mode != "COMPLIANCE"):
                raise S3Error("AccessDenied", "Access Denied: a COMPLIANCE retention can only be extended")
            if v.lock_mode == "GOVERNANCE" and (weaker or new_mode != v.lock_mode) and not bypass:
                raise S3Error("AccessDenied", "Access Denied: shortening or removing a GOVERNANCE retention needs "
                                              "x-amz-bypass-governance-retention and s3:BypassGovernanceRetention")
        return {"lock_mode": new_mode, "lock_until": new_until}

    v = await _update_version(req, b, key, change)
    return Response(200, _vid_header(b, v))


async def get_legal_hold(req: Req, b: BucketInfo, key: str) -> Response:
    v = await _version_for(req, b, key, "s3:GetObjectLegalHold")
    if not b.object_lock:
        raise no_lock_configuration()
    return Response(200, XML, doc("LegalHold", tag("Status", "ON" if v.legal_hold else "OFF")))


async def put_legal_hold(req: Req, b: BucketInfo, key: str) -> Response:
    req.check("s3:PutObjectLegalHold", b, key)
    if not b.object_lock:
        raise no_lock_configuration()
    status = parse(await req.read_body(), "LegalHold").text_of("Status")
    if status not in ("ON", "OFF"):
        raise S3Error("MalformedXML", "LegalHold Status must be ON or OFF")
    v = await _update_version(req, b, key, lambda _v: {"legal_hold": status == "ON"})
    return Response(200, _vid_header(b, v))


OBJECT_ATTRIBUTES = frozenset({"ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize"})


async def get_attributes(req: Req, b: BucketInfo, key: str) -> Response:
    wanted = {a.strip() for a in req.headers.get("x-amz-object-attributes", "").split(",") if a.strip()}
    if not wanted or not wanted <= OBJECT_ATTRIBUTES:
        raise S3Error("InvalidArgument", "Invalid attribute name specified.", ArgumentName="x-amz-object-attributes")
    v = await _version_for(req, b, key, "s3:GetObjectAttributes")
    if v.sse and v.sse.get("mode") == "SSE-C":
        read_key(req, v)  # as GET: an SSE-C object's attributes need its key
    inner = ""
    if "ETag" in wanted:
        inner += tag("ETag", v.etag.strip('"'))
    if "Checksum" in wanted and v.checksum:
        # as S3: a composite checksum without its "-N" suffix here (the part count is in ObjectParts)
        inner += "<Checksum>" + "".join(tag("Checksum" + k, val.split("-")[0])
                                        for k, val in v.checksum.items() if k != "type")
        inner += tag("ChecksumType", v.checksum.get("type", "FULL_OBJECT")) + "</Checksum>"
    if "ObjectParts" in wanted and v.parts_count:
        inner += _object_parts_xml(req, v)
    if "StorageClass" in wanted:
        inner += tag("StorageClass", v.storage_class)
    if "ObjectSize" in wanted:
        inner += tag("ObjectSize", v.size)
    h = XML | {"last-modified": http_date(v.last_modified)} | _vid_header(b, v)
    return Response(200, h, doc("GetObjectAttributesResponse", inner))


def _object_parts_xml(req: Req, v: ObjectVersion) -> str:
    """ObjectParts of GetObjectAttributes: the part count and, when the parts were checksummed, a page of
    parts (x-amz-max-parts, x-amz-part-number-marker) with their sizes and checksums."""
    try:
        max_parts = int(req.headers.get("x-amz-max-parts", "1000"))
        marker = int(req.headers.get("x-amz-part-number-marker", "0"))
    except ValueError:
        raise S3Error("InvalidArgument", "x-amz-max-parts and x-amz-part-number-marker must be integers") from None
    if max_parts < 0 or marker < 0:
        raise S3Error("InvalidArgument", "x-amz-max-parts and x-amz-part-number-marker must not be negative")
    max_parts = min(max_parts, 1000)
    out = tag("PartsCount", v.parts_count)
    alg = next((k for k in v.checksum or {} if k != "type"), None)
    segments = v.segments or []
    if alg is None or not all(len(seg) > 3 for seg in segments):
        return f"<ObjectParts>{out}</ObjectParts>"
    rest = [(i, seg) for i, seg in enumerate(segments, 1) if i > marker]
    page = rest[:max_parts]
    out += tag("PartNumberMarker", marker)
    if page:
        out += tag("NextPartNumberMarker", page[-1][0])
    out += tag("MaxParts", max_parts) + tag("IsTruncated", "true" if len(rest) > len(page) else "false")
    for i, seg in page:
        out += f"<Part>{tag('PartNumber', i)}{tag('Size', seg[1])}{tag('Checksum' + alg, seg[3])}</Part>"
    return f"<ObjectParts>{out}</ObjectParts>"


_SUB: dict[str, dict[str, Callable[[Req, BucketInfo, str], Awaitable[Response]]]] = {
    "tagging": {"GET": get_object_tagging, "PUT": put_object_tagging, "DELETE": delete_object_tagging},
    "acl": {"GET": get_object_acl, "PUT": put_object_acl},
    "retention": {"GET": get_retention, "PUT": put_retention},
    "legal-hold": {"GET": get_legal_hold, "PUT": put_legal_hold},
    "attributes": {"GET": get_attributes},
}


__all__ = ["ObjectVersion", "Sink", "feed", "object_op", "stream_object"]
