"""Who a request is: bearer tokens → `Principal`s (registered with `hackboot.core.auth`), and project roles.

Authorisation is always against the token, never the user alone: `project_role()` gives the role
a request holds in a project = min(token role, the user's current membership role), and only in
the token's own project (superusers excepted). A token of a demoted member carries the lower role;
one of a removed member stops working.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from hackboot.core import auth, errors
from hackboot.core.auth import PROJECT_HEADER, ROLE_RANK, Principal
from hackboot.core.crypto import hash_token
from hackboot.core.db import session_scope, utcnow
from hackboot.identity.models import ApiToken, Membership, Project, User

_LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


def project_role(s: Session, p: Principal, project_id: str, need: str = "viewer") -> str:
    """The role this request holds in `project_id`: min(token role, current membership role).

    A project other than the token's own does not exist for the request (404), whatever the
    user's other memberships; a weaker role than `need` is a 403. Superusers act as admins in
    every existing project.
    """
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


def resolve_token(token: str, requested_project: str | None) -> tuple[Principal, dt.datetime | None]:
    """The principal of a bearer token and when the token expires (the `core.auth.TokenResolver`)."""
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


auth.register_token_resolver(resolve_token)
