"""Finding 9: any project member could create projects (fresh quotas each) and users in the organisation.

Runs on its own control plane with a small per-organisation project quota, so the count is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from hackboot.sdk import ApiError
from tests.security.conftest import make_tenant, unique
from tests.support import Cloud, make_cloud

ORG_MAX_PROJECTS = 8


@pytest.fixture(scope="module")
def org_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    c = make_cloud(tmp_path_factory.mktemp("orgcloud"), HACKBOOT_ORG_MAX_PROJECTS=str(ORG_MAX_PROJECTS),
                   HACKBOOT_RUN_LOCAL_AGENT="false", HACKBOOT_API_WORKERS="2")
    c.start()
    yield c
    c.stop()


def _error(call: Callable[[], object]) -> ApiError:
    with pytest.raises(ApiError) as err:
        call()
    return err.value


def test_project_members_and_admins_cannot_create_projects_or_users(org_cloud: Cloud) -> None:
    for role in ("member", "admin"):
        tenant = make_tenant(org_cloud, role)
        err = _error(lambda t=tenant: t.client.projects.create(unique("mine")))  # type: ignore[misc]
        assert err.status == 403, role
        err = _error(lambda t=tenant: t.client.users.create(unique("sock"), password="sock-puppet-1"))  # type: ignore[misc]
        assert err.status == 403, role
        # Nor promote themselves in the organisation.
        err = _error(lambda t=tenant: t.client.users.update(t.user_id, org_role="admin"))  # type: ignore[misc]
        assert err.status == 403, role
        assert tenant.client.users.get(tenant.user_id)["org_role"] == "member"


def test_users_list_shows_only_people_sharing_the_project(org_cloud: Cloud) -> None:
    tenant = make_tenant(org_cloud, "member")
    admin = org_cloud.admin_client_unscoped()
    colleague = admin.users.create(unique("col"))
    admin.projects.set_member(tenant.project_id, colleague["id"], "viewer")
    stranger = admin.users.create(unique("str"))
    seen = {u["id"] for u in tenant.client.users.list()}
    sharing = {m["user_id"] for m in tenant.client.projects.members(tenant.project_id)}
    assert seen == sharing and {tenant.user_id, colleague["id"]} <= seen and stranger["id"] not in seen
    assert _error(lambda: tenant.client.users.get(stranger["id"])).status == 404
    assert tenant.client.users.list(username=stranger["username"]) == []


def test_org_admin_creates_projects_within_the_org_quota(org_cloud: Cloud) -> None:
    admin = org_cloud.admin_client_unscoped()
    tenant = make_tenant(org_cloud, "admin")
    promoted = admin.users.update(tenant.user_id, org_role="admin")
    assert promoted["org_role"] == "admin"
    # A member-role token of an organisation admin still cannot: the token bounds the request.
    narrow = admin.tokens.create(project_id=tenant.project_id, role="member", user_id=tenant.user_id)
    assert _error(lambda: org_cloud.client(narrow["token"]).projects.create(unique("x"))).status == 403
    # Organisation admins see the organisation's users and create users, but not owners.
    everyone = {u["id"] for u in tenant.client.users.list()}
    assert tenant.user_id in everyone and admin.auth.whoami()["user_id"] in everyone
    created = tenant.client.users.create(unique("new"), org_role="admin")
    assert created["org_role"] == "admin"
    assert _error(lambda: tenant.client.users.create(unique("own"), org_role="owner")).status == 403
    # The organisation's project count is capped (superusers' projects count too).
    existing = len(admin.projects.list())
    made = 0
    with pytest.raises(ApiError) as err:
        for _ in range(ORG_MAX_PROJECTS + 1):
            tenant.client.projects.create(unique("org"))
            made += 1
    assert err.value.status == 403 and err.value.code == "quota_exceeded"
    assert existing + made == ORG_MAX_PROJECTS
    # A demoted organisation admin loses the right at once.
    admin.users.update(tenant.user_id, org_role="member")
    assert _error(lambda: tenant.client.projects.create(unique("late"))).code == "org_admin_required"


def test_bootstrap_admin_is_owner_and_superusers_are_exempt(org_cloud: Cloud) -> None:
    admin = org_cloud.admin_client_unscoped()
    me = admin.users.get(admin.auth.whoami()["user_id"])
    assert me["org_role"] == "owner" and me["is_superuser"]
    assert _error(lambda: admin.users.update(me["id"], org_role="member")).code == "last_owner"
    for _ in range(ORG_MAX_PROJECTS + 1 - len(admin.projects.list())):
        admin.projects.create(unique("op"))
    assert len(admin.projects.list()) > ORG_MAX_PROJECTS


def test_org_role_change_rejects_bad_input_and_hides_strangers(org_cloud: Cloud) -> None:
    admin = org_cloud.admin_client_unscoped()
    tenant = make_tenant(org_cloud, "admin")
    admin.users.update(tenant.user_id, org_role="admin")
    err = _error(lambda: tenant.client.users.update(tenant.user_id, org_role="emperor"))
    assert err.status == 422
    assert tenant.client.users.get(tenant.user_id)["org_role"] == "admin"  # nothing changed
    # Demoted back to member, the tenant cannot promote anyone (the role is checked first: 403).
    outsider = admin.users.create(unique("out"))
    admin.users.update(tenant.user_id, org_role="member")
    err = _error(lambda: tenant.client.users.update(outsider["id"], org_role="admin"))
    assert err.status == 403 and err.code == "org_admin_required"
    assert admin.users.get(outsider["id"])["org_role"] == "member"
