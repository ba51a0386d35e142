"""SDK: volumes (attach, detach, resize, tiers), snapshots, backups, restore, backup policies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hackboot.sdk.client import ApiError, Client, Collection, JSONObject, JSONObjects, Resource, as_object, as_objects

SETTLED = ("available", "in-use", "error", "deleted")


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class Volumes(Collection):
    path = "/v1/volumes"

    def create(self, name: str, size_gb: int | None = None, *, tier: str | None = None, zone: str | None = None,
               encrypted: bool = False, shareable: bool = False, description: str = "",
               snapshot: str | None = None, backup: str | None = None, image: str | None = None,
               idempotency_key: str | None = None) -> JSONObject:
        body = {"name": name, "size_gb": size_gb, "tier": tier, "zone": zone, "encrypted": encrypted,
                "shareable": shareable, "description": description, "snapshot": snapshot, "backup": backup,
                "image": image}
        return as_object(self.c.post(self.path, _drop_none(body), idempotency_key=idempotency_key))

    def get(self, ref: str) -> JSONObject:
        """By id or name."""
        return self._get(ref)

    def update(self, ref: str, *, tier: str | None = None, description: str | None = None) -> JSONObject:
        return as_object(self.c.patch(f"{self.path}/{ref}", _drop_none({"tier": tier, "description": description})))

    def delete(self, ref: str) -> JSONObject:
        return as_object(self.c.delete(f"{self.path}/{ref}"))

    def attach(self, ref: str, instance: str, mode: str | None = None) -> JSONObject:
        body: dict[str, Any] = {"instance_id": instance}
        if mode:
            body["mode"] = mode
        return as_object(self.c.post(f"{self.path}/{ref}/attach", body))

    def detach(self, ref: str, instance: str | None = None, force: bool = False) -> JSONObject:
        body: dict[str, Any] = {"force": force}
        if instance:
            body["instance_id"] = instance
        return as_object(self.c.post(f"{self.path}/{ref}/detach", body))

    def resize(self, ref: str, size_gb: int) -> JSONObject:
        return as_object(self.c.post(f"{self.path}/{ref}/resize", {"size_gb": size_gb}))

    def revert(self, ref: str, snapshot: str) -> JSONObject:
        return as_object(self.c.post(f"{self.path}/{ref}/revert", {"snapshot": snapshot}))

    def tiers(self) -> JSONObjects:
        return as_objects(self.c.get("/v1/volume-tiers"))

    def wait(self, ref: str, statuses: tuple[str, ...] = ("available", "in-use"), *, timeout: float = 300.0,
             on_poll: Callable[[JSONObject], None] | None = None) -> JSONObject:
        """Poll until the volume has no task running and is in one of `statuses` (or error/deleted)."""
        def done(v: JSONObject) -> bool:
            return v.get("task_state") is None and (v["status"] in statuses or v["status"] in ("error", "deleted"))

        return self.c.wait_for(lambda: self.get(ref), done, timeout=timeout, on_poll=on_poll)

    def wait_deleted(self, ref: str, timeout: float = 120.0) -> JSONObject:
        return self.wait(ref, ("deleted",), timeout=timeout)


class VolumeSnapshots(Resource):
    """Snapshots are addressed within their volume: `get(volume, snapshot)`."""

    path = "/v1/volume-snapshots"

    def create(self, volume: str, name: str | None = None) -> JSONObject:
        return as_object(self.c.post(f"/v1/volumes/{volume}/snapshots", {"name": name} if name else {}))

    def list(self, volume: str | None = None, kind: str | None = None) -> JSONObjects:
        """One volume's snapshots, or every snapshot of the project."""
        return self._list({"kind": kind or None}, f"/v1/volumes/{volume}/snapshots" if volume else self.path)

    def get(self, volume: str, snapshot: str) -> JSONObject:
        return as_object(self.c.get(f"/v1/volumes/{volume}/snapshots/{snapshot}"))

    def delete(self, volume: str, snapshot: str) -> JSONObject:
        return as_object(self.c.delete(f"/v1/volumes/{volume}/snapshots/{snapshot}"))

    def wait(self, volume: str, snapshot: str, timeout: float = 120.0) -> JSONObject:
        def fetch() -> JSONObject:
            try:
                return self.get(volume, snapshot)
            except ApiError as exc:
                if exc.status == 404:
                    return {"status": "deleted"}
                raise

        return self.c.wait_for(fetch, lambda s: s["status"] in ("available", "error", "deleted"), timeout=timeout)


class VolumeBackups(Resource):
    path = "/v1/volume-backups"

    def create(self, volume: str, bucket: str | None = None, kind: str = "auto") -> JSONObject:
        """Back up to `bucket`, one of the project's (default: hb-backups-<project id>, made when missing)."""
        return as_object(self.c.post(f"/v1/volumes/{volume}/backups", _drop_none({"bucket": bucket, "kind": kind})))

    def list(self, volume: str | None = None, status: str | None = None) -> JSONObjects:
        return self._list({"volume": volume, "status": status})

    def get(self, backup_id: str) -> JSONObject:
        return self._get(backup_id)

    def delete(self, backup_id: str) -> JSONObject:
        return as_object(self.c.delete(f"{self.path}/{backup_id}"))

    def restore(self, backup_id: str, name: str, *, size_gb: int | None = None, tier: str | None = None,
                zone: str | None = None) -> JSONObject:
        body = {"name": name, "size_gb": size_gb, "tier": tier, "zone": zone}
        return as_object(self.c.post(f"{self.path}/{backup_id}/restore", _drop_none(body)))

    def wait(self, backup_id: str, timeout: float = 600.0,
             on_poll: Callable[[JSONObject], None] | None = None) -> JSONObject:
        return self.c.wait_for(lambda: self.get(backup_id), lambda b: b["status"] in ("available", "error"),
                               timeout=timeout, on_poll=on_poll)


class BackupPolicies(Collection):
    path = "/v1/backup-policies"

    def create(self, name: str, *, every: str = "6h", keep_local: str = "7d", keep_remote: str = "30d",
               bucket: str | None = None, volumes: list[str] | None = None,
               full_every: int | None = None) -> JSONObject:
        body = {"name": name, "every": every, "keep_local": keep_local, "keep_remote": keep_remote,
                "bucket": bucket, "volumes": volumes, "full_every": full_every}
        return as_object(self.c.post(self.path, _drop_none(body)))

    def delete(self, ref: str) -> None:
        self.c.delete(f"{self.path}/{ref}")


def attach(client: Client) -> None:
    client.volumes = Volumes(client)
    client.volume_snapshots = VolumeSnapshots(client)
    client.volume_backups = VolumeBackups(client)
    client.backup_policies = BackupPolicies(client)
