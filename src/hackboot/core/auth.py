"""Who is calling: bearer tokens → a Principal with a project and a role.

A token is scoped to one project with a role (viewer < member < admin). A
superuser's login token may be unscoped and choose a project per request with the
`X-Hackboot-Project` header. Another project's resource is always a 404.

Authorisation is always against the token, never the user alone: `project_role()` gives
the role a request holds in a project = min(token role, the user's current membership
role), and only in the token's own project (superusers excepted).
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPBearer
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from hackboot.core import errors
from hackboot.core.config import get_settings
from hackboot.core.crypto import hash_token
from hackboot.core.db import session_scope, utcnow

ROLE_RANK = {"viewer": 0, "member": 1, "admin": 2}
# Verified tokens are cached briefly: authentication then costs no query on hot paths.
# A revocation (or membership change) on this host touches the epoch file, which every API
# worker process checks with one stat() per request, so it takes effect at once here;
# control planes on other hosts see it within CACHE_TTL_S.
CACHE_TTL_S = 5.0
_cache: dict[tuple[str, str | None], tuple[float, Principal, dt.datetime | None]] = {}
_cache_lock = threading.Lock()
PROJECT_HEADER = "X-Hackboot-Project"
_LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


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


def project_role(s: Session, p: Principal, project_id: str, need: str = "viewer") -> str:
    """The role this request holds in `project_id`: min(token role, current membership role).

    A project other than the token's own does not exist for the request (404), whatever the
    user's other memberships; a weaker role than `need` is a 403. Superusers act as admins in
    every existing project.
    """
    from hackboot.identity.models import Membership, Project

    not_found = errors.NotFound(f"Project {project_id} not found")
    if p.is_superuser:
        if s.get(Project, project_id) is None:
            raise not_found
        return "admin"
    if p.project_id is None or p.project_id != project_id:
        raise not_found
    member_role = s.scalar(select(Membership.role).where(Membership.project_id == project_id,
                                                        Membership.user_id == p.user_id))
    if member_role is None:
        raise not_found
    role = min(p.role, member_role, key=ROLE_RANK.__getitem__)
    if ROLE_RANK[role] < ROLE_RANK[need]:
        raise errors.Forbidden(f"This action needs the '{need}' role in project {project_id}; "
                               f"this token has '{role}'")
    return role


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
    from hackboot.identity.models import ApiToken, Membership, Project, User

    now = utcnow()
    with session_scope(write=False) as s:
        row = s.execute(
            select(ApiToken, User).join(User, User.id == ApiToken.user_id).where(
                ApiToken.token_hash == hash_token(token))
        ).first()
        if row is None:
            raise errors.Unauthenticated("Unknown or deleted token", code="invalid_token")
        tok, user = row
        if tok.revoked_at is not None:
            raise errors.Unauthenticated("This token was revoked", code="token_revoked")
        if tok.expires_at is not None and tok.expires_at <= now:
            raise errors.Unauthenticated("This token has expired", code="token_expired")
        if user.disabled:
            raise errors.Unauthenticated("This user is disabled", code="user_disabled")
        project_id = tok.project_id
        role = tok.role
        if project_id is None and requested_project:
            if not user.is_superuser:
                raise errors.Forbidden("Only superusers may choose a project per request")
            if s.get(Project, requested_project) is None:
                # Not an empty project: rows created "in" it would belong to no project at all.
                raise errors.NotFound(f"Project {requested_project} not found (header {PROJECT_HEADER})")
            project_id = requested_project
        elif project_id is not None and not user.is_superuser:
            # A demoted or removed member loses the rights their older tokens carried.
            member_role = s.scalar(select(Membership.role).where(
                Membership.project_id == project_id, Membership.user_id == user.id))
            if member_role is None:
                raise errors.Unauthenticated("The token's user is no longer a member of its project",
                                             code="membership_revoked")
            if ROLE_RANK[member_role] < ROLE_RANK[role]:
                role = member_role
        stale = tok.last_used_at is None or now - tok.last_used_at > _LAST_USED_RESOLUTION
        principal = Principal(user_id=user.id, username=user.username, token_id=tok.id, role=role,
                              is_superuser=user.is_superuser, project_id=project_id)
        expires_at = tok.expires_at
    if stale:  # bounded write rate: at most once a minute per token
        with session_scope() as s:
            s.execute(update(ApiToken).where(ApiToken.id == principal.token_id).values(last_used_at=now))
    return principal, expires_at


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
