"""SDK: volumes (attach, detach, resize, tiers), snapshots, backups, restore, backup policies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hackboot.sdk.client import ApiError, Client, Resource

SETTLED = ("available", "in-use", "error", "deleted")


class Volumes(Resource):
    path = "/v1/volumes"

    def create(self, name: str, size_gb: int | None = None, *, tier: str | None = None, zone: str | None = None,
               encrypted: bool = False, shareable: bool = False, description: str = "",
               snapshot: str | None = None, backup: str | None = None, image: str | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "size_gb": size_gb, "tier": tier, "zone": zone, "encrypted": encrypted,
                                "shareable": shareable, "description": description, "snapshot": snapshot,
                                "backup": backup, "image": image}
        return self.c.post(self.path, {k: v for k, v in body.items() if v is not None},
                           idempotency_key=idempotency_key)

    def get(self, ref: str) -> dict[str, Any]:
        return self.c.get(f"{self.path}/{ref}")

    def update(self, ref: str, *, tier: str | None = None, description: str | None = None) -> dict[str, Any]:
        body = {k: v for k, v in {"tier": tier, "description": description}.items() if v is not None}
        return self.c.patch(f"{self.path}/{ref}", body)

    def delete(self, ref: str) -> dict[str, Any]:
        return self.c.delete(f"{self.path}/{ref}")  # type: ignore[no-any-return]

    def attach(self, ref: str, instance: str, mode: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"instance_id": instance}
        if mode:
            body["mode"] = mode
        return self.c.post(f"{self.path}/{ref}/attach", body)

    def detach(self, ref: str, instance: str | None = None, force: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"force": force}
        if instance:
            body["instance_id"] = instance
        return self.c.post(f"{self.path}/{ref}/detach", body)

    def resize(self, ref: str, size_gb: int) -> dict[str, Any]:
        return self.c.post(f"{self.path}/{ref}/resize", {"size_gb": size_gb})

    def revert(self, ref: str, snapshot: str) -> dict[str, Any]:
        return self.c.post(f"{self.path}/{ref}/revert", {"snapshot": snapshot})

    def tiers(self) -> list[dict[str, Any]]:
        return self.c.get("/v1/volume-tiers")  # type: ignore[no-any-return]

    def wait(self, ref: str, statuses: tuple[str, ...] = ("available", "in-use"), *, timeout: float = 300.0,
             on_poll: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the volume has no task running and is in one of `statuses` (or error/deleted)."""
        def done(v: dict[str, Any]) -> bool:
            return v.get("task_state") is None and (v["status"] in statuses or v["status"] in ("error", "deleted"))

        return self.c.wait_for(lambda: self.get(ref), done, timeout=timeout, on_poll=on_poll)

    def wait_deleted(self, ref: str, timeout: float = 120.0) -> dict[str, Any]:
        return self.wait(ref, ("deleted",), timeout=timeout)


class VolumeSnapshots(Resource):
    path = "/v1/volume-snapshots"

    def create(self, volume: str, name: str | None = None) -> dict[str, Any]:
        return self.c.post(f"/v1/volumes/{volume}/snapshots", {"name": name} if name else {})

    def list(self, volume: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:  # type: ignore[override]
        path = f"/v1/volumes/{volume}/snapshots" if volume else self.path
        return list(self.c.paginate(path, {"kind": kind} if kind else {}))

    def get(self, volume: str, snapshot: str) -> dict[str, Any]:  # type: ignore[override]
        return self.c.get(f"/v1/volumes/{volume}/snapshots/{snapshot}")

    def delete(self, volume: str, snapshot: str) -> dict[str, Any]:
        return self.c.delete(f"/v1/volumes/{volume}/snapshots/{snapshot}")  # type: ignore[no-any-return]

    def wait(self, volume: str, snapshot: str, timeout: float = 120.0) -> dict[str, Any]:
        def fetch() -> dict[str, Any]:
            try:
                return self.get(volume, snapshot)
            except ApiError as exc:
                if exc.status == 404:
                    return {"status": "deleted"}
                raise

        return self.c.wait_for(fetch, lambda s: s["status"] in ("available", "error", "deleted"), timeout=timeout)


class VolumeBackups(Resource):
    path = "/v1/volume-backups"

    def create(self, volume: str, bucket: str | None = None, kind: str = "auto") -> dict[str, Any]:
        """Back up to `bucket`, one of the project's (default: hb-backups-<project id>, made when missing)."""
        body = {"bucket": bucket, "kind": kind}
        return self.c.post(f"/v1/volumes/{volume}/backups", {k: v for k, v in body.items() if v is not None})

    def list(self, volume: str | None = None, status: str | None = None) -> list[dict[str, Any]]:  # type: ignore[override]
        return super().list(volume=volume, status=status)

    def delete(self, backup_id: str) -> dict[str, Any]:
        return self.c.delete(f"{self.path}/{backup_id}")  # type: ignore[no-any-return]

    def restore(self, backup_id: str, name: str, *, size_gb: int | None = None, tier: str | None = None,
                zone: str | None = None) -> dict[str, Any]:
        body = {"name": name, "size_gb": size_gb, "tier": tier, "zone": zone}
        return self.c.post(f"{self.path}/{backup_id}/restore", {k: v for k, v in body.items() if v is not None})

    def wait(self, backup_id: str, timeout: float = 600.0,
             on_poll: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        return self.c.wait_for(lambda: self.get(backup_id), lambda b: b["status"] in ("available", "error"),
                               timeout=timeout, on_poll=on_poll)


class BackupPolicies(Resource):
    path = "/v1/backup-policies"

    def create(self, name: str, *, every: str = "6h", keep_local: str = "7d", keep_remote: str = "30d",
               bucket: str | None = None, volumes: list[str] | None = None,
               full_every: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "every": every, "keep_local": keep_local, "keep_remote": keep_remote,
                                "bucket": bucket, "volumes": volumes, "full_every": full_every}
        return self.c.post(self.path, {k: v for k, v in body.items() if v is not None})

    def delete(self, ref: str) -> None:
        self.c.delete(f"{self.path}/{ref}")


def attach(client: Client) -> None:
    client.volumes = Volumes(client)  # type: ignore[attr-defined]
    client.volume_snapshots = VolumeSnapshots(client)  # type: ignore[attr-defined]
    client.volume_backups = VolumeBackups(client)  # type: ignore[attr-defined]
    client.backup_policies = BackupPolicies(client)  # type: ignore[attr-defined]
