"""The project's backup S3 key belongs to block storage, not to the member who made it (in-process, real SQLite).

Block storage registers how to recognise it with the object store (`register_service_key_check`):
the key keeps working after that member leaves, while the member's own keys stop.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from hackboot.core.config import get_settings, reset_settings_cache
from hackboot.core.db import dispose_engine, session_scope
from hackboot.core.ids import new_id
from hackboot.core.migrate import upgrade


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from hackboot.identity.models import Project
    from hackboot.identity.service import bootstrap

    monkeypatch.delenv("HACKBOOT_DATABASE_URL", raising=False)
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HACKBOOT_CONFIG", str(tmp_path / "none.toml"))
    reset_settings_cache()
    dispose_engine()
    upgrade(get_settings().effective_database_url)
    bootstrap(get_settings().state_dir)
    with session_scope(write=False) as s:
        project_id = s.scalar(select(Project.id).where(Project.name == "default"))
    assert project_id is not None
    yield project_id
    dispose_engine()
    reset_settings_cache()


def test_the_backup_key_outlives_its_creators_membership(project: str) -> None:
    from hackboot.identity.models import Membership, Organisation, User
    from hackboot.objectstore import engine
    from hackboot.objectstore import service as objectstore
    from hackboot.objectstore.models import S3Credential
    from hackboot.volumes import service as volumes

    with session_scope() as s:
        org = s.scalar(select(Organisation.id))
        assert org is not None
        member = User(id=new_id("usr"), org_id=org, username="ada", password_hash=None)
        s.add(member)
        s.flush()
        s.add(Membership(project_id=project, user_id=member.id, role="member"))
    volumes.ensure_backup_credential(project, member.id)
    own = objectstore.create_credential(project, member.id, name="ada's")

    def rights(credential_id: str) -> tuple[bool, bool]:
        with session_scope(write=False) as s:
            row = s.get(S3Credential, credential_id)
            assert row is not None
            return engine._holder_rights(s, row)

    backup_key = volumes.backup_credential(project)
    assert backup_key is not None
    with session_scope(write=False) as s:
        backup_id = s.scalar(select(S3Credential.id).where(S3Credential.access_key == backup_key[0]))
    assert backup_id is not None and backup_id != own.credential.id
    assert rights(backup_id) == (True, False) and rights(own.credential.id) == (True, False)
    with session_scope() as s:
        s.execute(delete(Membership).where(Membership.user_id == member.id))
    assert rights(backup_id) == (True, False)  # block storage's key: backups go on
    assert rights(own.credential.id)[0] is False  # the former member's own key stops
