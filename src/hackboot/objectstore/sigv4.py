"""AWS Signature Version 4 for S3: header auth, presigned URLs, streaming (aws-chunked) payloads,
browser POST policies. Pure functions and a push-style chunk decoder; no HTTP framework here.

References (public AWS documentation): "Authenticating Requests (AWS Signature Version 4)",
"Transferring Payload in Multiple Chunks", "Signature calculations for trailing headers",
"Browser-Based Uploads Using POST".
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import quote, unquote

from hackboot.objectstore.s3errors import S3Error

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING = (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER)
MAX_SKEW = dt.timedelta(minutes=15)
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600
_SPACES = re.compile(r"\s+")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class AuthRequest:
    access_key: str
    date: str  # YYYYMMDD of the scope
    region: str
    service: str
    signed_headers: list[str]
    signature: str
    amz_date: str  # 20130524T000000Z
    payload_hash: str
    presigned: bool = False
    expires: int = 0
    when: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


def aws_quote(value: str, safe: str = "~") -> str:
    return quote(value, safe=safe)


def parse_amz_date(value: str) -> dt.datetime:
    if len(value) == 16 and value[8] == "T" and value[15] == "Z" and value[:8].isdigit() and value[9:15].isdigit():
        try:
            return dt.datetime(int(value[:4]), int(value[4:6]), int(value[6:8]), int(value[9:11]),
                               int(value[11:13]), int(value[13:15]), tzinfo=dt.UTC)
        except ValueError:
            pass
    try:
        return dt.datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        pass
    try:  # RFC 7231 Date header
        from email.utils import parsedate_to_datetime

        return parsedate_to_datetime(value).astimezone(dt.UTC)
    except (TypeError, ValueError, IndexError):
        raise S3Error("AccessDenied", "AWS authentication requires a valid Date or x-amz-date header") from None


def _credential(value: str) -> tuple[str, str, str, str]:
    parts = value.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise S3Error("AuthorizationHeaderMalformed",
                      "The authorization header is malformed; the Credential is mal-formed; expecting "
                      "\"<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request\".")
    if parts[3] != "s3":
        raise S3Error("AuthorizationHeaderMalformed",
                      f"The authorization header is malformed; incorrect service \"{parts[3]}\". "
                      "This endpoint belongs to \"s3\".")
    return parts[0], parts[1], parts[2], parts[3]


def parse_authorization(header: str, headers: dict[str, str]) -> AuthRequest:
    if not header.startswith(ALGORITHM + " "):
        raise S3Error("AuthorizationHeaderMalformed", "Unsupported authorization type")
    fields: dict[str, str] = {}
    for item in header[len(ALGORITHM) + 1:].split(","):
        k, _, v = item.strip().partition("=")
        fields[k.strip()] = v.strip()
    try:
        credential, signed, signature = fields["Credential"], fields["SignedHeaders"], fields["Signature"]
    except KeyError:
        raise S3Error("AuthorizationHeaderMalformed",
                      "The authorization header is malformed: Credential, SignedHeaders and Signature are "
                      "required") from None
    ak, date, region, service = _credential(credential)
    amz_date = headers.get("x-amz-date") or headers.get("date", "")
    when = parse_amz_date(amz_date)
    payload = headers.get("x-amz-content-sha256", "")
    if not payload:
        raise S3Error("InvalidRequest", "Missing required header for this request: x-amz-content-sha256")
    if payload not in (UNSIGNED, *STREAMING) and not _HEX64.match(payload):
        raise S3Error("InvalidArgument", "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, a STREAMING-* value "
                                         "or a lowercase hex SHA-256 digest", ArgumentName="x-amz-content-sha256")
    signed_headers = signed.split(";")
    if "host" not in signed_headers:
        raise S3Error("AccessDenied", "The host header must be signed")
    return AuthRequest(ak, date, region, service, signed_headers, signature,
                       when.strftime("%Y%m%dT%H%M%SZ") if "x-amz-date" not in headers else amz_date,
                       payload, when=when)


def parse_presigned(query: dict[str, str]) -> AuthRequest:
    if query.get("X-Amz-Algorithm") != ALGORITHM:
        raise S3Error("AuthorizationQueryParametersError", "X-Amz-Algorithm only supports \"AWS4-HMAC-SHA256\"")
    try:
        credential = query["X-Amz-Credential"]
        amz_date = query["X-Amz-Date"]
        signed = query["X-Amz-SignedHeaders"]
        signature = query["X-Amz-Signature"]
        expires_s = query["X-Amz-Expires"]
    except KeyError:
        raise S3Error("AuthorizationQueryParametersError",
                      "Query-string authentication version 4 requires the X-Amz-Algorithm, X-Amz-Credential, "
                      "X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and X-Amz-Expires parameters.") from None
    # As S3: out-of-range values are malformed (400); 0 is well-formed and simply already expired (403).
    if not re.fullmatch(r"-?\d{1,12}", expires_s):
        raise S3Error("AuthorizationQueryParametersError", "X-Amz-Expires should be a number")
    expires = int(expires_s)
    if expires < 0:
        raise S3Error("AuthorizationQueryParametersError", "X-Amz-Expires must be non-negative")
    if expires > MAX_PRESIGN_EXPIRES:
        raise S3Error("AuthorizationQueryParametersError",
                      "X-Amz-Expires must be less than a week (in seconds) that is 604800")
    ak, date, region, service = _credential(credential)
    when = parse_amz_date(amz_date)
    return AuthRequest(ak, date, region, service, signed.split(";"), signature, amz_date,
                       query.get("X-Amz-Content-Sha256", UNSIGNED), presigned=True, expires=expires, when=when)


def check_time(auth: AuthRequest, now: dt.datetime) -> None:
    if auth.presigned:
        if auth.when - now > MAX_SKEW:
            raise S3Error("AccessDenied", "Request is not valid yet")
        if now > auth.when + dt.timedelta(seconds=auth.expires):
            raise S3Error("AccessDenied", "Request has expired", X_Amz_Expires=str(auth.expires),
                          Expires=auth.when.isoformat(), ServerTime=now.isoformat())
        return
    if abs(now - auth.when) > MAX_SKEW:
        raise S3Error("RequestTimeTooSkewed", "The difference between the request time and the current time "
                      "is too large.", RequestTime=auth.amz_date, ServerTime=now.strftime("%Y%m%dT%H%M%SZ"),
                      MaxAllowedSkewMilliseconds="900000")
    if auth.date != auth.when.strftime("%Y%m%d"):
        raise S3Error("SignatureDoesNotMatch", "The credential date does not match the request date")


@lru_cache(maxsize=4096)
def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    k = hmac.new(("AWS4" + secret).encode(), date.encode(), hashlib.sha256).digest()
    k = hmac.new(k, region.encode(), hashlib.sha256).digest()
    k = hmac.new(k, service.encode(), hashlib.sha256).digest()
    return hmac.new(k, b"aws4_request", hashlib.sha256).digest()


def canonical_query(raw_query: str, drop_signature: bool) -> str:
    pairs = []
    if raw_query:
        for item in raw_query.split("&"):
            if not item:
                continue
            k, _, v = item.partition("=")
            k, v = unquote(k), unquote(v)
            if drop_signature and k == "X-Amz-Signature":
                continue
            pairs.append((aws_quote(k), aws_quote(v)))
    pairs.sort()
    return "&".join(f"{k}={v}" for k, v in pairs)


def canonical_headers(headers: dict[str, str], signed: list[str]) -> str:
    out = []
    for name in signed:
        value = headers.get(name)
        if value is None:
            raise S3Error("AccessDenied", f"There were headers present in the request which were not signed "
                                          f"or a signed header is missing: {name}")
        out.append(f"{name}:{_SPACES.sub(' ', value.strip())}\n")
    return "".join(out)


# x-amz-* headers that may travel unsigned: their values are part of the string to sign anyway
# (the request date, and the payload hash, the last line of the canonical request).
UNSIGNED_AMZ_HEADERS = frozenset({"x-amz-date", "x-amz-content-sha256"})


def require_signed_amz_headers(auth: AuthRequest, headers: dict[str, str]) -> None:
    """As S3: every `x-amz-*` header of a SigV4 request (header-signed or presigned) must be signed, or
    whoever holds a signed request (a presigned URL) could add copy sources, ACLs, object locks…"""
    signed = set(auth.signed_headers)
    extra = sorted(h for h in headers if h.startswith("x-amz-") and h not in signed and h not in UNSIGNED_AMZ_HEADERS)
    if extra:
        raise S3Error("AccessDenied", "There were headers present in the request which were not signed",
                      HeadersNotSigned=", ".join(extra))


def wire_bytes(text: str) -> bytes:
    """Request text back to the bytes that were sent: header values arrive decoded as latin-1 (byte for
    byte), and clients sign the bytes they send (UTF-8 for non-ASCII metadata), not a re-encoding."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


def string_to_sign(auth: AuthRequest, method: str, uri: str, query: str, headers_block: str) -> str:
    creq = "\n".join([method, uri, query, headers_block, ";".join(auth.signed_headers), auth.payload_hash])
    return "\n".join([ALGORITHM, auth.amz_date, auth.scope, hashlib.sha256(wire_bytes(creq)).hexdigest()])


def sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def verify(auth: AuthRequest, secret: str, method: str, raw_path: str, raw_query: str,
           headers: dict[str, str]) -> bytes:
    """Check the request signature; return the signing key (streaming payloads need it)."""
    key = signing_key(secret, auth.date, auth.region, auth.service)
    headers_block = canonical_headers(headers, auth.signed_headers)
    query = canonical_query(raw_query, drop_signature=auth.presigned)
    # Clients encode the path once with AWS's rules; re-encoding the decoded path is canonical. Some
    # send characters AWS would encode: accept the path exactly as sent too.
    candidates = [aws_quote(unquote(raw_path), safe="/~")]
    if raw_path not in candidates:
        candidates.append(raw_path)
    for uri in candidates:
        if hmac.compare_digest(sign(key, string_to_sign(auth, method, uri, query, headers_block)),
                               auth.signature):
            return key
    raise S3Error("SignatureDoesNotMatch", "The request signature we calculated does not match the signature "
                                           "you provided. Check your key and signing method.",
                  AWSAccessKeyId=auth.access_key)


# --- aws-chunked payloads ------------------------------------------------------------------------

class ChunkedDecoder:
    """Decode an aws-chunked body pushed piece by piece, checking chunk and trailer signatures.

    `feed(data)` returns the payload bytes decoded so far (in order); `close()` checks that the body
    ended properly and returns the trailing headers. Signed chunks are verified as soon as each chunk
    is complete, so a forged chunk fails the upload before anything is committed.
    """

    MAX_LINE = 4096
    MAX_TRAILERS = 16  # S3 sends one (the checksum); bounded so a body cannot grow our memory through them

    def __init__(self, auth: AuthRequest | None, key: bytes | None, mode: str) -> None:
        self.signed = mode in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER)
        self.signed_trailer = mode == STREAMING_SIGNED_TRAILER
        self.auth = auth
        self.key = key
        self.prev = auth.signature if auth else ""
        self.buf = bytearray()
        self.state = "header"
        self.remaining = 0
        self.chunk_sig = ""
        self.chunk_hash = hashlib.sha256()
        self.trailers: dict[str, str] = {}
        self.trailer_lines: list[str] = []
        self.decoded = 0

    def _bad(self, msg: str) -> S3Error:
        return S3Error("IncompleteBody" if "end" in msg else "InvalidChunkSizeError" if "size" in msg
                       else "SignatureDoesNotMatch" if "signature" in msg else "InvalidRequest", msg)

    def _line(self) -> str | None:
        idx = self.buf.find(b"\n")
        if idx < 0:
            if len(self.buf) > self.MAX_LINE:
                raise self._bad("aws-chunked header line too long (bad chunk size)")
            return None
        line = bytes(self.buf[:idx]).rstrip(b"\r").decode("latin-1")
        del self.buf[:idx + 1]
        return line

    def _check_chunk(self) -> None:
        if not self.signed:
            return
        assert self.auth is not None and self.key is not None
        sts = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", self.auth.amz_date, self.auth.scope, self.prev, EMPTY_SHA256,
                         self.chunk_hash.hexdigest()])
        expected = sign(self.key, sts)
        if not hmac.compare_digest(expected, self.chunk_sig):
            raise self._bad("chunk signature does not match")
        self.prev = expected

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        self.buf += data
        while self.buf:
            if self.state == "header":
                line = self._line()
                if line is None:
                    break
                size_s, _, ext = line.partition(";")
                try:
                    size = int(size_s.strip(), 16)
                except ValueError:
                    raise self._bad("invalid chunk size") from None
                if size < 0:
                    raise self._bad("invalid chunk size")
                self.chunk_sig = ""
                if ext.startswith("chunk-signature="):
                    self.chunk_sig = ext[len("chunk-signature="):].strip()
                elif self.signed:
                    raise self._bad("missing chunk signature")
                self.chunk_hash = hashlib.sha256()
                self.remaining = size
                if size == 0:
                    self._check_chunk()
                    self.state = "trailer"
                else:
                    self.state = "data"
            elif self.state == "data":
                take = min(self.remaining, len(self.buf))
                piece = bytes(self.buf[:take])
                del self.buf[:take]
                self.remaining -= take
                self.decoded += take
                if self.signed:
                    self.chunk_hash.update(piece)
                out.append(piece)
                if self.remaining == 0:
                    self.state = "crlf"
            elif self.state == "crlf":
                if len(self.buf) < 2 and self.buf[:1] == b"\r":
                    break
                if self.buf[:2] == b"\r\n":
                    del self.buf[:2]
                elif self.buf[:1] == b"\n":
                    del self.buf[:1]
                else:
                    raise self._bad("chunk data longer than its declared size")
                self._check_chunk()
                self.state = "header"
            elif self.state == "trailer":
                line = self._line()
                if line is None:
                    break
                if line == "":
                    self.state = "done"
                    continue
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "x-amz-trailer-signature":
                    self._check_trailer(value.strip())
                else:
                    if len(self.trailer_lines) >= self.MAX_TRAILERS:
                        raise self._bad("too many trailing headers")
                    self.trailers[name] = value.strip()
                    self.trailer_lines.append(f"{name}:{value.strip()}\n")
            else:  # done: ignore trailing whitespace, reject anything else
                if bytes(self.buf).strip():
                    raise self._bad("data after the end of the aws-chunked body")
                self.buf.clear()
        return out

    def _check_trailer(self, signature: str) -> None:
        if not self.signed_trailer:
            return
        assert self.auth is not None and self.key is not None
        digest = hashlib.sha256("".join(self.trailer_lines).encode()).hexdigest()
        sts = "\n".join(["AWS4-HMAC-SHA256-TRAILER", self.auth.amz_date, self.auth.scope, self.prev, digest])
        expected = sign(self.key, sts)
        if not hmac.compare_digest(expected, signature):
            raise self._bad("trailer signature does not match")
        self.trailer_signed_ok = True

    def close(self) -> dict[str, str]:
        if self.state == "trailer" and not self.buf:  # clients may omit the final blank line
            self.state = "done"
        if self.state != "done":
            raise self._bad("the aws-chunked body did not end properly (end missing)")
        if self.signed_trailer and self.trailers and not getattr(self, "trailer_signed_ok", False):
            raise self._bad("missing trailer signature")
        return self.trailers


# --- browser POST uploads ------------------------------------------------------------------------

def post_policy_access_key(fields: dict[str, str]) -> str:
    """The access key a POST form's policy is signed with: `x-amz-credential` (SigV4) or `AWSAccessKeyId`
    (SigV2, what older SDKs and the S3 test suites send)."""
    if "x-amz-credential" in fields:
        return _credential(fields["x-amz-credential"])[0]
    return fields.get("awsaccesskeyid", "")


def verify_post_policy(fields: dict[str, str], secret: str) -> tuple[dict[str, object], str]:
    """Check a POST form's policy signature; return the decoded policy and the access key.

    SigV4: hex HMAC-SHA256 of the base64 policy with the scope's signing key (`x-amz-signature`);
    SigV2: base64 HMAC-SHA1 of the base64 policy with the secret (`signature`)."""
    policy_b64 = fields.get("policy", "")
    if "x-amz-credential" in fields:
        if fields.get("x-amz-algorithm", ALGORITHM) != ALGORITHM:
            raise S3Error("InvalidArgument", "x-amz-algorithm must be AWS4-HMAC-SHA256",
                          ArgumentName="x-amz-algorithm")
        if "x-amz-signature" not in fields:
            raise S3Error("InvalidArgument", "Bucket POST must contain a field named 'x-amz-signature'.  If it is "
                                             "specified, please check the order of the fields.",
                          ArgumentName="x-amz-signature")
        ak, date, region, service = _credential(fields["x-amz-credential"])
        expected = sign(signing_key(secret, date, region, service), policy_b64)
        given = fields["x-amz-signature"]
    else:
        if "signature" not in fields:
            raise S3Error("InvalidArgument", "Bucket POST must contain a field named 'Signature'.  If it is "
                                             "specified, please check the order of the fields.",
                          ArgumentName="Signature")
        ak = fields.get("awsaccesskeyid", "")
        expected = base64.b64encode(hmac.new(secret.encode(), policy_b64.encode(), hashlib.sha1).digest()).decode()
        given = fields["signature"]
    if not hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace")):
        raise S3Error("SignatureDoesNotMatch", "The request signature we calculated does not match the "
                                               "signature you provided. Check your key and signing method.",
                      AWSAccessKeyId=ak)
    import json

    try:
        policy = json.loads(base64.b64decode(policy_b64, validate=True))
    except (ValueError, TypeError):
        raise S3Error("InvalidPolicyDocument", "Invalid Policy: Invalid JSON.") from None
    if not isinstance(policy, dict):
        raise S3Error("InvalidPolicyDocument", "Invalid Policy: Invalid JSON.")
    return policy, ak


# --- Signature Version 2 (legacy; boto3 still presigns with it unless told s3v4) --------------------

V2_SUBRESOURCES = frozenset({
    "acl", "cors", "delete", "lifecycle", "location", "logging", "notification", "partNumber", "policy",
    "requestPayment", "restore", "tagging", "torrent", "uploadId", "uploads", "versionId", "versioning",
    "versions", "website", "object-lock", "retention", "legal-hold", "encryption", "publicAccessBlock",
    "response-content-type", "response-content-language", "response-expires", "response-cache-control",
    "response-content-disposition", "response-content-encoding"})


def v2_string_to_sign(method: str, headers: dict[str, str], resource_path: str, query: dict[str, str],
                      date_or_expires: str) -> str:
    amz = sorted((k, " ".join(v.split())) for k, v in headers.items() if k.startswith("x-amz-"))
    amz_block = "".join(f"{k}:{v}\n" for k, v in amz)
    subs = sorted((k, v) for k, v in query.items() if k in V2_SUBRESOURCES)
    resource = resource_path
    if subs:
        resource += "?" + "&".join(f"{k}={v}" if v != "" else k for k, v in subs)
    return "\n".join([method, headers.get("content-md5", ""), headers.get("content-type", ""), date_or_expires]) + \
        "\n" + amz_block + resource


def verify_v2(secret: str, signature: str, string_to_sign: str) -> None:
    expected = base64.b64encode(hmac.new(secret.encode(), wire_bytes(string_to_sign), hashlib.sha1).digest()).decode()
    if not hmac.compare_digest(expected, signature):
        raise S3Error("SignatureDoesNotMatch", "The request signature we calculated does not match the signature "
                                               "you provided. Check your key and signing method.",
                      StringToSign=string_to_sign)
