"""HTTP for identity: login, projects, members, users, tokens, quotas."""

from __future__ import annotations

import datetime as dt
from enum import Enum
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import Field

from hackboot.core import quotas
from hackboot.core.auth import Member, Principal, Superuser, Viewer
from hackboot.core.db import session_scope
from hackboot.core.pagination import Page, Pagination, paginate
from hackboot.core.schemas import Body, Description, Name, Out, ResourceId
from hackboot.identity import service
from hackboot.identity.models import ApiToken, Project, User

router = APIRouter(prefix="/v1", tags=["identity"])
Role = Literal["viewer", "member", "admin"]
OrgRole = Literal["member", "admin", "owner"]
QuotaResource = Enum("QuotaResource", {k: k for k in quotas.DEFAULT_QUOTAS}, type=str)  # type: ignore[misc]


class LoginIn(Body):
    username: Name
    password: str = Field(min_length=1, max_length=256)
    project_id: ResourceId | None = None


class TokenOut(Out):
    id: str
    user_id: str
    project_id: str | None
    role: str
    name: str
    prefix: str
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None
    created_at: dt.datetime


class IssuedTokenOut(TokenOut):
    token: str = Field(description="The secret: shown once, store it now")


class TokenIn(Body):
    project_id: ResourceId | None = Field(None, description="Defaults to the caller's project")
    role: Role = "member"
    name: Name = "api"
    user_id: ResourceId | None = Field(None, description="Another member of the project (project admins only)")
    expires_in_hours: int | None = Field(None, ge=1, le=24 * 366)


class ProjectIn(Body):
    name: Name
    description: Description = ""
    org_id: ResourceId | None = None


class ProjectOut(Out):
    id: str
    org_id: str
    name: str
    description: str
    created_at: dt.datetime


class MemberIn(Body):
    role: Role


class MemberOut(Out):
    project_id: str
    user_id: str
    role: str
    created_at: dt.datetime


class UserIn(Body):
    username: Name
    password: str | None = Field(None, min_length=8, max_length=256)
    email: str = Field("", max_length=254)
    is_superuser: bool = False
    org_role: OrgRole = Field("member", description="Role in the organisation: owners and admins create "
                                                    "projects and users")


class UserPatch(Body):
    org_role: OrgRole


class UserOut(Out):
    id: str
    org_id: str
    username: str
    email: str
    is_superuser: bool
    org_role: str
    disabled: bool
    created_at: dt.datetime


class PasswordIn(Body):
    old_password: str | None = Field(None, max_length=256)
    new_password: str = Field(min_length=8, max_length=256)


class WhoAmI(Body):
    user_id: str
    username: str
    token_id: str
    role: str
    is_superuser: bool
    project_id: str | None


class QuotaOut(Out):
    resource: str
    limit: int
    used: int


class QuotaIn(Body):
    # 2**53 - 1: the largest integer every JSON parser reads exactly (RFC 7493).
    limit: int = Field(ge=0, le=2**53 - 1)


def _issued(issued: service.IssuedToken) -> IssuedTokenOut:
    return IssuedTokenOut(**TokenOut.model_validate(issued.token).model_dump(), token=issued.secret)


THROTTLED: dict[int | str, dict[str, object]] = {429: {
    "description": "Too many failed password checks for this username or source address",
    "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}}


@router.post("/auth/login", status_code=201, response_model=IssuedTokenOut, tags=["auth"], responses=THROTTLED)
def login(body: LoginIn, request: Request) -> IssuedTokenOut:
    """Exchange a username and password for a short-lived token (failed attempts are throttled)."""
    source = request.client.host if request.client else "unknown"
    return _issued(service.login(body.username, body.password, body.project_id, source))


@router.get("/auth/whoami", response_model=WhoAmI, tags=["auth"])
def whoami(p: Viewer) -> WhoAmI:
    return WhoAmI(**p.__dict__)


@router.post("/tokens", status_code=201, response_model=IssuedTokenOut)
def create_token(body: TokenIn, p: Member) -> IssuedTokenOut:
    project_id = body.project_id or p.project
    return _issued(service.create_token(p, project_id=project_id, role=body.role, name=body.name,
                                        user_id=body.user_id, expires_in_hours=body.expires_in_hours))


@router.get("/tokens", response_model=Page[TokenOut])
def list_tokens(p: Viewer, page: Pagination,
                project_id: Annotated[ResourceId | None, Query()] = None) -> Page[TokenOut]:
    with session_scope(write=False) as s:
        tokens = service.list_tokens(s, p, project_id)
    after = page.after_id()
    tokens = [t for t in tokens if after is None or t.id > after]
    items = tokens[: page.limit]
    nxt = None
    if len(tokens) > page.limit:
        from hackboot.core.pagination import encode_cursor
        nxt = encode_cursor(items[-1].id)
    return Page[TokenOut](items=[TokenOut.model_validate(t) for t in items], next_cursor=nxt)


@router.delete("/tokens/{token_id}", response_model=TokenOut)
def revoke_token(token_id: str, p: Viewer) -> TokenOut:
    return TokenOut.model_validate(service.revoke_token(p, token_id))


@router.post("/projects", status_code=201, response_model=ProjectOut)
def create_project(body: ProjectIn, p: Member) -> ProjectOut:
    """Create a project (organisation owners and admins, with an admin token); you become its admin."""
    return ProjectOut.model_validate(service.create_project(p, body.name, body.description, body.org_id))


@router.get("/projects", response_model=Page[ProjectOut])
def list_projects(p: Viewer, page: Pagination, name: Annotated[Name | None, Query()] = None) -> Page[ProjectOut]:
    with session_scope(write=False) as s:
        stmt = service.project_query(p)
        if name:
            stmt = stmt.where(Project.name == name)
        rows, nxt = paginate(s, stmt, Project.id, page)
        return Page[ProjectOut](items=[ProjectOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/projects/{project_id}", response_model=ProjectOut)
def get_project(project_id: str, p: Viewer) -> ProjectOut:
    with session_scope(write=False) as s:
        return ProjectOut.model_validate(service.get_project(s, p, project_id))


@router.get("/projects/{project_id}/members", response_model=list[MemberOut])
def list_members(project_id: str, p: Viewer) -> list[MemberOut]:
    with session_scope(write=False) as s:
        return [MemberOut.model_validate(m) for m in service.members(s, p, project_id)]


@router.put("/projects/{project_id}/members/{user_id}", response_model=MemberOut)
def set_member(project_id: str, user_id: str, body: MemberIn, p: Member) -> MemberOut:
    return MemberOut.model_validate(service.add_member(p, project_id, user_id, body.role))


@router.delete("/projects/{project_id}/members/{user_id}", status_code=204)
def remove_member(project_id: str, user_id: str, p: Member) -> Response:
    service.remove_member(p, project_id, user_id)
    return Response(status_code=204)


@router.get("/projects/{project_id}/quotas", response_model=list[QuotaOut])
def get_quotas(project_id: str, p: Viewer) -> list[QuotaOut]:
    with session_scope(write=False) as s:
        service.get_project(s, p, project_id)
        return [QuotaOut.model_validate(q) for q in quotas.usage(s, project_id)]


@router.put("/projects/{project_id}/quotas/{resource}", response_model=QuotaOut)
def set_quota(project_id: str, resource: QuotaResource, body: QuotaIn, p: Superuser) -> QuotaOut:
    with session_scope() as s:
        service.get_project(s, p, project_id)
        return QuotaOut.model_validate(quotas.set_limit(s, project_id, resource.value, body.limit))


@router.post("/users", status_code=201, response_model=UserOut)
def create_user(body: UserIn, p: Member) -> UserOut:
    """Create a user in your organisation (organisation owners and admins, with an admin token)."""
    return UserOut.model_validate(service.create_user(p, body.username, body.password, body.email,
                                                      body.is_superuser, body.org_role))


@router.get("/users", response_model=Page[UserOut])
def list_users(p: Viewer, page: Pagination,
               username: Annotated[Name | None, Query()] = None) -> Page[UserOut]:
    with session_scope(write=False) as s:
        stmt = service.user_query(s, p)
        if username:
            stmt = stmt.where(User.username == username)
        rows, nxt = paginate(s, stmt, User.id, page)
        return Page[UserOut](items=[UserOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/users/{user_id}", response_model=UserOut)
def get_user(user_id: str, p: Viewer) -> UserOut:
    with session_scope(write=False) as s:
        return UserOut.model_validate(service.get_user(s, p, user_id))


@router.patch("/users/{user_id}", response_model=UserOut)
def update_user(user_id: str, body: UserPatch, p: Member) -> UserOut:
    """Change a user's organisation role (organisation owners and admins, with an admin token)."""
    return UserOut.model_validate(service.set_org_role(p, user_id, body.org_role))


@router.post("/users/{user_id}/password", status_code=204, responses=THROTTLED)
def change_password(user_id: str, body: PasswordIn, p: Viewer, request: Request) -> Response:
    """Change your password (the current one is required) or, for superusers, anyone's; the user's
    other login sessions are revoked."""
    source = request.client.host if request.client else "unknown"
    service.change_password(p, user_id, body.old_password, body.new_password, source)
    return Response(status_code=204)


__all__ = ["ApiToken", "Principal", "router"]
