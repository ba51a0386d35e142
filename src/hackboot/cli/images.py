"""`hackboot image list|show|upload|download|update|delete` commands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from hackboot.cli.context import state
from hackboot.cli.output import EXIT_USAGE, OutputOpt, api_errors, console, err_console, fail, render
from hackboot.sdk.client import ApiError

COLUMNS = ["id", "name", "status", "visibility", "disk_format", "os", "size_bytes", "min_disk_gb", "protected"]

image_app = typer.Typer(help="Disk images instances boot from: upload, share, download, delete.",
                        no_args_is_help=True)


def _size(value: Any) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)


@contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A byte progress bar on stderr (stdout stays clean for `-o json`)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update


@image_app.command("list")
def image_list(name: str | None = typer.Option(None, "--name"), status: str | None = typer.Option(None, "--status"),
               visibility: str | None = typer.Option(None, "--visibility", help="private or public"),
               os: str | None = typer.Option(None, "--os"), output: str = OutputOpt) -> None:
    """List the project's images and the public ones."""
    with api_errors():
        images = state.client().images.list(name=name, status=status,
                                            visibility=visibility, os=os)
    render(images, output, COLUMNS, formatters={"size_bytes": _size})


@image_app.command("show")
def image_show(image: str = typer.Argument(..., help="Image id or name"), output: str = OutputOpt) -> None:
    with api_errors():
        render(state.client().images.get(image), output)


@image_app.command("upload")
def image_upload(
    name: str = typer.Argument(..., help="Name of the new image"),
    file: str = typer.Argument(..., help="qcow2 or raw disk file"),
    disk_format: str | None = typer.Option(None, "--format", "-f",
                                       help="qcow2 or raw (guessed from the file if omitted)"),
    public: bool = typer.Option(False, "--public", help="Visible to every project (cloud administrators)"),
    os: str = typer.Option("", "--os", help="Operating system, e.g. debian"),
    os_version: str = typer.Option("", "--os-version"),
    min_disk_gb: int = typer.Option(0, "--min-disk", help="Smallest disk (GB) it can boot with"),
    min_ram_mb: int = typer.Option(0, "--min-ram", help="Smallest RAM (MB) it can boot with"),
    protected: bool = typer.Option(False, "--protected", help="Refuse deletion until unprotected"),
    sha256: str | None = typer.Option(None, "--sha256", help="Expected sha256: the server refuses a different file"),
    output: str = OutputOpt,
) -> None:
    """Create an image and stream FILE into it (with a progress bar); it is checked and becomes active."""
    from hackboot.sdk.images import guess_format

    if disk_format is not None and disk_format not in ("qcow2", "raw"):
        fail("--format must be qcow2 or raw", EXIT_USAGE)
    path = Path(file)
    if not path.is_file():
        fail(f"No such file: {file}", EXIT_USAGE)
    fmt = disk_format or guess_format(path)
    client = state.client()
    with api_errors():
        image = client.images.create(name, fmt, visibility="public" if public else "private",
                                     os=os, os_version=os_version, min_disk_gb=min_disk_gb,
                                     min_ram_mb=min_ram_mb, protected=protected)
        try:
            with _progress(f"Uploading {path.name}") as progress:
                image = client.images.upload(image["id"], path, progress=progress,
                                             sha256=sha256)
        except (ApiError, KeyboardInterrupt):
            # One command, one outcome: do not leave a half-made image behind.
            try:
                if protected:
                    client.images.update(image["id"], protected=False)
                client.images.delete(image["id"])
            except ApiError:
                err_console.print(f"[yellow]The image {image['id']} was left in place; delete it yourself.[/]")
            raise
    render(image, output)


@image_app.command("download")
def image_download(image: str = typer.Argument(..., help="Image id or name"),
                   file: str | None = typer.Option(None, "--file", "-f", help="Destination (default NAME.FORMAT)"),
                   ) -> None:
    """Download an image's file (streamed, sha256 checked)."""
    client = state.client()
    with api_errors():
        img = client.images.get(image)
        dest = Path(file) if file else Path(f"{img['name']}.{img['disk_format']}")
        with _progress(f"Downloading {img['name']}") as progress:
            client.images.download(img["id"], dest, progress=progress)
    console.print(f"Saved {img['id']} to {dest} (sha256 {img['sha256']})")


@image_app.command("update")
def image_update(
    image: str = typer.Argument(..., help="Image id or name"),
    name: str | None = typer.Option(None, "--name", help="New name"),
    public: bool | None = typer.Option(None, "--public/--private", help="Share with every project (administrators)"),
    protected: bool | None = typer.Option(None, "--protected/--unprotected"),
    os: str | None = typer.Option(None, "--os"),
    os_version: str | None = typer.Option(None, "--os-version"),
    min_disk_gb: int | None = typer.Option(None, "--min-disk"),
    min_ram_mb: int | None = typer.Option(None, "--min-ram"),
    output: str = OutputOpt,
) -> None:
    """Rename, share, protect an image, or change its OS and minimum sizes."""
    fields: dict[str, Any] = {"name": name, "protected": protected, "os": os, "os_version": os_version,
                              "min_disk_gb": min_disk_gb, "min_ram_mb": min_ram_mb}
    if public is not None:
        fields["visibility"] = "public" if public else "private"
    fields = {k: v for k, v in fields.items() if v is not None}
    if not fields:
        fail("Nothing to change: pass at least one option", EXIT_USAGE)
    client = state.client()
    with api_errors():
        img = client.images.get(image)
        render(client.images.update(img["id"], **fields), output)


@image_app.command("delete")
def image_delete(image: str = typer.Argument(..., help="Image id or name")) -> None:
    """Delete an image (refused while protected or used by instances)."""
    client = state.client()
    with api_errors():
        img = client.images.get(image)
        client.images.delete(img["id"])
    console.print(f"Deleted {img['id']} ({img['name']})")


def register(app: typer.Typer) -> None:
    app.add_typer(image_app, name="image")
