"""Grantees of an ACL being set: canonical IDs must name existing projects, email addresses resolve to a
project only within the bucket owner's organisation (no tenant can probe another organisation's users)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from hackboot.core.config import get_settings, reset_settings_cache
from hackboot.core.db import dispose_engine, session_scope
from hackboot.core.migrate import upgrade
from hackboot.identity.models import Membership, Organisation, Project, User
from hackboot.objectstore import engine
from hackboot.objectstore.s3errors import S3Error


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("HACKBOOT_DATABASE_URL", raising=False)
    reset_settings_cache()
    dispose_engine()
    upgrade(get_settings().effective_database_url)
    with session_scope() as s:
        for org, project, user, email in (("org-a", "prj-a", "usr-a", "ada@example.com"),
                                          ("org-b", "prj-b", "usr-b", "bob@example.com")):
            s.add(Organisation(id=org, name=org))
            s.flush()
            s.add(Project(id=project, org_id=org, name=f"name of {project}"))
            s.add(Project(id=project + "2", org_id=org, name=f"second of {project}"))
            s.add(User(id=user, org_id=org, username=user, email=email))
            s.flush()
            s.add(Membership(project_id=project, user_id=user, role="member"))
        s.add(User(id="usr-none", org_id="org-a", username="nobody", email="none@example.com"))
    yield
    dispose_engine()
    reset_settings_cache()


def resolve(s: Session, grants: list[dict[str, str]], owner: str) -> list[dict[str, str]]:
    return engine.q_resolve_grantees(s, grants, owner)


def test_email_resolves_within_the_owners_organisation_only(db: None) -> None:
    with session_scope(write=False) as s:
        got = resolve(s, [{"grantee": "", "email": "ADA@example.com", "permission": "READ"}], "prj-a2")
        assert got == [{"grantee": "prj-a", "permission": "READ"}]
        for email in ("bob@example.com", "none@example.com", "missing@example.com"):
            with pytest.raises(S3Error) as exc:  # another organisation's user, a user without project, nobody
                resolve(s, [{"grantee": "", "email": email, "permission": "READ"}], "prj-a")
            assert exc.value.code == "UnresolvableGrantByEmailAddress"


def test_ids_must_be_existing_projects(db: None) -> None:
    with session_scope(write=False) as s:
        grants = [{"grantee": "prj-b", "permission": "READ"},
                  {"grantee": "http://acs.amazonaws.com/groups/global/AllUsers", "permission": "READ"}]
        assert resolve(s, grants, "prj-a") == grants  # a canonical ID names any existing account
        with pytest.raises(S3Error) as exc:
            resolve(s, [{"grantee": "prj-nope", "permission": "READ"}], "prj-a")
        assert exc.value.code == "InvalidArgument" and exc.value.status == 400
        assert engine.project_display_names(s, ["prj-a", "prj-nope"]) == {"prj-a": "name of prj-a"}
