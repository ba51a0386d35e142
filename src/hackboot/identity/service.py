"""Identity rules: organisations, projects, users, memberships, tokens, bootstrap admin."""

from __future__ import annotations

import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hackboot.core import errors, quotas
from hackboot.core.auth import ROLE_RANK, Principal, forget_cached_tokens
from hackboot.core.config import get_settings
from hackboot.core.crypto import hash_password, hash_token, new_secret, verify_password
from hackboot.core.db import session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.events.service import emit
from hackboot.identity import throttle
from hackboot.identity.models import ORG_ROLES, ApiToken, Membership, Organisation, Project, User
from hackboot.identity.principals import project_role

TOKEN_PREFIX = "hbk_"
ADMIN_USERNAME = "admin"
DEFAULT_ORG = "default"
ORG_RANK = {role: rank for rank, role in enumerate(ORG_ROLES)}


@dataclass
class IssuedToken:
    token: ApiToken
    secret: str  # shown once, never stored


# --- bootstrap -------------------------------------------------------------------------------------

def bootstrap(state_dir: Path) -> str | None:
    """Create the default organisation, project and admin once. Returns the new password, or None.

    The password is stored hashed; its clear text is written once to a 0600 file in the state
    dir (as Jenkins and Argo CD do) so `make up` can print it again until the admin changes it.
    """
    with session_scope() as s:
        if s.scalar(select(User).where(User.username == ADMIN_USERNAME)) is not None:
            return None
        org = Organisation(id=new_id("org"), name=DEFAULT_ORG)
        s.add(org)
        s.flush()
        password = secrets.token_urlsafe(18)
        admin = User(id=new_id("usr"), org_id=org.id, username=ADMIN_USERNAME, password_hash=hash_password(password),
                     is_superuser=True, org_role="owner")
        project = Project(id=new_id("prj"), org_id=org.id, name="default", description="Created at bootstrap")
        s.add_all([admin, project])
        s.flush()
        s.add(Membership(project_id=project.id, user_id=admin.id, role="admin"))
        quotas.init_project_quotas(s, project.id)
        emit(s, "project.created", resource_type="project", resource_id=project.id, project_id=project.id)
    path = state_dir / "initial-admin-password"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


# --- tokens ----------------------------------------------------------------------------------------

def _issue(s: Session, *, user: User, project_id: str | None, role: str, name: str, ttl: dt.timedelta | None,
           created_by: str) -> IssuedToken:
    secret = new_secret(TOKEN_PREFIX)
    tok = ApiToken(id=new_id("tok"), user_id=user.id, project_id=project_id, role=role, name=name,
                   token_hash=hash_token(secret), prefix=secret[:10],
                   expires_at=(utcnow() + ttl) if ttl else None, created_by=created_by)
    s.add(tok)
    s.flush()
    return IssuedToken(token=tok, secret=secret)


# Unknown, disabled or password-less users are checked against this hash, so that every failed
# login costs one scrypt: the answer time does not tell which usernames exist.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(18))


def login(username: str, password: str, project_id: str | None, source: str = "unknown") -> IssuedToken:
    """Exchange a password for a short-lived token (project-scoped unless a superuser asks for none).

    Throttled per username and per source address (`throttle`); the password is checked outside
    any write transaction (scrypt is slow on purpose).
    """
    throttle.reserve(username, source)
    with session_scope(write=False) as s:
        user = s.scalar(select(User).where(User.username == username))
        stored = user.password_hash if user is not None and not user.disabled else None
    valid = verify_password(password, stored or _DUMMY_HASH) and stored is not None
    if not valid or user is None:
        # Same message whether the user exists or not: no account enumeration.
        raise errors.Unauthenticated("Wrong username or password", code="invalid_credentials")
    throttle.succeeded(username, source)
    with session_scope() as s:
        user = s.get(User, user.id)
        if user is None or user.disabled:
            raise errors.Unauthenticated("Wrong username or password", code="invalid_credentials")
        role = "admin"
        if project_id is not None:
            if not user.is_superuser:
                membership = s.get(Membership, (project_id, user.id))
                if membership is None:
                    raise errors.NotFound(f"Project {project_id} not found")
                role = membership.role
            elif s.get(Project, project_id) is None:
                raise errors.NotFound(f"Project {project_id} not found")
        elif not user.is_superuser:
            memberships = list(s.scalars(select(Membership).where(Membership.user_id == user.id)))
            if len(memberships) != 1:
                raise errors.BadRequest("You belong to several projects (or none): pass project_id",
                                        code="project_required")
            project_id, role = memberships[0].project_id, memberships[0].role
        ttl = dt.timedelta(hours=get_settings().login_token_ttl_hours)
        issued = _issue(s, user=user, project_id=project_id, role=role, name="login", ttl=ttl, created_by=user.id)
        emit(s, "token.created", resource_type="token", resource_id=issued.token.id, project_id=project_id,
             actor=user.id)
        return issued


def create_token(p: Principal, *, project_id: str, role: str, name: str, user_id: str | None,
                 expires_in_hours: int | None) -> IssuedToken:
    """A token for yourself, or (project admins) for another member, in the calling token's project.

    The request's rights are the token's, not the user's: a token can only mint tokens of its own
    project with at most its own effective role (min of token role and current membership).
    """
    with session_scope() as s:
        my_role = project_role(s, p, project_id)
        target_id = user_id or p.user_id
        user = s.get(User, target_id)
        if user is None:
            raise errors.NotFound(f"User {target_id} not found")
        if not p.is_superuser:
            if target_id != p.user_id:
                if my_role != "admin":
                    raise errors.Forbidden("Only project admins may create tokens for other users")
                if user.is_superuser:
                    # Any token of a superuser carries cloud-wide powers: never minted by a tenant.
                    raise errors.Forbidden("Only superusers may create tokens for superusers")
            if ROLE_RANK[role] > ROLE_RANK[my_role]:
                raise errors.Forbidden(f"You cannot grant '{role}': this token's role in the project is '{my_role}'")
        target_role = "admin" if user.is_superuser else _role_in(s, target_id, project_id)
        if target_role is None:
            raise errors.Conflict(f"User {user.username} is not a member of project {project_id}: add them first",
                                  code="not_a_member")
        if ROLE_RANK[role] > ROLE_RANK[target_role]:
            raise errors.Conflict(f"User {user.username} is only '{target_role}' in this project",
                                  code="role_too_high")
        hours = expires_in_hours if expires_in_hours is not None else get_settings().token_default_ttl_hours
        issued = _issue(s, user=user, project_id=project_id, role=role, name=name,
                        ttl=dt.timedelta(hours=hours), created_by=p.user_id)
        emit(s, "token.created", resource_type="token", resource_id=issued.token.id, project_id=project_id,
             actor=p.user_id, data={"user_id": user.id, "role": role})
        return issued


def list_tokens(s: Session, p: Principal, project_id: str | None) -> list[ApiToken]:
    """Superusers: every token (of a project). Others: their own tokens in the token's project, or,
    for project admins asking for `project_id`, the project's (superusers' tokens excepted)."""
    stmt = select(ApiToken).where(ApiToken.revoked_at.is_(None))
    if p.is_superuser:
        if project_id:
            stmt = stmt.where(ApiToken.project_id == project_id)
        return list(s.scalars(stmt.order_by(ApiToken.id)))
    project = project_id or p.project
    role = project_role(s, p, project)
    stmt = stmt.where(ApiToken.project_id == project)
    if project_id and role == "admin":
        stmt = stmt.join(User, User.id == ApiToken.user_id).where(User.is_superuser.is_(False))
    else:
        stmt = stmt.where(ApiToken.user_id == p.user_id)
    return list(s.scalars(stmt.order_by(ApiToken.id)))


def revoke_token(p: Principal, token_id: str) -> ApiToken:
    """Your own tokens of the token's project; a project admin token also revokes the project's
    other tokens (not superusers'). Anything else is a 404."""
    with session_scope() as s:
        tok = s.get(ApiToken, token_id)
        not_found = errors.NotFound(f"Token {token_id} not found")
        if tok is None:
            raise not_found
        if not p.is_superuser:
            if tok.project_id is None or tok.project_id != p.project_id:
                raise not_found
            role = project_role(s, p, tok.project_id)
            if tok.user_id != p.user_id:
                owner = s.get(User, tok.user_id)
                if role != "admin" or owner is None or owner.is_superuser:
                    raise not_found
        if tok.revoked_at is None:
            tok.revoked_at = utcnow()
            emit(s, "token.revoked", resource_type="token", resource_id=tok.id, project_id=tok.project_id,
                 actor=p.user_id)
    forget_cached_tokens()  # after commit, so no request re-caches the old state
    return tok


# --- projects and members --------------------------------------------------------------------------

def _role_in(s: Session, user_id: str, project_id: str) -> str | None:
    return s.scalar(select(Membership.role).where(Membership.project_id == project_id,
                                                  Membership.user_id == user_id))


def _visible_project(s: Session, p: Principal, project_id: str, need: str = "viewer") -> Project:
    project_role(s, p, project_id, need)  # the token's project only, with its effective role
    project = s.get(Project, project_id)
    assert project is not None
    return project


def get_project(s: Session, p: Principal, project_id: str) -> Project:
    return _visible_project(s, p, project_id)


def _org_admin(s: Session, p: Principal) -> User:
    """The caller, if this request may administer their organisation: an organisation owner or admin
    calling with an admin token (org roles never widen what a narrower token may do)."""
    me = s.get(User, p.user_id)
    assert me is not None
    if p.is_superuser:
        return me
    if ORG_RANK.get(me.org_role, 0) < ORG_RANK["admin"]:
        raise errors.Forbidden("Only organisation owners and admins may do this", code="org_admin_required")
    if not p.has_role("admin"):
        raise errors.Forbidden(f"Organisation administration needs an admin token; this token has '{p.role}'")
    return me


def create_project(p: Principal, name: str, description: str, org_id: str | None) -> Project:
    with session_scope() as s:
        me = _org_admin(s, p)
        org = org_id or me.org_id
        if org != me.org_id and not p.is_superuser:
            raise errors.NotFound(f"Organisation {org} not found")
        # Row lock on the organisation: concurrent creations are counted one after the other.
        if s.scalar(select(Organisation).where(Organisation.id == org).with_for_update()) is None:
            raise errors.NotFound(f"Organisation {org} not found")
        if not p.is_superuser:
            limit = get_settings().org_max_projects
            count = s.scalar(select(func.count()).select_from(Project).where(Project.org_id == org)) or 0
            if count >= limit:
                raise errors.QuotaExceeded(
                    f"Quota exceeded for projects: the organisation holds {count} of {limit}")
        if s.scalar(select(Project).where(Project.org_id == org, Project.name == name)) is not None:
            raise errors.Conflict(f"A project named '{name}' already exists in this organisation",
                                  code="already_exists")
        project = Project(id=new_id("prj"), org_id=org, name=name, description=description)
        s.add(project)
        s.flush()
        s.add(Membership(project_id=project.id, user_id=p.user_id, role="admin"))
        quotas.init_project_quotas(s, project.id)
        emit(s, "project.created", resource_type="project", resource_id=project.id, project_id=project.id,
             actor=p.user_id)
        return project


def project_query(p: Principal):  # type: ignore[no-untyped-def]
    stmt = select(Project)
    if not p.is_superuser:
        # The token's project only (authentication already checked the membership).
        stmt = stmt.where(Project.id == p.project)
    return stmt


def add_member(p: Principal, project_id: str, user_id: str, role: str) -> Membership:
    with session_scope() as s:
        project = _visible_project(s, p, project_id, need="admin")
        user = s.get(User, user_id)
        if user is None or user.org_id != project.org_id:  # members come from the project's organisation
            raise errors.NotFound(f"User {user_id} not found")
        m = s.get(Membership, (project_id, user_id))
        if m is None:
            m = Membership(project_id=project_id, user_id=user_id, role=role)
            s.add(m)
        else:
            m.role = role
        emit(s, "project.member_set", resource_type="project", resource_id=project_id, project_id=project_id,
             actor=p.user_id, data={"user_id": user_id, "role": role})
        s.flush()
    forget_cached_tokens()
    return m


def remove_member(p: Principal, project_id: str, user_id: str) -> None:
    with session_scope() as s:
        _visible_project(s, p, project_id, need="admin")
        m = s.get(Membership, (project_id, user_id))
        if m is None:
            raise errors.NotFound(f"User {user_id} is not a member of {project_id}")
        s.delete(m)
        emit(s, "project.member_removed", resource_type="project", resource_id=project_id,
             project_id=project_id, actor=p.user_id, data={"user_id": user_id})
    forget_cached_tokens()


def members(s: Session, p: Principal, project_id: str) -> list[Membership]:
    _visible_project(s, p, project_id)
    return list(s.scalars(select(Membership).where(Membership.project_id == project_id)
                          .order_by(Membership.user_id)))


# --- users -----------------------------------------------------------------------------------------

def create_user(p: Principal, username: str, password: str | None, email: str, superuser: bool,
                org_role: str = "member") -> User:
    """Organisation owners/admins (and superusers) create users in their own organisation."""
    with session_scope() as s:
        me = _org_admin(s, p)
        if superuser and not p.is_superuser:
            raise errors.Forbidden("Only superusers may create superusers")
        if not p.is_superuser and ORG_RANK[org_role] > ORG_RANK[me.org_role]:
            raise errors.Forbidden(f"You cannot grant the organisation role '{org_role}': yours is '{me.org_role}'")
        user = User(id=new_id("usr"), org_id=me.org_id, username=username, email=email,
                    password_hash=hash_password(password) if password else None, is_superuser=superuser,
                    org_role=org_role)
        s.add(user)
        try:
            s.flush()
        except IntegrityError:
            raise errors.Conflict(f"Username '{username}' is taken", code="already_exists") from None
        emit(s, "user.created", resource_type="user", resource_id=user.id, project_id=None, actor=p.user_id,
             data={"org_role": org_role})
        return user


def user_query(s: Session, p: Principal) -> Select[User]:
    """Superusers: everyone. Organisation owners/admins: their organisation. Others: themselves and
    the members of the token's project."""
    me = s.get(User, p.user_id)
    assert me is not None
    stmt = select(User)
    if p.is_superuser:
        return stmt
    stmt = stmt.where(User.org_id == me.org_id)
    if ORG_RANK.get(me.org_role, 0) < ORG_RANK["admin"]:
        colleagues = select(Membership.user_id).where(Membership.project_id == p.project)
        stmt = stmt.where(or_(User.id == me.id, User.id.in_(colleagues)))
    return stmt


def get_user(s: Session, p: Principal, user_id: str) -> User:
    user: User | None = s.scalar(user_query(s, p).where(User.id == user_id))
    if user is None:
        raise errors.NotFound(f"User {user_id} not found")
    return user


def set_org_role(p: Principal, user_id: str, org_role: str) -> User:
    """Owners manage every role of their organisation; admins grant or remove 'admin' below owners."""
    with session_scope() as s:
        me = _org_admin(s, p)
        user = s.get(User, user_id)
        if user is None or (not p.is_superuser and user.org_id != me.org_id):
            raise errors.NotFound(f"User {user_id} not found")
        if not p.is_superuser:
            if user.is_superuser:
                raise errors.Forbidden("Only superusers may change a superuser")
            mine = ORG_RANK[me.org_role]
            if ORG_RANK[org_role] > mine or ORG_RANK.get(user.org_role, 0) > mine:
                raise errors.Forbidden(f"Your organisation role '{me.org_role}' cannot change "
                                       f"'{user.org_role}' to '{org_role}'")
        if user.org_role == "owner" and org_role != "owner":
            owners = s.scalar(select(func.count()).select_from(User).where(
                User.org_id == user.org_id, User.org_role == "owner", User.id != user.id)) or 0
            if owners == 0:
                raise errors.Conflict("An organisation keeps at least one owner", code="last_owner")
        if user.org_role != org_role:
            user.org_role = org_role
            emit(s, "user.org_role_changed", resource_type="user", resource_id=user.id, project_id=None,
                 actor=p.user_id, data={"org_role": org_role})
        s.flush()
        return user


def change_password(p: Principal, user_id: str, old_password: str | None, new_password: str,
                    source: str = "unknown") -> None:
    """Your own password (the current one is checked, throttled like logins), or anyone's for
    superusers. The user's other login sessions end: a password changed after a leak locks the
    intruder out. API tokens, made on purpose, stay until revoked."""
    with session_scope(write=False) as s:
        user = get_user(s, p, user_id)
        if user.id != p.user_id and not p.is_superuser:
            raise errors.NotFound(f"User {user_id} not found")
        username = user.username
        stored = user.password_hash if user.id == p.user_id else None
    if stored:
        throttle.reserve(username, source)
        if not verify_password(old_password or "", stored):
            raise errors.Forbidden("The current password is wrong", code="wrong_password")
        throttle.succeeded(username, source)
    new_hash = hash_password(new_password)  # outside the write transaction: scrypt is slow on purpose
    with session_scope() as s:
        target = s.get(User, user_id)
        if target is None:
            raise errors.NotFound(f"User {user_id} not found")
        target.password_hash = new_hash
        s.execute(update(ApiToken).where(ApiToken.user_id == target.id, ApiToken.name == "login",
                                         ApiToken.revoked_at.is_(None), ApiToken.id != p.token_id)
                  .values(revoked_at=utcnow()))
        emit(s, "user.password_changed", resource_type="user", resource_id=target.id, project_id=None,
             actor=p.user_id)
    forget_cached_tokens()
