"""S3 errors: the exception every S3 layer raises, S3's code → HTTP status table, and the errors raised
from several places, named once so their wording (which clients and tests match on) cannot drift.

A leaf module: it imports nothing from the object store, so the engine, the policy evaluator, the
signature code and the protocol layer can all raise S3 errors. Rendering an error as XML is `s3xml`'s.
"""

from __future__ import annotations

from collections.abc import Mapping

# code → HTTP status
STATUS: dict[str, int] = {
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
    """An S3 error answer: `code`, `message`, HTTP `status` (from the code unless given), extra response
    `headers`, and `extra` elements of the XML error document (in the order given)."""

    def __init__(self, code: str, message: str = "", status: int | None = None,
                 headers: dict[str, str] | None = None, **extra: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message or code
        self.status = status or STATUS.get(code, 400)
        self.headers = headers or {}
        self.extra = extra


# --- errors raised from more than one place -------------------------------------------------------
# `extra` keyword arguments become elements of the error document, as with S3Error itself.

def _error(code: str, message: str, extra: Mapping[str, str], headers: dict[str, str] | None = None) -> S3Error:
    """S3Error(code, message, headers=headers, **extra), with `extra` passed on as the elements it holds (a
    key named like one of S3Error's parameters stays an element)."""
    error = S3Error(code, message, headers=headers)
    error.extra.update(extra)
    return error


def access_denied() -> S3Error:
    return S3Error("AccessDenied", "Access Denied")


def public_acls_blocked() -> S3Error:
    return S3Error("AccessDenied", "Access Denied: public ACLs are blocked (block public access)")


def method_not_allowed(headers: dict[str, str] | None = None) -> S3Error:
    return S3Error("MethodNotAllowed", "The specified method is not allowed against this resource.",
                   headers=headers)


def no_such_bucket(**extra: str) -> S3Error:
    return _error("NoSuchBucket", "The specified bucket does not exist", extra)


def no_such_key(headers: dict[str, str] | None = None, **extra: str) -> S3Error:
    return _error("NoSuchKey", "The specified key does not exist.", extra, headers)


def no_such_version(key: str, version_id: str) -> S3Error:
    return S3Error("NoSuchVersion", "The specified version does not exist.", Key=key, VersionId=version_id)


def invalid_version_id(argument_name: str) -> S3Error:
    return S3Error("InvalidArgument", "Invalid version id specified", ArgumentName=argument_name)


def invalid_part_number(**extra: str) -> S3Error:
    return _error("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive",
                  {"ArgumentName": "partNumber", **extra})


def precondition_failed(**extra: str) -> S3Error:
    return _error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold", extra)


def no_lock_configuration() -> S3Error:
    return S3Error("InvalidRequest", "Bucket is missing Object Lock Configuration")


def invalid_access_key_id(**extra: str) -> S3Error:
    return _error("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.", extra)


def insufficient_storage() -> S3Error:
    return S3Error("InsufficientStorage", "There is not enough free space to store this request; delete data "
                                          "or try again later.", 507)
