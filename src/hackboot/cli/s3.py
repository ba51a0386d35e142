"""`hackboot s3 credentials …` and `hackboot bucket …` commands."""

from __future__ import annotations

import typer

from hackboot.cli.context import state
from hackboot.cli.output import OutputOpt, api_errors, console, render

s3_app = typer.Typer(help="S3 object storage: access keys for S3 clients (aws CLI, boto3…).",
                     no_args_is_help=True)
credentials_app = typer.Typer(help="S3 access key / secret key pairs bound to the project.", no_args_is_help=True)
bucket_app = typer.Typer(help="Buckets of the project and their usage (create them with any S3 client).",
                         no_args_is_help=True)
CREDENTIAL_COLUMNS = ["id", "name", "access_key", "read_only", "buckets", "created_at", "revoked_at"]


@credentials_app.command("create")
def credentials_create(
    name: str = typer.Option("s3", "--name"),
    read_only: bool = typer.Option(False, "--read-only", help="Only reads (GET, HEAD, lists)"),
    bucket: list[str] | None = typer.Option(None, "--bucket", help="Limit the key to this bucket (repeatable)"),
    output: str = OutputOpt,
) -> None:
    """Issue an access key and secret key; the secret is printed once."""
    with api_errors():
        issued = state.client().s3_credentials.create(name, read_only=read_only,
                                                      buckets=bucket or None)
    render(issued, output)
    if output == "table":
        console.print("[yellow]Store the secret key now: it will not be shown again.[/]\n"
                      f"  export AWS_ACCESS_KEY_ID={issued['access_key']} AWS_SECRET_ACCESS_KEY=<secret>\n"
                      "  aws --endpoint-url http://127.0.0.1:9000 s3 ls")


@credentials_app.command("list")
def credentials_list(output: str = OutputOpt) -> None:
    with api_errors():
        render(state.client().s3_credentials.list(), output, CREDENTIAL_COLUMNS)


@credentials_app.command("revoke")
def credentials_revoke(credential_id: str) -> None:
    """Revoke a key pair: S3 requests signed with it are refused at once."""
    with api_errors():
        state.client().s3_credentials.revoke(credential_id)
    console.print(f"Revoked {credential_id}")


@s3_app.command("block-public-access")
def block_public_access(enable: bool = typer.Argument(..., help="true or false"), output: str = OutputOpt) -> None:
    """Switch the project's block on public (anonymous) access to its buckets."""
    with api_errors():
        render(state.client().buckets.set_public_access_block(enable), output)


@bucket_app.command("list")
def bucket_list(output: str = OutputOpt) -> None:
    with api_errors():
        render(state.client().buckets.list(), output,
               ["name", "region", "versioning", "object_lock", "objects", "bytes", "created_at"])


@bucket_app.command("show")
def bucket_show(name: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(state.client().buckets.get(name), output)


def register(app: typer.Typer) -> None:
    s3_app.add_typer(credentials_app, name="credentials")
    app.add_typer(s3_app, name="s3")
    app.add_typer(bucket_app, name="bucket")
