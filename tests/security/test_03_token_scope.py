"""Finding 3: identity routes authorise against the token (project + role), not the user's memberships.

The user here is a project admin of two projects by membership, but calls with a narrower
token: a member (or viewer) token of project A. The token must bound what the request can do.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hackboot.sdk import ApiError, Client
from tests.security.conftest import Tenant, unique
from tests.support import Cloud


def _status(call: Callable[[], object]) -> int:
    with pytest.raises(ApiError) as err:
        call()
    return err.value.status


@pytest.fixture
def narrow(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> tuple[Tenant, str, Client, Client]:
    """A user who is admin of projects A and B, with a member token and a viewer token of A."""
    tenant = tenant_factory("admin")
    admin = cloud.admin_client_unscoped()
    project_b = admin.projects.create(unique("secb"))["id"]
    admin.projects.set_member(project_b, tenant.user_id, "admin")
    member = admin.tokens.create(project_id=tenant.project_id, role="member", user_id=tenant.user_id)
    viewer = admin.tokens.create(project_id=tenant.project_id, role="viewer", user_id=tenant.user_id)
    return tenant, project_b, cloud.client(member["token"]), cloud.client(viewer["token"])


def test_member_token_cannot_mint_admin_or_reach_other_projects(
        cloud: Cloud, narrow: tuple[Tenant, str, Client, Client]) -> None:
    tenant, project_b, member, _ = narrow
    assert member.auth.whoami()["role"] == "member"
    # Not more than the token's own role, even though the user is a project admin.
    assert _status(lambda: member.tokens.create(project_id=tenant.project_id, role="admin")) == 403
    # Not another project, even one where the user is admin: it does not exist for this token.
    assert _status(lambda: member.tokens.create(project_id=project_b, role="member")) == 404
    assert _status(lambda: member.projects.get(project_b)) == 404
    assert _status(lambda: member.projects.members(project_b)) == 404
    assert _status(lambda: member.projects.quotas(project_b)) == 404
    assert [p["id"] for p in member.projects.list()] == [tenant.project_id]
    # Member management needs an admin token of that very project.
    outsider = cloud.admin_client_unscoped().users.create(unique("out"))
    assert _status(lambda: member.projects.set_member(project_b, outsider["id"], "admin")) == 404
    assert _status(lambda: member.projects.set_member(tenant.project_id, outsider["id"], "admin")) == 403
    assert _status(lambda: member.projects.remove_member(tenant.project_id, tenant.user_id)) == 403
    assert _status(lambda: member.tokens.list(project_id=project_b)) == 404
    # What the token may do still works: a token of at most its role, in its project.
    mine = member.tokens.create(role="viewer", name="ci")
    assert mine["project_id"] == tenant.project_id and mine["role"] == "viewer"
    member.tokens.revoke(mine["id"])


def test_viewer_token_cannot_revoke_other_users_tokens(
        cloud: Cloud, narrow: tuple[Tenant, str, Client, Client]) -> None:
    tenant, _, _, viewer = narrow
    admin = cloud.admin_client_unscoped()
    colleague = admin.users.create(unique("col"))
    admin.projects.set_member(tenant.project_id, colleague["id"], "member")
    theirs = admin.tokens.create(project_id=tenant.project_id, role="member", user_id=colleague["id"])
    assert _status(lambda: viewer.tokens.revoke(theirs["id"])) == 404
    assert cloud.client(theirs["token"]).auth.whoami()["user_id"] == colleague["id"]  # still valid
    # Listing the project's tokens is a project-admin view: a viewer token sees only its own.
    assert {t["user_id"] for t in viewer.tokens.list(project_id=tenant.project_id)} == {tenant.user_id}
    # The genuine project admin token may revoke it.
    tenant.client.tokens.revoke(theirs["id"])


def test_project_admin_cannot_mint_a_superuser_token(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    tenant = tenant_factory("admin")
    admin = cloud.admin_client_unscoped()
    admin_id = admin.auth.whoami()["user_id"]
    # A token of a superuser is cloud-wide power, whatever project it names.
    assert _status(lambda: tenant.client.tokens.create(role="admin", user_id=admin_id)) == 403
    # Nor revoke or list the superuser's tokens scoped to this project.
    su_token = admin.tokens.create(project_id=tenant.project_id, role="admin", name="su")
    assert su_token["id"] not in {t["id"] for t in tenant.client.tokens.list(project_id=tenant.project_id)}
    assert _status(lambda: tenant.client.tokens.revoke(su_token["id"])) == 404
    admin.tokens.revoke(su_token["id"])
