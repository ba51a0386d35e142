"""`hackboot volume …` and `hackboot backup-policy …` commands (block storage)."""

from __future__ import annotations

from typing import Any

import typer

from hackboot.cli.context import state
from hackboot.cli.output import EXIT_ERROR, OutputOpt, api_errors, console, fail, render
from hackboot.sdk.client import Client

VOLUME_COLUMNS = ["id", "name", "status", "task_state", "size_gb", "tier", "zone_id", "encrypted", "attached_to",
                  "status_reason"]
SNAPSHOT_COLUMNS = ["id", "name", "kind", "status", "size_gb", "created_at"]
BACKUP_COLUMNS = ["id", "volume_name", "kind", "status", "size_bytes", "rpo_seconds", "bucket", "point_in_time"]
POLICY_COLUMNS = ["id", "name", "every_s", "keep_local_s", "keep_remote_s", "bucket", "last_run_at"]
TIER_COLUMNS = ["name", "iops", "iops_burst", "bps", "burst_seconds", "price_eur_gb_month", "description"]

volume_app = typer.Typer(help="Block storage volumes: create, attach, snapshot, resize, back up, restore.",
                         no_args_is_help=True)
snapshot_app = typer.Typer(help="Instant snapshots of a volume.", no_args_is_help=True)
backup_app = typer.Typer(help="Backups of a volume to the project's S3 bucket.", no_args_is_help=True)
policy_app = typer.Typer(help="Scheduled backups (every, keep-local, keep-remote).", no_args_is_help=True)
volume_app.add_typer(snapshot_app, name="snapshot")
volume_app.add_typer(backup_app, name="backup")

WaitOpt = typer.Option(False, "--wait", "-w", help="Wait until the operation has finished")
TimeoutOpt = typer.Option(600, "--timeout", help="Seconds to wait")


def _client() -> Client:
    return state.client()


def _row(v: dict[str, Any]) -> dict[str, Any]:
    v = dict(v)
    v["attached_to"] = ",".join(a["instance_id"] for a in v.get("attachments", [])) or None
    return v


def _wait(client: Client, v: dict[str, Any], statuses: tuple[str, ...], timeout: float, verb: str) -> dict[str, Any]:
    with console.status(f"{verb} {v['name']}…") as spinner:
        def show(cur: dict[str, Any]) -> None:
            task = f" / {cur['task_state']}" if cur["task_state"] else ""
            spinner.update(f"{verb} {cur['name']}: {cur['status']}{task}")

        final = client.volumes.wait(v["id"], statuses, timeout=timeout, on_poll=show)
    if final["status"] == "error" or final.get("status_reason"):
        render(_row(final), "table")
        fail(f"{final['name']}: {final['status_reason'] or final['status']}", EXIT_ERROR)
    return final


@volume_app.command("create")
def volume_create(
    name: str,
    size: int | None = typer.Option(None, "--size", "-s", help="Size in GB"),
    tier: str = typer.Option("ssd-standard", "--tier", "-t",
                             help="ssd-performance, ssd-standard, hdd-standard, archive"),
    zone: str | None = typer.Option(None, "--zone", "-z"),
    encrypted: bool = typer.Option(False, "--encrypted", help="LUKS (AES-256) encryption at rest"),
    shareable: bool = typer.Option(False, "--shareable", help="May be attached to several instances"),
    from_snapshot: str | None = typer.Option(None, "--from-snapshot", help="Clone a snapshot (id or name)"),
    from_backup: str | None = typer.Option(None, "--from-backup", help="Restore a backup"),
    from_image: str | None = typer.Option(None, "--from-image", help="Copy an image (a bootable volume)"),
    wait: bool = WaitOpt, timeout: float = TimeoutOpt, output: str = OutputOpt,
) -> None:
    client = _client()
    with api_errors():
        v = client.volumes.create(name, size, tier=tier, zone=zone, encrypted=encrypted, shareable=shareable,
                                  snapshot=from_snapshot, backup=from_backup, image=from_image)
        if wait:
            v = _wait(client, v, ("available",), timeout, "Creating")
    render(_row(v), output)


@volume_app.command("list")
def volume_list(status: str | None = typer.Option(None, "--status"), tier: str | None = typer.Option(None, "--tier"),
                output: str = OutputOpt) -> None:
    with api_errors():
        render([_row(v) for v in _client().volumes.list(status=status, tier=tier)], output, VOLUME_COLUMNS)


@volume_app.command("show")
def volume_show(name: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_row(_client().volumes.get(name)), output)


@volume_app.command("tiers")
def volume_tiers(output: str = OutputOpt) -> None:
    """Storage tiers, their I/O caps and price per GB-month."""
    with api_errors():
        render(_client().volumes.tiers(), output, TIER_COLUMNS)


@volume_app.command("attach")
def volume_attach(name: str, instance: str, mode: str | None = typer.Option(None, "--mode", help="rw or ro"),
                  wait: bool = WaitOpt, timeout: float = TimeoutOpt, output: str = OutputOpt) -> None:
    """Hot-plug a volume into a running instance (it appears as a virtio disk whose serial is the volume id)."""
    client = _client()
    with api_errors():
        v = client.volumes.attach(name, instance, mode)
        if wait:
            v = _wait(client, v, ("in-use",), timeout, "Attaching")
    render(_row(v), output)


@volume_app.command("detach")
def volume_detach(name: str, instance: str | None = typer.Argument(None),
                  force: bool = typer.Option(False, "--force", help="Cut the disk off even if the guest holds it"),
                  wait: bool = WaitOpt, timeout: float = TimeoutOpt, output: str = OutputOpt) -> None:
    client = _client()
    with api_errors():
        v = client.volumes.detach(name, instance, force)
        if wait:
            v = _wait(client, v, ("available", "in-use"), timeout, "Detaching")
    render(_row(v), output)


@volume_app.command("resize")
def volume_resize(name: str, size: int = typer.Option(..., "--size", "-s", help="New size in GB (grow only)"),
                  wait: bool = WaitOpt, timeout: float = TimeoutOpt, output: str = OutputOpt) -> None:
    client = _client()
    with api_errors():
        v = client.volumes.resize(name, size)
        if wait:
            v = _wait(client, v, ("available", "in-use"), timeout, "Resizing")
    render(_row(v), output)


@volume_app.command("set-tier")
def volume_set_tier(name: str, tier: str, wait: bool = WaitOpt, timeout: float = TimeoutOpt,
                    output: str = OutputOpt) -> None:
    """Change the tier (applied live to attached volumes)."""
    client = _client()
    with api_errors():
        v = client.volumes.update(name, tier=tier)
        if wait:
            v = _wait(client, v, ("available", "in-use"), timeout, "Changing tier of")
    render(_row(v), output)


@volume_app.command("delete")
def volume_delete(name: str, wait: bool = WaitOpt, timeout: float = TimeoutOpt, output: str = OutputOpt) -> None:
    client = _client()
    with api_errors():
        v = client.volumes.delete(name)
        if wait:
            v = client.volumes.wait_deleted(v["id"], timeout=timeout)
    if output != "table":
        render(_row(v), output)
        return
    console.print(f"Volume {v['name']} ({v['id']}) {'deleted' if wait else 'is being deleted'}.")


@volume_app.command("restore")
def volume_restore(backup: str, as_name: str = typer.Option(..., "--as", help="Name of the new volume"),
                   size: int | None = typer.Option(None, "--size"), tier: str | None = typer.Option(None, "--tier"),
                   wait: bool = WaitOpt, timeout: float = TimeoutOpt, output: str = OutputOpt) -> None:
    """Restore a backup into a new volume."""
    client = _client()
    with api_errors():
        v = client.volume_backups.restore(backup, as_name, size_gb=size, tier=tier)
        if wait:
            v = _wait(client, v, ("available",), timeout, "Restoring")
    render(_row(v), output)


@volume_app.command("revert")
def volume_revert(name: str, snapshot: str, wait: bool = WaitOpt, timeout: float = TimeoutOpt,
                  output: str = OutputOpt) -> None:
    """Go back to a snapshot (detach the volume first)."""
    client = _client()
    with api_errors():
        v = client.volumes.revert(name, snapshot)
        if wait:
            v = _wait(client, v, ("available",), timeout, "Reverting")
    render(_row(v), output)


# --- snapshots -----------------------------------------------------------------------------------------

@snapshot_app.command("create")
def snapshot_create(volume: str, name: str | None = typer.Argument(None), wait: bool = WaitOpt,
                    output: str = OutputOpt) -> None:
    client = _client()
    with api_errors():
        snap = client.volume_snapshots.create(volume, name)
        if wait:
            snap = client.volume_snapshots.wait(volume, snap["id"])
    render(snap, output)


@snapshot_app.command("list")
def snapshot_list(volume: str | None = typer.Argument(None),
                  kind: str | None = typer.Option(None, "--kind", help="user|backup"),
                  output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().volume_snapshots.list(volume, kind), output, SNAPSHOT_COLUMNS)


@snapshot_app.command("delete")
def snapshot_delete(volume: str, snapshot: str, wait: bool = WaitOpt, output: str = OutputOpt) -> None:
    client = _client()
    with api_errors():
        snap = client.volume_snapshots.delete(volume, snapshot)
        if wait:
            snap = {**snap, **client.volume_snapshots.wait(volume, snap["id"])}
    if output != "table":
        render(snap, output)
        return
    console.print(f"Snapshot {snap['name']} {'deleted' if wait else 'is being deleted'}.")


@snapshot_app.command("revert")
def snapshot_revert(volume: str, snapshot: str, wait: bool = WaitOpt, timeout: float = TimeoutOpt,
                    output: str = OutputOpt) -> None:
    volume_revert(volume, snapshot, wait, timeout, output)


_BUCKET_HELP = "A bucket of this project (default: hb-backups-<project id>, created when missing)"


# --- backups -------------------------------------------------------------------------------------------

@backup_app.command("create")
def backup_create(volume: str, bucket: str | None = typer.Option(None, "--bucket", help=_BUCKET_HELP),
                  kind: str = typer.Option("auto", "--kind", help="auto, full or incremental"),
                  wait: bool = WaitOpt, timeout: float = TimeoutOpt, output: str = OutputOpt) -> None:
    client = _client()
    with api_errors():
        b = client.volume_backups.create(volume, bucket, kind)
        if wait:
            with console.status(f"Backing up {volume}…"):
                b = client.volume_backups.wait(b["id"], timeout=timeout)
    render(b, output)


@backup_app.command("list")
def backup_list(volume: str | None = typer.Argument(None), output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().volume_backups.list(volume=volume), output, BACKUP_COLUMNS)


@backup_app.command("show")
def backup_show(backup: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().volume_backups.get(backup), output)


@backup_app.command("delete")
def backup_delete(backup: str, output: str = OutputOpt) -> None:
    with api_errors():
        b = _client().volume_backups.delete(backup)
    if output != "table":
        render(b, output)
        return
    console.print(f"Backup {backup} is being deleted.")


# --- policies ------------------------------------------------------------------------------------------

@policy_app.command("create")
def policy_create(name: str, every: str = typer.Option("6h", "--every"),
                  keep_local: str = typer.Option("7d", "--keep-local"),
                  keep_remote: str = typer.Option("30d", "--keep-remote"),
                  bucket: str | None = typer.Option(None, "--bucket", help=_BUCKET_HELP),
                  volume: list[str] | None = typer.Option(None, "--volume", help="Volumes covered (default: all)"),
                  output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().backup_policies.create(name, every=every, keep_local=keep_local, keep_remote=keep_remote,
                                                bucket=bucket, volumes=volume or None), output)


@policy_app.command("list")
def policy_list(output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().backup_policies.list(), output, POLICY_COLUMNS)


@policy_app.command("show")
def policy_show(name: str, output: str = OutputOpt) -> None:
    with api_errors():
        render(_client().backup_policies.get(name), output)


@policy_app.command("delete")
def policy_delete(name: str, output: str = OutputOpt) -> None:
    with api_errors():
        _client().backup_policies.delete(name)
    if output != "table":
        render({"name": name, "deleted": True}, output)
        return
    console.print(f"Backup policy {name} deleted.")


def register(app: typer.Typer) -> None:
    app.add_typer(volume_app, name="volume")
    app.add_typer(policy_app, name="backup-policy")
