"""SDK: login, projects, members, users, tokens, quotas."""

from __future__ import annotations

from hackboot.sdk.client import Client, Collection, JSONObject, JSONObjects, Resource, as_object, as_objects


class Auth(Resource):
    def login(self, username: str, password: str, project_id: str | None = None) -> JSONObject:
        return as_object(self.c.post("/v1/auth/login", {"username": username, "password": password,
                                                        "project_id": project_id}))

    def whoami(self) -> JSONObject:
        return as_object(self.c.get("/v1/auth/whoami"))


class Projects(Collection):
    path = "/v1/projects"

    def create(self, name: str, description: str = "") -> JSONObject:
        return as_object(self.c.post(self.path, {"name": name, "description": description}))

    def members(self, project_id: str) -> JSONObjects:
        return as_objects(self.c.get(f"{self.path}/{project_id}/members"))

    def set_member(self, project_id: str, user_id: str, role: str) -> JSONObject:
        return as_object(self.c.put(f"{self.path}/{project_id}/members/{user_id}", {"role": role}))

    def remove_member(self, project_id: str, user_id: str) -> None:
        self.c.delete(f"{self.path}/{project_id}/members/{user_id}")

    def quotas(self, project_id: str) -> JSONObjects:
        return as_objects(self.c.get(f"{self.path}/{project_id}/quotas"))

    def set_quota(self, project_id: str, resource: str, limit: int) -> JSONObject:
        return as_object(self.c.put(f"{self.path}/{project_id}/quotas/{resource}", {"limit": limit}))


class Users(Collection):
    path = "/v1/users"

    def create(self, username: str, password: str | None = None, email: str = "",
               is_superuser: bool = False, org_role: str = "member") -> JSONObject:
        return as_object(self.c.post(self.path, {"username": username, "password": password, "email": email,
                                                 "is_superuser": is_superuser, "org_role": org_role}))

    def update(self, user_id: str, *, org_role: str) -> JSONObject:
        """Change a user's organisation role (member, admin or owner)."""
        return as_object(self.c.patch(f"{self.path}/{user_id}", {"org_role": org_role}))

    def set_password(self, user_id: str, new_password: str, old_password: str | None = None) -> None:
        self.c.post(f"{self.path}/{user_id}/password", {"new_password": new_password,
                                                       "old_password": old_password})


class Tokens(Resource):
    path = "/v1/tokens"

    def list(self, *, project_id: str | None = None) -> JSONObjects:
        """The caller's tokens (a project's, for its admins, with `project_id`)."""
        return self._list({"project_id": project_id})

    def create(self, *, project_id: str | None = None, role: str = "member", name: str = "api",
               user_id: str | None = None, expires_in_hours: int | None = None) -> JSONObject:
        return as_object(self.c.post(self.path, {"project_id": project_id, "role": role, "name": name,
                                                 "user_id": user_id, "expires_in_hours": expires_in_hours}))

    def revoke(self, token_id: str) -> JSONObject:
        return as_object(self.c.delete(f"{self.path}/{token_id}"))


def attach(client: Client) -> None:
    client.auth = Auth(client)
    client.projects = Projects(client)
    client.users = Users(client)
    client.tokens = Tokens(client)
