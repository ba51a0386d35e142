"""The API layers' error boundary: refusals raised by the layers inside it become problem+json answers.

Routes' own errors are rendered by the app's exception handlers (`core.app`); this boundary
answers for what the ASGI layers raise before or around routing (a bad token, a body too large,
a reused idempotency key, a full disk), with the same RFC 9457 body and the request id.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hackboot.core import diskspace
from hackboot.core.asgi import BODY_ADMITTED, has_body, send_problem
from hackboot.core.errors import ApiError, InsufficientStorage, PayloadTooLarge
from hackboot.core.limits import BodyTooLarge
from hackboot.core.storagefull import FULL_DETAIL

log = logging.getLogger("hackboot.api")


def status_for(exc: BaseException) -> int:
    """The status the boundary answers for `exc` (500: it lets the exception through to the server)."""
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, BodyTooLarge):
        return 413
    if isinstance(exc, Exception) and diskspace.is_full_error(exc):
        return 507
    return 500


class ProblemBoundary:
    """Catches `ApiError`, `BodyTooLarge` and storage-full errors from the layers inside it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_started)
        except ApiError as err:
            await send_problem(send, scope, err, close=self._body_unread(scope) and has_body(scope))
        except BodyTooLarge as err:  # raised while a layer read the body itself (idempotency keys)
            await send_problem(send, scope, PayloadTooLarge(str(err.detail)), close=True)
        except Exception as exc:
            # The disk filled between the disk guard's check and the write: a clear 507, and the
            # connection stays usable (an exception reaching the server would close it).
            if not diskspace.is_full_error(exc) or started:
                raise
            log.warning("storage full on %s %s: %s", scope["method"], scope["path"], exc)
            await send_problem(send, scope, InsufficientStorage(FULL_DETAIL), close=self._body_unread(scope))

    @staticmethod
    def _body_unread(scope: Scope) -> bool:
        return not scope.get("state", {}).get(BODY_ADMITTED)
