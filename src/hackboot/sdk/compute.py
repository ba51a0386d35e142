"""SDK: key pairs, server groups, instances."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hackboot.sdk.client import Client, Resource

TERMINAL = ("ACTIVE", "SHUTOFF", "ERROR", "DELETED")


class KeyPairs(Resource):
    path = "/v1/keypairs"

    def create(self, name: str, public_key: str | None = None) -> dict[str, Any]:
        """Generate an ed25519 pair (the response carries `private_key` once) or import `public_key`."""
        body: dict[str, Any] = {"name": name}
        if public_key is not None:
            body["public_key"] = public_key
        return self.c.post(self.path, body)

    def delete(self, ref: str) -> None:
        self.c.delete(f"{self.path}/{ref}")


class ServerGroups(Resource):
    path = "/v1/server-groups"

    def create(self, name: str, policy: str = "anti-affinity") -> dict[str, Any]:
        return self.c.post(self.path, {"name": name, "policy": policy})

    def delete(self, ref: str) -> None:
        self.c.delete(f"{self.path}/{ref}")


class Instances(Resource):
    path = "/v1/instances"

    def create(self, name: str, *, flavor: str, image: str, keypair: str | None = None, zone: str | None = None,
               region: str | None = None, user_data: str | None = None, server_group: str | None = None,
               placement: str | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        body = {"name": name, "flavor": flavor, "image": image, "keypair": keypair, "zone": zone, "region": region,
                "user_data": user_data, "server_group": server_group, "placement": placement}
        return self.c.post(self.path, {k: v for k, v in body.items() if v is not None},
                           idempotency_key=idempotency_key)

    def action(self, ref: str, action: str, **params: Any) -> dict[str, Any]:
        return self.c.post(f"{self.path}/{ref}/actions", {"action": action, **params})

    def stop(self, ref: str) -> dict[str, Any]:
        return self.action(ref, "stop")

    def start(self, ref: str) -> dict[str, Any]:
        return self.action(ref, "start")

    def reboot(self, ref: str, hard: bool = False) -> dict[str, Any]:
        return self.action(ref, "reboot", hard=hard)

    def resize(self, ref: str, flavor: str) -> dict[str, Any]:
        return self.action(ref, "resize", flavor=flavor)

    def delete(self, ref: str) -> dict[str, Any]:
        return self.c.delete(f"{self.path}/{ref}")  # type: ignore[no-any-return]

    def console(self, ref: str, tail_bytes: int = 64 * 1024) -> str:
        return str(self.c.get(f"{self.path}/{ref}/console", tail_bytes=tail_bytes)["output"])

    def snapshot(self, ref: str, name: str | None = None) -> dict[str, Any]:
        return self.c.post(f"{self.path}/{ref}/snapshot", {"name": name} if name else {})

    def wait(self, ref: str, statuses: tuple[str, ...] = ("ACTIVE",), *, timeout: float = 300.0,
             on_poll: Callable[[dict[str, Any]], None] | None = None, settle: bool = True) -> dict[str, Any]:
        """Poll until the instance reaches one of `statuses` (with no task running, when `settle`).

        Raises TimeoutError; returns early on ERROR/DELETED too, so callers can check `status`.
        """
        def done(inst: dict[str, Any]) -> bool:
            if inst["status"] in ("ERROR", "DELETED") and inst["status"] not in statuses:
                return inst.get("task_state") is None
            return inst["status"] in statuses and (not settle or inst.get("task_state") is None)

        return self.c.wait_for(lambda: self.get(ref), done, timeout=timeout, on_poll=on_poll)

    def wait_deleted(self, ref: str, timeout: float = 120.0) -> dict[str, Any]:
        return self.wait(ref, ("DELETED",), timeout=timeout)


def attach(client: Client) -> None:
    client.keypairs = KeyPairs(client)  # type: ignore[attr-defined]
    client.server_groups = ServerGroups(client)  # type: ignore[attr-defined]
    client.instances = Instances(client)  # type: ignore[attr-defined]
