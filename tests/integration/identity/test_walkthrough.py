"""Identity and tenancy through the SDK, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
import uuid

import pytest

from hackboot.sdk import ApiError
from tests.support import Cloud


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_member_token_walkthrough(any_cloud: Cloud) -> None:
    admin = any_cloud.admin_client_unscoped()
    project = admin.projects.create(_name("proj"))
    user = admin.users.create(_name("alice"), password="correct-horse-1")
    admin.projects.set_member(project["id"], user["id"], "member")
    issued = admin.tokens.create(project_id=project["id"], role="member", user_id=user["id"], name="ci")
    assert issued["token"].startswith("hbk_")
    member = any_cloud.client(issued["token"])
    me = member.auth.whoami()
    assert me == {"user_id": user["id"], "username": user["username"], "token_id": issued["id"],
                  "role": "member", "is_superuser": False, "project_id": project["id"]}
    # The member sees only their project; another project's is a 404, never a 403.
    assert [p["id"] for p in member.projects.list()] == [project["id"]]
    with pytest.raises(ApiError) as err:
        member.projects.get(any_cloud.project_id)
    assert err.value.status == 404
    # A member cannot mint an admin token.
    with pytest.raises(ApiError) as err:
        member.tokens.create(project_id=project["id"], role="admin")
    assert err.value.status == 403


def test_viewer_cannot_write_and_revoked_token_is_refused(any_cloud: Cloud) -> None:
    admin = any_cloud.admin_client_unscoped()
    project = admin.projects.create(_name("proj"))
    user = admin.users.create(_name("victor"))
    admin.projects.set_member(project["id"], user["id"], "viewer")
    issued = admin.tokens.create(project_id=project["id"], role="viewer", user_id=user["id"])
    viewer = any_cloud.client(issued["token"])
    assert viewer.projects.get(project["id"])["id"] == project["id"]
    with pytest.raises(ApiError) as err:
        viewer.projects.create(_name("nope"))
    assert err.value.status == 403 and err.value.code == "forbidden"
    admin.tokens.revoke(issued["id"])
    with pytest.raises(ApiError) as err:
        viewer.auth.whoami()
    assert err.value.status == 401 and err.value.code == "token_revoked"


def test_unauthenticated_gets_401_with_challenge(any_cloud: Cloud) -> None:
    import httpx

    resp = httpx.get(any_cloud.url + "/v1/projects")
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["code"] == "unauthenticated"


def test_idempotency_key_returns_the_same_project(any_cloud: Cloud) -> None:
    admin = any_cloud.admin_client_unscoped()
    name = _name("idem")
    first = admin.request("POST", "/v1/projects", json={"name": name}, idempotency_key="k-" + name)
    again = admin.request("POST", "/v1/projects", json={"name": name}, idempotency_key="k-" + name)
    assert first == again
    assert len(admin.projects.list(name=name)) == 1
    with pytest.raises(ApiError) as err:
        admin.request("POST", "/v1/projects", json={"name": name + "x"}, idempotency_key="k-" + name)
    assert err.value.code == "idempotency_key_reused"


def test_failed_logins_are_throttled_per_username(any_cloud: Cloud) -> None:
    import httpx

    admin = any_cloud.admin_client_unscoped()
    project = admin.projects.create(_name("proj"))
    user = admin.users.create(_name("tina"), password="correct-horse-1")
    admin.projects.set_member(project["id"], user["id"], "member")
    with httpx.Client(base_url=any_cloud.url, timeout=30) as http:
        def attempt(password: str) -> httpx.Response:
            return http.post("/v1/auth/login", json={"username": user["username"], "password": password})

        assert [attempt("wrong-password").status_code for _ in range(5)] == [401] * 5
        refused = attempt("correct-horse-1")
        assert refused.status_code == 429 and refused.json()["code"] == "too_many_attempts"
        time.sleep(int(refused.headers["retry-after"]) + 0.2)
        assert attempt("correct-horse-1").status_code == 201
        assert attempt("wrong-password").status_code == 401  # the success reset the counter


def test_password_change_ends_the_other_login_sessions(any_cloud: Cloud) -> None:
    admin = any_cloud.admin_client_unscoped()
    project = admin.projects.create(_name("proj"))
    user = admin.users.create(_name("pat"), password="correct-horse-1")
    admin.projects.set_member(project["id"], user["id"], "member")
    anon = any_cloud.client()
    mine, other = (anon.auth.login(user["username"], "correct-horse-1") for _ in range(2))
    api_token = admin.tokens.create(project_id=project["id"], user_id=user["id"], name="ci")
    me = any_cloud.client(mine["token"])
    with pytest.raises(ApiError) as err:
        me.users.set_password(user["id"], "new-password-1", old_password="not-the-password")
    assert err.value.status == 403 and err.value.code == "wrong_password"
    me.users.set_password(user["id"], "new-password-1", old_password="correct-horse-1")
    assert me.auth.whoami()["user_id"] == user["id"]
    assert any_cloud.client(api_token["token"]).auth.whoami()["user_id"] == user["id"]
    with pytest.raises(ApiError) as err:
        any_cloud.client(other["token"]).auth.whoami()
    assert err.value.status == 401 and err.value.code == "token_revoked"
    assert anon.auth.login(user["username"], "new-password-1")["user_id"] == user["id"]
