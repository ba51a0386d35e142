"""SDK: key pairs, server groups, instances."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hackboot.sdk.client import Client, Collection, JSONObject, as_object

TERMINAL = ("ACTIVE", "SHUTOFF", "ERROR", "DELETED")


class KeyPairs(Collection):
    path = "/v1/keypairs"

    def create(self, name: str, public_key: str | None = None) -> JSONObject:
        """Generate an ed25519 pair (the response carries `private_key` once) or import `public_key`."""
        body: dict[str, Any] = {"name": name}
        if public_key is not None:
            body["public_key"] = public_key
        return as_object(self.c.post(self.path, body))

    def delete(self, ref: str) -> None:
        self.c.delete(f"{self.path}/{ref}")


class ServerGroups(Collection):
    path = "/v1/server-groups"

    def create(self, name: str, policy: str = "anti-affinity") -> JSONObject:
        return as_object(self.c.post(self.path, {"name": name, "policy": policy}))

    def delete(self, ref: str) -> None:
        self.c.delete(f"{self.path}/{ref}")


class Instances(Collection):
    path = "/v1/instances"

    def create(self, name: str, *, flavor: str, image: str, keypair: str | None = None, zone: str | None = None,
               region: str | None = None, user_data: str | None = None, server_group: str | None = None,
               placement: str | None = None, subnet: str | None = None, security_groups: list[str] | None = None,
               private_ip: str | None = None, idempotency_key: str | None = None) -> JSONObject:
        """Without `subnet`: on the default VPC's subnet of the zone it is placed in (made on first use)."""
        body = {"name": name, "flavor": flavor, "image": image, "keypair": keypair, "zone": zone, "region": region,
                "user_data": user_data, "server_group": server_group, "placement": placement, "subnet": subnet,
                "security_groups": security_groups, "private_ip": private_ip}
        return as_object(self.c.post(self.path, {k: v for k, v in body.items() if v is not None},
                                     idempotency_key=idempotency_key))

    def action(self, ref: str, action: str, **params: Any) -> JSONObject:
        return as_object(self.c.post(f"{self.path}/{ref}/actions", {"action": action, **params}))

    def stop(self, ref: str) -> JSONObject:
        return self.action(ref, "stop")

    def start(self, ref: str) -> JSONObject:
        return self.action(ref, "start")

    def reboot(self, ref: str, hard: bool = False) -> JSONObject:
        return self.action(ref, "reboot", hard=hard)

    def resize(self, ref: str, flavor: str) -> JSONObject:
        return self.action(ref, "resize", flavor=flavor)

    def delete(self, ref: str) -> JSONObject:
        return as_object(self.c.delete(f"{self.path}/{ref}"))

    def interfaces(self, ref: str) -> list[JSONObject]:
        """The instance's network interfaces in device order (0: the primary one)."""
        return [as_object(n) for n in self.c.get(f"{self.path}/{ref}/network-interfaces")]

    def attach_interface(self, ref: str, network_interface: str, device_index: int | None = None) -> JSONObject:
        """Attach a free interface (hot-plugged into a running guest)."""
        body: dict[str, Any] = {"network_interface": network_interface}
        if device_index is not None:
            body["device_index"] = device_index
        return as_object(self.c.post(f"{self.path}/{ref}/network-interfaces", body))

    def detach_interface(self, ref: str, network_interface: str) -> JSONObject:
        return as_object(self.c.delete(f"{self.path}/{ref}/network-interfaces/{network_interface}"))

    def console(self, ref: str, tail_bytes: int = 64 * 1024) -> str:
        return str(self.c.get(f"{self.path}/{ref}/console", tail_bytes=tail_bytes)["output"])

    def snapshot(self, ref: str, name: str | None = None) -> JSONObject:
        return as_object(self.c.post(f"{self.path}/{ref}/snapshot", {"name": name} if name else {}))

    def wait(self, ref: str, statuses: tuple[str, ...] = ("ACTIVE",), *, timeout: float = 300.0,
             on_poll: Callable[[JSONObject], None] | None = None, settle: bool = True) -> JSONObject:
        """Poll until the instance reaches one of `statuses` (with no task running, when `settle`).

        Raises TimeoutError; returns early on ERROR/DELETED too, so callers can check `status`.
        """
        def done(inst: JSONObject) -> bool:
            if inst["status"] in ("ERROR", "DELETED") and inst["status"] not in statuses:
                return inst.get("task_state") is None
            return inst["status"] in statuses and (not settle or inst.get("task_state") is None)

        return self.c.wait_for(lambda: self.get(ref), done, timeout=timeout, on_poll=on_poll)

    def wait_deleted(self, ref: str, timeout: float = 120.0) -> JSONObject:
        return self.wait(ref, ("DELETED",), timeout=timeout)


def attach(client: Client) -> None:
    client.keypairs = KeyPairs(client)
    client.server_groups = ServerGroups(client)
    client.instances = Instances(client)
