"""RFC 9457 problem details with stable machine-readable codes.

Services raise `ApiError` subclasses; the API layer renders them as
`application/problem+json`. Drivers raise their own exceptions and never these.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(self, detail: str, *, code: str | None = None, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code:
            self.code = code
        self.errors = errors or []
        self.headers = headers or {}

    def to_problem(self, instance: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"https://hackboot.cloud/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = self.errors
        return body


class BadRequest(ApiError):
    pass


class ValidationFailed(ApiError):
    status = 422
    code = "validation_failed"
    title = "Validation failed"


class Unauthenticated(ApiError):
    status = 401
    code = "unauthenticated"
    title = "Authentication required"

    def __init__(self, detail: str, **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="hackboot"'})
        super().__init__(detail, **kw)


class Forbidden(ApiError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(ApiError):
    status = 409
    code = "conflict"
    title = "Conflict"


class PreconditionFailed(ApiError):
    status = 412
    code = "precondition_failed"
    title = "Precondition failed"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class QuotaExceeded(ApiError):
    status = 403
    code = "quota_exceeded"
    title = "Quota exceeded"


class NoCapacity(ApiError):
    status = 409
    code = "no_capacity"
    title = "No capacity"


class Unavailable(ApiError):
    status = 503
    code = "unavailable"
    title = "Service unavailable"


class InsufficientStorage(ApiError):
    status = 507
    code = "insufficient_storage"
    title = "Insufficient storage"
