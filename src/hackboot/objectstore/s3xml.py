"""S3 errors and the little XML the protocol needs (built as strings: fast and exact)."""

from __future__ import annotations

import datetime as dt
import re
import xml.etree.ElementTree as ET
import xml.parsers.expat as expat
from typing import Any, NoReturn
from xml.sax.saxutils import escape as _escape

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
HEADER = '<?xml version="1.0" encoding="UTF-8"?>\n'
MAX_XML_BODY = 1024 * 1024

# code → HTTP status
_STATUS = {
    "AccessDenied": 403, "AccountProblem": 403, "AllAccessDisabled": 403,
    "BadDigest": 400, "BucketAlreadyExists": 409, "BucketAlreadyOwnedByYou": 409, "BucketNotEmpty": 409,
    "EntityTooSmall": 400, "EntityTooLarge": 400, "ExpiredToken": 400, "IllegalVersioningConfigurationException": 400,
    "IncompleteBody": 400, "InlineDataTooLarge": 400, "InternalError": 500, "InvalidAccessKeyId": 403,
    "InvalidArgument": 400, "InvalidBucketName": 400, "InvalidBucketState": 409, "InvalidDigest": 400,
    "InvalidEncryptionAlgorithmError": 400, "InvalidObjectState": 403, "InvalidPart": 400,
    "InvalidPartOrder": 400, "InvalidRange": 416, "InvalidRequest": 400, "InvalidStorageClass": 400,
    "InvalidTag": 400, "InvalidURI": 400, "KeyTooLongError": 400, "MalformedACLError": 400,
    "MalformedPOSTRequest": 400, "MalformedXML": 400, "MalformedPolicy": 400, "MaxMessageLengthExceeded": 400,
    "MetadataTooLarge": 400, "MethodNotAllowed": 405, "MissingContentLength": 411, "MissingSecurityHeader": 400,
    "NoSuchBucket": 404, "NoSuchBucketPolicy": 404, "NoSuchKey": 404, "NoSuchLifecycleConfiguration": 404,
    "NoSuchUpload": 404, "NoSuchVersion": 404, "NoSuchTagSet": 404, "NoSuchCORSConfiguration": 404,
    "NotImplemented": 501, "NotModified": 304, "PreconditionFailed": 412, "RequestTimeTooSkewed": 403,
    "SignatureDoesNotMatch": 403, "ServiceUnavailable": 503, "SlowDown": 503, "TooManyBuckets": 400,
    "XAmzContentSHA256Mismatch": 400, "ObjectLockConfigurationNotFoundError": 404,
    "NoSuchObjectLockConfiguration": 404, "InvalidRetentionPeriod": 400,
    "ServerSideEncryptionConfigurationNotFoundError": 404, "NoSuchPublicAccessBlockConfiguration": 404,
    "ConditionalRequestConflict": 409, "QuotaExceeded": 403, "InvalidChunkSizeError": 400,
    "BadRequest": 400, "InvalidPolicyDocument": 400, "EntityTooLargeForPost": 400, "CORSForbidden": 403,
    "UnexpectedContent": 400, "AuthorizationHeaderMalformed": 400, "AuthorizationQueryParametersError": 400,
    "IncorrectNumberOfFilesInPostRequest": 400, "OwnershipControlsNotFoundError": 404,
    "MissingRequestBodyError": 400, "RequestTimeout": 400, "NoSuchObjectLockConfigurationError": 404,
    "InsufficientStorage": 507, "RequestHeaderSectionTooLarge": 431,
}


class S3Error(Exception):
    def __init__(self, code: str, message: str = "", status: int | None = None,
                 headers: dict[str, str] | None = None, **extra: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message or code
        self.status = status or _STATUS.get(code, 400)
        self.headers = headers or {}
        self.extra = extra

    def to_xml(self, resource: str, request_id: str) -> bytes:
        extra = "".join(f"<{k}>{esc(v)}</{k}>" for k, v in self.extra.items())
        return (f"{HEADER}<Error><Code>{self.code}</Code><Message>{esc(self.message)}</Message>{extra}"
                f"<Resource>{esc(resource)}</Resource><RequestId>{request_id}</RequestId>"
                f"<HostId>{request_id}</HostId></Error>").encode()


_SPECIAL = re.compile(r'[&<>"]')


def esc(value: Any) -> str:
    text = str(value)
    if _SPECIAL.search(text) is None:  # the common case: nothing to escape
        return text
    return _escape(text, {'"': "&quot;"})


def iso(ts: dt.datetime) -> str:
    if ts.utcoffset() != dt.timedelta(0):
        ts = ts.astimezone(dt.UTC)
    return ts.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def http_date(ts: dt.datetime) -> str:
    return ts.astimezone(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def tag(name: str, value: Any) -> str:
    return f"<{name}>{esc(value)}</{name}>"


def doc(root: str, inner: str) -> bytes:
    return f'{HEADER}<{root} xmlns="{NS}">{inner}</{root}>'.encode()


# --- parsing -------------------------------------------------------------------------------------

class Node:
    """A namespace-free view of an XML element: `node.find("Rule")`, `node.text_of("ID")`."""

    def __init__(self, el: ET.Element) -> None:
        self.el = el
        self.tag = el.tag.rsplit("}", 1)[-1]

    @property
    def text(self) -> str:
        return (self.el.text or "").strip()

    def children(self, name: str | None = None) -> list[Node]:
        out = [Node(c) for c in self.el]
        return [c for c in out if name is None or c.tag == name]

    def find(self, name: str) -> Node | None:
        for c in self.el:
            if c.tag.rsplit("}", 1)[-1] == name:
                return Node(c)
        return None

    def text_of(self, name: str, default: str | None = None) -> str | None:
        n = self.find(name)
        return n.el.text if n is not None and n.el.text is not None else (default if n is None else "")


class _Refused(Exception):
    pass


def _refuse(*_: Any) -> NoReturn:
    raise _Refused


def _qname(name: str) -> str:
    # expat reports "namespace}local" with namespace_separator="}"; ElementTree spells it "{namespace}local"
    return "{" + name if "}" in name else name


def safe_fromstring(body: bytes) -> ET.Element:
    """Parse XML with expat directly, refusing any DOCTYPE (hence any entity declaration or external
    reference) whatever the document's encoding: a byte search for "<!DOCTYPE" misses UTF-16."""
    builder = ET.TreeBuilder()
    p = expat.ParserCreate(namespace_separator="}")
    p.buffer_text = True
    p.StartDoctypeDeclHandler = _refuse
    p.EntityDeclHandler = _refuse
    p.UnparsedEntityDeclHandler = _refuse
    p.NotationDeclHandler = _refuse
    p.ExternalEntityRefHandler = _refuse
    p.SkippedEntityHandler = _refuse
    p.StartElementHandler = lambda name, attrs: builder.start(_qname(name), {_qname(k): v for k, v in attrs.items()})
    p.EndElementHandler = lambda name: builder.end(_qname(name))
    p.CharacterDataHandler = builder.data
    p.Parse(body, True)
    return builder.close()


def parse(body: bytes, root: str | None = None) -> Node:
    if len(body) > MAX_XML_BODY:
        raise S3Error("MaxMessageLengthExceeded", "Your request was too big")
    if not body.strip():
        raise S3Error("MalformedXML", "The XML you provided was not well-formed or did not validate "
                                      "against our published schema")
    try:
        el = safe_fromstring(body)
    except _Refused:
        raise S3Error("MalformedXML", "DTDs and entity declarations are not allowed") from None
    except (expat.ExpatError, ValueError, UnicodeError):
        raise S3Error("MalformedXML", "The XML you provided was not well-formed or did not validate "
                                      "against our published schema") from None
    node = Node(el)
    if root is not None and node.tag != root:
        raise S3Error("MalformedXML", f"Expected a <{root}> document, got <{node.tag}>")
    return node
