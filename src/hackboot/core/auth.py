"""Who is calling: bearer tokens → a Principal with a project and a role; the routes' auth dependencies.

A token is scoped to one project with a role (viewer < member < admin). A
superuser's login token may be unscoped and choose a project per request with the
`X-Hackboot-Project` header. Another project's resource is always a 404.

core knows no token table: the identity service registers the resolver that turns a token into
a Principal (`register_token_resolver`, a `TokenResolver`); this module caches its answers and
gives routes the `Viewer`/`Member`/`Admin`/`Superuser` dependencies.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol

import anyio
from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPBearer

from hackboot.core import errors
from hackboot.core.config import get_settings
from hackboot.core.crypto import hash_token
from hackboot.core.db import utcnow

ROLE_RANK = {"viewer": 0, "member": 1, "admin": 2}
# Verified tokens are cached briefly: authentication then costs no query on hot paths.
# A revocation (or membership change) on this host touches the epoch file, which every API
# worker process checks with one stat() per request, so it takes effect at once here;
# control planes on other hosts see it within CACHE_TTL_S.
CACHE_TTL_S = 5.0
_cache: dict[tuple[str, str | None], tuple[float, Principal, dt.datetime | None]] = {}
_cache_lock = threading.Lock()
PROJECT_HEADER = "X-Hackboot-Project"


@dataclass(frozen=True)
class Principal:
    user_id: str
    username: str
    token_id: str
    role: str
    is_superuser: bool
    project_id: str | None

    def has_role(self, role: str) -> bool:
        return self.is_superuser or ROLE_RANK[self.role] >= ROLE_RANK[role]

    @property
    def project(self) -> str:
        """The project the request acts in; a clear 400 when a superuser has not chosen one."""
        if self.project_id is None:
            raise errors.BadRequest(
                f"This token is not scoped to a project: send the {PROJECT_HEADER} header or use a project token",
                code="project_required")
        return self.project_id


class TokenResolver(Protocol):
    def __call__(self, token: str, requested_project: str | None, /) -> tuple[Principal, dt.datetime | None]:
        """The principal of a bearer token (acting in `requested_project`, the header's project, when the
        token lets it choose) and when the token expires (None: never).

        Raises `errors.Unauthenticated` for an unknown, revoked or expired token, `Forbidden`/`NotFound`
        for a project it may not choose. Called from a worker thread; may query the database.
        """
        ...


_resolver: list[TokenResolver] = []


def register_token_resolver(resolver: TokenResolver) -> None:
    """Install the function that resolves bearer tokens (the identity service's); replaces any earlier one."""
    with _cache_lock:
        _resolver[:] = [resolver]
        _cache.clear()


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise errors.Unauthenticated("Missing Authorization header: send 'Authorization: Bearer <token>'")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthenticated("Authorization header must be 'Bearer <token>'", code="bad_auth_scheme")
    return token.strip()


_epoch = {"seen": -1}


def _epoch_file() -> Path:
    return get_settings().state_dir / "auth-epoch"


def forget_cached_tokens() -> None:
    """Called after tokens, users or memberships change: every process drops its cache."""
    with _cache_lock:
        _cache.clear()
    path = _epoch_file()
    path.touch()
    os.utime(path, ns=(time.time_ns(), time.time_ns()))


def auth_epoch() -> int:
    """Changes whenever credentials change anywhere on this host (other caches key on it too)."""
    try:
        return os.stat(_epoch_file()).st_mtime_ns
    except FileNotFoundError:
        return 0


def _check_epoch() -> None:
    mtime = auth_epoch()
    if mtime != _epoch["seen"]:
        with _cache_lock:
            _cache.clear()
        _epoch["seen"] = mtime


def _cached(key: tuple[str, str | None]) -> Principal | None:
    _check_epoch()
    hit = _cache.get(key)
    if hit is not None and hit[0] > time.monotonic() and (hit[2] is None or hit[2] > utcnow()):
        return hit[1]
    return None


def authenticate_token(token: str, requested_project: str | None = None) -> Principal:
    key = (hash_token(token), requested_project)
    principal = _cached(key)
    if principal is not None:
        return principal
    principal, expires_at = _authenticate(token, requested_project)
    with _cache_lock:
        if len(_cache) > 10_000:
            _cache.clear()
        _cache[key] = (time.monotonic() + CACHE_TTL_S, principal, expires_at)
    return principal


def _authenticate(token: str, requested_project: str | None) -> tuple[Principal, dt.datetime | None]:
    if not _resolver:
        raise RuntimeError("no token resolver is registered: the identity service (hackboot.identity) is not loaded")
    return _resolver[0](token, requested_project)


# Declares the bearer scheme in the OpenAPI document (securitySchemes + each operation's `security`);
# the token itself is read by `_bearer`, which words its own problem+json errors.
_bearer_scheme = HTTPBearer(auto_error=False, scheme_name="bearer", description=(
    "An API token: `Authorization: Bearer <token>` (POST /v1/auth/login or POST /v1/tokens)"))
ProjectHeader = Annotated[str | None, Header(
    alias=PROJECT_HEADER,
    description=("The project this request acts in: required when the token is not scoped to a project "
                 "(superuser login tokens), otherwise a 400 `project_required`; ignored for project tokens"))]


async def authenticated(request: Request, _scheme: Annotated[object, Security(_bearer_scheme)],
                        project: ProjectHeader = None) -> Principal:
    # async, so a cache hit costs no thread hop; a miss queries the database in a worker thread.
    token = _bearer(request)
    principal = _cached((hash_token(token), project))
    if principal is None:
        principal = await anyio.to_thread.run_sync(authenticate_token, token, project)
    request.state.principal = principal
    return principal


def _need(role: str):  # type: ignore[no-untyped-def]
    async def dependency(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if not principal.has_role(role):
            raise errors.Forbidden(f"This action needs the '{role}' role; the token has '{principal.role}'")
        return principal

    return dependency


async def _superuser(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
    if not principal.is_superuser:
        raise errors.Forbidden("Only cloud administrators (superusers) may do this")
    return principal


Viewer = Annotated[Principal, Depends(_need("viewer"))]
Member = Annotated[Principal, Depends(_need("member"))]
Admin = Annotated[Principal, Depends(_need("admin"))]
Superuser = Annotated[Principal, Depends(_superuser)]
