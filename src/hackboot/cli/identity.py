"""`hackboot login|whoami|project|user|token|quota` commands."""

from __future__ import annotations

import getpass

import typer

from hackboot.cli import config
from hackboot.cli.context import state
from hackboot.cli.output import OutputOpt, api_errors, console, render

TOKEN_COLUMNS = ["id", "name", "user_id", "project_id", "role", "prefix", "expires_at", "last_used_at"]


def login(
    username: str = typer.Option("admin", "--username", "-u", help="User to log in as"),
    password: str | None = typer.Option(None, "--password", "-p", envvar="HACKBOOT_PASSWORD",
                                 help="Password (prompted when omitted)"),
    url: str | None = typer.Option(None, "--url", help="API address, e.g. http://127.0.0.1:8080"),
    project: str | None = typer.Option(None, "--project", help="Project id to scope the session token to"),
) -> None:
    """Log in with a password and save a session token in the profile."""
    prof = state.resolved()
    if url:
        prof.url = url
    pw = password or getpass.getpass(f"Password for {username}: ")
    from hackboot.sdk.client import Client

    with api_errors(), Client(prof.url) as client:
        issued = client.auth.login(username, pw, project)
        prof.token, prof.username = issued["token"], username
        prof.project = issued["project_id"] or ""
        if not prof.project:
            # Superusers get an unscoped token: default to their first project for convenience.
            with Client(prof.url, prof.token) as authed:
                projects = authed.projects.list()
            prof.project = projects[0]["id"] if projects else ""
    path = config.save(state.profile, prof)
    console.print(f"Logged in to {prof.url} as [bold]{username}[/] (project {prof.project or '-'}); "
                  f"token expires {issued['expires_at']}. Profile '{state.profile}' saved in {path}")


def logout() -> None:
    """Revoke the profile's token and forget it."""
    prof = state.resolved()
    if prof.token:
        with api_errors():
            client = state.client()
            me = client.auth.whoami()
            client.tokens.revoke(me["token_id"])
    prof.token = ""
    config.save(state.profile, prof)
    console.print("Logged out.")


def whoami(output: str = OutputOpt) -> None:
    """Show who the current token belongs to, its project and role."""
    with api_errors():
        render(state.client().auth.whoami(), output)


project_app = typer.Typer(help="Projects: every resource belongs to one.", no_args_is_help=True)


@project_app.command("create")
def project_create(name: str, description: str = typer.Option("", "--description", "-d"),
                   output: str = OutputOpt) -> None:
    """Create a project (organisation admins; you become its admin)."""
    with api_errors():
        render(state.client().projects.create(name, description), output)


@project_app.command("list")
def project_list(output: str = OutputOpt) -> None:
    """List the projects you can see."""
    with api_errors():
        render(state.client().projects.list(), output,
               ["id", "name", "org_id", "description", "created_at"])


@project_app.command("show")
def project_show(project_id: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(state.client().projects.get(project_id), output)


@project_app.command("use")
def project_use(project_id: str) -> None:
    """Make PROJECT_ID the profile's default project (superuser tokens act in it)."""
    prof = state.resolved()
    prof.project = project_id
    config.save(state.profile, prof)
    console.print(f"Profile '{state.profile}' now uses project {project_id}")


member_app = typer.Typer(help="Project members and their roles (viewer, member, admin).", no_args_is_help=True)


@member_app.command("add")
def member_add(user_id: str, role: str = typer.Option("member", "--role", "-r", help="viewer, member or admin"),
               project: str | None = typer.Option(None, "--project", help="Defaults to the profile's project"),
               output: str = OutputOpt) -> None:
    """Add USER_ID to a project with a role (or change their role)."""
    with api_errors():
        render(state.client().projects.set_member(project or state.resolved().project, user_id, role),
               output)


@member_app.command("list")
def member_list(project: str | None = typer.Option(None, "--project"), output: str = OutputOpt) -> None:
    with api_errors():
        render(state.client().projects.members(project or state.resolved().project), output,
               ["user_id", "role", "created_at"])


@member_app.command("remove")
def member_remove(user_id: str, project: str | None = typer.Option(None, "--project")) -> None:
    with api_errors():
        state.client().projects.remove_member(project or state.resolved().project, user_id)
    console.print(f"Removed {user_id}")


user_app = typer.Typer(help="Users of your organisation.", no_args_is_help=True)


@user_app.command("create")
def user_create(username: str,
                password: str | None = typer.Option(None, "--password", help="Leave empty for token-only"),
                email: str = typer.Option("", "--email"), superuser: bool = typer.Option(False, "--superuser"),
                org_role: str = typer.Option("member", "--org-role", help="member, admin or owner"),
                output: str = OutputOpt) -> None:
    """Create a user (organisation admins); add them to a project with `hackboot member add`."""
    with api_errors():
        render(state.client().users.create(username, password, email, superuser, org_role),
               output)


@user_app.command("set-role")
def user_set_role(user_id: str, org_role: str = typer.Argument(..., help="member, admin or owner"),
                  output: str = OutputOpt) -> None:
    """Change USER_ID's organisation role (organisation owners and admins)."""
    with api_errors():
        render(state.client().users.update(user_id, org_role=org_role), output)


@user_app.command("list")
def user_list(output: str = OutputOpt) -> None:
    with api_errors():
        render(state.client().users.list(), output,
               ["id", "username", "email", "org_role", "is_superuser", "disabled", "created_at"])


token_app = typer.Typer(help="API tokens: shown once, expiring, revocable, scoped to a project and role.",
                        no_args_is_help=True)


@token_app.command("create")
def token_create(name: str = typer.Option("api", "--name"),
                 role: str = typer.Option("member", "--role", "-r", help="viewer, member or admin"),
                 user: str | None = typer.Option(None, "--user", help="User id of another member (project admins)"),
                 project: str | None = typer.Option(None, "--project"),
                 expires_in_hours: int | None = typer.Option(None, "--expires-in-hours"),
                 output: str = OutputOpt) -> None:
    """Create a token; its secret is printed once."""
    with api_errors():
        tok = state.client().tokens.create(project_id=project or state.resolved().project or None,
                                           role=role, name=name, user_id=user, expires_in_hours=expires_in_hours)
    render(tok, output)
    if output == "table":
        console.print("[yellow]Store the token now: it will not be shown again.[/]")


@token_app.command("list")
def token_list(project: str | None = typer.Option(None, "--project"), output: str = OutputOpt) -> None:
    with api_errors():
        render(state.client().tokens.list(project_id=project), output, TOKEN_COLUMNS)


@token_app.command("revoke")
def token_revoke(token_id: str) -> None:
    with api_errors():
        state.client().tokens.revoke(token_id)
    console.print(f"Revoked {token_id}")


quota_app = typer.Typer(help="Project quotas (instances, vCPUs, RAM, GPUs, volumes, buckets…).",
                        no_args_is_help=True)


@quota_app.command("show")
def quota_show(project: str | None = typer.Option(None, "--project"), output: str = OutputOpt) -> None:
    with api_errors():
        render(state.client().projects.quotas(project or state.resolved().project), output,
               ["resource", "used", "limit"])


@quota_app.command("set")
def quota_set(resource: str, limit: int, project: str | None = typer.Option(None, "--project"),
              output: str = OutputOpt) -> None:
    """Set a project's limit for RESOURCE (cloud administrators)."""
    with api_errors():
        render(state.client().projects.set_quota(project or state.resolved().project, resource, limit),
               output)


def register(app: typer.Typer) -> None:
    app.command()(login)
    app.command()(logout)
    app.command()(whoami)
    app.add_typer(project_app, name="project")
    app.add_typer(member_app, name="member")
    app.add_typer(user_app, name="user")
    app.add_typer(token_app, name="token")
    app.add_typer(quota_app, name="quota")
