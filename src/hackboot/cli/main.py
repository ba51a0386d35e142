"""`hackboot`: the command-line interface, built on the SDK.

Exit codes: 0 ok, 1 error, 2 bad usage or input (4xx), 3 not found, 4 not authenticated or not
allowed, 5 conflict or quota, 6 server unreachable or failing, 7 timed out waiting.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

import typer

from hackboot.cli import catalog, compute, events, functions, identity, images, lb, network, s3, volumes
from hackboot.cli.context import state

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)


# Commands that write the cloud's state: their files must not be readable by other local users.
STATE_WRITERS = ("serve", "agent")


@app.callback()
def main(
    ctx: typer.Context,
    profile: str = typer.Option("default", "--profile", envvar="HACKBOOT_PROFILE", help="CLI profile to use"),
    url: str = typer.Option(None, "--url", envvar="HACKBOOT_URL", help="API address (overrides the profile)"),
    token: str = typer.Option(None, "--token", envvar="HACKBOOT_TOKEN", help="API token (overrides the profile)"),
    project: str = typer.Option(None, "--project-id", envvar="HACKBOOT_PROJECT",
                                help="Project to act in (overrides the profile)"),
) -> None:
    state.profile, state.url, state.token, state.project = profile, url, token, project
    if ctx.invoked_subcommand in STATE_WRITERS:
        from hackboot.core.fsperms import restrict_umask

        restrict_umask()  # before any file is created


@app.command()
def serve(
    host: str = typer.Option(None, "--host", help="API listen address (default 127.0.0.1)"),
    port: int = typer.Option(None, "--port", help="API port (default 8080)"),
    state_dir: str = typer.Option(None, "--state-dir", help="Where state lives (default ./var)"),
    no_agent: bool = typer.Option(False, "--no-agent", help="Do not run the local host agent"),
) -> None:
    """Run the control plane (REST API, S3 endpoint, workers) and, by default, a local host agent."""
    for env, value in (("HACKBOOT_API_HOST", host), ("HACKBOOT_API_PORT", port), ("HACKBOOT_STATE_DIR", state_dir)):
        if value is not None:
            os.environ[env] = str(value)
    if no_agent:
        os.environ["HACKBOOT_RUN_LOCAL_AGENT"] = "false"
    from hackboot.core.config import get_settings, reset_settings_cache
    from hackboot.core.fsperms import restrict_umask, secure_state_dir

    restrict_umask()
    reset_settings_cache()
    settings = get_settings()
    secure_state_dir(settings.state_dir, settings.unprivileged_user)
    from hackboot.core.diskspace import maintain_reserve

    maintain_reserve(settings.state_dir)  # room for deletes the day the disk fills up
    if settings.api_workers > 1:
        # Prometheus must know before it is imported that several processes share /metrics.
        parent = _metrics_parent()
        _remove_stale_metrics(Path(parent or tempfile.gettempdir()))
        metrics_dir = Path(tempfile.mkdtemp(prefix=f"hackboot-metrics-{os.getpid()}-", dir=parent))
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    from hackboot import server

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    password = server.prepare()
    banner(settings, password)
    server.serve()


def _metrics_parent() -> str | None:
    """Where the worker processes share their metrics: memory, not the state directory's disk.

    Prometheus maps those files and grows them sparsely; on a full disk, touching a new page
    kills the process with SIGBUS. /dev/shm cannot be filled by tenants' data.
    """
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


def _remove_stale_metrics(parent: Path) -> None:
    """Metrics directories of servers that are gone (a killed server cannot clean up after itself)."""
    for old in parent.glob("hackboot-metrics-*-*"):
        try:
            os.kill(int(old.name.split("-")[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def banner(settings: object, password: str | None) -> None:
    from hackboot.core.config import Settings

    assert isinstance(settings, Settings)
    pw_file = settings.state_dir / "initial-admin-password"
    if password is None and pw_file.exists():
        password = pw_file.read_text().strip()
    api = f"http://{settings.api_host}:{settings.api_port}"
    typer.echo(f"""
Hackboot Cloud is running.
  API          {api}   (docs {api}/docs)
  S3 endpoint  http://{settings.s3_host}:{settings.s3_port}
  State        {settings.state_dir.resolve()}  ({settings.effective_database_url.split(':')[0]})
  Admin        user 'admin', password {password or '(changed by the admin; see your records)'}

Next steps:
  .venv/bin/hackboot login --url {api} -u admin
  .venv/bin/hackboot region list
  .venv/bin/hackboot flavor list
  .venv/bin/hackboot capacity
""", err=False)


for _commands in (identity, catalog, events, compute, images, volumes, network, lb, functions, s3):
    _commands.register(app)


if __name__ == "__main__":
    app()
